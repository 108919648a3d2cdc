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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer, saved as a Hugging Face directory."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tiny_llama")
    words = "once upon a time there was little girl who liked to play in the park with her dog".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(d)
    cfg = tf.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(" ".join(["once upon a time there was a little girl who liked to play"] * 40))
    return p
