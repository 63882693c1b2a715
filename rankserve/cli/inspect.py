"""Show a model's architecture, layer shapes, parameter count and weight bytes read per token."""

from __future__ import annotations

import json

from rankserve.cli.main import common_model_args


def add_arguments(p):
    common_model_args(p)
    p.add_argument("--json", action="store_true")


def describe(lm) -> dict:
    from rankserve.analysis import model_stats
    from rankserve.layers import projections

    cfg, model = lm.config, lm.model
    st = model_stats(model)
    layers = []
    for name, proj in projections(model).items():
        layers.append(
            {
                "name": name,
                "kind": proj.kind,
                "in": proj.in_features,
                "out": proj.out_features,
                "rank": proj.rank(),
                "params": proj.param_count(count_shared=False),
                "int8": proj.is_int8(),
            }
        )
    m = lm.manifest or {}
    return {
        "source": lm.source,
        "kind": lm.kind,
        "model_type": cfg.model_type,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "tied_embeddings": cfg.tie_word_embeddings,
        "params_total": st.params_total,
        "params_linear": st.params_linear,
        "bytes_per_token": st.bytes_per_token,
        "lm_head_bytes": st.lm_head_bytes,
        "family": m.get("family"),
        "ratio": m.get("ratio"),
        "ratio_convention": m.get("ratio_convention"),
        "quantization": m.get("quantization"),
        "weight_bytes": st.weight_bytes,
        "projections": layers,
    }


def run(args) -> int:
    from rankserve.cli.main import apply_threads
    from rankserve.loaders.source import load_model

    apply_threads(args.threads)
    d = describe(load_model(args.model, dtype=args.dtype, check_finite=args.check_finite))
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"{d['source']} ({d['kind']}, {d['model_type']}, {d['dtype']})")
    print(
        f"  layers {d['layers']}, hidden {d['hidden_size']}, intermediate {d['intermediate_size']}, heads "
        f"{d['heads']}/{d['kv_heads']} (head_dim {d['head_dim']}), vocab {d['vocab_size']}, context {d['context']}, "
        f"tied embeddings {d['tied_embeddings']}"
    )
    print(f"  parameters {d['params_total']:,} (decoder projections {d['params_linear']:,})")
    print(
        f"  weight bytes read per token {d['bytes_per_token'] / 1e6:.1f} MB (LM head {d['lm_head_bytes'] / 1e6:.1f} MB)"
    )
    if d["family"] and d["family"] != "dense":
        print(f"  compressed: family {d['family']}, ratio {d['ratio']} ({d['ratio_convention']})")
    q = d["quantization"]
    if q:
        g = q["config"]["group_size"]
        print(
            f"  quantized: {q['scheme']}, {'per channel' if g is None else f'groups of {g}'}, "
            f"LM head {'int8' if q['config']['lm_head'] else 'float'}; weights {d['weight_bytes'] / 1e6:.1f} MB"
        )
    print(f"  {'projection':44s} {'kind':8s} {'out x in':>12s} {'rank':>6s} {'params':>10s}")
    for L in d["projections"]:
        rank = "-" if L["rank"] is None else str(L["rank"])
        int8 = " int8" if L["int8"] else ""
        print(
            f"  {L['name']:44s} {L['kind']:8s} {L['out']:>5d} x {L['in']:<5d} {rank:>6s} {L['params']:>10,d}{int8}"
        )
    return 0
