"""GGUF files written by llama.cpp's own converter: rankserve reads them as transformers reads the HF original.

The converter comes from the llama-cpp-python sdist on PyPI (``llamacpp_converter.py``), downloaded once per
machine. Without network the tests fail under CI (``CI=true``) and skip elsewhere.
"""

import os

import numpy as np
import pytest
import torch
from tiny import hf_model_from, tiny_model

from rankserve.loaders.gguf_export import export_gguf
from rankserve.loaders.gguf_file import read_gguf
from rankserve.loaders.hf_dir import read_hf_dir
from rankserve.loaders.weights import build_model
from rankserve.runtime.generate import generate_tokens
from rankserve.runtime.sampling import SamplingParams

# Every supported architecture; GQA in all but llama-mha, which also ties its embeddings.
VARIANTS = ["llama-gqa", "llama-mha", "mistral", "qwen2-bias"]
# max |logits - transformers' on the HF original| / max |those logits|: f32 is exact up to summation order; f16
# and q8_0 round the 2-D weights (f16: 2^-11 relative; q8_0: up to 1/254 of each 32-weight block's largest
# magnitude), measured 1.1e-3 and 3.4e-2 at most over these models.
BOUNDS = {"f32": 1e-5, "f16": 3e-3, "q8_0": 8e-2}
PROMPTS = [[1, 17, 42, 99, 250], [7, 300, 7, 7, 5, 7]]
NEW_TOKENS = 8


@pytest.fixture(scope="session")
def llamacpp_converter():
    """The directory holding llama.cpp's convert_hf_to_gguf.py."""
    from llamacpp_converter import LLAMA_CPP_PYTHON, ConverterUnavailable, converter_dir

    try:
        return converter_dir()
    except ConverterUnavailable as e:
        msg = f"llama.cpp's converter (llama-cpp-python=={LLAMA_CPP_PYTHON} sdist, from PyPI) is unavailable: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def write_hf_dir(path: str, variant: str, tokenizer_model: bytes, vocab_size: int) -> None:
    """A tiny random model saved by transformers (safetensors) with a SentencePiece tokenizer, which the
    converter needs for the GGUF vocabulary."""
    hf = hf_model_from(tiny_model(variant, vocab_size=vocab_size))
    hf.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(tokenizer_model)


@pytest.fixture(scope="module")
def converted(llamacpp_converter, tmp_path_factory):
    """{variant: hf_dir} and {(variant, outtype): gguf path}, converted in one converter process."""
    import sentencepiece as spm
    from llamacpp_converter import convert
    from standins import sentencepiece_proto

    root = tmp_path_factory.mktemp("llamacpp")
    proto = sentencepiece_proto()  # the cheapest tokenizer the converter accepts without a known-hash check
    vocab = spm.SentencePieceProcessor(model_proto=proto).vocab_size()
    dirs, files, jobs = {}, {}, []
    for variant in VARIANTS:
        dirs[variant] = str(root / variant)
        write_hf_dir(dirs[variant], variant, proto, vocab)
        for outtype in BOUNDS:
            files[variant, outtype] = str(root / f"{variant}-{outtype}.gguf")
            jobs.append((dirs[variant], files[variant, outtype], outtype))
    convert(llamacpp_converter, jobs)
    return dirs, files


def hf_reference(converted, variant: str, outtype: str, from_gguf: bool):
    """transformers on the HF original, or on the converted GGUF itself (its own GGUF loader, which dequantizes
    and un-permutes by its own rules: the same weights as rankserve's for a quantized file)."""
    import transformers

    dirs, files = converted
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if from_gguf:
        path = files[variant, outtype]
        kw["gguf_file"] = os.path.basename(path)
        return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), **kw).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(dirs[variant], **kw).eval()


def rankserve_model(converted, variant: str, outtype: str):
    return build_model(*read_gguf(converted[1][variant, outtype]))


@pytest.mark.parametrize("outtype", list(BOUNDS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_gguf_logits_equal_transformers(converted, variant, outtype):
    model = rankserve_model(converted, variant, outtype)
    tokens = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    for from_gguf, bound in [(False, BOUNDS[outtype]), (True, 1e-5)]:
        hf = hf_reference(converted, variant, outtype, from_gguf)
        assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
        with torch.no_grad():
            ours, ref = model(tokens), hf(tokens).logits
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert err <= bound, (
            f"{variant} {outtype} (reference from GGUF: {from_gguf}): relative error {err:.2e}"
        )


@pytest.mark.parametrize("outtype", list(BOUNDS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_gguf_greedy_equals_transformers(converted, variant, outtype):
    # q8_0 moves logits by a few percent, enough to flip near-ties against the unquantized original: its
    # reference is transformers on the same file
    hf = hf_reference(converted, variant, outtype, from_gguf=outtype == "q8_0")
    model = rankserve_model(converted, variant, outtype)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt in PROMPTS:
        ours = [s.tokens[0] for s in generate_tokens(model, [prompt], params)]
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert ours == ref, f"{variant} {outtype} prompt {prompt}"


@pytest.mark.parametrize("outtype", list(BOUNDS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_exporter_writes_the_converters_tensors(converted, variant, outtype, tmp_path):
    """rankserve's exporter (the llama.cpp bench baselines) writes the converter's names, Q/K order, tensor
    types and bytes: F32, F16 and Q8_0 (with its F16 fallback for rows that are not whole blocks)."""
    import gguf

    dirs, files = converted
    model = build_model(*read_hf_dir(dirs[variant]))  # independent of rankserve's GGUF reader
    ours = export_gguf(model, str(tmp_path / "ours.gguf"), outtype)
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(files[variant, outtype]).tensors}
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(a[name].data, b[name].data), name
    fields = lambda p: gguf.GGUFReader(p).fields  # noqa: E731
    for key in ("general.architecture", "general.file_type"):
        assert fields(ours)[key].contents() == fields(files[variant, outtype])[key].contents(), key
