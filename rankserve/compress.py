"""Compression as one verb: ``compress_(model, config, calibration=None) -> CompressionReport``.

The flow, for any registered family:

1. The family cuts the decoder projections into slots (one matrix each, or one stacked group for Basis Sharing).
   The LM head and embeddings are never touched and never counted.
2. Ranks are planned per slot. ``uniform``: ``r = floor(out*in*(1-ratio)/(out+in))`` (ranks.rank_for_ratio);
   a slot stays dense where that rank would not save parameters (``r > ranks.max_useful_rank``).
   ``adaptive``: the same parameter budget is spent greedily where each family's spectrum says truncation hurts
   least (ranks.allocate_ranks). The layer-by-layer pipeline truncates each layer before it sees the next, so
   adaptive ranks first run a statistics pass over the DENSE model to get every slot's spectrum, then the
   compressing pass. ``sensitivity``: the same budget spent where the calibration LOSS says truncation hurts
   least. One backward pass per sample over the first ``sensitivity_samples`` calibration samples gives each
   projection's output-gradient moment ``E[g g^T]``; a statistics pass over the dense model on the same samples
   gives its input moment ``E[x x^T]`` (and the family's statistics); the family's own expansion (e.g. SVD-LLM's whitened SVD) then yields the K-FAC
   second-order estimate of the loss increase at EVERY rank from one factorization
   (linalg.kfac_truncation_loss), and a global threshold on loss per parameter meets the budget
   (ranks.allocate_ranks_by_loss); a slot the loss says to keep nearly whole stays dense, since at the
   break-even rank a factorization stores as much as the dense matrix and still loses. A Basis Sharing group is one item: its shared basis is truncated for the
   whole group at once, at the stacked matrix's cost per rank. ``rank_overrides`` (exact name or regex) win
   over every mode.
3. Families that read gradients (FWSVD) get them from one backward pass per sample over the dense model.
4. Families that read activations are compressed unit by unit (a unit is one decoder block, or a Basis Sharing
   group of blocks): the statistics of a unit come from running its dense blocks on the hidden states produced
   by the already-compressed blocks before it, so later layers correct for earlier truncation errors.

``ratio`` is always the fraction of linear-layer parameters REMOVED (see ``RATIO_CONVENTION``).
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from rankserve.calibration import (
    Calibration,
    LayerPipeline,
    fisher_row_importance,
    output_grad_moments,
    projection_names,
)
from rankserve.errors import InputError
from rankserve.families import RANK_RULE, RATIO_CONVENTION, FamilyConfig, Slot, SlotData, transform_for
from rankserve.layers import DenseLinear, replace_module
from rankserve.linalg import kfac_truncation_loss
from rankserve.ranks import allocate_ranks, allocate_ranks_by_loss, max_useful_rank, rank_for_ratio
from rankserve.threads import num_threads

log = logging.getLogger(__name__)

ACTIVATION_STATS = frozenset({"xtx", "absmean"})


@dataclass
class SlotRecord:
    """What happened to one slot: its rank (None = kept dense), parameter counts, and family details."""

    name: str
    kind: str
    members: list[str]
    member_shapes: list[list[int]]  # [out, in] per member
    out: int
    inp: int
    rank: int | None
    params_before: int
    params_after: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompressionReport:
    family: str
    config: dict[str, Any]
    ratio: float  # requested: fraction of linear-layer parameters REMOVED
    rank_mode: str  # effective mode ("uniform" when a family cannot do adaptive)
    slots: list[SlotRecord]
    calibration: dict[str, Any] | None = None
    wall_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    ratio_convention: str = RATIO_CONVENTION
    allocation: dict[str, Any] | None = None  # how ranks="sensitivity" chose (settings, estimates, time)

    @property
    def params_before(self) -> int:
        return sum(s.params_before for s in self.slots)

    @property
    def params_after(self) -> int:
        return sum(s.params_after for s in self.slots)

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def rank_step(self) -> float:
        """The ratio one rank of every slot is worth: uniform floors can miss the request by less than this."""
        return sum(s.out + s.inp for s in self.slots) / self.params_before if self.params_before else 0.0

    def ranks(self) -> dict[str, int | None]:
        """Rank per projection name (shared members report their group's rank)."""
        return {m: s.rank for s in self.slots for m in s.members}

    def slots_by_kind(self) -> dict[str, list[SlotRecord]]:
        """The slots grouped by projection kind (q_proj, ...), kinds in slot order."""
        kinds: dict[str, list[SlotRecord]] = {}
        for s in self.slots:
            kinds.setdefault(s.kind, []).append(s)
        return kinds

    def whitening_counts(self) -> dict[str, int]:
        """Slots per whitening method, shift sizes dropped ("cholesky+shift(1e-05)" counts as "cholesky+shift")."""
        return dict(Counter(s.info["whitening"].split("(")[0] for s in self.slots if "whitening" in s.info))

    def to_dict(self) -> dict[str, Any]:
        layers = {}
        for s in self.slots:
            for m, shape in zip(s.members, s.member_shapes, strict=True):
                layers[m] = {"kind": s.kind, "shape": shape, "rank": s.rank, "slot": s.name, **s.info}
        return {
            "family": self.family,
            "family_config": self.config,
            "ratio": self.ratio,
            "ratio_convention": self.ratio_convention,
            "achieved_ratio": round(self.achieved_ratio, 6),
            "rank_step": round(self.rank_step, 6),
            "rank_mode": self.rank_mode,
            "params_linear_before": self.params_before,
            "params_linear_after": self.params_after,
            "whitening": self.whitening_counts(),
            "layers": layers,
            "slots": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "members": s.members,
                    "shape": [s.out, s.inp],
                    "rank": s.rank,
                    "params_before": s.params_before,
                    "params_after": s.params_after,
                    **s.info,
                }
                for s in self.slots
            ],
            "calibration": self.calibration,
            "allocation": self.allocation,
            "wall_time_s": round(self.wall_time_s, 3),
            "notes": self.notes,
        }

    def table(self) -> str:
        """A plain-text summary by projection kind, with the ratio convention spelled out."""
        kinds = self.slots_by_kind()
        head = f"{'kind':<10} {'ranks':<28} {'params before':>14} {'params after':>14} {'removed':>8}"
        lines = [
            f"family {self.family}, ranks {self.rank_mode}, requested ratio {self.ratio:g}",
            f"(ratio = {self.ratio_convention}; {RANK_RULE})",
            head,
            "-" * len(head),
        ]
        for kind, ss in kinds.items():
            before, after = sum(s.params_before for s in ss), sum(s.params_after for s in ss)
            lines.append(
                f"{kind:<10} {_rank_summary(ss):<28} {before:>14,} {after:>14,} {1 - after / before:>8.4f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<10} {'':<28} {self.params_before:>14,} {self.params_after:>14,} "
            f"{self.achieved_ratio:>8.4f}"
        )
        lines.append(
            f"achieved ratio {self.achieved_ratio:.4f} vs requested {self.ratio:g} "
            f"(one rank per slot = {self.rank_step:.4f}); wall time {self.wall_time_s:.1f} s"
        )
        wc = self.whitening_counts()
        if wc:
            lines.append("whitening: " + ", ".join(f"{k} x{v}" for k, v in sorted(wc.items())))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def factorized_ranks(ss: list[SlotRecord]) -> tuple[list[int], int]:
    """The sorted ranks of the factorized slots among ``ss``, and how many of ``ss`` stay dense."""
    ranks = sorted(s.rank for s in ss if s.rank is not None)
    return ranks, len(ss) - len(ranks)


def _rank_summary(ss: list[SlotRecord]) -> str:
    ranks, dense = factorized_ranks(ss)
    parts = []
    if ranks:
        if min(ranks) == max(ranks):
            parts.append(f"{ranks[0]} x{len(ranks)}")
        else:
            parts.append(f"{min(ranks)}-{max(ranks)} (median {statistics.median(ranks):g})")
    if dense:
        parts.append(f"dense x{dense}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# rank planning


def uniform_rank(slot: Slot, ratio: float) -> int | None:
    """Uniform rank of a slot, or None where the factorization would not save parameters (stay dense)."""
    r = rank_for_ratio(slot.out, slot.inp, ratio)
    return None if r > max_useful_rank(slot.out, slot.inp) else r


def plan_ranks(
    cfg: FamilyConfig,
    slots: list[Slot],
    spectra: dict[str, Tensor] | None = None,
    losses: dict[str, Tensor] | None = None,
) -> dict[str, int | None]:
    """Rank per slot name (None = dense): uniform, adaptive from ``spectra``, or by the loss curves ``losses``
    (``losses[name][r]`` = loss increase at rank r), then explicit overrides."""
    if cfg.ratio == 0:
        ranks: dict[str, int | None] = {s.name: None for s in slots}
    elif losses is not None:
        items = [{"name": s.name, "out": s.out, "inp": s.inp, "loss": losses[s.name]} for s in slots]
        ranks = dict(allocate_ranks_by_loss(items, cfg.ratio))
    elif spectra is None:
        ranks = {s.name: uniform_rank(s, cfg.ratio) for s in slots}
    else:
        items = [{"name": s.name, "out": s.out, "inp": s.inp, "spectrum": spectra[s.name]} for s in slots]
        ranks = dict(allocate_ranks(items, cfg.ratio))
    for s in slots:
        r = _override(cfg.rank_overrides, [s.name, *s.members])
        if r is not None:
            ranks[s.name] = min(r, s.out, s.inp)
    return ranks


def _override(overrides: dict[str, int], names: list[str]) -> int | None:
    for pattern, r in overrides.items():
        if any(n == pattern or re.fullmatch(pattern, n) for n in names):
            return r
    return None


# --------------------------------------------------------------------------------------------------
# the verb


def compress_(
    model: nn.Module,
    config: FamilyConfig,
    calibration: Calibration | Tensor | None = None,
    *,
    batch_size: int = 8,
    progress: bool = True,
    linalg_threads: int | None = 1,
) -> CompressionReport:
    """Compress ``model`` in place with the family ``config`` describes; return what was done.

    ``calibration`` (a :class:`~rankserve.calibration.Calibration` or token ids [N, L]) is required by families
    that read data. Projections are replaced by ``LowRankLinear`` / ``SharedBasisLinear`` in the model's dtype.
    ``linalg_threads``: torch threads while decomposing (None = leave as is). One by default: a float64 SVD of a
    1536x576 weight took 0.55 s on one thread but 14.5 s on two when other processes shared the two cores
    (LAPACK's threads wait on each other at every step); forward passes keep the caller's thread count.
    """
    t0 = time.perf_counter()
    config.validate()
    transform = transform_for(config)
    wanted = config.wanted_stats()
    calib_meta = None
    tokens = None
    if isinstance(calibration, Calibration):
        tokens, calib_meta = calibration.tokens, calibration.to_dict()
    elif calibration is not None:
        tokens = torch.as_tensor(calibration)
        calib_meta = {"source": "tokens", "n_samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[-1])}
    if config.ratio == 0 and not config.rank_overrides:  # nothing to truncate: no data pass needed
        wanted = frozenset()
    if wanted and tokens is None:
        raise InputError(f"family {config.name} needs calibration data (calibration=None was given)")

    projs = projection_names(model)
    int8 = [n for n, m in projs.items() if m.is_int8()]
    if int8:
        raise InputError(
            f"the model holds int8 weights ({int8[0]}); compress its float source, then quantize"
        )
    not_dense = [n for n, m in projs.items() if not isinstance(m, DenseLinear)]
    if not_dense:
        raise InputError(
            f"model is already compressed ({not_dense[0]} is {type(projs[not_dense[0]]).__name__}); to "
            "compress it further, multiply its factors out first with rankserve.layers.densify_(model)"
        )
    n_layers = len(model.model.layers)
    slots = transform.slots(config, projs, n_layers)
    units = transform.units(config, n_layers)
    unit_of = {i: k for k, unit in enumerate(units) for i in unit}
    by_unit: dict[int, list[Slot]] = {}
    for s in slots:
        by_unit.setdefault(unit_of[s.layers[0]], []).append(s)
    notes: list[str] = []

    rank_mode = config.ranks
    if rank_mode == "adaptive" and not type(config).supports_adaptive:
        notes.append(f"{config.name} does not support adaptive ranks; uniform ranks were used")
        rank_mode = "uniform"

    fisher: dict[str, Tensor] = {}
    if "fisher" in wanted:
        fisher = fisher_row_importance(model, tokens, list(projs), progress=progress)

    own = config.own_stats() if wanted else frozenset()

    def slot_data(s: Slot, stats: dict | None) -> SlotData:
        d = SlotData()
        if stats is not None:
            st = [stats[m] for m in s.members]
            if "xtx" in own:
                d.xtx = st[0].xtx if len(st) == 1 else torch.stack([x.xtx for x in st]).sum(0)
            if "absmean" in own:
                d.absmean = st[0].absmean
        if fisher:
            d.fisher = [fisher[m] for m in s.members]
        return d

    act = own & ACTIVATION_STATS
    spectra = None
    if rank_mode == "adaptive" and config.ratio > 0:
        spectra = {}
        pipe = LayerPipeline(model, tokens, act, batch_size) if act else None
        for k, unit in enumerate(
            tqdm(units, desc="spectra (dense model)", unit="unit", disable=not progress)
        ):
            stats = pipe.collect(unit, advance=True) if pipe else None
            for s in by_unit.get(k, []):
                weights = [projs[m].weight.detach() for m in s.members]
                with num_threads(linalg_threads):
                    spectra[s.name] = transform.spectrum(config, s, weights, slot_data(s, stats)).cpu()
        del pipe
    losses = allocation = None
    if rank_mode == "sensitivity" and config.ratio > 0:
        t1 = time.perf_counter()
        probe = tokens[: config.sensitivity_samples]
        grads = output_grad_moments(model, probe, list(projs), progress=progress)
        losses = {}
        # The same samples for both K-FAC factors; a quarter of the statistics pass of the default 32 samples.
        pipe = LayerPipeline(model, probe, act | {"xtx"}, batch_size)
        for k, unit in enumerate(
            tqdm(units, desc="loss sensitivity (dense model)", unit="unit", disable=not progress)
        ):
            stats = pipe.collect(unit, advance=True)
            for s in by_unit.get(k, []):
                weights = [projs[m].weight.detach() for m in s.members]
                with num_threads(linalg_threads):
                    expansions = transform.expansion(config, s, weights, slot_data(s, stats))
                    moments = [stats[m].xtx / stats[m].tokens for m in s.members]
                    losses[s.name] = kfac_truncation_loss(
                        expansions, moments, [grads.pop(m) for m in s.members]
                    )
        del pipe, grads
        allocation = {
            "allocator": "sensitivity",
            "estimate": "K-FAC second-order loss increase, 1/2 tr(dW E[xx^T] dW^T E[gg^T]), per slot",
            "samples": int(probe.shape[0]),
            "tokens": int(probe.numel()),
            "time_s": round(time.perf_counter() - t1, 3),
        }
    ranks = plan_ranks(config, slots, spectra, losses)
    if losses is not None:
        uniform = {s.name: uniform_rank(s, config.ratio) for s in slots}
        allocation["est_loss_uniform"] = round(sum(float(_at(losses[n], r)) for n, r in uniform.items()), 6)
        allocation["est_loss_chosen"] = round(sum(float(_at(losses[n], r)) for n, r in ranks.items()), 6)

    records: dict[str, SlotRecord] = {}
    pipe = LayerPipeline(model, tokens, act, batch_size) if act else None
    for k, unit in enumerate(
        tqdm(units, desc=f"compress ({config.name})", unit="unit", disable=not progress)
    ):
        todo = [s for s in by_unit.get(k, []) if ranks[s.name] is not None]
        stats = pipe.collect(unit) if (pipe and todo) else None
        for s in by_unit.get(k, []):
            modules = [projs[m] for m in s.members]
            rank = ranks[s.name]
            before = sum(m.param_count() for m in modules)
            info: dict[str, Any] = {}
            if rank is not None:
                with num_threads(linalg_threads):
                    res = transform.factorize(config, s, modules, slot_data(s, stats), rank)
                for name, new in zip(s.members, res.modules, strict=True):
                    replace_module(model, name, new)
                info = res.info
                # a shared basis is one tensor: count it once for the slot
                after = _unique_params(res.modules)
                log.info("%s: rank %d%s", s.name, rank, "".join(f", {k_} {v}" for k_, v in info.items()))
            else:
                after = before
            if losses is not None:  # every slot, dense ones too (zero: nothing truncated)
                info = {**info, "est_loss_increase": round(float(_at(losses[s.name], rank)), 6)}
            records[s.name] = SlotRecord(
                s.name,
                s.kind,
                list(s.members),
                [[m.out_features, m.in_features] for m in modules],
                s.out,
                s.inp,
                rank,
                before,
                after,
                info,
            )
        if pipe:
            pipe.advance(unit)
    return CompressionReport(
        family=config.name,
        config=config.to_dict(),
        ratio=float(config.ratio),
        rank_mode=rank_mode,
        slots=[records[s.name] for s in slots],
        calibration=calib_meta,
        wall_time_s=time.perf_counter() - t0,
        notes=notes,
        allocation=allocation,
    )


def _at(curve: Tensor, rank: int | None) -> Tensor:
    """A loss curve's value at ``rank`` (None = dense: no loss; past its end: its last value)."""
    return curve.new_zeros(()) if rank is None else curve[min(rank, curve.numel() - 1)]


def _unique_params(modules: list[nn.Module]) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        for pname, p in m.named_parameters():
            if pname != "bias":
                seen[id(p)] = p.numel()
    return sum(seen.values())


def compression_manifest(
    model: nn.Module,
    config: FamilyConfig,
    report: CompressionReport,
    source_path: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint manifest of a model compressed by :func:`compress_`: family, ratio and its convention,
    ranks and shapes (from the model), calibration settings, and the report's details under ``compression``."""
    from rankserve.checkpoint import build_manifest

    info = report.to_dict()
    for k in ("family", "family_config", "ratio", "ratio_convention"):  # standard manifest keys already
        info.pop(k)
    info.update(extra or {})
    return build_manifest(
        model,
        family=config.name,
        family_config=config.to_dict(),
        ratio=config.ratio,
        source_path=source_path,
        calibration=info.pop("calibration"),
        extra={"compression": info},
    )
