"""Huffman coding of integer codes (Deep Compression's last stage, Han et al. 2016).

``code_lengths`` builds an optimal prefix code from a histogram (Huffman's merge of the two
least frequent subtrees); the code is made canonical (``canonical_codes``: codes of one length
are consecutive integers, shorter codes first), so a decoder needs only each symbol's length.
``encode`` writes the codes MSB first into a ``uint8`` stream; ``decode`` reads it back.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

TABLE_BITS = 20  # decode through a 2^L lookup table up to this longest code; bit by bit beyond it


def code_lengths(counts: list[int]) -> list[int]:
    """Each symbol's Huffman code length (0 for a symbol that never occurs; a lone symbol gets 1 bit)."""
    used = [(int(c), i) for i, c in enumerate(counts) if c > 0]
    lengths = [0] * len(counts)
    if len(used) == 1:
        lengths[used[0][1]] = 1
        return lengths
    heap = [(c, i, [i]) for c, i in used]  # (weight, tie-break, the symbols of the subtree)
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        for s in s1 + s2:  # every symbol of the merged subtree moves one level deeper
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    return lengths


def canonical_codes(lengths: list[int]) -> list[int]:
    """The canonical code of each symbol (an integer read MSB first over its length; 0 where unused)."""
    codes = [0] * len(lengths)
    code, prev = 0, 0
    for length, sym in sorted((n, s) for s, n in enumerate(lengths) if n > 0):
        code <<= length - prev
        codes[sym], prev = code, length
        code += 1
    return codes


def encode(symbols: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, int]:
    """``symbols`` (any shape, values indexing ``lengths``) as a ``uint8`` stream and its length in bits."""
    sym = symbols.reshape(-1).long().numpy()
    lens = np.asarray(lengths, dtype=np.int64)
    if sym.size and (lens[sym] == 0).any():
        raise ValueError("a symbol to encode has no Huffman code: build the lengths from these symbols' histogram")
    codes = np.asarray(canonical_codes(lengths), dtype=np.int64)
    top = max(int(lens.max()), 1)
    chunks = []
    for start in range(0, sym.size, 1 << 20):  # bounded memory: [chunk, top] bits at a time
        s = sym[start : start + (1 << 20)]
        shift = np.arange(top - 1, -1, -1)
        bits = (codes[s][:, None] << (top - lens[s])[:, None] >> shift) & 1  # MSB-first, left-aligned
        chunks.append(bits[np.arange(top)[None] < lens[s][:, None]].astype(np.uint8))
    stream = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    return torch.from_numpy(np.packbits(stream)), int(stream.size)


def decode(stream: torch.Tensor, nbits: int, count: int, lengths: list[int]) -> torch.Tensor:
    """The first ``count`` symbols of an ``encode`` stream (``nbits`` long), as ``long``."""
    bits = np.unpackbits(stream.numpy())[:nbits].astype(np.int64)
    top = max(lengths)
    out = np.zeros(count, dtype=np.int64)
    if top > TABLE_BITS:
        return torch.from_numpy(_decode_serial(bits, count, lengths, out))
    sym_of = np.zeros(1 << top, dtype=np.int64)
    len_of = np.zeros(1 << top, dtype=np.int64)
    for s, (code, n) in enumerate(zip(canonical_codes(lengths), lengths)):
        if n:  # every top-bit window that starts with this code
            lo = code << (top - n)
            sym_of[lo : lo + (1 << (top - n))], len_of[lo : lo + (1 << (top - n))] = s, n
    padded = np.concatenate([bits, np.zeros(top, np.int64)])
    window = np.zeros(nbits, dtype=np.int64)
    for j in range(top):  # the top bits starting at every position, as an integer
        window = (window << 1) | padded[j : j + nbits]
    syms, steps = sym_of[window].tolist(), len_of[window].tolist()
    pos = 0
    for i in range(count):
        if pos >= nbits:
            raise ValueError(f"the Huffman stream ends after {i} of {count} symbols")
        out[i] = syms[pos]
        pos += steps[pos]
    return torch.from_numpy(out)


def _decode_serial(bits: np.ndarray, count: int, lengths: list[int], out: np.ndarray) -> np.ndarray:
    table = {(n, c): s for s, (c, n) in enumerate(zip(canonical_codes(lengths), lengths)) if n}
    pos = 0
    for i in range(count):
        code, n = 0, 0
        while (n, code) not in table:
            if pos >= bits.size or n > max(lengths):
                raise ValueError(f"the Huffman stream is corrupted at symbol {i} of {count}")
            code, n, pos = (code << 1) | int(bits[pos]), n + 1, pos + 1
        out[i] = table[(n, code)]
    return out


def coded_bits(counts: list[int]) -> int:
    """The length in bits of the Huffman-coded stream of symbols with histogram ``counts``."""
    return sum(int(c) * n for c, n in zip(counts, code_lengths(counts)))
