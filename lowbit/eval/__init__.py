"""Evaluation independent of how a model was quantized."""

from lowbit.eval.classification import top1
from lowbit.eval.fidelity import embed, embedding_fidelity, kl_divergence
from lowbit.eval.perplexity import perplexity, token_chunks

__all__ = ["embed", "embedding_fidelity", "kl_divergence", "perplexity", "token_chunks", "top1"]
