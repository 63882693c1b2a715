"""Sampling and the layered generation API on a tiny model."""

import pytest
import torch
from tiny import tiny_model

from rankserve.runtime.generate import (
    PromptTooLongError,
    complete,
    generate,
    generate_tokens,
    stream_generate,
)
from rankserve.runtime.sampling import Sampler, SamplingParams, filter_logits, greedy_token
from rankserve.tokenizer import Tokenizer


class CharHF:
    """A stand-in HF tokenizer: id i <-> one printable character; 0..3 are specials."""

    pad_token_id = 0
    eos_token_id = 2

    def __len__(self):
        return 128

    def encode(self, text, add_special_tokens=True):
        return [min(127, max(4, ord(c) - 28)) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 28) for i in ids if i >= 4)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa")


@pytest.fixture
def tok():
    return Tokenizer(hf=CharHF(), eos_ids=[2])


PROMPT = [10, 20, 30, 40, 50]


def test_seed_gives_same_tokens(model, tok):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = complete(model, tok, PROMPT, p).token_ids
    b = complete(model, tok, PROMPT, p).token_ids
    c = complete(model, tok, PROMPT, SamplingParams(**{**p.__dict__, "seed": 8})).token_ids
    assert a == b and len(a) == 12
    assert a != c


def test_top_k_one_is_greedy(model, tok):
    g = complete(model, tok, PROMPT, SamplingParams(max_tokens=8, ignore_eos=True)).token_ids
    k1 = complete(
        model, tok, PROMPT, SamplingParams(max_tokens=8, temperature=0.7, top_k=1, seed=1, ignore_eos=True)
    ).token_ids
    assert g == k1


def test_greedy_token_is_torch_argmax_on_ties_nan_views_and_bf16():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 49152, generator=g)
    rows[1, [70, 9000]] = 50.0  # a tie: the first index
    rows[2, [300, 40000]] = float("nan")  # NaN counts as largest: the first NaN
    rows[3, 11] = float("inf")
    rows[4] = -float("inf")
    for x in (*rows, rows[:, 5], rows[0, ::3], rows[5].bfloat16()):
        assert greedy_token(x) == int(x.argmax())
    with torch.inference_mode():
        x = torch.randn(49152, generator=g)
        assert greedy_token(x) == int(x.argmax())


def test_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = SamplingParams(temperature=1.0, top_p=0.7)
    kept = torch.isfinite(filter_logits(logits, p))
    assert kept.tolist() == [True, True, False, False, False]  # 0.64 < 0.7, 0.64 + 0.24 >= 0.7
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, min_p=0.3)))
    assert kept.tolist() == [True, True, False, False, False]  # p1/p0 = e^-1 = 0.37 >= 0.3
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=3)))
    assert kept.tolist() == [True, True, True, False, False]


def test_repetition_penalty_changes_output(model, tok):
    plain = complete(model, tok, PROMPT, SamplingParams(max_tokens=16, ignore_eos=True)).token_ids
    pen = complete(
        model, tok, PROMPT, SamplingParams(max_tokens=16, repetition_penalty=5.0, ignore_eos=True)
    ).token_ids
    assert len(set(pen)) >= len(set(plain))
    assert plain != pen


def test_max_tokens_and_length_finish(model, tok):
    c = complete(model, tok, PROMPT, SamplingParams(max_tokens=5, ignore_eos=True))
    assert c.completion_tokens == 5 and c.finish_reason == "length"


def test_stop_string_is_cut_and_not_emitted(model, tok):
    full = complete(model, tok, PROMPT, SamplingParams(max_tokens=20, ignore_eos=True))
    stop = full.text[5:7]
    c = complete(model, tok, PROMPT, SamplingParams(max_tokens=20, stop=[stop], ignore_eos=True))
    assert c.finish_reason == "stop"
    assert c.text == full.text[: full.text.find(stop)]
    assert stop not in "".join(
        r.text
        for r in stream_generate(
            model, tok, PROMPT, SamplingParams(max_tokens=20, stop=[stop], ignore_eos=True)
        )
    )


def test_stop_token_id(model, tok):
    full = complete(model, tok, PROMPT, SamplingParams(max_tokens=10, ignore_eos=True))
    target = full.token_ids[3]
    c = complete(model, tok, PROMPT, SamplingParams(max_tokens=10, stop_token_ids=[target], ignore_eos=False))
    assert c.finish_reason == "stop"
    assert c.token_ids == full.token_ids[: full.token_ids.index(target) + 1]


def test_layers_agree(model, tok):
    p = SamplingParams(max_tokens=9, ignore_eos=True)
    steps = [o.tokens[0] for o in generate_tokens(model, [PROMPT], p, tok.eos_ids, tok.pad_id)]
    c = complete(model, tok, PROMPT, p)
    assert steps == c.token_ids
    assert generate(model, tok, PROMPT, p) == c.text == tok.decode(steps)


def test_batch_rows_stop_independently(model, tok):
    p = [SamplingParams(max_tokens=3, ignore_eos=True), SamplingParams(max_tokens=7, ignore_eos=True)]
    outs = list(generate_tokens(model, [PROMPT, PROMPT[:2]], p, tok.eos_ids, tok.pad_id))
    assert len(outs) == 7
    assert [o.active[0] for o in outs] == [True] * 3 + [False] * 4


def test_bad_inputs(model, tok):
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        complete(model, tok, PROMPT, SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        complete(model, tok, PROMPT, SamplingParams(top_p=0))
    with pytest.raises(PromptTooLongError, match="context is 256"):
        complete(model, tok, list(range(4, 100)) * 3, SamplingParams(max_tokens=4))


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(temperature=-0.5),
        dict(top_p=float("nan")),
        dict(top_p=1.5),
        dict(min_p=float("nan")),
        dict(repetition_penalty=float("inf")),
        dict(repetition_penalty=float("nan")),
        dict(top_k=-1),
        dict(seed=2**64),
    ],
    ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))}",
)
def test_sampling_params_refuse_non_finite_and_out_of_range(bad):
    """NaN passes every comparison unnoticed; validate() names the parameter (the CLI and the server both use it)."""
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name} must be"):
        SamplingParams(**bad).validate()


def test_tiny_temperature_samples_the_top_token():
    """logits / 1e-39 overflows to inf; shifted by the max first it stays a valid, near-greedy distribution."""
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    s = Sampler(SamplingParams(temperature=1e-39, seed=0))
    assert [s(logits, torch.empty(0, dtype=torch.long)) for _ in range(5)] == [1] * 5
