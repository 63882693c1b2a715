"""rankserve: SVD-family compression of decoder LLMs and a runtime that serves them fast.

The public API, as in mlx-lm and torchao::

    import rankserve
    lm = rankserve.load("smollm2-135m")
    report = rankserve.compress_(lm.model, rankserve.SVDLLMConfig(ratio=0.2), calibration)
    rankserve.quantize_(lm.model, rankserve.Int8Config())  # optional: int8 weights, after compression
    print(rankserve.generate(lm.model, lm.tokenizer, "What is the capital of France?", chat=True))
    rankserve.save(lm.model, "out-dir", lm.tokenizer, report=report, source=lm.source)

Names are imported on first use, so ``import rankserve`` (and the CLI) stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "load": "rankserve.api",
    "generate": "rankserve.api",
    "stream_generate": "rankserve.api",
    "save": "rankserve.api",
    "compress_": "rankserve.api",
    "quantize_": "rankserve.api",
    "Int8Config": "rankserve.quantize",
    "heal_": "rankserve.heal",
    "HealConfig": "rankserve.heal",
    "SamplingParams": "rankserve.runtime.sampling",
    "RuntimeOptions": "rankserve.runtime.options",
    "make_calibration": "rankserve.calibration",
    "SVDConfig": "rankserve.families",
    "FWSVDConfig": "rankserve.families",
    "ASVDConfig": "rankserve.families",
    "SVDLLMConfig": "rankserve.families",
    "BasisSharingConfig": "rankserve.families",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'rankserve' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
