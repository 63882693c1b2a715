import os
import sys

import pytest

# tests import their shared helpers (tiny.py, ...) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext2")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32), loaded once per session."""
    from rankserve.loaders.source import SourceError, load_model

    try:
        return load_model("smollm2-135m")
    except SourceError as e:
        pytest.skip(str(e))
