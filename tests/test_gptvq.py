"""Vector-quantized (vq) weights and GPTVQ: the format's layout, exact bits and refusals, its EM against
a plain Lloyd loop, GPTVQ's column loop and codebook update against written-out references, and the
method end to end."""

import copy
import math

import pytest
import torch
import transformers as tf

import lowbit
from lowbit.formats import vector
from lowbit.formats.spec import WeightFormat
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.gptvq import gptvq_quantize, update_codebooks
from lowbit.quantized_weight import QuantizedWeight


def test_vq_format_round_trips_and_older_formats_keep_their_dicts():
    fmt = WeightFormat("vq", 2, 256)
    assert (fmt.vq_dim, fmt.vq_block) == (2, 128 * 2 * 16)  # GPTVQ's 1/8 bit of codebook per weight
    assert WeightFormat.from_dict(fmt.to_dict()) == fmt
    assert fmt.describe() == "vq2 g256 d2 block4096"
    assert set(WeightFormat("lut", 3, -1).to_dict()) == {"kind", "bits", "group_size", "symmetric"}
    assert WeightFormat.from_dict({"kind": "int", "bits": 4, "group_size": 128, "symmetric": False}) == WeightFormat()
    for bad, match in [({"bits": 3, "vq_dim": 4}, "12-bit indices"), ({"vq_dim": 3}, "vq_dim 3"),
                       ({"group_size": 255}, "multiple of vq_dim"), ({"group_size": None}, "group_size -1"),
                       ({"vq_block": 0}, "vq_block")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            WeightFormat("vq", **{"bits": 2, "group_size": 256, **bad})
    with pytest.raises(ValueError, match="belong to vq"):
        WeightFormat("int", 4, 128, vq_dim=2)


@pytest.mark.parametrize(
    "shape,bits,dim,group,block",
    [((12, 100), 2, 2, 48, 200), ((10, 101), 2, 4, -1, 250), ((8, 3, 3, 3), 3, 2, -1, None), ((16, 64), 4, 1, 32, 64)],
)
def test_vq_weights_decode_to_their_codebook_entries_and_count_their_bits(shape, bits, dim, group, block):
    torch.manual_seed(0)
    w = torch.randn(shape)
    fmt = WeightFormat("vq", bits, group, vq_dim=dim, vq_block=block)
    qw = QuantizedWeight.quantize(w, fmt)
    rows, k = qw.matrix_shape
    nvec = math.ceil(k / dim)  # a ragged last vector is zero-padded, never decoded
    g = nvec * dim if group == -1 else group
    ng = math.ceil(nvec * dim / g)
    r = min(rows, max(1, fmt.vq_block // g))
    nbooks = math.ceil(rows / r) * ng
    assert qw.scale.dtype == torch.float16 and tuple(qw.scale.shape) == (nbooks, 2 ** (bits * dim), dim)
    codes = qw.codes()
    assert tuple(codes.shape) == (rows, nvec)
    deq = qw.dequantize().reshape(rows, k)
    for i in range(rows):
        for v in range(nvec):
            entry = qw.scale[(i // r) * ng + v * dim // g, int(codes[i, v])].float()
            cols = range(v * dim, min(k, (v + 1) * dim))
            assert torch.equal(deq[i, list(cols)], entry[: len(cols)])
    assert qw.packed.numel() == math.ceil(rows * nvec * bits * dim / 8)
    assert qw.storage_bits() == qw.packed.numel() * 8 + nbooks * 2 ** (bits * dim) * dim * 16
    back = QuantizedWeight.from_tensors(qw.to_tensors("l"), "l", fmt, shape)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_corrupted_vq_arrays_are_refused():
    torch.manual_seed(0)
    fmt = WeightFormat("vq", 2, -1, vq_dim=2, vq_block=64)
    t = QuantizedWeight.quantize(torch.randn(8, 32), fmt).to_tensors("l")
    for name, bad, match in [("scales", t["l.scales"][:-1], "codebooks were expected"),
                             ("scales", t["l.scales"].reshape(-1, 4, 8), "codebooks were expected"),
                             ("qweight", t["l.qweight"][:-1], "uint8 were expected")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            QuantizedWeight.from_tensors({**t, f"l.{name}": bad}, "l", fmt, (8, 32))
    with pytest.raises(ValueError, match="vector indices"):
        QuantizedWeight.from_codes(torch.zeros(8, 32, dtype=torch.uint8), t["l.scales"], None, fmt, (8, 32))


def plain_weighted_em(x, w, n_entries, iters):
    """One block, written out: the Mahalanobis start (vectors ranked by their distance from the mean
    under the inverse covariance, taken at even steps), then Lloyd with per-dimension weights."""
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / len(x)
    dist = torch.stack([(v - mu) @ torch.linalg.pinv(cov) @ (v - mu) for v in x])
    order = torch.argsort(dist)
    c = torch.stack([x[order[round(i * (len(x) - 1) / (n_entries - 1))]] for i in range(n_entries)])
    for _ in range(iters):
        code = torch.tensor([int(torch.argmin(((v - c) ** 2 * wv).sum(-1))) for v, wv in zip(x, w)])
        for e in range(n_entries):
            sel = code == e
            if sel.any():
                c[e] = torch.where(w[sel].sum(0) > 0, (w[sel] * x[sel]).sum(0) / w[sel].sum(0), c[e])
    return c


@pytest.mark.parametrize("kernel", ["compiled", "pytorch"])
def test_weighted_em_is_lloyds_algorithm_from_the_mahalanobis_start(kernel, monkeypatch):
    """On the compiled E-step and on PyTorch's fallback (no compiler, or a GPU tensor)."""
    from lowbit.kernels import vq as vq_kernel

    if kernel == "pytorch":
        monkeypatch.setattr(vector, "_nearest_kernel", None)
    else:
        assert vector._nearest_kernel is vq_kernel.nearest
    torch.manual_seed(0)
    x = torch.randn(2, 60, 2) * torch.tensor([1.0, 3.0])
    w = torch.rand(2, 60, 2) + 0.1
    got = vector.weighted_kmeans(x, w, 8, iters=10)
    for b in range(2):
        torch.testing.assert_close(got[b], plain_weighted_em(x[b], w[b], 8, 10), rtol=1e-4, atol=1e-5)


def _layer(out=64, k=128, n=1024, seed=0):
    """A layer whose inputs are correlated and unevenly scaled, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    X = torch.randn(n, k, generator=g) @ mix * (torch.rand(k, generator=g) * 3 + 0.2)
    return torch.randn(out, k, generator=g), X, 2 / n * X.T @ X


def plain_gptvq(W, H, fmt, damp, kmeans_iters):
    """GPTVQ's loop without lazy batches, one row and one codeword at a time: a group's codebooks from
    its current weights (EM weighted by 1 / [H^-1]_jj), then per ``d`` columns each row's nearest
    codeword under that weighting and the error ``(w - q) / U_jj`` spread along the Cholesky rows ``U_j``."""
    W = W.clone()
    rows, k = W.shape
    d, E = fmt.vq_dim, 2 ** (fmt.bits * fmt.vq_dim)
    g, ng, r, nrb = vector.layout(rows, k, fmt)
    Hd = H + damp * torch.diag(H).mean() * torch.eye(k)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    imp = 1 / torch.diag(U) ** 2
    books = torch.zeros(nrb * ng, E, d)
    codes = torch.zeros(rows, k // d, dtype=torch.long)
    for col in range(0, k, d):
        j = col // g
        if col % g == 0:
            cols = range(col, min(k, col + g))
            for b in range(nrb):
                block = [i for i in range(b * r, min(rows, (b + 1) * r))]
                x = torch.stack([W[i, c : c + d] for i in block for c in cols[::d]])
                wt = torch.stack([imp[c : c + d] for i in block for c in cols[::d]])
                books[b * ng + j] = vector.weighted_kmeans(x[None], wt[None], E, kmeans_iters)[0].half().float()
        for i in range(rows):
            book = books[(i // r) * ng + j]
            dists = [float((imp[col : col + d] * (W[i, col : col + d] - c) ** 2).sum()) for c in book]
            codes[i, col // d] = e = dists.index(min(dists))
            err = (W[i, col : col + d] - book[e]) / torch.diag(U)[col : col + d]
            for t in range(d):
                W[i, col + d :] -= err[t] * U[col + t, col + d :]
    return codes, books


def test_gptvq_loop_matches_a_plain_written_out_reference():
    W, _, H = _layer(out=6, k=24, n=200)
    fmt = WeightFormat("vq", 2, 8, vq_dim=2, vq_block=16)  # 3 groups of 8 columns, 2 rows per codebook
    codes, books = gptvq_quantize(W, H, fmt, damp=0.01, blocksize=6, kmeans_iters=5, update_iters=0)
    ref_codes, ref_books = plain_gptvq(W, H, fmt, 0.01, 5)
    assert torch.equal(codes.long(), ref_codes)
    torch.testing.assert_close(books.float(), ref_books, rtol=5e-3, atol=5e-3)  # float32 sums in another order


def test_codebook_update_is_the_least_squares_fit_of_the_codewords():
    W, _, H = _layer(out=4, k=8, n=100)
    fmt = WeightFormat("vq", 2, 4, vq_dim=2, vq_block=8)  # 2 groups, 2 rows per codebook: 4 codebooks
    books = torch.randn(4, 16, 2).half().float()
    codes = torch.randint(0, 16, (4, 4))
    got = update_codebooks(W, H, codes, books, fmt, iters=200)
    # written out: the decoded weight is M_i theta for one-hot rows M_i; solve sum M_i^T H M_i theta = sum M_i^T H W_i
    P = books.numel()
    A, b = torch.zeros(P, P, dtype=torch.float64), torch.zeros(P, dtype=torch.float64)
    ids = vector.book_ids(4, 8, fmt)
    for i in range(4):
        M = torch.zeros(8, P, dtype=torch.float64)
        for c in range(8):
            M[c, (int(ids[i, c // 2]) * 16 + int(codes[i, c // 2])) * 2 + c % 2] = 1
        A += M.T @ H.double() @ M
        b += M.T @ H.double() @ W[i].double()
    used = A.diagonal() > 0  # codewords no weight uses keep their place
    theta = books.reshape(-1).double().clone()
    theta[used] = torch.linalg.solve(A[used][:, used], b[used])
    torch.testing.assert_close(got.reshape(-1).double(), theta.half().double(), rtol=2e-3, atol=2e-3)


def test_gptvq_beats_gptq_at_the_same_bits_on_correlated_inputs():
    W, X, H = _layer()
    fmt = WeightFormat("vq", 2, 256, vq_dim=2)
    codes, books = gptvq_quantize(W, H, fmt, kmeans_iters=30)
    vq = QuantizedWeight.from_codes(codes, books, None, fmt, tuple(W.shape))
    c, s, z = gptq_quantize(W, H, 2, 128, False, act_order=True, mse=True)
    gq = QuantizedWeight.from_codes(c, s, z, WeightFormat("int", 2, 128))
    assert vq.bits_per_weight <= gq.bits_per_weight  # 2.125 against 2.14

    def out_err(q):
        return float(((X @ (W - q.dequantize()).T) ** 2).mean())

    assert out_err(vq) < 0.85 * out_err(gq), (out_err(vq), out_err(gq))


def test_gptvq_runs_on_a_llama_an_encoder_and_grouped_convs_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    llama, ids = tf.LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (4, 16))
    q = lowbit.quantize(llama, "gptvq", calib=ids, bits=2, kmeans_iters=20, progress=False)
    assert {r.method for r in q.lowbit_coverage.quantized} == {"gptvq"}
    assert q.model.layers[0].mlp.down_proj.fmt.describe() == "vq2 g256 d2 block4096"
    lowbit.save(q, tmp_path / "llama")
    assert torch.equal(lowbit.load(tmp_path / "llama")(input_ids=ids).logits, q(input_ids=ids).logits)

    bert_cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    qb = lowbit.quantize(tf.BertModel(bert_cfg).eval(), "gptvq", calib=ids, bits=3, vq_dim=1, progress=False)
    assert {r.method for r in qb.lowbit_coverage.quantized} == {"gptvq"}
    lowbit.save(qb, tmp_path / "bert")
    assert torch.equal(lowbit.load(tmp_path / "bert")(input_ids=ids).last_hidden_state,
                       qb(input_ids=ids).last_hidden_state)  # fmt: skip

    def cnn():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)).eval()  # fmt: skip

    torch.manual_seed(0)
    skeleton = cnn()
    x = torch.randn(8, 3, 8, 8)
    qc = lowbit.quantize(copy.deepcopy(skeleton), "gptvq", calib=x, bits=2, kmeans_iters=20, progress=False)
    assert {r.method for r in qc.lowbit_coverage.quantized} == {"gptvq"}
    grouped = qc[2].quantized_weight  # 4 groups of 4 rows: no codebook spans two groups (27 columns each)
    assert tuple(grouped.scale.shape) == (4, 16, 2) and grouped.shape == (16, 4, 3, 3)
    lowbit.save(qc, tmp_path / "cnn")
    assert torch.equal(lowbit.load(tmp_path / "cnn", model=skeleton)(x), qc(x))


def test_gptvq_refuses_other_formats_and_bad_knobs():
    with pytest.raises(ValueError, match="format vq"):
        lowbit.methods.make_method("gptvq", format="int")
    with pytest.raises(ValueError, match="blocksize"):
        lowbit.methods.make_method("gptvq", blocksize=127)
    with pytest.raises(ValueError, match="indices"):
        lowbit.methods.make_method("gptvq", bits=4, vq_dim=4)


@pytest.mark.slow
def test_gptvq_beats_rtn_at_2_bits_on_stories260k_and_reloads_exactly(stories, tinystories_halves, tmp_path):
    from lowbit.data import calibration_windows
    from lowbit.eval import perplexity

    model, tok = stories
    calib = calibration_windows(tok, tinystories_halves[0], nsamples=16, seqlen=256, seed=0)
    text = tinystories_halves[1][:100_000]
    rtn = lowbit.quantize(copy.deepcopy(model), "rtn", bits=2, group_size=-1, progress=False)
    q = lowbit.quantize(model, "gptvq", calib=calib, bits=2, kmeans_iters=50, progress=False)
    assert q.lowbit_coverage.block_counts() == (35, 35)
    assert q.lowbit_coverage.mean_bits_per_weight() < rtn.lowbit_coverage.mean_bits_per_weight()
    ppl_rtn = perplexity(rtn, tok, text, progress=False)["ppl"]
    ppl_q = perplexity(q, tok, text, progress=False)["ppl"]
    assert ppl_q < 0.2 * ppl_rtn, (ppl_q, ppl_rtn)
    lowbit.save(q, tmp_path / "q")
    ids = calib[0].reshape(1, -1)[:, :64]
    assert torch.equal(lowbit.load(tmp_path / "q")(input_ids=ids).logits, q(input_ids=ids).logits)


@pytest.mark.parametrize("d", vector.DIMS)
def test_kmeans_assignment_kernel_is_the_direct_sum_on_every_instruction_set(d):
    """The compiled E-step (``kernels.vq.nearest``) against PyTorch's direct form of the weighted distance:
    the same indices on every path this CPU has, ties to the lowest index, and ``weighted_kmeans`` itself
    unchanged by it."""
    from lowbit.kernels import vq as vq_kernel

    if vq_kernel.assign_extension() is None:
        pytest.skip("lowbit's C++ kernels cannot be built here")
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, 517, d, generator=g)
    w = torch.rand(3, 517, d, generator=g)
    w[1, :40] = 0  # padding vectors: every entry scores 0, so entry 0 wins
    books = torch.randn(3, 37, d, generator=g)
    books[:, 20] = books[:, 5]  # a duplicated entry: the lower index wins
    x[2, :10] = books[2, 5]
    want = ((x[:, :, None] - books[:, None]) ** 2 * w[:, :, None]).sum(-1).argmin(-1)
    assert bool((want[2, :10] == 5).all()) and bool((want[1, :40] == 0).all())
    got = {isa: vq_kernel.nearest(x, books, w, isa) for isa in vq_kernel.assign_extension().available_isas()}
    for isa, code in got.items():
        assert torch.equal(code, want), isa
    assert torch.equal(vector.assign(x, books, w), want)
