"""Fidelity to the unquantized model: next-token KL divergence and embedding cosine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def kl_divergence(reference: nn.Module, quantized: nn.Module, chunks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean over tokens of ``KL(p_reference || p_quantized)`` of next-token distributions."""
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch_size):
        batch = chunks[i : i + batch_size]
        logp = F.log_softmax(reference(input_ids=batch).logits.float(), -1)
        logq = F.log_softmax(quantized(input_ids=batch).logits.float(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        total += kl.sum().item()
        count += kl.numel()
    return total / count


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states over real tokens (the sentence-transformers pooling)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out)


def embedding_fidelity(
    reference: nn.Module, quantized: nn.Module, tokenizer, texts: list[str], batch_size: int = 32
) -> dict:
    """Cosine between reference and quantized embeddings: mean, min, and ``1 - mean``."""
    if not texts:
        raise ValueError("embedding fidelity needs at least one sentence")
    a = embed(reference, tokenizer, texts, batch_size)
    b = embed(quantized, tokenizer, texts, batch_size)
    cos = F.cosine_similarity(a, b, dim=-1)
    return {
        "cosine": cos.mean().item(),
        "min_cosine": cos.min().item(),
        "cosine_loss": 1 - cos.mean().item(),
        "sentences": len(texts),
    }
