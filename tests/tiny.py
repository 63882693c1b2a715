"""Tiny random models shared by the tests: the same config classes as real models, a few thousand weights."""

from __future__ import annotations

import torch

from rankserve.config import ModelConfig
from rankserve.loaders.weights import build_model

TINY_VARIANTS = {
    # name: overrides of the base config
    "llama-gqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "llama-mha": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True
    ),
    "qwen2-bias": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", num_attention_heads=8, num_key_value_heads=2, hidden_size=96),
    "llama3-rope": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


def tiny_hf_config(variant: str = "llama-gqa", **over) -> dict:
    d = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=144,
        num_hidden_layers=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    d.update(TINY_VARIANTS[variant])
    d.update(over)
    d["architectures"] = [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[
            d["model_type"]
        ]
    ]
    return d


def random_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random weights for ``cfg`` (norm weights near 1, biases small, projections ~N(0, 0.02..0.1))."""
    from rankserve.loaders.weights import new_model

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in new_model(cfg).state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith("bias"):
            out[name] = 0.05 * torch.randn(p.shape, generator=g)
        else:
            out[name] = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
    return out


def tiny_model(variant: str = "llama-gqa", seed: int = 0, dtype=torch.float32, **over):
    cfg = ModelConfig.from_hf(tiny_hf_config(variant, **over))
    return build_model(cfg, random_tensors(cfg, seed), dtype=dtype)


def hf_model_from(model) -> torch.nn.Module:
    """The same weights in HF transformers (for equality tests)."""
    import transformers

    cfg = model.config
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    sd = {k: v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    return hf
