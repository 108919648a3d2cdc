"""The registered methods by name, with one line each: what the command line's ``--help``
lists without importing torch. ``tests/test_cli.py`` checks it against the registry."""

METHODS = {
    "rtn": "round to nearest (min-max or --mse clipped grid)",
    "gptq": "GPTQ (Frantar et al. 2022): Hessian-guided error feedback",
    "awq": "AWQ (Lin et al. 2023): activation-aware scales and clipping",
    "adaround": "AdaRound (Nagel et al. 2020): learned rounding, layer by layer",
    "brecq": "BRECQ (Li et al. 2021): block reconstruction, Fisher-weighted",
    "qdrop": "QDrop (Wei et al. 2022): block reconstruction with activation dropping",
    "owq": "OWQ (Lee et al. 2023): GPTQ with the most Hessian-sensitive input columns kept in fp16",
    "signround": "SignRound / AutoRound (Cheng et al. 2023): rounding offsets and ranges by signed gradient descent per block",
    "squeezellm": "SqueezeLLM (Kim et al. 2023): Fisher-weighted k-means codebook per channel (lut), fp16 outliers",
    "gptvq": "GPTVQ (van Baalen et al. 2024): 2-D vector codebooks (vq) inside GPTQ's loop, Hessian-weighted EM, codebook update",
    "spqr": "SpQR (Dettmers et al. 2023): GPTQ on groups of 16 with 3-bit scales, costliest weights kept in fp16",
    "lorc": "LoRC (Yao et al. 2023, ZeroQuant-V2): GPTQ plus a rank-8 fp16 correction of its error",
    "bcq": "BCQ / LUT-GEMM (Park et al. 2022): sums of signed binary planes with scales and an offset per group",
    "rex": "REx (Yvinec et al. 2023): a second quantized order of the error on the rows that need it, data-free",
    "nf4": "QLoRA's NF4 (Dettmers et al. 2023): blocks of 64, double-quantized scales (4.127 bits)",
    "gobo": "GOBO (Zadeh et al. 2020): Gaussian outliers in fp16, per-layer centroids by L1-converged selection (lut)",
    "deep_compression": "Deep Compression (Han et al. 2016): magnitude pruning, k-means weight sharing (lut), Huffman size",
    "hqq": "HQQ (Badri & Shaji 2023): zero points and scales by half-quadratic l_p splitting, calibration-free",
    "bias_correction": "bias correction (Nagel et al. 2019) on the MSE grid",
    "llmint8": "LLM.int8() (Dettmers et al. 2022): int8 with fp outlier columns",
    "zeroquant": "ZeroQuant (Yao et al. 2022): group weights, per-token activations",
    "smoothquant": "SmoothQuant (Xiao et al. 2023): activation-to-weight scale migration (+rtn)",
    "osplus": "Outlier Suppression+ (Wei et al. 2023): shift and scale migration (+rtn)",
    "rptq": "RPTQ (Yuan et al. 2023): reordered channel clusters for activations (+rtn)",
    "peg": "PEG (Bondarenko et al. 2021): per-embedding-group activations (+rtn)",
    "fq_vit": "FQ-ViT (Lin et al. 2022): power-of-two factors on LayerNorm inputs, log2 attention maps",
    "noisyquant": "NoisyQuant (Liu et al. 2023): a fixed noisy bias before static activation grids",
    "apq_vit": "APQ-ViT (Ding et al. 2022): block-output Hessian-guided scale search, Matthew-effect log2 softmax",
    "ptq_for_vit": "PTQ for ViT (Liu et al. 2021): cosine scale search with a ranking-aware attention loss, bias correction",
    "p2_vit": "P2-ViT (Shi et al. 2024): power-of-two weight and activation scales, adaptively rounded",
    "oas_vit": "Outlier-aware slicing (Ma et al. 2024): QDrop reconstruction at the granularity a trial picks per block",
    "pmq": "PMQ (Xiao et al. 2023): Fisher sensitivity, Pareto-frontier widths per linear, patch-wise widths",
    "cpt_v": "CPT-V (Nasser et al. 2022): block-wise evolutionary scale search against a contrastive loss",
    "ptq4vit": "PTQ4ViT (Yuan et al. 2022): twin-uniform softmax/GELU, Hessian-guided scale search",
    "repq_vit": "RepQ-ViT (Li et al. 2023): post-LayerNorm per-channel grids reparameterized, log-sqrt2 softmax",
}

# methods that transform the model for a quantizer after them (a recipe ``name+rtn``)
TRANSFORMS = ("smoothquant", "osplus", "rptq", "peg")


def method_help() -> str:
    names = [f"{n}+rtn" if n in TRANSFORMS else n for n in METHODS]
    return "method or +-joined recipe (e.g. awq+gptq): " + ", ".join(names)
