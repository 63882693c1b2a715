import os
import sys

import pytest

# tests import their shared helpers (tiny.py, ...) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random HF model directory (config, safetensors, tokenizer) for CLI and server tests."""
    from test_loaders import write_hf_dir
    from tiny_tok import tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    write_hf_dir(path, max_position_embeddings=64)
    tiny_tokenizer().save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32), loaded once per session."""
    from rankserve.loaders.source import SourceError, load_model

    try:
        return load_model("smollm2-135m")
    except SourceError as e:
        pytest.skip(str(e))
