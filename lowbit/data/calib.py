"""Calibration windows: ``nsamples`` random windows of ``seqlen`` tokens from a text, seeded."""

from __future__ import annotations

import torch


def calibration_windows(tokenizer, text: str, nsamples: int = 128, seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids; the same seed gives the same windows.

    The text is tokenized once; window starts are drawn uniformly with a
    private generator (the global RNG is left alone).
    """
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < seqlen:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}; "
            f"give more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
