"""Which tensor of a model's output fxdeco compares: the one place that picks it.

Two rules, for two situations:

* :func:`select_output` (final-output criteria: falor's ``nsr_final_threshold``,
  the sensitivity pass of budget mode): the model's output when it is a
  tensor, or the tensor ``output_fn`` selects from a tuple, dict or Hugging Face
  ``ModelOutput``. It refuses to guess, because a wrong guess silently changes
  which ranks pass.
* :func:`default_logits` (distillation in ``finetune``, graphs handed over by
  ``torch.compile``): the logits by convention (the tensor, ``.logits`` or
  ``["logits"]``, else the first floating-point tensor), where a user asked
  for the default and a Dynamo graph returns a flat tuple of outputs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

OutputFn = Callable[[Any], torch.Tensor]


def select_output(output: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The floating-point tensor to compare: ``output`` itself or ``output_fn(output)``.

    Example:
        >>> select_output(torch.ones(2))
        tensor([1., 1.])
        >>> select_output({"logits": torch.ones(1, 3)}, lambda out: out["logits"]).shape
        torch.Size([1, 3])
        >>> select_output((torch.ones(1), torch.ones(1)))
        Traceback (most recent call last):
        ...
        TypeError: the model returns a tuple, not a tensor; pass output_fn= to select the tensor to compare, \
e.g. output_fn=lambda out: out[0]
    """
    if output_fn is not None:
        try:
            selected = output_fn(output)
        except Exception as exc:
            raise TypeError(f"output_fn failed on the model's output ({type(output).__name__}): "
                            f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(selected, torch.Tensor) or not selected.is_floating_point():
            raise TypeError(f"output_fn must return a floating-point tensor, got {type(selected).__name__}")
        return selected
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output
    if isinstance(output, torch.Tensor):
        raise TypeError(f"the model returns a {output.dtype} tensor; final-output criteria compare floating-point "
                        "outputs (logits, embeddings): pass output_fn= selecting one, or compare before an argmax")
    # torch.fx's immutable containers (a traced graph's outputs) are named as the plain ones they stand for
    kind = next((t for t in (dict, list, tuple) if isinstance(output, t)), type(output))
    example = {tuple: "out[0]", list: "out[0]", dict: "out['logits']"}.get(kind, "out.logits")
    raise TypeError(f"the model returns a {kind.__name__}, not a tensor; pass output_fn= to select the "
                    f"tensor to compare, e.g. output_fn=lambda out: {example}")


def default_logits(output: Any) -> torch.Tensor:
    """The logits of a model output by convention: the tensor itself, ``.logits``, ``["logits"]``, or else the
    first floating-point tensor in it.

    Example:
        >>> default_logits((torch.ones(2), torch.zeros(1))), default_logits({"logits": torch.zeros(1)})
        (tensor([1., 1.]), tensor([0.]))
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; pass output_fn=... "
                    "that returns the logits tensor")
