"""Quantized scales: the scales of a grouped weight stored as low-bit codes themselves.

QLoRA (Dettmers et al. 2023, section 3, "Double Quantization") stores the absmax constant of
each 64-weight NF4 block in 8 bits, blocks of 256 constants sharing one second-level
constant: 32/64 = 0.5 bits per weight become 8/64 + 32/(64*256) = 0.127. SpQR (Dettmers et al.
2023, section 4.1) quantizes the statistics of its 16-weight groups to 3 bits in groups of 16,
which is what makes groups that small affordable.

lowbit's second level is one layout for both: the first-level scales ``[out, ngroups]`` are read
column group by column group (``scale.T``, ``[ngroups, out]``), and each run of ``group`` scales
along the output channels (SpQR's grouping) keeps ``bits``-bit codes of the scales' base-2
logarithms, on a grid from the run's smallest to its largest with an fp16 base and step: a
scale is ``fp16(2^(base + code * step))``, computed in float64 so that every CPU decodes the same
number. The grid is logarithmic because a scale's error matters relative to the scale: a
linear 3-bit grid over scales that span 10x leaves the smallest ones tens of percent off
(on stories260K at w3 g16, GPTQ's perplexity with 3-bit scales is 5.17 on a linear grid and
4.97 on this one, 4.89 with fp16 scales). At 8 bits (QLoRA's setting) either grid is within
0.3% of every scale. Each run is encoded on its own, so encoding one column group's scales
gives the same codes as encoding the whole matrix (GPTQ rounds a group's scales when it
reaches the group). A decoded scale is an fp16 number at least fp16's smallest normal
(6.1e-5), like every plain lowbit scale, so the kernels and exporters read it unchanged.

A method that wants quantized scales decodes them before it computes codes against them
(``round_scales``): the codes must be computed against the scales that will be stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import packing
from lowbit.formats.integer import num_groups, qmax, to_groups

TINY = torch.finfo(torch.float16).tiny  # the smallest decoded scale: fp16's smallest normal number


@dataclass
class QuantizedScales:
    """Second-level codes of a ``[rows, n]`` matrix of positive scales (the first-level scales,
    transposed), ``group`` scales per run along each row: ``packed`` codes, ``base`` and ``step``
    ``[rows, nruns]``."""

    packed: torch.Tensor
    base: torch.Tensor
    step: torch.Tensor
    bits: int
    group: int
    shape: tuple[int, int]

    @classmethod
    def encode(cls, scales: torch.Tensor, bits: int, group: int) -> QuantizedScales:
        """The codes, base and step of ``scales: [rows, n]`` (every value positive and finite)."""
        s = scales.detach().float()
        if s.dim() != 2 or not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise ValueError("quantized scales need a 2-D matrix of positive, finite scales")
        rows, n = s.shape
        runs = to_groups(s, group)  # [rows, nruns, g]; a ragged run is padded with zeros
        pad = torch.zeros(runs.shape[1] * runs.shape[2], dtype=torch.bool)
        pad[n:] = True
        pad = pad.reshape(1, runs.shape[1], runs.shape[2])
        logs = torch.log2(runs.double().clamp(min=TINY))
        lo = logs.masked_fill(pad, float("inf")).amin(-1)
        hi = logs.masked_fill(pad, -float("inf")).amax(-1)
        if bool((hi > 15.999).any()):
            raise ValueError("a scale above 65504 cannot be stored quantized (fp16 scales)")
        base = lo.half().double()
        step = ((hi - base) / qmax(bits)).clamp(min=0)
        step = torch.where(step > 0, step, torch.ones_like(step)).half().double()  # equal scales: any step
        step = step.clamp(min=2.0**-24)  # fp16's smallest subnormal: a step never rounds to 0
        codes = torch.round((logs - base[..., None]) / step[..., None]).clamp(0, qmax(bits))
        codes = codes.reshape(rows, -1)[:, :n].to(torch.uint8)
        return cls(packing.pack(codes, bits), base.half(), step.half(), bits, group, (rows, n))

    @classmethod
    def stack(cls, parts: list[QuantizedScales]) -> QuantizedScales:
        """The rows of several encodings (one per column group, in order) as one."""
        first = parts[0]
        codes = torch.cat([p.codes() for p in parts])
        return cls(packing.pack(codes, first.bits), torch.cat([p.base for p in parts]),
                   torch.cat([p.step for p in parts]), first.bits, first.group, tuple(codes.shape))  # fmt: skip

    def codes(self) -> torch.Tensor:
        return packing.unpack(self.packed, self.bits, self.shape[0] * self.shape[1]).reshape(self.shape)

    def decode(self) -> torch.Tensor:
        """The scales ``[rows, n]``: fp16 numbers, held in fp32."""
        rows, n = self.shape
        runs = to_groups(self.codes().double(), self.group)
        logs = self.base.double()[..., None] + runs * self.step.double()[..., None]
        s = torch.exp2(logs).reshape(rows, -1)[:, :n]
        return s.clamp(min=TINY).half().float()

    def storage_bits(self) -> int:
        return (self.packed.numel() + (self.base.numel() * self.base.element_size()
                                       + self.step.numel() * self.step.element_size())) * 8  # fmt: skip

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.scales_q": self.packed, f"{prefix}.scales_base": self.base,
                f"{prefix}.scales_step": self.step}  # fmt: skip

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str, bits: int, group: int, shape: tuple[int, int]):
        keys = [f"{prefix}.scales_{k}" for k in ("q", "base", "step")]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"{prefix} stores quantized scales but {', '.join(missing)} is missing")
        packed, base, step = (tensors[k] for k in keys)
        rows, n = shape
        runs = (rows, num_groups(n, group))
        if (packed.dtype != torch.uint8 or packed.numel() != packing.packed_nbytes(rows * n, bits)
                or tuple(base.shape) != runs or tuple(step.shape) != runs
                or base.dtype != torch.float16 or step.dtype != torch.float16):  # fmt: skip
            raise ValueError(f"{prefix}: quantized scales ({packed.numel()} code bytes, base {list(base.shape)}, "
                             f"step {list(step.shape)}) do not describe {rows}x{n} scales at {bits} bits "
                             f"in runs of {group}")  # fmt: skip
        return cls(packed, base, step, bits, group, (rows, n))


def round_scales(scale: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, QuantizedScales]:
    """``scale: [out, ngroups]`` through the second level: the decoded scales (what codes must be
    computed against) and their encoding."""
    q = QuantizedScales.encode(scale.t(), bits, group)
    return q.decode().t().contiguous(), q
