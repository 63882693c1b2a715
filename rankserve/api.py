"""The public verbs, re-exported at the package top (``rankserve.load``, ``rankserve.generate``, ...).

Thin by design: each verb resolves the convenient argument forms (a prompt as text or ids, sampling as keywords)
and hands over to the one implementation in ``loaders``, ``runtime``, ``compress`` or ``checkpoint``.
"""

from __future__ import annotations

from collections.abc import Iterator

from rankserve.compress import CompressionReport, compress_, compression_manifest
from rankserve.errors import InputError
from rankserve.families import config_from_dict
from rankserve.loaders.source import LoadedModel, load_model
from rankserve.quantize import QuantReport, quantize_
from rankserve.runtime import generate as _gen
from rankserve.runtime.options import RuntimeOptions
from rankserve.runtime.sampling import SamplingParams

__all__ = ["compress_", "generate", "load", "quantize_", "save", "stream_generate"]


def load(source: str, dtype: str = "fp32") -> LoadedModel:
    """Load a model source (alias, HF directory, GGUF file or rankserve checkpoint).

    The result has ``.model`` and ``.tokenizer`` (and the resolved ``.source``, ``.config``, ``.manifest``).
    """
    return load_model(source, dtype=dtype)


def _prompt_ids(tokenizer, prompt: str | list[int], chat: bool) -> list[int]:
    if isinstance(prompt, str):
        if chat:
            return tokenizer.chat([{"role": "user", "content": prompt}])
        return tokenizer.encode(prompt)
    if chat:
        raise InputError("chat=True needs the prompt as text, not token ids")
    if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise InputError("prompt must be text or a non-empty list of token ids")
    return list(prompt)


def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is not None and sampling:
        raise InputError(f"pass either params or sampling keywords ({', '.join(sampling)}), not both")
    if params is not None:
        return params
    try:
        return SamplingParams(**sampling)
    except TypeError:
        known = ", ".join(SamplingParams.__dataclass_fields__)
        raise InputError(f"unknown sampling keyword in {sorted(sampling)}; known: {known}") from None


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[int],
    params: SamplingParams | None = None,
    *,
    chat: bool = False,
    options: RuntimeOptions | None = None,
    **sampling,
) -> Iterator[_gen.GenerationResponse]:
    """Stream text deltas for one prompt; ``chat=True`` wraps a text prompt in the model's chat template.

    Sampling is given as ``params`` or as keywords (``max_tokens=32, temperature=0.7, stop=["\\n"]``).
    """
    ids = _prompt_ids(tokenizer, prompt, chat)
    return _gen.stream_generate(model, tokenizer, ids, _params(params, sampling), options)


def generate(
    model,
    tokenizer,
    prompt: str | list[int],
    params: SamplingParams | None = None,
    *,
    chat: bool = False,
    options: RuntimeOptions | None = None,
    **sampling,
) -> str:
    """The generated text for one prompt (arguments as :func:`stream_generate`)."""
    ids = _prompt_ids(tokenizer, prompt, chat)
    return _gen.generate(model, tokenizer, ids, _params(params, sampling), options)


def save(
    model,
    out_dir: str,
    tokenizer,
    *,
    report: CompressionReport | None = None,
    quant: QuantReport | None = None,
    source: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``model`` as a rankserve checkpoint directory, atomically; return its path.

    A model compressed by :func:`compress_` needs the ``report`` that call returned (the manifest records the
    family, its config and the calibration); a model quantized by :func:`quantize_` needs the ``quant`` report
    that call returned. ``source`` is the path it came from (hashed into the manifest).
    """
    from rankserve.checkpoint import build_manifest, save_checkpoint, with_quantization
    from rankserve.layers import DenseLinear, projections

    if report is not None:
        config = config_from_dict({"family": report.family, **report.config})
        manifest = compression_manifest(model, config, report, source)
    elif any(not isinstance(p, DenseLinear) for p in projections(model).values()):
        raise InputError(
            "the model is compressed: pass report=<what compress_ returned> so the manifest says how"
        )
    else:
        manifest = build_manifest(model, source_path=source)
    if quant is not None:
        manifest = with_quantization(manifest, model, quant)
    return save_checkpoint(model, out_dir, tokenizer=tokenizer, manifest=manifest, overwrite=overwrite)
