"""Which runner a generation uses: :func:`make_runner` picks eager or fast, :class:`RunnerCache` keeps the
model's last runner so the fast path packs and compiles once per model."""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

from rankserve.runtime.eager import EagerRunner
from rankserve.runtime.fast import FastRunner, bucketed_len
from rankserve.runtime.options import RuntimeOptions


def context_limit(model) -> int:
    """The longest sequence (prompt + generated) the model takes."""
    return int(model.config.max_position_embeddings)


def make_runner(model, batch: int, max_len: int, options: RuntimeOptions):
    """A new runner for ``options.backend``: the fast one (packed, compiled, native kernels) or the eager one."""
    if options.backend == "fast":
        return FastRunner(model, batch, max_len, options)
    return EagerRunner(model, batch, max_len, options)


class RunnerCache:
    """The runner a model last generated with, kept for the next call: the fast path packs and compiles once.

    Owned by the model (:func:`runner_cache`); it holds one runner, so at most one KV cache stays allocated. A
    runner is reused when batch, options and cache length match and the model's weights are the same tensors,
    unchanged. It serves one generation at a time: the generation holds a :class:`Lease`, and while that lease
    is alive (its generator not yet finished or collected) another generation gets a new, uncached runner.
    """

    def __init__(self):
        self._key = None
        self._runner = None
        self._lease = None  # weakref to the live Lease of the cached runner
        self.last = None  # the runner of the latest generation (for reports: which kernels ran)

    def __reduce__(self):  # a copied or pickled model starts with an empty cache
        return (RunnerCache, ())

    def lease(self, model, batch: int, max_len: int, options: RuntimeOptions) -> Lease:
        key = (batch, _cache_len(model, max_len, options), dataclasses.replace(options, max_len=None))
        busy = self._lease is not None and self._lease() is not None
        if busy:
            runner = make_runner(model, batch, max_len, options)
        else:
            if self._key != (key, _weights_key(model)):
                self._runner = None  # free the old KV cache before allocating the new one
                self._runner = make_runner(model, batch, max_len, options)
                self._key = (key, _weights_key(model))  # after the runner: packing moves the weights
            runner = self._runner
        self.last = runner
        lease = Lease(runner)
        if not busy:
            self._lease = weakref.ref(lease)
        return lease


@dataclass
class Lease:
    runner: object


def runner_cache(model) -> RunnerCache:
    """The model's own :class:`RunnerCache` (created on first use)."""
    return vars(model).setdefault("_rankserve_runners", RunnerCache())


def _cache_len(model, max_len: int, options: RuntimeOptions) -> int:
    """KV cache slots the runner for ``max_len`` allocates (the fast path rounds up to share compiled steps)."""
    if options.backend != "fast":
        return max_len
    return bucketed_len(max_len, context_limit(model))


def _weights_key(model) -> tuple:
    """Identity and version of every weight: a replaced or modified weight makes a cached runner stale."""
    return tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in model.parameters())
