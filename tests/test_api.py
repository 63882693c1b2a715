"""The package-top API, exercised by running the README's own Python section."""

import os
import re

import pytest
import torch
from tiny import tiny_model
from tiny_tok import tiny_tokenizer

import rankserve

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_python_blocks() -> list[str]:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_the_two_examples():
    blocks = readme_python_blocks()
    assert len(blocks) == 2
    for b in blocks:  # the README's Python section uses only package-top names
        assert "from rankserve" not in b and "import rankserve." not in b


@pytest.fixture()
def tiny_dense_checkpoint(tmp_path):
    model = tiny_model("llama-gqa")
    return rankserve.save(model, str(tmp_path / "tiny-dense"), tiny_tokenizer())


@pytest.mark.real
def test_readme_stream_example_runs(capsys):
    exec(readme_python_blocks()[0], {})
    assert len(capsys.readouterr().out.strip()) > 0


def test_readme_compress_example_on_a_tiny_model(tiny_dense_checkpoint, tmp_path, monkeypatch, capsys):
    code = readme_python_blocks()[1].replace('"smollm2-135m"', repr(tiny_dense_checkpoint))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code, scope)
    capsys.readouterr()
    saved = rankserve.load(str(tmp_path / "smol-svdllm-02"))
    assert saved.manifest["family"] == "svd-llm"
    assert abs(saved.manifest["ratio_measured"] - 0.2) < 0.1
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.allclose(saved.model(ids), scope["lm"].model(ids), atol=1e-5)


def test_generate_accepts_text_or_ids_and_names_bad_input(tiny_dense_checkpoint):
    lm = rankserve.load(tiny_dense_checkpoint)
    ids = lm.tokenizer.encode("ab")
    a = rankserve.generate(lm.model, lm.tokenizer, "ab", max_tokens=4)
    b = rankserve.generate(lm.model, lm.tokenizer, ids, rankserve.SamplingParams(max_tokens=4))
    assert a == b
    with pytest.raises(ValueError, match="unknown sampling keyword"):
        rankserve.generate(lm.model, lm.tokenizer, "ab", max_token=4)
    with pytest.raises(ValueError, match="either params or sampling keywords"):
        rankserve.generate(lm.model, lm.tokenizer, "ab", rankserve.SamplingParams(), max_tokens=4)
    with pytest.raises(ValueError, match="chat=True needs the prompt as text"):
        rankserve.generate(lm.model, lm.tokenizer, ids, chat=True)


def test_save_refuses_a_compressed_model_without_its_report(tmp_path):
    lm_model = tiny_model("llama-gqa")
    rankserve.compress_(lm_model, rankserve.SVDConfig(ratio=0.3), progress=False)
    with pytest.raises(ValueError, match="pass report="):
        rankserve.save(lm_model, str(tmp_path / "x"), tiny_tokenizer())
    assert not os.path.exists(tmp_path / "x")


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        rankserve.no_such_name  # noqa: B018
