"""What a compression family is: a config dataclass (what to do) plus a registered transform (how).

* :class:`FamilyConfig` holds the knobs common to every family (``ratio``, rank mode, explicit rank overrides);
  each family subclasses it with its own fields and class-level declarations (``name``, ``needs_calibration``,
  which statistics it reads). Configs round-trip through JSON by an allowlist of dataclass fields, never ``eval``.
* :class:`Transform` turns the dense weights of one :class:`Slot` into factorized projections. A slot is the unit
  that is truncated to ONE rank: a single matrix for most families, the vertical stack of a group of layers'
  matrices for Basis Sharing. Rank planning and parameter budgets work on slots, so every family meets its
  budget by the same arithmetic (see ``rankserve.compress``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from rankserve.errors import InputError
from rankserve.layers import DenseLinear, LowRankLinear, Projection
from rankserve.linalg import Expansion

# Tables print the manifest's RATIO_CONVENTION (rankserve.checkpoint.manifest) and then this rule.
RANK_RULE = (
    "0.4 keeps 60%; uniform rank of an out x in weight = floor(out*in*(1-ratio)/(out+in)); a weight stays dense "
    "where a factorization would not save parameters"
)

RANK_MODES = ("uniform", "adaptive", "sensitivity")
# What ranks="sensitivity" reads on top of the family's own statistics: input Grams and output loss gradients.
SENSITIVITY_STATS = frozenset({"xtx", "outgrad"})

# Projections that read the same input tensor as another one in the block (Llama family): their
# activation statistics are the same object, collected once.
SAME_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


@dataclass
class FamilyConfig:
    """Knobs shared by every family. Subclasses add their own fields and set the class variables."""

    ratio: float = 0.2  # fraction of linear-layer parameters REMOVED (see RATIO_CONVENTION)
    # "uniform" | "adaptive" (same budget, spent where the spectra say it hurts least) | "sensitivity" (same
    # budget, spent where the estimated calibration loss says it hurts least; see rankserve.compress)
    ranks: str = "uniform"
    # Explicit ranks by exact slot/projection name or a regex matched in full, e.g. {"model.layers.0.mlp.down_proj": 64}
    # or {r".*\.k_proj": 32}. Honoured as given (clamped to min(out, in)), even where it saves nothing.
    rank_overrides: dict[str, int] = field(default_factory=dict)
    # ranks="sensitivity": calibration samples (the first ones) whose loss gradients weigh each truncation
    sensitivity_samples: int = 4

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    needs_calibration: ClassVar[bool] = False
    # Statistics the transform reads: "xtx" (input Gram), "absmean" (mean |x| per input channel) come from the
    # layer-by-layer activation pipeline; "fisher" (per-row squared gradients) from one backward pass.
    stats: ClassVar[frozenset[str]] = frozenset()
    supports_adaptive: ClassVar[bool] = True

    def validate(self) -> FamilyConfig:
        """Raise InputError naming the first bad field; return self."""
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r) or not 0 <= r < 1:
            raise InputError(
                f"ratio is the fraction of parameters removed and must satisfy 0 <= ratio < 1, got {r!r}"
            )
        if self.ranks not in RANK_MODES:
            raise InputError(f"ranks must be one of {', '.join(RANK_MODES)}, got {self.ranks!r}")
        n = self.sensitivity_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"sensitivity_samples must be an int >= 1, got {n!r}")
        for k, v in self.rank_overrides.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"rank_overrides maps names to ranks >= 1, got {k!r}: {v!r}")
            try:
                re.compile(k)
            except re.error as e:
                raise InputError(f"rank_overrides key {k!r} is not a valid regex: {e}") from None
        return self

    def wanted_stats(self) -> frozenset[str]:
        """Statistics this configuration actually reads: the family's own, plus what its rank mode reads."""
        return self.own_stats() | (SENSITIVITY_STATS if self.ranks == "sensitivity" else frozenset())

    def own_stats(self) -> frozenset[str]:
        """Statistics the family's factorization reads with these settings (a family may need none for some)."""
        return self.stats

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``family``, ``version`` and every dataclass field."""
        d: dict[str, Any] = {"family": self.name, "version": self.version}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, dict) else v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FamilyConfig:
        """Inverse of :meth:`to_dict`. Only declared fields are accepted, each checked against its default's type."""
        d = dict(d)
        fam = d.pop("family", cls.name)
        if fam != cls.name:
            raise InputError(f"config is for family {fam!r}, not {cls.name!r}")
        version = d.pop("version", cls.version)
        if version != cls.version:
            raise InputError(
                f"{cls.name} config version {version!r} is not supported (this is {cls.version})"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise InputError(
                f"unknown field(s) for family {cls.name}: {', '.join(unknown)} (known: {', '.join(fields)})"
            )
        kwargs = {k: _coerce(cls.name, k, v, _default(fields[k])) for k, v in d.items()}
        return cls(**kwargs).validate()


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _coerce(family: str, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the field's default (JSON gives lists for tuples, ints for floats)."""
    bad = InputError(f"{family} field {key!r} expects {type(default).__name__}, got {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
            raise bad
        return tuple(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise bad


@dataclass
class Slot:
    """One truncation unit: ``members`` (projection names) stacked vertically into an ``[out, inp]`` matrix."""

    name: str  # the projection name, or the basis group name for Basis Sharing ("q_proj.g0")
    kind: str  # projection type: q_proj, k_proj, ..., down_proj
    members: list[str]
    layers: list[int]
    out: int  # rows of the stacked matrix (sum of members' out)
    inp: int

    @property
    def dense_params(self) -> int:
        return self.out * self.inp


@dataclass
class SlotData:
    """What a transform may read for one slot (only what its config declared in ``stats``)."""

    xtx: Tensor | None = None  # [in, in] float64, summed over calibration tokens (and over a group's layers)
    absmean: Tensor | None = None  # [in] float64 mean |x| per input channel
    fisher: list[Tensor] | None = None  # per member: [out] float64 row importance (sum of squared grads)


@dataclass
class SlotResult:
    """The new projections of a slot (aligned with ``slot.members``) and what was done (e.g. whitening method)."""

    modules: list[Projection]
    info: dict[str, Any] = field(default_factory=dict)


class Transform:
    """How one family factorizes. The default treats every decoder projection as its own slot."""

    def slots(self, cfg: FamilyConfig, projs: dict[str, Projection], n_layers: int) -> list[Slot]:
        out = []
        for name, p in projs.items():
            out.append(
                Slot(name, short_name(name), [name], [layer_index(name)], p.out_features, p.in_features)
            )
        return out

    def units(self, cfg: FamilyConfig, n_layers: int) -> list[list[int]]:
        """Consecutive decoder blocks compressed together (their stats are collected on the dense blocks of
        the unit, fed by the already-compressed blocks before it)."""
        return [[i] for i in range(n_layers)]

    def spectrum(self, cfg: FamilyConfig, slot: Slot, weights: list[Tensor], data: SlotData) -> Tensor:
        """Singular values whose squared tail is this family's truncation loss (for adaptive ranks)."""
        raise NotImplementedError

    def expansion(
        self, cfg: FamilyConfig, slot: Slot, weights: list[Tensor], data: SlotData
    ) -> list[Expansion]:
        """Per member, the rank-one expansion this family truncates (ranks="sensitivity" weighs its tail)."""
        raise NotImplementedError

    def factorize(
        self, cfg: FamilyConfig, slot: Slot, modules: list[Projection], data: SlotData, rank: int
    ) -> SlotResult:
        raise NotImplementedError


def short_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def layer_index(name: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", name)
    if m is None:
        raise InputError(f"{name} is not a decoder-layer projection")
    return int(m.group(1))


def dense_weight(module: Projection) -> Tensor:
    if not isinstance(module, DenseLinear):
        raise InputError(f"expected a dense projection, got {type(module).__name__} (already compressed?)")
    return module.weight.detach()


def low_rank(module: Projection, U: Tensor, V: Tensor) -> LowRankLinear:
    """A LowRankLinear in the module's dtype/device that keeps its bias."""
    w = module.weight
    bias = None if module.bias is None else module.bias.detach().clone()
    return LowRankLinear.from_factors(U.to(w.device, w.dtype), V.to(w.device, w.dtype), bias)


def need(data: SlotData, what: str, family: str) -> Any:
    v = getattr(data, what)
    if v is None:
        raise InputError(f"family {family} needs calibration statistic {what!r}, none was collected")
    return v


# --------------------------------------------------------------------------------------------------
# registry: name -> (config class, transform). Filled once at import by the family modules.

_FAMILIES: dict[str, tuple[type[FamilyConfig], Transform]] = {}


def register(config_cls: type[FamilyConfig], transform: Transform) -> None:
    if not config_cls.name:
        raise ValueError(f"{config_cls.__name__} has no family name")
    if config_cls.name in _FAMILIES:
        raise ValueError(f"family {config_cls.name!r} is registered twice")
    _FAMILIES[config_cls.name] = (config_cls, transform)


def family_names() -> list[str]:
    return list(_FAMILIES)


def config_class(name: str) -> type[FamilyConfig]:
    """The config class of a family by name; InputError listing the known names otherwise."""
    if name not in _FAMILIES:
        raise InputError(f"unknown family {name!r}; known families: {', '.join(_FAMILIES)}")
    return _FAMILIES[name][0]


def transform_for(cfg: FamilyConfig) -> Transform:
    """The transform registered for a config's type (exact type, so a subclass must register itself)."""
    entry = _FAMILIES.get(cfg.name)
    if entry is None or type(cfg) is not entry[0]:
        raise ValueError(f"no transform registered for {type(cfg).__name__}")
    return entry[1]


def config_from_dict(d: dict[str, Any]) -> FamilyConfig:
    """Rebuild any family's config from its :meth:`FamilyConfig.to_dict` form."""
    if "family" not in d:
        raise InputError("config dict has no 'family' key")
    return config_class(d["family"]).from_dict(d)


def f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)
