"""Which tensor of a model's output the final-output criteria compare.

Final-output modes (falor's ``nsr_final_threshold``, the sensitivity pass of
budget mode) compare one tensor: the model's output when it is a tensor, or the
tensor ``output_fn`` selects from a tuple, dict or Hugging Face ``ModelOutput``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

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
    example = {tuple: "out[0]", list: "out[0]", dict: "out['logits']"}.get(type(output), "out.logits")
    raise TypeError(f"the model returns a {type(output).__name__}, not a tensor; pass output_fn= to select the "
                    f"tensor to compare, e.g. output_fn=lambda out: {example}")
