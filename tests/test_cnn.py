"""CNN quantization: fake-quant modules against plain formulas, BatchNorm folding, the
generic walker, reconstruction, the CNN checkpoint and CLI, and ResNet-20 on CIFAR-10."""

import copy
import json
import pathlib

import pytest
import torch
from torch import nn

from lowbit.engine.cnn import quantize_cnn
from lowbit.methods import bias_correction
from lowbit.methods.adaround import ReconConfig, beta_at
from lowbit.models.cnn import fold_batchnorm, plan_cnn
from lowbit.models.resnet_cifar import ResNetCifar
from lowbit.nn.fakequant import ActQuantizer, QuantLayer, inverse_rectified_sigmoid, rectified_sigmoid


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))


def small_resnet(seed=0) -> ResNetCifar:
    torch.manual_seed(seed)
    model = ResNetCifar(8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def images(n=64, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- the core steps against plain formulas --------------------------------------------------------


def test_nearest_rounding_is_plain_per_channel_asymmetric_rtn():
    conv = nn.Conv2d(4, 6, 3)
    q = QuantLayer(conv, 4, search=False)
    w = conv.weight.detach().reshape(6, -1)
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    ref = (torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 15) - z[:, None]) * s[:, None]
    torch.testing.assert_close(q.quantized_weight().reshape(6, -1), ref)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(q(x), nn.functional.conv2d(x, ref.reshape(conv.weight.shape), conv.bias))


def test_adaround_soft_rounding_starts_at_the_float_weight_and_hardens_to_floor_or_ceil():
    h = torch.rand(1000) * 0.98 + 0.01
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-5, rtol=0)
    lin = nn.Linear(32, 8)
    q = QuantLayer(lin, 3, search=False)
    nearest = q.codes().clone()
    q.start_adaround()
    # soft weights equal the float weights wherever they are inside the clipping range
    inside = (q.weight / q.scale + q.zero >= 0) & (q.weight / q.scale + q.zero <= q.qmax)
    torch.testing.assert_close(q.quantized_weight()[inside], q.weight[inside], atol=1e-5, rtol=0)
    # the regulariser vanishes only when every h is 0 or 1
    assert float(q.round_regularizer(2.0).detach()) > 0
    with torch.no_grad():
        q.alpha.copy_(torch.where(q.alpha > 0, 10.0, -10.0))
    assert float(q.round_regularizer(2.0)) == 0
    q.harden()
    base = torch.floor(q.weight / q.scale)
    codes = q.codes()
    assert torch.all((codes - q.zero == base) | (codes - q.zero == base + 1) | (codes == 0) | (codes == q.qmax))
    assert torch.equal(codes, nearest)  # the init was each weight's fraction: hardening gives nearest


def test_beta_anneals_after_the_warmup():
    cfg = ReconConfig(iters=100, warmup=0.2)
    assert beta_at(0, cfg) is None and beta_at(19, cfg) is None
    assert beta_at(20, cfg) == pytest.approx(20.0) and beta_at(100, cfg) == pytest.approx(2.0)
    assert 2.0 < beta_at(60, cfg) < 20.0


def test_activation_quantizer_is_unsigned_after_a_relu_and_drops_to_float():
    q = ActQuantizer(4, observer="minmax")
    x = torch.relu(torch.randn(8, 16, 5, 5))
    q.observe()
    q(x)
    q.finish_observing()
    assert not q.signed and float(q.zero) == 0
    s = float(x.max()) / 15
    torch.testing.assert_close(float(q.scale), s, rtol=1e-6, atol=0)
    torch.testing.assert_close(q(x), torch.clamp(torch.round(x / s), 0, 15) * s)
    q.drop_prob = 1.0
    q.train()
    assert torch.equal(q(x), x)  # QDrop keeps every element in float at p=1 while training
    q.eval()
    assert not torch.equal(q(x), x)
    signed = ActQuantizer(8, observer="minmax")
    signed.observe()
    signed(torch.randn(100))
    signed.finish_observing()
    assert signed.signed and 0 < float(signed.zero) < 255


def test_learned_activation_scale_gets_a_gradient():
    q = ActQuantizer(4, observer="minmax")
    q.observe()
    q(torch.rand(1000))
    q.finish_observing()
    scale = q.learn_scale()
    q(torch.rand(4, 1000) * 2).pow(2).sum().backward()
    assert scale.grad is not None and float(scale.grad.abs()) > 0
    q.freeze_scale()
    assert not isinstance(q.scale, nn.Parameter)


def test_batchnorm_folds_exactly_and_bad_pairs_fail():
    model = small_resnet()
    x = images(4)
    ref = model(x)
    folded = copy.deepcopy(model)
    pairs = fold_batchnorm(folded, x)
    assert ("conv1", "bn1") in pairs and ("layer1.0.conv2", "layer1.0.bn2") in pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="changed the model's output"):  # a norm that does not follow the conv
        fold_batchnorm(copy.deepcopy(model), x, pairs=[("layer1.0.conv1", "layer1.0.bn2")])


def test_bias_correction_moves_the_bias_by_the_mean_shift():
    lin = nn.Linear(4, 3)
    before = lin.bias.detach().clone()
    delta = bias_correction.correct(lin, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.0, 4.0]))
    torch.testing.assert_close(lin.bias.detach(), before + torch.tensor([0.5, 0.0, -1.0]))
    assert delta == pytest.approx(1.0)
    y = torch.randn(5, 3, 4, 4) + torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(bias_correction.channel_mean(y), y.mean((0, 2, 3)))


def test_bias_correction_removes_each_layers_own_mean_weight_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 3)).eval()  # fmt: skip
    x = images(64)
    kw = dict(bits=2, act_bits=None, first_last_bits=None)
    rtn = quantize_cnn(model, x, "rtn", **kw).model
    q = quantize_cnn(model, x, "bias_correction", **kw).model
    inputs = {}
    hooks = [q.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0]))
             for n in ("0", "2", "4")]  # fmt: skip
    with torch.no_grad():
        q(x)
        for h in hooks:
            h.remove()
        moved = 0.0
        for name, inp in inputs.items():
            layer, before = q.get_submodule(name), rtn.get_submodule(name).bias
            shift = (layer.bias - before).reshape(1, -1, 1, 1)
            moved = max(moved, float(shift.abs().max()))
            quantized = bias_correction.channel_mean(layer(inp))
            layer.quantize_weight = False
            wanted = bias_correction.channel_mean(layer(inp) - shift)  # float weights, the bias before
            layer.quantize_weight = True
            torch.testing.assert_close(quantized, wanted, atol=1e-4, rtol=1e-4)
    assert moved > 1e-3  # 2-bit weights do shift the means: the check above is not vacuous


# ---- engine ---------------------------------------------------------------------------------------


def test_resnet_plan_quantizes_after_every_relu_and_reconstructs_block_by_block():
    model = small_resnet()
    x = images(2)
    fold_batchnorm(model, x)
    plan = plan_cnn(model, x)
    assert plan.adapter == "resnet_cifar" and plan.layers[0] == "conv1" and plan.layers[-1] == "linear"
    assert len(plan.layers) == 8 and not plan.skipped
    assert "layer1.0.relu2" in plan.act_sites and len(plan.act_sites) == 1 + 2 * 3
    assert [u.name for u in plan.units] == ["stem", "layer1.0", "layer2.0", "layer3.0", "head"]


def test_generic_walker_quantizes_any_sequential_and_reports_coverage():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 15 * 15, 10), nn.Embedding(5, 3)).eval()  # fmt: skip
    model[1].running_var.uniform_(0.5, 2)
    x = images(64)
    ref = model[:7](x)
    result = quantize_cnn(model[:7], x, "rtn", bits=8, act_bits=8)
    assert result.plan.adapter == "generic" and result.plan.bn_pairs == [("0", "1")]
    cov = result.coverage
    assert [r.name for r in cov.quantized] == ["0", "3", "6"]
    assert all(r.act.startswith("a8") for r in cov.quantized)
    out = result.model(x)
    cos = nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert cos > 0.99
    # an embedding is weighted but not a CNN layer: it is reported, not silently skipped
    full = quantize_cnn(_EmbedderNet(), x, "rtn", bits=8, act_bits=None)
    assert [r.name for r in full.coverage.skipped] == ["table"]
    assert "no CNN quantizer" in full.coverage.skipped[0].reason


class _EmbedderNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.table = nn.Embedding(5, 3)

    def forward(self, x):
        return self.conv(x)


def test_adaround_fits_the_layer_outputs_better_than_nearest_rounding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = images(128)
    ref = model(x)
    cfg = ReconConfig(iters=300, batch_size=32, lr=1e-2)
    errs = {}
    for method in ("rtn", "adaround"):
        q = quantize_cnn(model, x, method, bits=3, act_bits=None, first_last_bits=None, recon=cfg).model
        errs[method] = float((q(x) - ref).pow(2).mean())
    assert errs["adaround"] < 0.75 * errs["rtn"]


def test_bad_input_fails_clearly():
    model = small_resnet()
    with pytest.raises(ValueError, match="unknown CNN method"):
        quantize_cnn(model, images(4), "gptq")
    with pytest.raises(ValueError, match="finite"):
        quantize_cnn(model, images(4) * float("nan"), "rtn")
    with pytest.raises(ValueError, match="activation bits must be 2-8"):
        quantize_cnn(model, images(4), "rtn", act_bits=9)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.linear.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_cnn(bad, images(4), "rtn")


def test_cnn_checkpoint_reloads_identically(tmp_path):
    from lowbit.io.cnn_checkpoint import load_cnn, save_cnn

    model = small_resnet()
    x = images(64)
    q = quantize_cnn(model, x, "adaround", bits=4, act_bits=4, recon=ReconConfig(iters=20)).model
    save_cnn(q, tmp_path / "q")
    again = load_cnn(tmp_path / "q")
    assert torch.equal(again(x), q(x))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["layers"]["conv1"]["bits"] == 8 and cfg["layers"]["layer1.0.conv1"]["bits"] == 4


def test_cli_quantizes_a_resnet_checkpoint_and_evaluates_it(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.models.resnet_cifar import save_resnet_cifar

    save_resnet_cifar(small_resnet(), tmp_path / "fp")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for cls in ("airplane", "cat"):
            d = tmp_path / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                px = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i}.jpg")
    runner = CliRunner()
    r = runner.invoke(app, ["quantize", str(tmp_path / "fp"), "--method", "qdrop", "--bits", "4", "--act-bits", "4",
                            "--calib-images", str(tmp_path / "imgs" / "train"), "--nsamples", "8", "--iters", "5",
                            "--out", str(tmp_path / "q"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["layers_quantized"] == 8 and summary["layers_skipped"] == 0
    for target in ("fp", "q"):
        r = runner.invoke(app, ["eval", str(tmp_path / target), "--cifar10", str(tmp_path / "imgs" / "test"), "--json"])
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout)
        assert 0 <= result["top1"] <= 100 and result["images"] == 12
    r = runner.invoke(app, ["info", str(tmp_path / "q"), "--json"])
    info = json.loads(r.stdout)
    assert info["quant_method"] == "lowbit-cnn" and info["recipe"] == "qdrop" and len(info["layers_quantized"]) == 8
    assert 4 < info["bits_per_weight"] < 5
    r = runner.invoke(app, ["quantize", str(tmp_path / "fp"), "--method", "gptq", "--calib-images",
                            str(tmp_path / "imgs" / "train"), "--out", str(tmp_path / "q2")])  # fmt: skip
    assert r.exit_code == 2 and "not a CNN method" in r.output


# ---- real model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet20_data():
    pytest.importorskip("PIL.Image", reason="pip install pillow to read CIFAR-10 JPEGs")
    from lowbit.assets import asset
    from lowbit.data.cifar10 import default_cifar10, load_cifar10
    from lowbit.models.resnet_cifar import NORMALIZE, load_resnet_cifar

    ckpt = asset("resnet_cifar", "resnet20-12fca82f.th")
    train, test = default_cifar10("train"), default_cifar10("test")
    for p in (ckpt, train, test):
        if not pathlib.Path(p).exists():
            pytest.skip(f"{p} is absent; set LOWBIT_ASSETS to the shared assets folder")
    model = load_resnet_cifar(ckpt)
    calib, _ = load_cifar10(train, split="train", limit=256, normalize=NORMALIZE)
    x, y = load_cifar10(test, split="test", limit=1000, seed=1, normalize=NORMALIZE)
    return model, calib, x, y


@pytest.mark.slow
def test_resnet20_w8a8_rtn_keeps_fp32_accuracy(resnet20_data):
    from lowbit.eval.classification import top1

    model, calib, x, y = resnet20_data
    fp = top1(model, x, y)
    q = quantize_cnn(model, calib, "rtn", bits=8, act_bits=8)
    assert len(q.coverage.quantized) == 20 and not q.coverage.skipped
    assert abs(top1(q.model, x, y) - fp) <= 1.0  # 1,000 images: one image is 0.1 points


@pytest.mark.slow
def test_resnet20_w4a4_qdrop_beats_rtn(resnet20_data):
    from lowbit.eval.classification import top1

    model, calib, x, y = resnet20_data
    rtn = top1(quantize_cnn(model, calib, "rtn", bits=4, act_bits=4).model, x, y)
    from lowbit.methods.qdrop import QDropConfig

    qdrop = top1(quantize_cnn(model, calib, "qdrop", bits=4, act_bits=4, recon=QDropConfig(iters=150)).model, x, y)
    assert qdrop > rtn + 1.5


def test_int8_execution_refuses_what_it_cannot_run_exactly():
    from lowbit.nn.int8conv import Int8ResNet

    model = small_resnet()
    q = quantize_cnn(model, images(32), "rtn", bits=4, act_bits=8).model
    with pytest.raises(ValueError, match="int4 weights"):
        Int8ResNet(q, images(8))


@pytest.mark.slow
def test_resnet20_runs_in_real_int8_as_simulated(resnet20_data):
    """PyTorch's quantized convs against the fake-quant model given the same extra 8-bit
    points (each block's second conv output, which the integer kernels must requantize)."""
    from lowbit.eval.classification import top1
    from lowbit.models.adapters import set_module
    from lowbit.nn.fakequant import ActSite
    from lowbit.nn.int8conv import Int8ResNet

    model, calib, x, y = resnet20_data
    q = quantize_cnn(model, calib, "rtn", bits=8, act_bits=8).model
    int8 = Int8ResNet(q, calib)
    sim = copy.deepcopy(q)
    names = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    for name, block in zip(names, int8.blocks):
        set_module(sim, f"{name}.conv2", ActSite(sim.get_submodule(f"{name}.conv2"), block.out2))
    with torch.no_grad():
        a, b = sim(x[:300]), int8(x[:300])
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.98
    assert nn.functional.cosine_similarity(a, b).mean() > 0.999
    assert abs(top1(int8, x, y) - top1(q, x, y)) <= 1.5
