"""Perplexity with the GPTQ paper's protocol.

Tokenize the whole text once, cut it into non-overlapping chunks of ``seqlen``
tokens (dropping the incomplete tail), and report ``exp`` of the mean of the
per-chunk next-token losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def token_chunks(tokenizer, text: str, seqlen: int) -> torch.Tensor:
    """``[nchunks, seqlen]`` token ids of ``text``."""
    if seqlen < 2:
        raise ValueError(f"seqlen {seqlen} is too short; use at least 2 tokens")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(
            f"the text has {ids.numel()} tokens, fewer than one chunk of seqlen={seqlen}; "
            f"give more text or a smaller --seqlen"
        )
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def chunk_losses(model: nn.Module, chunks: torch.Tensor, batch_size: int = 8, progress: bool = True, device=None):
    """Mean next-token loss of each chunk: ``[nchunks]``."""
    device = device if device is not None else next(model.parameters()).device
    losses = []
    for i in tqdm(range(0, len(chunks), batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = chunks[i : i + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        losses.append(loss.reshape(batch.shape[0], -1).mean(-1).cpu())
    return torch.cat(losses)


def perplexity(
    model: nn.Module, tokenizer, text: str, seqlen: int = 512, batch_size: int = 8, progress: bool = True
) -> dict:
    chunks = token_chunks(tokenizer, text, seqlen)
    losses = chunk_losses(model, chunks, batch_size, progress)
    return {"ppl": math.exp(losses.mean().item()), "tokens": chunks.numel(), "chunks": len(chunks)}


def streamed_perplexity(path, tokenizer, text: str, seqlen: int = 512, batch_size: int = 8, progress: bool = True,
                        spill_dir=None, kernel: str = "auto") -> dict:  # fmt: skip
    """``perplexity`` of a checkpoint (or safetensors model) larger than memory, block by block: the
    embedding runs on every chunk, then each block is read, run on every chunk's hidden states and
    freed, then the final norm and head give the losses. The same chunks, batches and kernels as
    ``perplexity``, so the same number. ``spill_dir``: the hidden states between blocks in files."""
    from lowbit.engine.capture import capture_inputs
    from lowbit.io.onload import StreamedModel

    streamed = StreamedModel(path, kernel)
    chunks = token_chunks(tokenizer, text, seqlen)
    batches = list(chunks.split(batch_size))
    model = streamed.model
    first = model.get_submodule(streamed.blocks[0])
    inputs = capture_inputs(model, first, batches, torch.device("cpu"))
    outputs = streamed.run_blocks(inputs, progress, spill_dir)
    with streamed.replay(outputs) as replayed:
        losses = chunk_losses(replayed, chunks, batch_size, progress, device=torch.device("cpu"))
    return {"ppl": math.exp(losses.mean().item()), "tokens": chunks.numel(), "chunks": len(chunks)}
