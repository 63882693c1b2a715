"""The native model against HF transformers, and the cache paths against one full forward."""

import pytest
import torch
from tiny import TINY_VARIANTS, hf_model_from, tiny_model

from rankserve.runtime.eager import EagerRunner, padded_batch
from rankserve.runtime.options import RuntimeOptions


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_logits_match_transformers(variant):
    model = tiny_model(variant)
    hf = hf_model_from(model)
    tokens = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(tokens), hf(tokens).logits
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias", "llama3-rope"])
def test_prefill_then_decode_equals_full_forward(variant):
    model = tiny_model(variant)
    tokens = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)[0]  # (T, V)
    runner = EagerRunner(model, batch=1, max_len=32, options=RuntimeOptions(prefill_chunk=5))
    vf = torch.zeros(1, dtype=torch.long)
    P = 12
    pos = torch.arange(20)[None]
    out = [runner.prefill(tokens[:, :P], pos[:, :P], vf)[0]]  # chunked: 5 + 5 + 2
    for t in range(P, 20):
        out.append(runner.decode(tokens[:, t : t + 1], pos[:, t : t + 1], t, vf)[0])
    got = torch.stack(out)  # logits predicting tokens P .. 20
    assert (got - full[P - 1 :]).abs().max().item() <= 1e-4


def test_left_padded_batch_equals_each_row_alone():
    model = tiny_model("llama-gqa")
    g = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(3, 128, (9,), generator=g).tolist(),
        torch.randint(3, 128, (4,), generator=g).tolist(),
    ]
    steps = 6

    def run(batch_prompts):
        tokens, positions, pads = padded_batch(batch_prompts, pad_id=0)
        runner = EagerRunner(model, len(batch_prompts), 32)
        logits = [runner.prefill(tokens, positions, pads)]
        nxt = logits[-1].argmax(-1)[:, None]
        pos = positions[:, -1:] + 1
        P = tokens.shape[1]
        for s in range(steps):
            logits.append(runner.decode(nxt, pos, P + s, pads))
            nxt, pos = logits[-1].argmax(-1)[:, None], pos + 1
        return torch.stack(logits, 1)  # (B, steps+1, V)

    both = run(prompts)
    for b, p in enumerate(prompts):
        alone = run([p])[0]
        assert (both[b] - alone).abs().max().item() <= 1e-4
        assert torch.equal(both[b].argmax(-1), alone.argmax(-1))


def test_bf16_model_runs_close_to_fp32():
    m32, m16 = tiny_model("llama-gqa"), tiny_model("llama-gqa", dtype=torch.bfloat16)
    tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = m32(tokens), m16(tokens).float()
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() <= 0.1 * a.abs().max().item()
