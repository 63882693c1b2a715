"""Write a golden checkpoint (``v1_tiny/``, ``v2_int8_tiny/``) and its logits (``<name>.expected.safetensors``).

Run once per format version (``python tests/golden/make_golden.py VERSION``) and commit the output; never
regenerate an existing version's files: the golden tests (test_checkpoint, test_int8_checkpoint) exist so that
later code keeps reading them. The model is self-contained (its own config and seeded weights): a Qwen2-style body (q/k/v biases), tied
embeddings stored in fp16, q_proj and k_proj of both layers sharing one basis each, v_proj and the MLP low-rank,
o_proj dense. About 30 KB in all.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for tiny_tok

from tiny_tok import tiny_tokenizer  # noqa: E402

from rankserve.checkpoint import build_manifest, save_checkpoint  # noqa: E402
from rankserve.config import ModelConfig  # noqa: E402
from rankserve.layers import LowRankLinear, SharedBasisLinear, projections, replace_module  # noqa: E402
from rankserve.loaders.weights import build_model, new_model  # noqa: E402

CONFIG = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    vocab_size=102,  # the tiny char tokenizer
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
TOKENS = torch.tensor(
    [[1, 40, 77, 84, 84, 87, 7, 92, 87, 90, 84, 76], [1, 5, 5, 17, 18, 19, 60, 61, 2, 3, 4, 101]]
)


def golden_model() -> torch.nn.Module:
    cfg = ModelConfig.from_hf(CONFIG)
    g = torch.Generator().manual_seed(1234)
    tensors = {}
    for name, p in new_model(cfg).state_dict().items():
        if name == "lm_head.weight":
            continue
        scale = 0.1 if name.endswith(("norm.weight", "bias")) else p.shape[-1] ** -0.5
        tensors[name] = (1.0 if name.endswith("norm.weight") else 0.0) + scale * torch.randn(
            p.shape, generator=g
        )
    model = build_model(cfg, tensors, dtype=torch.float32)
    projs = projections(model)
    for kind, rank in (("q_proj", 6), ("k_proj", 4)):
        names = [n for n in projs if n.endswith(kind)]
        stacked = torch.cat([projs[n].weight.detach() for n in names])
        basis = torch.nn.Parameter(
            torch.linalg.svd(stacked, full_matrices=False)[2][:rank].contiguous(), False
        )
        for n in names:
            coeff = projs[n].weight.detach() @ basis.T
            replace_module(model, n, SharedBasisLinear(basis, coeff, projs[n].bias, group=f"{kind}.g0"))
    for n, p in projs.items():
        if n.endswith(("v_proj", "gate_proj", "up_proj", "down_proj")):
            u, s, vh = torch.linalg.svd(p.weight.detach(), full_matrices=False)
            root = s[:5].sqrt()
            replace_module(
                model, n, LowRankLinear.from_factors(u[:, :5] * root, root[:, None] * vh[:5], p.bias)
            )
    return model.half()


def write(name: str, model: torch.nn.Module, manifest: dict) -> None:
    """Save ``model`` as golden/<name>/ and its fp32 logits on TOKENS as golden/<name>.expected.safetensors."""
    out = os.path.join(HERE, name)
    if os.path.exists(out):
        raise SystemExit(f"{out} exists: golden files are never regenerated")
    save_checkpoint(model, out, tokenizer=tiny_tokenizer(), manifest=manifest)
    # Expected logits come from the saved file loaded in fp32, the path the test takes.
    from rankserve.checkpoint import load_checkpoint

    loaded, _ = load_checkpoint(out, dtype=torch.float32)
    with torch.inference_mode():
        logits = loaded(TOKENS)
    save_file(
        {"tokens": TOKENS, "logits": logits.contiguous()}, os.path.join(HERE, f"{name}.expected.safetensors")
    )


def golden_manifest(model: torch.nn.Module, what: str) -> dict:
    return build_manifest(
        model,
        family="golden-test",
        family_config={"note": "hand-built: shared q/k bases, low-rank v and MLP"},
        ratio=0.5,
        extra={"notes": f"golden file for {what}; do not regenerate"},
    )


def v1() -> None:
    model = golden_model()
    write("v1_tiny", model, golden_manifest(model, "format version 1"))


def v2() -> None:
    """Format 2: the v1 model quantized to int8 in groups of 8 with its tied LM head (a rank of 4, 5 or 6 is
    not a multiple of 8, so the lifts fall back to per-channel scales)."""
    from rankserve.checkpoint import with_quantization
    from rankserve.quantize import Int8Config, quantize_

    model = golden_model()
    manifest = golden_manifest(model, "format version 2 (int8)")
    report = quantize_(model, Int8Config(group_size=8, lm_head=True, factor_group_size=None))
    write("v2_int8_tiny", model, with_quantization(manifest, model, report))


if __name__ == "__main__":
    # python tests/golden/make_golden.py 2   (writes one version's files, once)
    {"1": v1, "2": v2}[sys.argv[1]]()
