import pytest
import torch

from lowbit.assets import asset


def _need(path):
    if not path.exists():
        pytest.skip(f"{path} is absent; set LOWBIT_ASSETS to the shared assets folder")
    return path


@pytest.fixture(scope="session")
def stories_dir():
    return _need(asset("stories260K"))


@pytest.fixture(scope="session")
def tinystories_halves():
    from lowbit.data import read_text, split_halves

    return split_halves(read_text(_need(asset("text", "tinystories_dev.txt"))))


@pytest.fixture
def stories(stories_dir):
    from lowbit.models import load_pretrained

    return load_pretrained(str(stories_dir))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
