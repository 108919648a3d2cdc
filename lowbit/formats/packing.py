"""Bit packing of sub-byte codes into a flat ``uint8`` stream.

Codes are packed in row-major order, little-endian within each byte (the first
code takes the lowest bits). 2-, 4- and 8-bit codes fill whole bytes; 3-bit codes
go eight at a time into three bytes. Any other width uses the generic bit stream.
The stream is padded with zero codes to a whole unit; ``unpack`` takes the
number of codes to return.
"""

from __future__ import annotations

import math

import torch


def packed_nbytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def _pad(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    rem = (-flat.numel()) % multiple
    return torch.nn.functional.pad(flat, (0, rem)) if rem else flat


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into ``uint8 [ceil(n * bits / 8)]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes; bits must be 1 to 8")
    flat = codes.reshape(-1).to(torch.int32)
    n = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        units = _pad(flat, per).reshape(-1, per)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (units << shifts).sum(-1).to(torch.uint8)
    if bits == 3:
        units = _pad(flat, 8).reshape(-1, 8)
        word = (units << (torch.arange(8, dtype=torch.int32) * 3)).sum(-1)  # 24 bits
        out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(3)], -1)
        return out.reshape(-1).to(torch.uint8)[: packed_nbytes(n, bits)]
    bitplanes = (flat.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int32)) & 1
    stream = _pad(bitplanes.reshape(-1), 8).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` codes as ``uint8``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot unpack {bits}-bit codes; bits must be 1 to 8")
    if packed.numel() < packed_nbytes(count, bits):
        raise ValueError(
            f"packed buffer holds {packed.numel()} bytes, {packed_nbytes(count, bits)} "
            f"are needed for {count} {bits}-bit codes"
        )
    mask = (1 << bits) - 1
    if bits == 8:
        return packed.reshape(-1)[:count].to(torch.uint8)
    if 8 % bits == 0:  # stay in uint8: this runs on every reference-path forward
        data = packed.reshape(-1)
        planes = [(data >> (i * bits)) & mask for i in range(8 // bits)]
        return torch.stack(planes, -1).reshape(-1)[:count]
    data = packed.reshape(-1).to(torch.int32)
    if bits == 3:
        triples = _pad(data, 3).reshape(-1, 3)
        word = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        out = ((word.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int32) * 3)) & mask).reshape(-1)
    else:
        stream = ((data.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)
        planes = stream[: count * bits].reshape(count, bits)
        out = (planes << torch.arange(bits, dtype=torch.int32)).sum(-1)
    return out[:count].to(torch.uint8)
