"""The Triton source of lowbit's W4A16 kernel; imported only where triton is (see ``triton_w4a16``).

This module imports triton at its top, so nothing imports it at ``import lowbit``
time: ``triton_w4a16`` loads it on first use, after checking that triton exists.
"""

import triton
import triton.language as tl


@triton.jit
def _load_words(qw_ptr, s_ptr, z_ptr, kw, kw_ok, offs_n, n_ok, N, GROUP, HAS_ZERO: tl.constexpr):
    """Words ``[BLOCK_KW, BLOCK_N]`` of rows ``kw``, with each word's scale (fp32) and zero point (int32)."""
    tile_ok = kw_ok[:, None] & n_ok[None, :]
    words = tl.load(qw_ptr + kw[:, None] * N + offs_n[None, :], mask=tile_ok, other=0)
    # the 8 codes of a word share one group (GROUP % 8 == 0, or a single group)
    g_off = ((kw * 8) // GROUP)[:, None] * N + offs_n[None, :]
    scale = tl.load(s_ptr + g_off, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_ZERO:
        zero = tl.load(z_ptr + g_off, mask=tile_ok, other=0).to(tl.int32)
    else:
        zero = tl.zeros_like(words) + 8  # symmetric 4-bit: 1 << (bits - 1)
    return words, scale, zero


@triton.jit
def _plane(words, scale, zero, i: tl.constexpr):
    """Code ``8 * kw + i`` of every word, dequantized exactly as lowbit does: ``(q - z) * s`` in fp32."""
    return (((words >> (4 * i)) & 0xF) - zero).to(tl.float32) * scale


@triton.jit
def w4a16_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, row stride stride_xm
    qw_ptr,  # int32 [KW, N]: word (j, n) holds codes 8j..8j+7 of output row n, code 8j+i in bits 4i..4i+3
    s_ptr,  # [G, N] fp16 / fp32 scales
    z_ptr,  # uint8 [G, N] zero points (unused without HAS_ZERO)
    b_ptr,  # [N] bias (unused without HAS_BIAS)
    y_ptr,  # [M, N]: x's dtype, or a zeroed fp32 buffer when ATOMIC
    M,
    N,
    K,
    KW,  # ceil(K / 8): 32-bit words per output row
    GROUP,  # codes per scale group along K; a multiple of 8 unless there is one group
    stride_xm,
    stride_ym,
    kw_per_split,  # words of K each split (program_id 2) reduces; a multiple of BLOCK_KW
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,  # words per K step: BLOCK_KW * 8 codes
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,  # split-K: partial sums are added into y atomically
):
    pid_m = tl.program_id(0)  # fastest: the programs that share a weight tile run together (L2 reuse)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm  # [BLOCK_M] row starts; int64: M * K may pass 2**31
    kw_lo = pid_k * kw_per_split  # every split runs the same span, the last one masked past KW
    kw = kw_lo + tl.arange(0, BLOCK_KW)  # [BLOCK_KW] the words of this K step
    if BLOCK_M == 1:
        # GEMV: fp32 products into a 2-D accumulator, reduced once at the end (one row needs no
        # tensor cores, and every product stays exact to fp32 rounding)
        acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
        words, scale, zero = _load_words(qw_ptr, s_ptr, z_ptr, kw, kw < KW, offs_n, n_ok, N, GROUP, HAS_ZERO)
        for step in range(0, kw_per_split, BLOCK_KW):
            # the next step's words are requested before this step's arithmetic so that their
            # memory latency hides behind it (triton pipelines only the loads that feed tl.dot)
            nxt = kw + BLOCK_KW
            nxt_ok = (nxt < KW) & (nxt < kw_lo + kw_per_split)
            n_words, n_scale, n_zero = _load_words(qw_ptr, s_ptr, z_ptr, nxt, nxt_ok, offs_n, n_ok, N, GROUP, HAS_ZERO)
            for i in tl.static_range(8):
                k = kw * 8 + i
                xi = tl.load(x_rows + k, mask=(kw < KW) & (k < K), other=0.0).to(tl.float32)  # [BLOCK_KW]
                acc += _plane(words, scale, zero, i) * xi[:, None]
            words, scale, zero = n_words, n_scale, n_zero
            kw = nxt
        out = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_N]
    else:
        # a whole [8 * BLOCK_KW, BLOCK_N] tile per K step: the step's words, scales and zeros are
        # loaded once ([BLOCK_KW, BLOCK_N]), their 8 nibbles spread along a middle axis and the
        # tile reshaped so that row 8j + i is code i of word j; dequantized as (q - z) * s, then one
        # tl.dot against x's contiguous tile, the loads pipelined over num_stages
        offs_k = tl.arange(0, 8 * BLOCK_KW)
        shifts = 4 * tl.arange(0, 8)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, kw_per_split, BLOCK_KW):
            kw_ok = kw < KW
            words, scale, zero = _load_words(qw_ptr, s_ptr, z_ptr, kw, kw_ok, offs_n, n_ok, N, GROUP, HAS_ZERO)
            codes = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_KW, 8, BLOCK_N]
            w3 = (codes - zero[:, None, :]).to(tl.float32) * scale[:, None, :]
            k = kw_lo * 8 + step * 8 + offs_k
            xt = tl.load(x_rows[:, None] + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
            # fp16/bf16 x: the tile rounded to x's dtype for the tensor cores; fp32 x: ieee fp32 products
            w = tl.reshape(w3, (8 * BLOCK_KW, BLOCK_N)).to(xt.dtype)
            acc = tl.dot(xt, w, acc, input_precision="ieee")
            kw += BLOCK_KW
        out = acc
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = tl.where(pid_k == 0, bias, 0.0)  # added by one split only
        out += bias[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, out, mask=y_ok, sem="relaxed")
    else:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=y_ok)
