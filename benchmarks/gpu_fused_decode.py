"""On a CUDA machine: the fused decoder step over QLinear layers that run the Triton kernel gives
transformers' logits and greedy tokens (fp16, a tiny random Llama). Run by benchmarks/gpu_check.sh."""
import copy, torch, transformers as tf
import lowbit
from lowbit.fused_decode import FusedLlama
from lowbit.generate import greedy_decode
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
model = tf.LlamaForCausalLM(cfg).eval()
q = lowbit.quantize(copy.deepcopy(model), "rtn", bits=4, group_size=64, progress=False).cuda().half()
ids = torch.randint(0, 256, (1, 12)).cuda()
with torch.no_grad():
    want = q(ids).logits[:, -1].float()
got = FusedLlama(q, 16).forward(ids).float()
print("fused vs transformers on CUDA fp16 (triton QLinear): max |d| %.3e of max %.3e" % ((got - want).abs().max(), want.abs().max()))
a = greedy_decode(q, ids, 16); b = greedy_decode(q, ids, 16, fused=False)
print("greedy tokens equal:", torch.equal(a.tokens, b.tokens), a.path, b.path)
