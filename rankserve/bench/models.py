"""Random-weight models of real configs, for speed and memory work without downloads."""

from __future__ import annotations

import torch

from rankserve.errors import InputError

# Real configs for random-weight speed work (no downloads). Values from the models' published config.json.
RANDOM_CONFIGS = {
    "llama-1b": dict(  # Llama-3.2-1B
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "tiny": dict(  # for tests of the harness itself
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def random_model(name: str, dtype: torch.dtype, ratio: float | None, seed: int = 0):
    """A random-weight model of a real config; with ``ratio`` every decoder projection is low-rank at the
    uniform rank for that ratio (random factors: speed work only)."""
    from rankserve.config import ModelConfig
    from rankserve.io.assign import assign, meta_parameters, new_model
    from rankserve.layers import LowRankLinear, projections, replace_module
    from rankserve.ranks import rank_for_ratio

    if name not in RANDOM_CONFIGS:
        raise InputError(f"unknown random config {name!r}; choose from {', '.join(RANDOM_CONFIGS)}")
    cfg = ModelConfig.from_hf(RANDOM_CONFIGS[name])
    model = new_model(cfg)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        # Drawn in place: a freed temporary stays in the C heap and would show as the model's resident memory.
        return torch.empty(*shape, dtype=dtype).normal_(0.0, shape[-1] ** -0.5, generator=g)

    if ratio is not None:
        for pname, p in projections(model).items():
            if pname == "lm_head":
                continue
            r = rank_for_ratio(p.out_features, p.in_features, ratio)
            replace_module(
                model, pname, LowRankLinear.from_factors(rnd(p.out_features, r), rnd(r, p.in_features))
            )
    state = {
        k: torch.ones(shape, dtype=dtype) if k.endswith("norm.weight") else rnd(*shape)
        for k, shape in meta_parameters(model).items()
    }
    return assign(model, state, dtype, "cpu", source=name)
