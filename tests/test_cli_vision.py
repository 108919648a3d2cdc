"""One CLI for every family: a CIFAR ResNet and the ViT go through the same ``quantize``,
``eval`` and ``info`` as language models, ``--calib`` taking images for them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.data.cifar10 import CLASSES
from lowbit.models.resnet_cifar import ResNetCifar, save_resnet_cifar

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """A CIFAR-10 layout folder: train/ and test/ with 3 random 32x32 JPEGs per class."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_resnet_cifar(ResNetCifar(8).eval(), tmp_path_factory.mktemp("resnet8"))


def test_quantize_eval_info_a_resnet_with_image_calibration(resnet_dir, jpegs, tmp_path):
    out = tmp_path / "q"
    r = _run("quantize", resnet_dir, "--method", "qdrop", "--bits", "4", "--act-bits", "4", "--calib", jpegs / "train",
             "--nsamples", "16", "--iters", "3", "--out", out, "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["family"] == "cnn" and res["layers_quantized"] == 8 and res["layers_skipped"] == 0
    assert res["group_size"] == -1  # vision models default to per-channel weights
    e = _run("eval", out, "--cifar10", jpegs / "test", "--json")
    assert e.exit_code == 0, e.output
    ev = json.loads(e.stdout)
    assert ev["images"] == 30 and 0 <= ev["top1"] <= 100
    i = _run("info", out, "--json")
    info = json.loads(i.stdout)
    assert info["recipe"][0]["method"] == "qdrop" and len(info["layers_quantized"]) == 8
    assert 4 < info["bits_per_weight"] < 6  # first and last layers at 8 bits, the rest at 4


def test_calib_images_alias_and_per_tensor_static_defaults(resnet_dir, jpegs, tmp_path):
    out = tmp_path / "q"
    r = _run("quantize", resnet_dir, "--method", "rtn", "--bits", "8", "--act-bits", "8", "--calib-images",
             jpegs / "train", "--nsamples", "16", "--out", out, "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    acts = {r["name"]: r["act"] for r in cfg["coverage"]["layers"] if r["status"] == "quantized"}
    assert acts["conv1"].startswith("a8 per-tensor static asym")


def test_a_method_that_refuses_the_family_exits_2_with_one_line_and_writes_nothing(resnet_dir, jpegs, tmp_path):
    out = tmp_path / "q"
    r = _run("quantize", resnet_dir, "--method", "smoothquant+rtn", "--bits", "8", "--act-bits", "8", "--calib",
             jpegs / "train", "--out", out)  # fmt: skip
    assert r.exit_code == 2
    assert r.output.strip().startswith("error: smoothquant cannot run on ResNetCifar (cnn)")
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_reconstruction_without_calibration_data_exits_2(resnet_dir, tmp_path):
    r = _run("quantize", resnet_dir, "--method", "brecq", "--out", tmp_path / "q")
    assert r.exit_code == 2 and "needs calibration data" in r.output


def test_eval_without_a_metric_names_both(resnet_dir):
    r = _run("eval", resnet_dir)
    assert r.exit_code == 2 and "--ppl" in r.output and "--cifar10" in r.output
