"""Quantization methods, one file per algorithm, registered by name."""

from lowbit.methods.adaround import AdaRound
from lowbit.methods.apq_vit import APQViT
from lowbit.methods.awq import AWQ
from lowbit.methods.base import REGISTRY, MethodConfig, check_recipe, load_recipe, make_method, parse_recipe, register
from lowbit.methods.bcq import BCQ
from lowbit.methods.bias_correction import BiasCorrection
from lowbit.methods.brecq import BRECQ
from lowbit.methods.cpt_v import CPTV
from lowbit.methods.deep_compression import DeepCompression
from lowbit.methods.fq_vit import FQViT
from lowbit.methods.gobo import GOBO
from lowbit.methods.gptq import GPTQ
from lowbit.methods.gptvq import GPTVQ
from lowbit.methods.hqq import HQQ
from lowbit.methods.llmint8 import LLMInt8
from lowbit.methods.lorc import LoRC
from lowbit.methods.nf4 import NF4
from lowbit.methods.noisyquant import NoisyQuant
from lowbit.methods.oas_vit import OASViT
from lowbit.methods.osplus import OSPlus
from lowbit.methods.owq import OWQ
from lowbit.methods.p2_vit import P2ViT
from lowbit.methods.peg import PEG
from lowbit.methods.pmq import PMQ
from lowbit.methods.ptq4vit import PTQ4ViT
from lowbit.methods.ptq_for_vit import PTQForViT
from lowbit.methods.qdrop import QDrop
from lowbit.methods.repq_vit import RepQViT
from lowbit.methods.rex import REx
from lowbit.methods.rptq import RPTQ
from lowbit.methods.rtn import RTN
from lowbit.methods.signround import SignRound
from lowbit.methods.smoothquant import SmoothQuant
from lowbit.methods.spqr import SpQR
from lowbit.methods.squeezellm import SqueezeLLM
from lowbit.methods.zeroquant import ZeroQuant

__all__ = [
    "AWQ",
    "BCQ",
    "BRECQ",
    "CPTV",
    "GOBO",
    "GPTQ",
    "GPTVQ",
    "HQQ",
    "NF4",
    "OWQ",
    "PEG",
    "PMQ",
    "REGISTRY",
    "RPTQ",
    "RTN",
    "APQViT",
    "AdaRound",
    "BiasCorrection",
    "DeepCompression",
    "FQViT",
    "LLMInt8",
    "LoRC",
    "MethodConfig",
    "NoisyQuant",
    "OASViT",
    "OSPlus",
    "P2ViT",
    "PTQ4ViT",
    "PTQForViT",
    "QDrop",
    "REx",
    "RepQViT",
    "SignRound",
    "SmoothQuant",
    "SpQR",
    "SqueezeLLM",
    "ZeroQuant",
    "check_recipe",
    "load_recipe",
    "make_method",
    "parse_recipe",
    "register",
]
