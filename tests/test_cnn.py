"""CNNs through the one path (``lowbit.quantize``): the quantizers' core steps against plain
formulas, BatchNorm folding, the frozen ResNet's modules, the generic path, bias
correction and reconstruction, the native checkpoint, real int8 execution, and
ResNet-20 on CIFAR-10.

CLI behaviours of the old ``--calib-images`` CNN branch, to re-add once the CLI is rewritten:
- ``quantize <resnet dir> --method qdrop --bits 4 --act-bits 4 --calib-images <jpeg folder>
  --nsamples 8 --iters 5 --out q --json``: exit 0, ``layers_quantized == 8`` and
  ``layers_skipped == 0`` for a ResNet-8;
- ``eval <fp or q dir> --cifar10 <jpeg folder> --json``: ``0 <= top1 <= 100`` and the image count;
- ``info q --json``: the quant method, the recipe (``qdrop``), the 8 quantized layers and
  ``4 < bits_per_weight < 5``;
- a method that cannot run on the model, or a bad image folder, exits 2 with the reason.
"""

import copy
import json
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import lowbit
from lowbit.formats.activation import ActFormat
from lowbit.formats.spec import WeightFormat
from lowbit.methods import bias_correction
from lowbit.methods.adaround import AdaRound
from lowbit.models.cnn import ResNetCifarAdapter, fold_batchnorm
from lowbit.models.resnet_cifar import ResNetCifar
from lowbit.nn.qconv import QConv
from lowbit.nn.qmodule import QModule, QSite
from lowbit.nn.quantizers import ActQuantizer, WeightQuantizer, inverse_rectified_sigmoid, rectified_sigmoid
from lowbit.nn.w8a8 import W8A8Linear
from lowbit.nn.w8a8conv import W8A8Conv

PER_CHANNEL_INT4 = WeightFormat("int", 4, -1, False)
RELU_SITES = ["relu"] + [f"layer{s}.0.relu{r}" for s in (1, 2, 3) for r in (1, 2)]


def small_resnet(seed: int = 0) -> ResNetCifar:
    """A ResNet-8 whose BatchNorms are not the identity, so a wrong fold would show."""
    torch.manual_seed(seed)
    model = ResNetCifar(8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def images(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def conv_stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 4, 3)).eval()  # fmt: skip


def output_error(model: nn.Module, ref: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - ref).pow(2).mean())


# ---- the core steps against plain formulas --------------------------------------------------------


def plain_rtn(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel asymmetric min-max round-to-nearest, the scale stored in fp16."""
    w = w.reshape(w.shape[0], -1)
    top = 2**bits - 1
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    s = ((hi - lo) / top).half().float()
    z = torch.round(-lo / s)
    return (torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, top) - z[:, None]) * s[:, None]


def test_nearest_rounding_is_plain_per_channel_asymmetric_rtn():
    conv = nn.Conv2d(4, 6, 3)
    qm = QModule(conv, PER_CHANNEL_INT4)
    qm.weight_q.init_params(qm.stored_weight(), "rtn")
    ref = plain_rtn(conv.weight.detach(), 4).reshape(conv.weight.shape)
    torch.testing.assert_close(qm.quantized_weight_value(), ref, rtol=0, atol=0)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(qm(x), F.conv2d(x, ref, conv.bias))
    frozen = qm.freeze()  # the packed module computes what the simulation did
    assert isinstance(frozen, QConv) and frozen.quantized_weight.bits_per_weight < 5
    torch.testing.assert_close(frozen(x), qm(x), rtol=0, atol=0)


def test_soft_rounding_starts_at_the_float_weight_and_hardens_to_floor_or_ceil():
    h = torch.rand(1000) * 0.98 + 0.01
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-5, rtol=0)
    w = torch.randn(8, 32)
    q = WeightQuantizer(WeightFormat("int", 3, -1, False))
    q.init_params(w, "adaround")
    nearest = q.codes(w).clone()
    q.start_soft_rounding(w)
    s, z = q.scale, q.zero  # [8, 1]: one grid per output channel
    inside = (w / s + z >= 0) & (w / s + z <= 7)
    # the soft weights equal the float weights wherever they are inside the clipping range
    torch.testing.assert_close(q(w)[inside], w[inside], atol=1e-5, rtol=0)
    assert float(q.round_regularizer(2.0).detach()) > 0  # it vanishes only when every h is 0 or 1
    with torch.no_grad():
        q.alpha.copy_(torch.where(q.alpha > 0, 10.0, -10.0))
    assert float(q.round_regularizer(2.0).detach()) == 0
    q.harden(w)
    assert q.rounding == "learned"
    base, codes = torch.floor(w / s), q.codes(w)
    assert torch.all((codes - z == base) | (codes - z == base + 1) | (codes == 0) | (codes == 7))
    assert torch.equal(codes, nearest)  # the init was each weight's fraction: hardening gives nearest
    torch.testing.assert_close(q(w), (codes - z) * s, rtol=0, atol=0)


def test_beta_anneals_after_the_warmup():
    cfg = AdaRound(iters=100, warmup=0.2)
    assert cfg.beta_at(0) is None and cfg.beta_at(19) is None
    assert cfg.beta_at(20) == pytest.approx(20.0) and cfg.beta_at(100) == pytest.approx(2.0)
    assert 2.0 < cfg.beta_at(60) < 20.0


def observed(q: ActQuantizer, x: torch.Tensor) -> ActQuantizer:
    q.begin_observing()
    q.accumulate(x)
    q.finish_observing()
    return q


def test_activation_quantizer_is_unsigned_after_a_relu_and_drops_to_float():
    x = torch.relu(torch.randn(8, 16, 5, 5))
    q = observed(ActQuantizer(ActFormat(4, "tensor", dynamic=False, symmetric=False), "minmax", channel_dim=1), x)
    assert float(q.zero) == 0
    s = float(x.max()) / 15
    torch.testing.assert_close(float(q.scale), s, rtol=1e-6, atol=0)
    torch.testing.assert_close(q(x), torch.clamp(torch.round(x / s), 0, 15) * s)
    q.drop_prob = 1.0
    q.train()
    assert torch.equal(q(x), x)  # QDrop keeps every element in float at p=1 while training
    q.eval()
    assert not torch.equal(q(x), x)
    signed = observed(ActQuantizer(ActFormat(8, "tensor", dynamic=False, symmetric=False), "minmax"), torch.randn(100))
    assert 0 < float(signed.zero) < 255


def test_step_size_learning_rate_is_capped_relative_to_each_scale():
    # Adam's first step moves a parameter by about its rate: at most act_lr, and at most act_lr_rel of the scale
    x = torch.rand(64, 32)
    moved = {}
    for bits, mult in ((8, 1.0), (4, 1.0), (4, 40.0)):
        q = observed(ActQuantizer(ActFormat(bits, "tensor", dynamic=False, symmetric=False), "minmax"), x * mult)
        s0 = float(q.scale)
        cfg = AdaRound(iters=1, batch_size=64, act_lr=4e-3, act_lr_rel=0.04)
        cfg.reconstruct(q, [], [q], x * mult, (x * mult) * 0.7, learn_rounding=False, learn_acts=True)
        moved[(bits, mult)] = (abs(float(q.scale) - s0), s0)
    for (bits, mult), (step, s0) in moved.items():
        assert 0 < step <= min(4e-3, 0.04 * s0) * 1.001, (bits, mult, step, s0)
    # a small 8-bit scale moves by 4% of itself, a large one (above 0.1) by act_lr only
    step8, s8 = moved[(8, 1.0)]
    assert s8 < 0.01 and step8 == pytest.approx(0.04 * s8, rel=1e-2)
    step_big, s_big = moved[(4, 40.0)]
    assert s_big > 0.1 and step_big == pytest.approx(4e-3, rel=1e-2)


def test_learned_activation_scale_gets_a_gradient():
    q = observed(ActQuantizer(ActFormat(4, "tensor", dynamic=False, symmetric=False), "minmax"), torch.rand(1000))
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


def test_channel_mean_averages_everything_but_the_channels():
    y = torch.randn(5, 3, 4, 4) + torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(bias_correction.channel_mean(y, 1), y.mean((0, 2, 3)))
    t = torch.randn(2, 7, 6)
    torch.testing.assert_close(bias_correction.channel_mean(t, -1), t.mean((0, 1)))


def test_bias_correction_removes_each_layers_own_mean_weight_error():
    """``E[W_q x + b'] = E[W x + b]`` per output channel for every layer, on the inputs the
    quantized (corrected) model gives it: the bias absorbs each layer's own weight error."""
    model = conv_stack()
    x = images(64)
    q = lowbit.quantize(copy.deepcopy(model), "bias_correction", bits=2, group_size=-1, first_last_bits=None,
                        calib=x, progress=False)  # fmt: skip
    inputs = {}
    hooks = [q.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0]))
             for n in ("0", "2", "4")]  # fmt: skip
    with torch.no_grad():
        q(x)
        for h in hooks:
            h.remove()
        moved = 0.0
        for name, inp in inputs.items():
            layer, fp = q.get_submodule(name), model.get_submodule(name)
            assert isinstance(layer, QConv) and layer.fmt.bits == 2
            moved = max(moved, float((layer.bias - fp.bias).abs().max()))
            quantized = bias_correction.channel_mean(layer(inp), 1)
            wanted = bias_correction.channel_mean(fp(inp), 1)  # float weights and bias, same inputs
            torch.testing.assert_close(quantized, wanted, atol=1e-4, rtol=1e-4)
    assert moved > 1e-3  # 2-bit weights do shift the means: the check above is not vacuous
    assert {r.method for r in q.lowbit_coverage.quantized} == {"bias_correction"}


def test_reconstruction_fits_a_layer_better_than_nearest_rounding_on_the_same_grid():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    noise = torch.randn(128, 8, 8, 8)
    # correlated inputs, as real feature maps are: what learned rounding exploits (eq. 13)
    x = torch.relu(F.avg_pool2d(noise, 3, stride=1, padding=1) + 0.5 * noise.mean(1, keepdim=True))
    target = conv(x).detach()
    qm = QModule(conv, WeightFormat("int", 3, -1, False))
    qm.weight_q.init_params(qm.stored_weight(), "adaround", mse=True)
    with torch.no_grad():
        nearest = float((qm(x) - target).pow(2).mean())
    stats = AdaRound(iters=300, batch_size=32).reconstruct(qm, [qm], [], x, target)
    assert set(stats) == {"first_loss", "last_loss"} and stats["last_loss"] > 0
    assert qm.weight_q.rounding == "learned"
    with torch.no_grad():
        learned = float((qm(x) - target).pow(2).mean())
    assert learned < 0.75 * nearest  # measured: 0.56


# ---- the one path on CNNs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qdrop_resnet():
    """ResNet-8 at W4A4 by QDrop (a few steps), with its float original and the calibration images."""
    model = small_resnet()
    x = images(64)
    q = lowbit.quantize(copy.deepcopy(model), "qdrop", bits=4, act_bits=4, iters=20, calib=x, progress=False)
    return model, q, x


def test_resnet_units_and_sites_cover_every_block_and_relu():
    model = small_resnet()
    adapter = ResNetCifarAdapter()
    assert [u.name for u in adapter.units(model)] == ["stem", "layer1.0", "layer2.0", "layer3.0", "head"]
    assert [s.name for s in adapter.sites(model)] == RELU_SITES and all(s.output for s in adapter.sites(model))
    assert adapter.quantizes_input("conv1") and adapter.quantizes_input("linear")
    assert not adapter.quantizes_input("layer1.0.conv1")  # it reads the ReLU site's output


def test_frozen_resnet_holds_packed_convs_relu_sites_and_an_integer_head(qdrop_resnet):
    model, q, x = qdrop_resnet
    # every conv runs on the integer kernels: the first quantizes the image itself at 8 bits, the
    # others take their input on the grid of the ReLU site before them (4 bits)
    assert isinstance(q.conv1, W8A8Conv) and q.conv1.act.bits == 8 and q.conv1.act_scale is not None
    assert q.conv1.fmt.bits == 8
    inner = [n for n, m in q.named_modules() if isinstance(m, W8A8Conv) and n != "conv1"]
    assert len(inner) == 6 and all(q.get_submodule(n).fmt.bits == 4 for n in inner)
    assert all(q.get_submodule(n).act.bits == 4 for n in inner)
    for name in RELU_SITES:
        site = q.get_submodule(name)
        assert isinstance(site, QSite) and isinstance(site.module, nn.ReLU) and len(site.input_q) == 0
        assert site.output_q.fmt.bits == 4 and float(site.output_q.zero) == 0  # unsigned after a ReLU
    assert not any(isinstance(m, (nn.BatchNorm2d, QModule)) for m in q.modules())
    assert isinstance(q.bn1, nn.Identity) and isinstance(q.layer2[0].bn2, nn.Identity)
    assert isinstance(q.linear, W8A8Linear) and q.linear.act.bits == 8 and q.linear.fmt.bits == 8
    cov = q.lowbit_coverage
    assert [r.name for r in cov.quantized] == ["conv1", *inner, "linear"] and not cov.skipped
    assert {r.method for r in cov.quantized} == {"qdrop"}
    assert cov.get("conv1").act.startswith("a8")
    assert cov.get("layer1.0.conv1").format == "int4 per-channel asym learned rounding"
    ref = model(x)
    cos = F.cosine_similarity(q(x), ref).mean()
    assert cos > 0.8  # W4A4 on a random network: close, not equal


def test_native_checkpoint_reloads_identically(qdrop_resnet, tmp_path):
    _, q, x = qdrop_resnet
    lowbit.save(q, tmp_path / "q")
    again = lowbit.load(tmp_path / "q")
    assert type(again) is ResNetCifar and isinstance(again.layer1[0].relu2, QSite)
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    layers = cfg["layers"]  # integer convs: their input grid is stored with them
    assert layers["conv1"]["format"]["bits"] == 8 and layers["layer1.0.conv1"]["format"]["bits"] == 4
    assert layers["conv1"]["act"]["bits"] == 8 and layers["layer1.0.conv1"]["act"]["bits"] == 4
    assert layers["layer1.0.conv1"]["shape"] == [16, 16, 3, 3] and layers["conv1"]["conv"]["padding"] == [1, 1]
    assert isinstance(again.conv1, W8A8Conv) and isinstance(again.layer3[0].conv2, W8A8Conv)
    assert set(RELU_SITES) <= set(cfg["structure"]["sites"])


def test_bits_per_weight_in_the_coverage_are_the_bytes_the_checkpoint_stores(qdrop_resnet, tmp_path):
    _, q, _ = qdrop_resnet
    lowbit.save(q, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    width = {"U8": 1, "F16": 2, "F32": 4}
    total_bits = total_numel = 0
    for r in q.lowbit_coverage.quantized:
        # a layer that quantizes its input is stored inside its site, as `<name>.module`
        name = f"{r.name}.module" if isinstance(q.get_submodule(r.name), QSite) else r.name
        keys = [k for k in (f"{name}.qweight", f"{name}.scales", f"{name}.qzeros") if k in sizes]
        assert f"{name}.qweight" in keys and f"{name}.scales" in keys
        stored = sum(math.prod(sizes[k]) * width[dtypes[k]] * 8 for k in keys)
        assert r.bits_per_weight == pytest.approx(stored / r.numel, rel=1e-12), r.name
        total_bits, total_numel = total_bits + stored, total_numel + r.numel
    assert q.lowbit_coverage.mean_bits_per_weight() == pytest.approx(total_bits / total_numel, rel=1e-12)
    assert 4 < total_bits / total_numel < 5


def test_generic_path_quantizes_any_sequential_and_reports_coverage():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 15 * 15, 10)).eval()  # fmt: skip
    model[1].running_var.uniform_(0.5, 2)
    x = images(32)
    ref = model(x)
    # static per-tensor activations (the CNN papers' scheme) need the images, which also fold the norm
    q = lowbit.quantize(model, "rtn", bits=8, act_bits=8, act_granularity="tensor", calib=x, progress=False)
    assert q.lowbit_family == "generic" and q.lowbit_notes == ["folded 1 BatchNorms into their convs"]
    assert isinstance(q[1], nn.Identity)
    cov = q.lowbit_coverage
    assert [r.name for r in cov.quantized] == ["0", "3", "6"] and not cov.skipped
    assert all(r.act.startswith("a8") for r in cov.quantized)  # every layer quantizes its own input
    assert isinstance(q[0], W8A8Conv) and isinstance(q[3], W8A8Conv) and isinstance(q[6], W8A8Linear)
    with torch.no_grad():
        assert F.cosine_similarity(q(x).flatten(1), ref.flatten(1)).min() > 0.99


class _EmbedderNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.table = nn.Embedding(5, 3)

    def forward(self, x):
        return self.conv(x)


def test_a_weighted_layer_that_is_not_quantized_is_reported_with_its_reason():
    q = lowbit.quantize(_EmbedderNet(), "rtn", bits=8, progress=False)
    assert [r.name for r in q.lowbit_coverage.quantized] == ["conv"]
    assert [r.name for r in q.lowbit_coverage.skipped] == ["table"]
    assert "embedding" in q.lowbit_coverage.skipped[0].reason


def test_adaround_fits_the_layer_outputs_better_than_round_to_nearest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = images(128)
    ref = model(x).detach()
    kw = dict(bits=3, group_size=-1, first_last_bits=None, calib=x, progress=False)
    rtn = lowbit.quantize(copy.deepcopy(model), "rtn", mse=True, **kw)
    ada = lowbit.quantize(copy.deepcopy(model), "adaround", iters=300, batch_size=32, lr=1e-2, **kw)
    assert output_error(ada, ref, x) < 0.75 * output_error(rtn, ref, x)


def test_gptq_runs_on_resnet_convs_through_their_unfolded_patches():
    model = small_resnet()
    q = lowbit.quantize(copy.deepcopy(model), "gptq", bits=4, calib=images(32), progress=False)
    convs = [r for r in q.lowbit_coverage.quantized if r.kind == "Conv2d"]
    assert len(convs) == 7 and {r.method for r in convs} == {"gptq"}  # no fallback to RTN
    assert isinstance(q.layer1[0].conv1, QConv) and q.layer1[0].conv1.fmt.bits == 4


def test_gptq_runs_on_grouped_and_depthwise_convs_one_hessian_per_group():
    from lowbit.methods.gptq import GPTQ
    from lowbit.observers import InputStats

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding="same", groups=4),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1)).eval()  # fmt: skip
    x = images(64)
    ref = model(x).detach()
    kw = dict(bits=3, group_size=-1, first_last_bits=None, calib=x, progress=False)
    gptq = lowbit.quantize(copy.deepcopy(model), "gptq", **kw)
    rtn = lowbit.quantize(copy.deepcopy(model), "rtn", **kw)
    assert {r.name: r.method for r in gptq.lowbit_coverage.quantized} == {n: "gptq" for n in ("0", "2", "4", "6")}
    assert output_error(gptq, ref, x) < 0.8 * output_error(rtn, ref, x)
    awq = lowbit.quantize(copy.deepcopy(model), "awq", **kw)  # its clipping search, group by group too
    assert {r.method for r in awq.lowbit_coverage.quantized} == {"awq"}
    assert output_error(awq, ref, x) < output_error(rtn, ref, x)

    # the per-group Hessians are the diagonal blocks of the full one over all the patches
    conv = QModule(model[2], WeightFormat("int", 3, -1))
    rows = conv.weight_rows(x.new_empty(0).resize_(8, 16, 6, 6).normal_())
    grouped = InputStats.empty(rows.shape[1], hessian=True, groups=4)
    full = InputStats.empty(rows.shape[1], hessian=True)
    grouped.add(rows)
    full.add(rows)
    k = rows.shape[1] // 4
    for j in range(4):
        assert torch.allclose(grouped.H[j], full.H[j * k:(j + 1) * k, j * k:(j + 1) * k], atol=1e-5)
    # and a grouped conv's codes are each group's own GPTQ on its own block
    w = conv.weight.reshape(16, -1)
    qw = GPTQ(bits=3, group_size=-1).quantize_groups(w, grouped)
    one = GPTQ(bits=3, group_size=-1).quantize_linear(w[4:8], grouped.group(1))
    assert torch.equal(qw.codes()[4:8], one.codes()) and torch.equal(qw.scale[4:8], one.scale)


def test_bad_input_fails_clearly():
    model = small_resnet()
    with pytest.raises(ValueError, match="unknown method"):
        lowbit.quantize(copy.deepcopy(model), "nope", calib=images(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        lowbit.quantize(copy.deepcopy(model), "rtn", act_bits=8, calib=images(4) * float("nan"))
    with pytest.raises(ValueError, match="act_bits=9"):
        lowbit.quantize(copy.deepcopy(model), "rtn", act_bits=9, calib=images(4))
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.linear.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        lowbit.quantize(bad, "rtn", calib=images(4))


def simulated(q: nn.Module) -> nn.Module:
    """A copy of the frozen model with every integer conv put back as the simulation computes it:
    the input fake-quantized on the conv's grid, the dequantized weight, a float conv."""
    from lowbit.models.adapters import set_module

    sim = copy.deepcopy(q)
    for name, m in list(sim.named_modules()):
        if isinstance(m, W8A8Conv):
            aq = ActQuantizer(m.act)
            aq.set_static(m.act_scale, m.act_zero)
            conv = QConv(m.conv_quantized_weight, m.bias, **m.conv_config())
            set_module(sim, name, QSite(conv, [aq.eval()]))
    return sim


def test_w8a8_resnet_runs_every_conv_on_the_integer_kernels():
    x = images(64)
    q = lowbit.quantize(small_resnet(), "rtn", bits=8, act_bits=8, calib=x, progress=False)
    convs = {n: m for n, m in q.named_modules() if isinstance(m, (W8A8Conv, QConv))}
    assert len(convs) == 7 and all(isinstance(m, W8A8Conv) for m in convs.values())
    assert isinstance(q.linear, W8A8Linear)
    inner = q.lowbit_coverage.get("layer1.0.conv2").act
    assert "layer1.0.relu1's grid" in inner, inner
    with torch.no_grad():
        a, b = simulated(q)(x), q(x)
        for m in convs.values():
            m.w8a8_kernel = "reference"
            m._cache.clear()
        c = q(x)
    # the integer sums are the simulated ones; float rounding may move a value across a rounding
    # boundary of a later grid, so compare the outputs, not bit patterns
    assert F.cosine_similarity(a, b).min() > 0.9999 and F.cosine_similarity(b, c).min() > 0.9999
    assert (a.argmax(1) == b.argmax(1)).all()


def test_integer_convs_where_the_formats_allow_and_simulated_elsewhere():
    x = images(16)
    w4 = lowbit.quantize(small_resnet(), "rtn", bits=4, act_bits=8, act_observer="minmax", calib=x, progress=False)
    assert isinstance(w4.layer1[0].conv1, W8A8Conv) and w4.layer1[0].conv1.fmt.bits == 4
    weight_only = lowbit.quantize(small_resnet(), "rtn", bits=8, calib=x, progress=False)
    assert not any(isinstance(m, W8A8Conv) for m in weight_only.modules())
    assert isinstance(weight_only.layer1[0].conv1, QConv)
    dyn = lowbit.quantize(small_resnet(), "rtn", bits=8, act_bits=8, act_dynamic=True, calib=x, progress=False)
    assert isinstance(dyn.conv1, QSite) and isinstance(dyn.conv1.module, QConv)  # dynamic: simulated


def test_integer_conv_matches_the_float_conv_on_its_grids():
    from lowbit.formats import activation as A
    from lowbit.quantized_weight import QuantizedWeight

    torch.manual_seed(0)
    cases = [  # act symmetric, padding, stride, dims, dilation, kernel size, weight bits
        (False, 1, 2, 2, 1, 3, 8), (True, "same", 1, 2, 1, 3, 8), (False, 0, 1, 1, 1, 3, 8),
        (False, 2, 1, 2, 2, 3, 8),  # dilated: the box sum of the weight's offset as a conv
        (False, "same", 1, 2, 1, 4, 8),  # an even kernel pads unevenly: padded before the kernel
        (False, 1, 1, 2, 1, 3, 4),  # 4-bit codes fit int8 around their zero point: no offset left
    ]
    for symmetric, padding, stride, dims, dilation, k, bits in cases:
        w = torch.randn(6, 4, *([k] * dims))
        qw = QuantizedWeight.quantize(w, WeightFormat("int", bits, -1, symmetric=False))
        x = torch.randn(2, 4, *([7] * dims))
        x = x if symmetric else x.relu()
        fmt = ActFormat(8, "tensor", dynamic=False, symmetric=symmetric)
        scale, zero = A.params_from_range(x.amin().reshape(1, 1), x.amax().reshape(1, 1), fmt)
        if symmetric:
            scale, zero = x.abs().amax().reshape(1, 1) / 127, torch.zeros(1, 1)
        fn = F.conv2d if dims == 2 else F.conv1d
        xq = A.fake_quantize(x, fmt, scale.reshape(1), zero.reshape(1))
        want = fn(xq.double(), qw.dequantize(torch.float64), None, stride=stride, padding=padding, dilation=dilation)
        for kernel in ("reference", "int_mm", "int8_avx2", "onednn", "auto"):
            try:
                m = W8A8Conv(qw, None, fmt, act_scale=scale, act_zero=zero, stride=stride, padding=padding,
                             dilation=dilation, dims=dims, kernel=kernel)  # fmt: skip
            except ValueError as e:  # a kernel this machine lacks
                assert "not available" in str(e) or "int_mm" in str(e)
                continue
            got = m(x).double()
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (kernel, symmetric, padding, dims, dilation, k)
    with pytest.raises(ValueError, match="groups=2"):
        W8A8Conv(QuantizedWeight.quantize(torch.randn(4, 2, 3, 3), WeightFormat("int", 8, -1)), None,
                 ActFormat(8, "tensor", dynamic=False), act_scale=torch.ones(1), groups=2, dims=2)  # fmt: skip


# ---- real model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet20_data(tmp_path_factory):
    """The shipped ResNet-20, 256 calibration images and 1,000 balanced test images."""
    pytest.importorskip("PIL.Image", reason="pip install pillow to read CIFAR-10 JPEGs")
    from lowbit.assets import asset
    from lowbit.data.cifar10 import default_cifar10, load_cifar10
    from lowbit.models.resnet_cifar import NORMALIZE, load_resnet_cifar

    ckpt = asset("resnet_cifar", "resnet20-12fca82f.th")
    train, test = default_cifar10("train"), default_cifar10("test")
    for p in (ckpt, train, test):
        if not pathlib.Path(p).exists():
            pytest.skip(f"{p} is absent; set LOWBIT_ASSETS to the shared assets folder")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        model = load_resnet_cifar(ckpt)
    calib, _ = load_cifar10(train, split="train", limit=256, normalize=NORMALIZE)
    x, y = load_cifar10(test, split="test", limit=1000, seed=1, normalize=NORMALIZE)
    return model, calib, x, y


@pytest.fixture(scope="module")
def resnet20_w8a8(resnet20_data):
    model, calib, _, _ = resnet20_data
    return lowbit.quantize(copy.deepcopy(model), "rtn", bits=8, act_bits=8, calib=calib, progress=False)


@pytest.mark.slow
def test_resnet20_w8a8_rtn_keeps_fp32_accuracy(resnet20_data, resnet20_w8a8):
    from lowbit.eval.classification import top1

    model, _, x, y = resnet20_data
    assert len(resnet20_w8a8.lowbit_coverage.quantized) == 20 and not resnet20_w8a8.lowbit_coverage.skipped
    assert abs(top1(resnet20_w8a8, x, y) - top1(model, x, y)) <= 1.0  # 1,000 images: one image is 0.1 points


@pytest.mark.slow
def test_resnet20_w4a4_qdrop_beats_rtn(resnet20_data):
    from lowbit.eval.classification import top1

    model, calib, x, y = resnet20_data
    kw = dict(bits=4, act_bits=4, calib=calib, progress=False)
    rtn = top1(lowbit.quantize(copy.deepcopy(model), "rtn", mse=True, **kw), x, y)
    qdrop = top1(lowbit.quantize(copy.deepcopy(model), "qdrop", iters=30, **kw), x, y)
    assert qdrop > rtn + 1.5


@pytest.mark.slow
def test_resnet20_w8a8_integer_convs_compute_what_the_simulation_does(resnet20_data, resnet20_w8a8):
    _, _, x, _ = resnet20_data
    q = resnet20_w8a8
    assert sum(isinstance(m, W8A8Conv) for m in q.modules()) == 19
    with torch.no_grad():
        a, b = simulated(q)(x[:300]), q(x[:300])
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.99
    assert F.cosine_similarity(a, b).mean() > 0.9999
