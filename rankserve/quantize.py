"""Weight quantization as one verb, as in torchao: ``quantize_(model, Int8Config(...)) -> QuantReport``.

A method is a config dataclass (what to do, versioned, JSON round trip by an allowlist of fields) plus a
registered handler (how). The only method is symmetric int8 (:mod:`rankserve.quant` holds its math, the
projections hold the result, see :mod:`rankserve.layers`). It is training-free and works on any mix of dense,
low-rank and shared-basis projections, so it applies after compression and healing: every matrix of every decoder
projection (each shared basis once), and the LM head unless asked not to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rankserve.errors import InputError
from rankserve.layers import SCALE_SUFFIX, Projection, projections
from rankserve.quant import SCHEME, dequantize_int8, quantize_int8, smoothing_scales

LM_HEAD = "lm_head"


@dataclass
class QuantConfig:
    """Base of every quantization method's config: a name, a version and a JSON round trip."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def validate(self) -> QuantConfig:
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``method``, ``version`` and every dataclass field."""
        return {"method": self.name, "version": self.version, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Inverse of :meth:`to_dict`; only declared fields are accepted, and :meth:`validate` checks them."""
        d = dict(d)
        if d.pop("method", cls.name) != cls.name or d.pop("version", cls.version) != cls.version:
            raise InputError(f"not a {cls.name} config of version {cls.version}: {d}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(
                f"unknown field(s) for {cls.name}: {', '.join(unknown)} (known: {', '.join(known)})"
            )
        return cls(**d).validate()


@dataclass
class Int8Config(QuantConfig):
    """Symmetric int8 weights (``quant.SCHEME``): fp32 scales per output channel, or per group of input columns.

    The defaults, measured on SmolLM2-135M (docs/INT8.md):

    - ``group_size=None``: one scale per output channel for dense matrices and the lifts (``U``, coefficients).
      Dense int8 moves perplexity by -0.03%; it is the only layout PyTorch's own int8 weight matmul takes
      (``torch._weight_int8pack_mm``), and the decode GEMV loads one scale per row.
    - ``factor_group_size=16``: the *first* factor of a low-rank or shared-basis projection (``V`` [r, in], the
      shared basis) gets one scale per 16 input columns. It multiplies the activations directly, and SVD-LLM's
      whitening folds the activations' outlier channels into its columns, so one scale per row is too coarse:
      per channel it alone costs SVD-LLM 0.4 +1.9% WikiText-2 perplexity, groups of 32 +0.8%, groups of 16
      -0.1% (for +8% of the factors' bytes). ``None``: the factors take ``group_size`` like every other matrix.
    - ``smooth=False``: before rounding, divide each RMSNorm's weight by per-column scales and multiply the
      columns of the projections it feeds by them (:func:`rankserve.quant.smoothing_scales`; exact in real
      arithmetic), in the norm groups that hold a low-rank first factor. It lets SVD-LLM's ``V`` take one scale
      per row (``factor_group_size=None``) within the quality bar (docs/INT8.md).
    - ``lm_head=True``: the LM head is int8 too (a tied head then gets its own int8 copy; the embedding stays in
      the working dtype). It is a fifth of SmolLM2's decode bytes in fp32, and llama.cpp's Q8_0 quantizes it.

    A group that does not divide a matrix's columns gives that matrix per-channel scales (see
    ``QuantReport.per_channel``): the layout has no ragged groups.
    """

    group_size: int | None = None
    lm_head: bool = True
    factor_group_size: int | None = 16
    smooth: bool = False

    name: ClassVar[str] = "int8"
    scheme: ClassVar[str] = SCHEME

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Int8Config:
        # Records written before factor groups existed gave the factors ``group_size`` like every other matrix.
        # Records written before smoothing existed did not smooth.
        return super().from_dict({"factor_group_size": None, "smooth": False, **d})

    def validate(self) -> Int8Config:
        for field, g in (("group_size", self.group_size), ("factor_group_size", self.factor_group_size)):
            if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
                raise InputError(f"int8 {field} must be a positive integer or None (per channel), got {g!r}")
        for field in ("lm_head", "smooth"):
            if not isinstance(getattr(self, field), bool):
                raise InputError(f"int8 {field} must be true or false, got {getattr(self, field)!r}")
        return self

    def wanted_group(self, matrices: tuple[str, ...], i: int) -> int | None:
        """The group size asked for matrix ``i`` of a projection that applies ``matrices`` in order (None: per
        channel). The first of several (``V``, a shared basis) is a first factor: ``factor_group_size``."""
        first_factor = i == 0 and len(matrices) > 1
        return (
            self.factor_group_size if first_factor and self.factor_group_size is not None else self.group_size
        )

    def group(self, cols: int, matrices: tuple[str, ...], i: int) -> int:
        """Input columns per scale of matrix ``i`` (``cols`` columns) of a projection applying ``matrices``: the
        one rule, used by :func:`quantize_` and the checkpoint loader."""
        return group_for(cols, self.wanted_group(matrices, i))


@dataclass
class QuantReport:
    """What :func:`quantize_` did: the config, and per int8 tensor its SQNR against the float matrix (dB)."""

    config: dict[str, Any]
    # "model.layers.0.self_attn.q_proj.V" -> dB; a shared basis under its first member
    sqnr_db: dict[str, float]
    # with a group size: the matrices whose columns it does not divide, which got per-channel scales instead
    per_channel: list[str] = dataclasses.field(default_factory=list)
    # with ``smooth``: how many norm groups (a norm and the projections reading it) were smoothed
    smoothed: int = 0

    @property
    def tensors(self) -> list[str]:
        return list(self.sqnr_db)

    def table(self) -> str:
        s = sorted(self.sqnr_db.values())
        cfg = self.config
        gran = "per channel" if cfg.get("group_size") is None else f"groups of {cfg['group_size']}"
        if cfg.get("factor_group_size") is not None:
            gran += f", first factors in groups of {cfg['factor_group_size']}"
        if cfg.get("smooth"):
            gran += f", {self.smoothed} norm groups smoothed"
        head = "with" if cfg.get("lm_head") else "without"
        if not s:
            return f"{cfg['method']}: nothing quantized"
        fallback = (
            f"; {len(self.per_channel)} per channel (the group does not divide their columns)"
            if self.per_channel
            else ""
        )
        return (
            f"{cfg['method']} ({gran}, {head} the LM head): {len(s)} matrices{fallback}; SQNR min {s[0]:.1f} dB, "
            f"median {s[len(s) // 2]:.1f} dB, max {s[-1]:.1f} dB"
        )


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB (inf if exact)."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.pow(2).sum() / noise))


def group_for(cols: int, group_size: int | None) -> int:
    """The group a matrix with ``cols`` columns gets: ``group_size`` where it divides ``cols``, else per channel
    (``cols``), since the layout has no ragged groups. The checkpoint loader checks files by the same rule."""
    return cols if group_size is None or cols % group_size else group_size


def targets(model: nn.Module, lm_head: bool) -> dict[str, Projection]:
    """Projections a quantization touches: the decoder projections, and the LM head if ``lm_head``."""
    return {n: p for n, p in projections(model).items() if n != LM_HEAD or lm_head}


def _int8(model: nn.Module, cfg: Int8Config) -> QuantReport:
    projs = targets(model, cfg.lm_head)
    done = [n for n, p in projections(model).items() if p.is_int8()]
    if done:
        raise InputError(
            f"the model already holds int8 weights ({done[0]}); quantize its float source instead"
        )
    # Every matrix's group first, so that bad input fails before anything changes. A group size that does not
    # divide a matrix's columns (SmolLM2's hidden 576 by 128, a factor U [out, r] whose rank r is arbitrary)
    # gives that matrix one scale per output channel, as the layout has no ragged groups; the report lists them.
    plan = [
        (n, p, m, cfg.wanted_group(p.matrices, i)) for n, p in projs.items() for i, m in enumerate(p.matrices)
    ]
    g = cfg.group_size
    if g is not None and all(group_for(getattr(p, m).shape[1], g) != g for _, p, m, _ in plan):
        widths = sorted({getattr(p, m).shape[1] for _, p, m, _ in plan})
        raise InputError(
            f"int8 group size {g} divides none of the matrices' column counts ({', '.join(map(str, widths))}); "
            "choose a divisor, or per-channel scales"
        )
    smoothed = smooth_norm_groups_(model) if cfg.smooth else 0
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(shared basis) -> its pair, quantized once
    sqnr: dict[str, float] = {}
    per_channel: list[str] = []
    for name, p, m, wanted in plan:
        W = getattr(p, m)
        pair = shared.get(id(W))
        if pair is None:
            group = group_for(W.shape[1], wanted)
            pair = quantize_int8(W, group)
            sqnr[f"{name}.{m}"] = sqnr_db(W, dequantize_int8(*pair))
            if wanted is not None and group != wanted:
                per_channel.append(f"{name}.{m}")
            if m == "basis":
                shared[id(W)] = pair
        p.set_int8(m, *pair, work_dtype=W.dtype)
    return QuantReport(cfg.to_dict(), sqnr, per_channel, smoothed)


def smooth_norm_groups_(model: nn.Module) -> int:
    """Fold :func:`smoothing_scales` into each norm group that holds a low-rank first factor: the projections'
    first matrices times ``s`` per column, the norm's weight divided by ``s``. A group with a shared basis is left
    alone (the basis is shared with other layers' groups, which would need the same ``s``); so is an all-dense one.
    Returns the number of groups smoothed."""
    n = 0
    for layer in model.model.layers:
        for norm, members in layer.norm_consumers():
            firsts = [p.matrices[0] for p in members]
            if "basis" in firsts or all(len(p.matrices) == 1 for p in members):
                continue
            mats = [getattr(p, m) for p, m in zip(members, firsts, strict=True)]
            s = smoothing_scales(mats)
            # new tensors, not in place: a loaded model's weights may be read-only memory maps of its files
            for M in mats:
                M.data = M.data * s.to(M.dtype)
            norm.weight.data = norm.weight.data / s.to(norm.weight.dtype)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# registry: config type -> handler

_METHODS: dict[type[QuantConfig], Callable[[nn.Module, Any], QuantReport]] = {}


def register(config_cls: type[QuantConfig], handler: Callable[[nn.Module, Any], QuantReport]) -> None:
    if config_cls in _METHODS or any(c.name == config_cls.name for c in _METHODS):
        raise ValueError(f"quantization method {config_cls.name!r} is registered twice")
    _METHODS[config_cls] = handler


register(Int8Config, _int8)


def method_names() -> list[str]:
    return [c.name for c in _METHODS]


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """Rebuild any method's config from its :meth:`QuantConfig.to_dict` form (as a manifest records it)."""
    for cls in _METHODS:
        if cls.name == d.get("method"):
            return cls.from_dict(d)
    raise InputError(f"unknown quantization method {d.get('method')!r}; known: {', '.join(method_names())}")


@torch.no_grad()
def quantize_(model: nn.Module, config: QuantConfig) -> QuantReport:
    """Quantize ``model``'s weights in place as ``config`` says; return what was done.

    Training-free. Compress (and heal) first: a quantized model refuses compression and healing.
    """
    handler = _METHODS.get(type(config))
    if handler is None:
        raise InputError(f"no quantization method registered for {type(config).__name__}")
    return handler(model, config.validate())


def int8_tensors(model: nn.Module) -> dict[str, str]:
    """Every int8 matrix of ``model``: state-dict name of the int8 tensor -> name of its scale tensor."""
    return {
        f"{n}.{m}": f"{n}.{m}{SCALE_SUFFIX}"
        for n, p in projections(model).items()
        for m in p.matrices
        if p.qmat(m) is not None
    }
