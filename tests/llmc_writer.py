"""Run by tests/test_compressed_tensors.py in llm-compressor's own virtual environment (its
transformers pin differs from lowbit's): quantize a model directory with llm-compressor, save
it compressed, and write the logits transformers computes from the saved checkpoint.

    python tests/llmc_writer.py FP_DIR OUT_DIR SCHEME_JSON IDS_PT LOGITS_PT
"""

import json
import sys

import torch
import transformers as tf
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from tokenizers import Tokenizer, models


def word_tokenizer():
    vocab = {f"w{i}": i for i in range(128)}
    return tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
                                      unk_token="w0")  # fmt: skip


def main(fp_dir, out_dir, scheme_json, ids_path, logits_path):
    spec = json.loads(scheme_json)
    model = tf.AutoModelForCausalLM.from_pretrained(fp_dir)
    if isinstance(spec, str):
        recipe = QuantizationModifier(targets="Linear", scheme=spec, ignore=["lm_head"])
    else:
        recipe = QuantizationModifier(config_groups={"g": {"targets": ["Linear"], **spec}}, ignore=["lm_head"])
    kwargs = {}
    if "input_activations" in str(spec) or spec == "W8A8":  # activations calibrate on data
        ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        kwargs = {"dataset": data, "processor": word_tokenizer(), "num_calibration_samples": 8, "max_seq_length": 32}
    oneshot(model=model, recipe=recipe, **kwargs)
    model.save_pretrained(out_dir, save_compressed=True)
    theirs = tf.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        torch.save(theirs(input_ids=torch.load(ids_path)).logits, logits_path)
    print(f"llm-compressor {__import__('llmcompressor').__version__}, transformers {tf.__version__}")


if __name__ == "__main__":
    main(*sys.argv[1:])
