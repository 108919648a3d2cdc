"""Hostile and broken checkpoints: lowbit's native format, compressed-tensors and the GPTQ layout, truncated
or with bytes overwritten at random (safetensors headers, config.json), a tensor with the wrong shape,
NaN or zero scales, a missing file. Each either loads or raises one clear error naming the directory."""

import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.io.native import CheckpointError

pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors to write that layout")
FUZZ_EXAMPLES = int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from test_compressed_tensors import tiny_llama

    from lowbit.io.compressed_tensors import export_compressed_tensors
    from lowbit.io.gptq_layout import export_gptq

    root = tmp_path_factory.mktemp("hostile")
    model = tiny_llama()
    lowbit.quantize(model, "rtn", bits=4, group_size=32, symmetric=True, progress=False)
    lowbit.save(model, root / "native")
    export_compressed_tensors(model, root / "ct")
    export_gptq(model, root / "gptq")
    return root


def _copy(checkpoints, fmt, tmp_path):
    d = tmp_path / f"{fmt}-copy"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(checkpoints / fmt, d)
    return d


def _clear_or_loads(d):
    try:
        lowbit.load(d)
    except (CheckpointError, FileNotFoundError) as e:
        assert str(d) in str(e), e


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["native", "ct", "gptq"]), file=st.sampled_from(["model.safetensors", "config.json"]),
       data=st.data())  # fmt: skip
def test_corrupted_files_load_or_fail_clearly(checkpoints, tmp_path, fmt, file, data):
    d = _copy(checkpoints, fmt, tmp_path)
    f = d / file
    raw = bytearray(f.read_bytes())
    if data.draw(st.booleans()):  # truncated
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:  # bytes overwritten in the header / the JSON
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, min(len(raw), 4000) - 1))
            raw[at] = data.draw(st.integers(0, 255))
    f.write_bytes(bytes(raw))
    _clear_or_loads(d)


@pytest.mark.parametrize("fmt", ["native", "ct", "gptq"])
def test_wrong_shapes_nan_and_zero_scales_and_missing_files_are_named(checkpoints, tmp_path, fmt):
    d = _copy(checkpoints, fmt, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    scale_key = next(k for k in sorted(tensors) if k.endswith(("scales", "weight_scale")) and "layers.1" in k)
    for bad, message in [(float("nan"), "NaN, Inf or zero scales"), (0.0, "NaN, Inf or zero scales")]:
        broken = dict(tensors)
        broken[scale_key] = tensors[scale_key].clone().fill_(bad)
        save_file(broken, str(d / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=message):
            lowbit.load(d)
    broken = dict(tensors)
    broken[scale_key] = tensors[scale_key][:1].clone()  # a shape that disagrees with the config
    save_file(broken, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=str(d)):
        lowbit.load(d)
    config = json.loads((d / "config.json").read_text())
    config["hidden_size"] = 96  # the config disagrees with the tensors
    (d / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=str(d)):
        lowbit.load(d)
    (d / "model.safetensors").unlink()
    with pytest.raises((CheckpointError, FileNotFoundError), match=str(d)):
        lowbit.load(d)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lowbit.load(tmp_path / "nowhere")


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_corrupted_legacy_resnet_checkpoint_fails_clearly(tmp_path, data):
    """The CIFAR ResNet's legacy ``.th`` file (read without unpickling code), truncated or overwritten."""
    from lowbit.assets import asset
    from lowbit.models.resnet_cifar import load_resnet_cifar

    src = asset("resnet_cifar", "resnet20-12fca82f.th")
    if not src.exists():
        pytest.skip(f"{src} is absent (set LOWBIT_ASSETS)")
    raw = bytearray(src.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    bad = tmp_path / "resnet20-bad.th"
    bad.write_bytes(bytes(raw))
    try:
        load_resnet_cifar(bad)
    except ValueError as e:
        assert str(bad) in str(e), e
