"""Knowledge-distillation fine-tuning of a decomposed model from its original, and the loop pieces it shares.

``finetune(student, teacher, loader, steps=...)`` works after any method
(``fxdeco.transform``, ``fxdeco.methods.lockd.finalize``): the student learns the
teacher's softened output distribution (KL divergence on logits), optionally
plus a task loss on labels. For models whose output is not a distribution
(sentence embeddings, features, regression), ``distill_loss="cosine"`` or
``"mse"`` compares the outputs directly, and any
``(student_out, teacher_out) -> scalar`` callable is accepted.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from fxdeco.batches import call_on_batch, check_input_fn, model_inputs, no_batches
from fxdeco.checks import check_positive, check_steps
from fxdeco.modes import modes_restored
from fxdeco.outputs import default_logits
from fxdeco.progress import Progress

log = logging.getLogger(__name__)


class TrainingBatches:
    """The batches a training loop draws from ``loader``, never re-iterating a one-shot iterator.

    A re-iterable loader (a list, a ``DataLoader``) is read epoch after epoch
    (a shuffling ``DataLoader`` reshuffles). A one-shot iterator (a generator,
    ``itertools.islice(...)``, ``iter(loader)``) is read once: when it runs out,
    :meth:`next` returns ``None`` and the loop stops early instead of failing
    after the work. The last ``keep`` batches drawn are kept (``recent``) so a
    loop can evaluate on data it has seen without asking the loader for more.

    Example:
        >>> stream = TrainingBatches([1, 2], keep=2)
        >>> [stream.next() for _ in range(5)], stream.recent
        ([1, 2, 1, 2, 1], [2, 1])
        >>> once = TrainingBatches(iter([1, 2]))
        >>> [once.next() for _ in range(3)], once.exhausted
        ([1, 2, None], True)
        >>> TrainingBatches([]).next()
        Traceback (most recent call last):
        ...
        fxdeco.errors.CalibrationError: the training loader yielded no batches
    """

    def __init__(self, loader: Iterable[Any], *, keep: int = 0, what: str = "training loader") -> None:
        try:
            self._iterator = iter(loader)
        except TypeError as exc:
            raise TypeError(f"the {what} must be an iterable of batches (a list, a DataLoader, a generator), "
                            f"got {type(loader).__name__}") from exc
        self.loader = loader
        # iter(x) is x only for iterators: those can be read once, and reading them again yields nothing
        self.one_shot = self._iterator is loader
        self.what = what
        self.drawn = 0
        self.exhausted = False
        self._keep = max(keep, 0)
        self._recent: collections.deque[Any] = collections.deque(maxlen=max(self._keep, 1))

    @property
    def recent(self) -> list[Any]:
        """The last ``keep`` batches drawn, oldest first."""
        return list(self._recent) if self._keep else []

    def next(self) -> Any | None:
        """The next batch, or ``None`` once a one-shot loader (or a loader whose new epoch is empty) runs out."""
        if self.exhausted:
            return None
        for attempt in range(2):
            try:
                batch = next(self._iterator)
                break
            except StopIteration:
                if self.drawn == 0:
                    raise no_batches(self.loader, self.what) from None
                if self.one_shot or attempt == 1:
                    self.exhausted = True
                    return None
                self._iterator = iter(self.loader)  # the next epoch
        self.drawn += 1
        if self._keep:
            self._recent.append(batch)
        return batch

    def ran_out_message(self, steps: int) -> str:
        """Why a loop that wanted ``steps`` batches stopped after :attr:`drawn`."""
        kind = "a one-shot iterator" if self.one_shot else "a loader whose next epoch was empty"
        return (f"the {self.what} ({kind}) ran out after {self.drawn} batches of the {steps} steps asked for; "
                f"training stopped there and its history is kept. Pass a re-iterable loader (a list, a DataLoader) "
                f"or steps <= {self.drawn}")


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside ``obj`` (tensors, tuples, lists, dicts) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def use_amp(amp: bool, device: torch.device) -> bool:
    """Whether to autocast: only when asked and on CUDA (elsewhere a warning, and full precision)."""
    if amp and device.type != "cuda":
        log.warning("amp=True is for CUDA models; this one is on %s, so training runs in full precision", device)
        return False
    return bool(amp)


def autocast_context(enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when ``enabled`` (see :func:`use_amp`), else a no-op."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over every row of logits.

    Example:
        >>> z = torch.randn(4, 10)
        >>> float(kd_loss(z, z))
        0.0
    """
    classes = student_logits.shape[-1]
    s = nn.functional.log_softmax(student_logits.float().reshape(-1, classes) / temperature, -1)
    t = nn.functional.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, -1)
    return nn.functional.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


def cosine_distance(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(student, teacher)`` over the rows (last dimension = features), e.g. for embeddings.

    Example:
        >>> e = torch.randn(4, 8)
        >>> float(cosine_distance(e, 2 * e)) < 1e-6, round(float(cosine_distance(e, -e)), 4)
        (True, 2.0)
    """
    return (1 - nn.functional.cosine_similarity(student_out.float(), teacher_out.float(), dim=-1)).mean()


def mse_distance(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the outputs (``F.mse_loss`` in float32).

    Example:
        >>> float(mse_distance(torch.zeros(2, 3), torch.ones(2, 3)))
        1.0
    """
    return nn.functional.mse_loss(student_out.float(), teacher_out.float())


DISTILL_LOSSES = ("kl", "cosine", "mse")


def distill_function(distill_loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     temperature: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ``(student_out, teacher_out) -> loss`` function that ``finetune``'s ``distill_loss`` names.

    Example:
        >>> distill_function("cosine", 1.0) is cosine_distance
        True
        >>> distill_function("l1", 1.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: distill_loss must be one of ('kl', 'cosine', 'mse') or a callable ... got 'l1'
    """
    if callable(distill_loss):
        return distill_loss
    if distill_loss == "kl":
        return lambda s, t: kd_loss(s, t, temperature)
    if distill_loss == "cosine":
        return cosine_distance
    if distill_loss == "mse":
        return mse_distance
    raise ValueError(f"distill_loss must be one of {DISTILL_LOSSES} or a callable (student_out, teacher_out) -> "
                     f"scalar tensor, got {distill_loss!r}")


@dataclasses.dataclass
class FinetuneHistory:
    """Per-step losses of :func:`finetune` (``kd``: the distillation term, any ``distill_loss``) and its wall time."""

    loss: list[float] = dataclasses.field(default_factory=list)
    kd: list[float] = dataclasses.field(default_factory=list)
    task: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    loader: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-4,
    temperature: float = 1.0,
    distill_loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "kl",
    task_loss: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    task_weight: float = 1.0,
    input_fn: Callable[[Any], Any] | None = None,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    train_mode: bool = False,
    amp: bool = False,
    show_progress: bool | None = None,
    log_every: int = 100,
) -> FinetuneHistory:
    """Fine-tune ``student`` in place for ``steps`` batches to imitate ``teacher`` (knowledge distillation).

    Loss = ``kd_loss(student, teacher, temperature)`` + ``task_weight *
    task_loss(student_logits, batch)`` when ``task_loss`` is given (e.g.
    ``lambda logits, b: F.cross_entropy(logits, b[1])``). ``distill_loss``
    replaces the KL term: ``"cosine"`` (mean ``1 - cos`` along the last
    dimension, for embeddings), ``"mse"``, or a callable ``(student_out,
    teacher_out) -> scalar``; ``temperature`` only applies to ``"kl"``.
    ``input_fn`` turns a batch into model inputs (``lambda b: b[0]`` for
    ``(x, y)``), ``output_fn`` picks the logits (or embeddings) from a model
    output (default: the tensor itself, ``.logits``, or the first element). Adam with learning rate ``lr`` on the
    student's parameters that require gradients; the teacher runs in eval mode
    without gradients. The student trains in eval mode by default: in a short
    fine-tune, BatchNorm running statistics re-estimated from a few batches cost
    more accuracy than they recover; ``train_mode=True`` (BatchNorm statistics
    follow the new layers, dropout on) suits long fine-tunes. The student may
    be wrapped in DistributedDataParallel. Each module's train/eval mode is
    restored at the end. A re-iterable loader is read as often as needed; a
    one-shot iterator (a generator) is read once, and when it runs out before
    ``steps`` fine-tuning stops there with a warning, keeping its history.

    Example:
        >>> import torch
        >>> from fxdeco.train.finetune import finetune
        >>> teacher = torch.nn.Linear(8, 4)
        >>> student = torch.nn.Linear(8, 4)
        >>> data = [torch.randn(32, 8) for _ in range(4)]
        >>> history = finetune(student, teacher, data, steps=50, lr=1e-2)
        >>> history.loss[-1] < history.loss[0]
        True
    """
    check_steps(steps)
    check_positive("lr", lr)
    check_positive("temperature", temperature)
    check_input_fn(input_fn)
    if task_weight < 0:
        raise ValueError(f"task_weight must be >= 0, got {task_weight!r}")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no parameter that requires gradients; nothing to fine-tune")
    distill = distill_function(distill_loss, temperature)
    get_logits = output_fn or default_logits
    device = model_device(student)
    amp = use_amp(amp, device)
    optimizer = torch.optim.Adam(params, lr=lr)
    history = FinetuneHistory()
    batches = TrainingBatches(loader, what="fine-tuning loader")
    bar = Progress("KD fine-tuning", steps, show_progress)
    start = time.perf_counter()
    with modes_restored(student, teacher), contextlib.closing(bar):
        student.train(train_mode)
        teacher.eval()
        for step in range(steps):
            batch = batches.next()
            if batch is None:
                warnings.warn(batches.ran_out_message(steps), UserWarning, stacklevel=2)
                break
            batch = to_device(batch, device)
            args, kwargs = model_inputs(batch, input_fn, step)
            with torch.no_grad(), autocast_context(amp):
                teacher_logits = get_logits(call_on_batch(teacher, args, kwargs, step))
            with autocast_context(amp):
                student_logits = get_logits(student(*args, **kwargs))
            kd = distill(student_logits, teacher_logits)
            task = task_loss(student_logits, batch) if task_loss is not None else torch.zeros((), device=device)
            loss = kd + task_weight * task
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss became {float(loss)} at step {step}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.loss.append(float(loss.detach()))
            history.kd.append(float(kd.detach()))
            history.task.append(float(task.detach()))
            bar.update(loss=history.loss[-1], kd=history.kd[-1])
            if log_every and (step + 1) % log_every == 0:
                log.info("finetune step %d/%d: loss %.4g (kd %.4g, task %.4g)", step + 1, steps, history.loss[-1],
                         history.kd[-1], history.task[-1])
    history.seconds = time.perf_counter() - start
    return history
