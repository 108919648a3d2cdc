"""CIFAR-10 ResNets, the JPEG reader and top-1: synthetic specs, then the shipped checkpoints."""

import argparse
import pathlib
import tarfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.assets import asset
from lowbit.data.cifar10 import CLASSES, default_cifar10, load_cifar10
from lowbit.eval.classification import predict_logits, top1
from lowbit.models.resnet_cifar import (
    NORMALIZE,
    PadShortcut,
    ResNetCifar,
    is_resnet_cifar_checkpoint,
    load_resnet_cifar,
    save_resnet_cifar,
)

PIL = pytest.importorskip("PIL.Image", reason="pip install pillow to read CIFAR-10 JPEGs")

COLORS = {"airplane": (255, 0, 0), "cat": (0, 255, 0), "truck": (0, 0, 255)}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{path} is absent; set LOWBIT_ASSETS to the shared assets folder")
    return path


def _randomised(depth: int) -> ResNetCifar:
    """A model whose BatchNorms are not the identity, so a dropped buffer would show."""
    model = ResNetCifar(depth)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


# ---- model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth,params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_parameter_counts_match_he_et_al(depth, params):
    model = ResNetCifar(depth)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.layer1) == len(model.layer3) == (depth - 2) // 6
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth", [21, 2, 0])
def test_depth_not_6n_plus_2_is_refused(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNetCifar(depth)


def test_every_activation_site_is_a_module():
    model = ResNetCifar(20)
    names = dict(model.named_modules())
    relus = [n for n, m in names.items() if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 1 + 2 * 9 and "relu" in names and "layer3.2.relu2" in names
    assert isinstance(names["layer2.0.shortcut"], PadShortcut) and isinstance(names["pool"], torch.nn.AdaptiveAvgPool2d)
    assert isinstance(names["layer1.0.shortcut"], torch.nn.Identity)
    x = torch.randn(1, 16, 32, 32)
    padded = names["layer2.0.shortcut"](x)
    assert padded.shape == (1, 32, 16, 16) and padded[:, :8].abs().sum() == 0 and padded[:, 24:].abs().sum() == 0
    torch.testing.assert_close(padded[:, 8:24], x[:, :, ::2, ::2])


def test_saved_directory_round_trips(tmp_path):
    model = _randomised(32)
    save_resnet_cifar(model, tmp_path / "r32")
    loaded = load_resnet_cifar(tmp_path / "r32")
    assert loaded.depth == 32 and not loaded.training and is_resnet_cifar_checkpoint(tmp_path / "r32")
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_safetensors_file_with_dataparallel_prefix_and_without_num_batches_tracked_loads(tmp_path):
    model = _randomised(20)
    state = {f"module.{k}": v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    save_file(state, tmp_path / "r20.safetensors")
    assert is_resnet_cifar_checkpoint(tmp_path / "r20.safetensors")
    loaded = load_resnet_cifar(tmp_path / "r20.safetensors")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_missing_or_unexpected_keys_are_listed(tmp_path):
    state = ResNetCifar(20).state_dict()
    del state["layer2.1.bn1.running_var"]
    save_file(state, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="layer2.1.bn1.running_var"):
        load_resnet_cifar(tmp_path / "missing.safetensors")
    state = {**ResNetCifar(20).state_dict(), "fc.weight": torch.zeros(10, 64)}
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match="fc.weight"):
        load_resnet_cifar(tmp_path / "extra.safetensors")


def test_config_depth_that_disagrees_with_weights_is_an_error(tmp_path):
    save_resnet_cifar(ResNetCifar(20), tmp_path)
    (tmp_path / "config.json").write_text('{"architecture": "resnet_cifar", "depth": 32}')
    with pytest.raises(ValueError, match="depth 32"):
        load_resnet_cifar(tmp_path)


def test_untrusted_pickle_with_code_is_refused_without_running_it(tmp_path):
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return pathlib.Path.touch, (sentinel,)

    torch.save({"state_dict": ResNetCifar(20).state_dict(), "best_prec1": 90.0, "x": Evil()}, tmp_path / "evil.th")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_resnet_cifar(tmp_path / "evil.th")
    assert not sentinel.exists()


def test_pickle_with_a_plain_object_needs_trust_pickle(tmp_path):
    model = _randomised(20)
    ckpt = {"state_dict": model.state_dict(), "best_prec1": 90.0, "args": argparse.Namespace(lr=0.1)}
    torch.save(ckpt, tmp_path / "args.th")
    with pytest.raises(ValueError, match="not unpickled"):
        load_resnet_cifar(tmp_path / "args.th")
    loaded = load_resnet_cifar(tmp_path / "args.th", trust_pickle=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_tensor_only_pickle_loads_through_the_restricted_unpickler_and_is_cached(tmp_path):
    model = _randomised(20)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_prec1": 1.0},
               tmp_path / "plain.th")  # fmt: skip
    assert is_resnet_cifar_checkpoint(tmp_path / "plain.th")
    loaded = load_resnet_cifar(tmp_path / "plain.th")
    cached = list((tmp_path / "cache" / "resnet_cifar").glob("*.safetensors"))
    assert len(cached) == 1 and "layer1.0.conv1.weight" in load_file(cached[0])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_missing_checkpoint_and_non_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.th"):
        load_resnet_cifar(tmp_path / "nope.th")
    save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    assert not is_resnet_cifar_checkpoint(tmp_path / "other.safetensors")
    assert not is_resnet_cifar_checkpoint(tmp_path)


# ---- reader --------------------------------------------------------------------------------------


def _jpeg(path: pathlib.Path, color, size=(32, 32), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.new("RGB", size, color).convert(mode).save(path, quality=95)


@pytest.fixture
def tiny_cifar(tmp_path):
    """``train/`` and ``test/`` with 4 solid-colour images for each of 3 classes, as a folder and a .tar.gz."""
    root = tmp_path / "tiny"
    for split in ("train", "test"):
        for cls, color in COLORS.items():
            for i in range(4):
                _jpeg(root / split / cls / f"{i:02d}.jpg", color)
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(root / split, arcname=split)
    return root, archive


def _check_labels(images, labels):
    assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    for img, label in zip(images, labels):
        channel = int(img.mean((1, 2)).argmax())  # airplane red, cat green, truck blue
        assert CLASSES[label] == list(COLORS)[channel]


def test_archive_and_folder_read_the_same_images(tiny_cifar):
    root, archive = tiny_cifar
    images, labels = load_cifar10(archive, split="test")
    assert len(images) == 12 and 0 <= images.min() and images.max() <= 1
    assert labels.tolist() == [0] * 4 + [3] * 4 + [9] * 4
    _check_labels(images, labels)
    for folder, split in ((root, "test"), (root / "test", None), (root / "test", "test")):
        f_images, f_labels = load_cifar10(folder, split=split)
        torch.testing.assert_close(f_images, images, rtol=0, atol=0)
        assert torch.equal(f_labels, labels)


def test_both_splits_without_split_or_an_absent_split_are_errors(tiny_cifar):
    root, archive = tiny_cifar
    with pytest.raises(ValueError, match="split='train'"):
        load_cifar10(archive)
    with pytest.raises(ValueError, match="no 'train' images"):
        load_cifar10(root / "test", split="train")


def test_limit_is_class_balanced_and_seeded(tiny_cifar):
    _, archive = tiny_cifar
    a_images, a_labels = load_cifar10(archive, split="train", limit=6, seed=3)
    assert sorted(a_labels.tolist()) == [0, 0, 3, 3, 9, 9]
    _check_labels(a_images, a_labels)
    b_images, b_labels = load_cifar10(archive, split="train", limit=6, seed=3)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert sorted(load_cifar10(archive, split="train", limit=7)[1].tolist()).count(0) == 3
    assert len(load_cifar10(archive, split="train", limit=100)[1]) == 12


def test_normalize_standardises_channels(tiny_cifar):
    _, archive = tiny_cifar
    raw, _ = load_cifar10(archive, split="test")
    mean, std = NORMALIZE
    normed, _ = load_cifar10(archive, split="test", normalize=NORMALIZE)
    torch.testing.assert_close(normed * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1), raw)


def test_grayscale_is_converted_and_wrong_size_is_named(tmp_path):
    _jpeg(tmp_path / "cat" / "gray.jpg", (90, 90, 90), mode="L")
    images, labels = load_cifar10(tmp_path)
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [3]
    _jpeg(tmp_path / "cat" / "big.jpg", (0, 0, 0), size=(64, 64))
    with pytest.raises(ValueError, match="big.jpg"):
        load_cifar10(tmp_path)


def test_missing_path_and_no_images_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.tar.gz"):
        load_cifar10(tmp_path / "absent.tar.gz")
    _jpeg(tmp_path / "giraffe" / "0.jpg", (0, 0, 0))
    with pytest.raises(ValueError, match="no .jpg"):
        load_cifar10(tmp_path)


# ---- top-1 ---------------------------------------------------------------------------------------


def test_top1_counts_argmax_hits():
    model = torch.nn.Flatten()  # logits = the inputs themselves
    images = torch.eye(4)[[0, 1, 2, 3, 0]].view(5, 4, 1, 1)
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert predict_logits(model, images, batch_size=2).shape == (5, 4)
    assert top1(model, images, labels, batch_size=2) == pytest.approx(60.0)
    with pytest.raises(ValueError, match="labels"):
        top1(model, images, labels[:3])


# ---- the shipped checkpoints on real JPEGs -------------------------------------------------------


@pytest.fixture(scope="module")
def test_images():
    """1,000 class-balanced images of the CIFAR-10 JPEG test set, normalised for the checkpoints."""
    return load_cifar10(_need(default_cifar10("test")), split="test", limit=1000, seed=0, normalize=NORMALIZE)


@pytest.mark.parametrize("name,depth", [("resnet20-12fca82f.th", 20), ("resnet32-d509ac18.th", 32)])
def test_shipped_resnets_load_and_classify_real_jpegs(name, depth, test_images):
    path = _need(asset("resnet_cifar", name))
    assert is_resnet_cifar_checkpoint(path)
    model = load_resnet_cifar(path)
    assert model.depth == depth
    images, labels = test_images
    assert labels.bincount().tolist() == [100] * 10
    # Full 10,000-image test set, fp32: ResNet-20 81.0%, ResNet-32 82.6% (JPEG q75 costs ~10 points).
    assert top1(model, images, labels) > 75.0
