"""Calibration data and the statistics that compression families read from it.

* :class:`Calibration`: ``N`` samples of ``L`` token ids plus where they came from. Either windows of a text file
  (:func:`text_calibration`) or text the dense model generates itself (:func:`self_calibration`: sampled at
  temperature 1 from the BOS token, one seeded sampler per sample, so compression needs no dataset), or both
  (:func:`mixed_calibration`: the model's prose and chat answers, :func:`self_generated_rows`, and a file's windows).
* :class:`LayerPipeline`: runs one unit of decoder blocks at a time on the hidden states produced by the blocks
  before it, which the caller may already have compressed. Only the current ``[N, L, D]`` hidden states are
  kept, so memory stays bounded whatever the depth. Per projection input it accumulates ``X^T X`` in float64
  and ``sum |x|`` (one object shared by q/k/v, and by gate/up, which read the same tensor).
* :func:`fisher_row_importance`: per-row sums of squared gradients of the LM loss (FWSVD), one backward pass
  per sample with gradients enabled for the projection weights only, reduced to rows as soon as each
  gradient is complete.

Everything is deterministic for a given seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from rankserve.errors import InputError
from rankserve.families.base import SAME_INPUT, short_name
from rankserve.hashing import file_sha256
from rankserve.layers import Projection, projections
from rankserve.models.llama import rope_cos_sin
from rankserve.textstyle import detokenizer

SELF = "self"
MIX = "mix"  # self-generated rows and a text file's windows
GENERATE_BATCH = 64  # most rows self-generated in one batch
SELF_GENERATED = "self-generated"

# Chat prompts for self-generated data: generic instructions across many registers, so the student sees the
# teacher answering in chat form, not only continuing prose. None is a question any evaluation asks.
CHAT_PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "Give me three tips for a job interview.",
    "Summarize the causes of the First World War.",
    "Write a Python function that reverses a list.",
    "What are the health benefits of walking every day?",
    "Describe the water cycle to a ten-year-old.",
    "Write a polite email asking for a deadline extension.",
    "Compare renting and buying a home.",
    "How do vaccines train the immune system?",
    "Write a poem about autumn rain.",
    "Explain what inflation is and why it matters.",
    "What should I pack for a week of hiking?",
    "Explain the difference between weather and climate.",
    "Give a recipe for a simple vegetable soup.",
    "Why is the sky blue?",
    "Describe how a bill becomes law in a parliament.",
    "Write a product description for a reusable water bottle.",
    "What is machine learning, in plain words?",
    "Tell me about the history of the printing press.",
    "How can I improve my sleep?",
    "Explain photosynthesis step by step.",
    "Write a dialogue between a teacher and a student about fractions.",
    "What are the main features of Gothic architecture?",
)


@dataclass
class Calibration:
    """Calibration token ids [N, L] and a JSON-able description of their origin (for the manifest)."""

    tokens: Tensor  # int64 [N, L]
    source: str  # "self", the text file's path, or "mix" (both: ``details["parts"]``)
    seed: int
    sha256: str | None = None  # of the text file
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "n_samples": self.n_samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "sha256": self.sha256,
            **self.details,
        }


def _check_sizes(n_samples: int, seq_len: int) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise InputError(f"calibration samples must be a positive integer, got {n_samples!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise InputError(f"calibration sequence length must be an integer >= 2, got {seq_len!r}")


def text_calibration(
    path: str, tokenizer, n_samples: int, seq_len: int, seed: int = 0, detokenize: str | None = None
) -> Calibration:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets of the tokenized file.

    The whole file is tokenized once (no special tokens; a UTF-8 BOM is dropped); window starts are drawn
    uniformly with a ``torch.Generator`` seeded by ``seed``, as SVD-LLM samples its calibration set.
    ``detokenize``: a :data:`rankserve.textstyle.DETOKENIZERS` name whose rules rewrite the text first (e.g.
    ``"wikitext"``: WikiText's tokenized style as plain prose).
    """
    _check_sizes(n_samples, seq_len)
    rewrite = detokenizer(detokenize) if detokenize is not None else None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file not found: {path}")
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if rewrite is not None:
        text = rewrite(text)
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    if ids.numel() < seq_len:
        raise InputError(f"{path} has {ids.numel()} tokens, fewer than one window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=g)
    tokens = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])  # (N, L)
    record: dict[str, Any] = {"file_tokens": int(ids.numel())}
    if detokenize is not None:
        record["detokenize"] = detokenize
    return Calibration(tokens, os.path.abspath(path), seed, file_sha256(path), record)


def self_calibration(
    model: nn.Module,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    *,
    bos_id: int,
    pad_id: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
    prompts: list[list[int]] | None = None,
    options=None,
) -> Calibration:
    """``n_samples`` sequences of ``seq_len`` tokens sampled by the dense model itself from ``[bos_id]``.

    Temperature 1, no top-k/p, EOS ignored so every sample has the full length. Sample i uses its own sampler
    seeded from ``seed``; batches have a fixed size so the same seed gives the same tokens. By default
    (``batch_size=None``) as few batches of equal size as :data:`GENERATE_BATCH` allows: a decode step reads
    every weight once whatever the batch, so on a CPU many rows cost little more per step than one. ``prompts``: sample
    i starts from ``prompts[i % len(prompts)]`` instead (each shorter than ``seq_len``; healing uses chat prompts).
    ``options``: the runtime that generates. Default: on a CPU the fast runtime (packed weights, native decode:
    2.7x the eager path's tokens/s for 16 rows of 256 on 2 Zen 4 cores), elsewhere the eager reference path.
    Each batch shape gets its own runner, dropped afterwards, so no KV cache stays cached on ``model``.
    """
    from rankserve.runtime.generate import generate_tokens, generation_len
    from rankserve.runtime.options import RuntimeOptions
    from rankserve.runtime.runners import make_runner
    from rankserve.runtime.sampling import SamplingParams

    _check_sizes(n_samples, seq_len)
    limit = int(model.config.max_position_embeddings)
    if seq_len > limit:
        raise InputError(f"calibration sequence length {seq_len} exceeds the model context {limit}")
    prompts = prompts or [[bos_id]]
    if any(not 1 <= len(p) < seq_len for p in prompts):
        raise InputError(f"every prompt must have between 1 and {seq_len - 1} tokens")
    batch_size = batch_size or math.ceil(n_samples / math.ceil(n_samples / GENERATE_BATCH))
    if options is None:
        on_cpu = next(model.parameters()).device.type == "cpu"
        options = RuntimeOptions(backend="fast" if on_cpu else "eager")
    runners = {}  # (batch size, cache length) -> runner (the last batch may be smaller)
    row_seeds = torch.randint(0, 2**62, (n_samples,), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[list[int]] = []
    bar = tqdm(total=n_samples, desc="calibration: self-generating", unit="sample", disable=not progress)
    for s in range(0, n_samples, batch_size):
        seeds = row_seeds[s : s + batch_size]
        starts = [list(prompts[(s + i) % len(prompts)]) for i in range(len(seeds))]
        params = [
            SamplingParams(max_tokens=seq_len - len(p), temperature=1.0, seed=int(r), ignore_eos=True)
            for p, r in zip(starts, seeds, strict=True)
        ]
        out = [list(p) for p in starts]
        # rows are left-padded to the longest prompt, so the cache is longer than seq_len when prompts differ
        P, cache_len, steps = generation_len(model, starts, params, options)
        if steps < max(sp.max_tokens for sp in params):
            raise InputError(
                f"self-generated rows of {seq_len} tokens from prompts of {min(map(len, starts))} to {P} tokens "
                f"need a cache of {P + max(sp.max_tokens for sp in params)} slots (rows are left-padded), more "
                f"than the model context {limit}; use a shorter seq_len or prompts of one length"
            )
        key = (len(seeds), cache_len)
        if key not in runners:
            runners[key] = make_runner(model, *key, options)
        runner = runners[key]
        for step in generate_tokens(model, starts, params, [], pad_id, options, runner):
            for b, tok in enumerate(step.tokens):
                if step.active[b]:  # rows with longer prompts stop earlier
                    out[b].append(tok)
        rows.extend(out)
        bar.update(len(seeds))
    bar.close()
    tokens = torch.tensor(rows, dtype=torch.long)  # (N, L)
    return Calibration(tokens, SELF, seed, None, {"prompt_ids": [bos_id], "temperature": 1.0})


def make_calibration(
    source: str | None,
    model: nn.Module,
    tokenizer,
    n_samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    progress: bool = False,
    self_share: float = 0.0,
) -> Calibration:
    """Calibration from a text file path, or self-generated when ``source`` is None or ``"self"``.

    ``self_share`` (a file only): that fraction of the samples, rounded, is the model's own prose and chat
    answers (:func:`self_generated_rows`) and the rest windows of the file (:func:`mixed_calibration`).
    """
    if source in (None, SELF):
        return self_calibration(
            model,
            n_samples,
            seq_len,
            seed,
            bos_id=start_token(tokenizer),
            pad_id=tokenizer.pad_id,
            progress=progress,
        )
    check_self_share(self_share)
    _check_sizes(n_samples, seq_len)
    n_self = round(n_samples * self_share)
    if n_self == 0:
        return text_calibration(source, tokenizer, n_samples, seq_len, seed)
    text = (
        text_calibration(source, tokenizer, n_samples - n_self, seq_len, seed) if n_self < n_samples else None
    )
    return mixed_calibration(self_generated_rows(model, tokenizer, n_self, seq_len, seed, progress), text)


def check_self_share(self_share: float, name: str = "calibration self_share") -> None:
    """The self-generated fraction of a mixed calibration must be a number in [0, 1] (``name``: what the caller
    calls it, e.g. a command-line flag)."""
    if isinstance(self_share, bool) or not isinstance(self_share, int | float) or not 0 <= self_share <= 1:
        raise InputError(f"{name} must be a fraction in [0, 1], got {self_share!r}")


def mixed_calibration(generated: tuple[Tensor, dict[str, Any]], text: Calibration | None) -> Calibration:
    """Rows the model wrote (``(tokens [n, L], record)`` from :func:`self_generated_rows`) followed by ``text``'s
    windows. With loss-driven ranks, half of each calibrated SVD-LLM 0.2 better on WikiText-2 and on other prose
    than either alone (docs/HEALING.md). The model's rows come first, so the sensitivity probe (the first few
    samples) reads them: interleaving the two kinds measured slightly worse (SmolLM2, SVD-LLM 0.2, unhealed:
    1.76x / 2.08x dense against 1.74x / 2.01x)."""
    own, record = generated
    if text is None:
        return Calibration(own, MIX, int(record["seed"]), None, {"parts": [record]})
    if own.shape[1] != text.seq_len:
        raise InputError(f"mixed calibration rows differ in length: {own.shape[1]} and {text.seq_len} tokens")
    parts = [record, text.to_dict()]
    return Calibration(torch.cat([own, text.tokens]), MIX, text.seed, None, {"parts": parts})


def start_token(tokenizer) -> int:
    """The token self-generated rows start from: BOS, or the end-of-text token when there is no BOS."""
    bos = getattr(getattr(tokenizer, "hf", None), "bos_token_id", None)
    if bos is None:  # no BOS in the vocabulary: start from the end-of-text token instead
        bos = tokenizer.eos_ids[0] if tokenizer.eos_ids else 0
    return int(bos)


def self_generated_rows(
    teacher: nn.Module, tokenizer, n_rows: int, seq_len: int, seed: int, progress: bool = False
) -> tuple[Tensor, dict[str, Any]]:
    """``n_rows`` rows of ``seq_len`` tokens the teacher writes: even rows from BOS (prose), odd rows as chat
    answers to :data:`CHAT_PROMPTS` when the tokenizer has a chat template."""
    bos = start_token(tokenizer)
    prompts = [[bos]]
    if tokenizer.has_chat_template:
        chat = [tokenizer.chat([{"role": "user", "content": q}]) for q in CHAT_PROMPTS]
        chat = [c for c in chat if len(c) < seq_len // 2]  # keep most of every row generated
        # interleave prose and chat rows, rotating through the chat prompts
        prompts = [p for c in chat for p in ([bos], c)]
    calib = self_calibration(
        teacher,
        n_rows,
        seq_len,
        seed,
        bos_id=bos,
        pad_id=tokenizer.pad_id,
        progress=progress,
        prompts=prompts,
    )
    record = {
        "source": SELF_GENERATED,
        "seed": seed,
        "samples": n_rows,
        "seq_len": seq_len,
        "prompts": "BOS and chat instructions" if len(prompts) > 1 else "BOS",
        "temperature": 1.0,
    }
    return calib.tokens, record


# --------------------------------------------------------------------------------------------------
# activation statistics


class InputStats:
    """Running statistics of one projection input: ``X^T X`` and ``sum |x|`` in float64, token count."""

    def __init__(self, dim: int, xtx: bool, absmean: bool):
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64) if xtx else None
        self.abs_sum = torch.zeros(dim, dtype=torch.float64) if absmean else None
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, in)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0)
        self.tokens += x.shape[0]

    @property
    def absmean(self) -> Tensor | None:
        return None if self.abs_sum is None else self.abs_sum / max(self.tokens, 1)


class LayerPipeline:
    """Layer-by-layer activation statistics over calibration tokens.

    Usage (the caller compresses between ``collect`` and ``advance``)::

        pipe = LayerPipeline(model, calib.tokens, {"xtx"})
        for unit in [[0], [1], ...]:
            stats = pipe.collect(unit)   # dense blocks of the unit run on the current inputs
            ...replace projections of the unit...
            pipe.advance(unit)           # the (now compressed) blocks produce the next unit's inputs

    ``stats`` maps projection names to :class:`InputStats`; names that read the same tensor (k/v with q,
    up with gate) map to the same object.
    """

    def __init__(self, model: nn.Module, tokens: Tensor, wanted: Iterable[str], batch_size: int = 8):
        wanted = set(wanted)
        unknown = wanted - {"xtx", "absmean"}
        if unknown:
            raise ValueError(f"unknown activation statistics: {sorted(unknown)}")
        if tokens.ndim != 2:
            raise ValueError(f"calibration tokens must be [N, L], got shape {tuple(tokens.shape)}")
        self.model, self.wanted, self.batch_size = model, wanted, batch_size
        self.layers = model.model.layers
        p = model.model.embed_tokens.weight
        positions = torch.arange(tokens.shape[1], device=p.device)[None]  # (1, L), broadcast over the batch
        self.cos, self.sin = rope_cos_sin(model.inv_freq, positions, p.dtype)  # (1, 1, L, hd)
        with torch.no_grad():
            self.x = model.model.embed_tokens(tokens.to(p.device))  # (N, L, D): inputs of the next block
        self.next_layer = 0

    def _run(self, layer: nn.Module, x: Tensor) -> Tensor:
        outs = []
        with torch.no_grad():
            for s in range(0, x.shape[0], self.batch_size):
                outs.append(layer(x[s : s + self.batch_size], self.cos, self.sin))  # (b, L, D)
        return torch.cat(outs)

    def collect(self, unit: list[int], advance: bool = False) -> dict[str, InputStats]:
        """Run the unit's blocks (as they are now) on the current inputs and return their input statistics.

        ``advance=True`` also keeps the unit's output as the next inputs (for passes that change nothing).
        """
        if not unit or unit[0] != self.next_layer or unit != list(range(unit[0], unit[0] + len(unit))):
            raise ValueError(
                f"units must be consecutive and in order; expected to start at {self.next_layer}"
            )
        stats: dict[str, InputStats] = {}
        hooks = []
        x = self.x
        try:
            for i in unit:
                prefix = f"model.layers.{i}."
                projs = {prefix + n: m for n, m in projections(self.layers[i]).items()}
                for name, m in projs.items():
                    if short_name(name) in SAME_INPUT:
                        continue
                    st = stats[name] = InputStats(
                        m.in_features, "xtx" in self.wanted, "absmean" in self.wanted
                    )
                    hooks.append(m.register_forward_pre_hook(lambda _m, args, st=st: st.add(args[0])))
                for name in projs:
                    src = SAME_INPUT.get(short_name(name))
                    if src is not None:
                        stats[name] = stats[name.rsplit(".", 1)[0] + "." + src]
                x = self._run(self.layers[i], x)
        finally:
            for h in hooks:
                h.remove()
        if advance:
            self.x, self.next_layer = x, unit[-1] + 1
        return stats

    def advance(self, unit: list[int]) -> None:
        """Replace the current inputs by the outputs of the unit's blocks (compressed or not)."""
        if not unit or unit[0] != self.next_layer:
            raise ValueError(f"advance expects the unit starting at layer {self.next_layer}")
        for i in unit:
            self.x = self._run(self.layers[i], self.x)
        self.next_layer = unit[-1] + 1


def fisher_row_importance(
    model: nn.Module, tokens: Tensor, names: Iterable[str], progress: bool = False
) -> dict[str, Tensor]:
    """FWSVD row importance ``I_i = sum_samples sum_j (dL/dW_ij)^2`` (float64 ``[out]``) per projection.

    ``L`` is the mean next-token cross-entropy of one calibration sample; each sample is its own backward pass,
    so the squares are per-sample (the empirical Fisher), not of a batch mean. Only the listed projections'
    weights require grad, and each gradient is reduced to its row sums and freed as soon as it is complete
    (post-accumulate hooks), so memory holds activations for one sample and one weight gradient at a time.
    """
    projs = projections(model)
    params: dict[str, nn.Parameter] = {}
    for n in names:
        m = projs[n]
        if not isinstance(getattr(m, "weight", None), nn.Parameter):
            raise ValueError(f"{n} has no dense weight to take gradients of")
        params[n] = m.weight
    acc = {n: torch.zeros(p.shape[0], dtype=torch.float64) for n, p in params.items()}

    def hook_for(name: str):
        def hook(p: Tensor) -> None:
            acc[name] += p.grad.detach().to(torch.float64).pow(2).sum(1).cpu()
            p.grad = None

        return hook

    hooks = []
    try:
        for n, p in params.items():
            p.requires_grad_(True)
            hooks.append(p.register_post_accumulate_grad_hook(hook_for(n)))
        _backward_per_sample(model, tokens, "fisher: backward", progress)
    finally:
        for h in hooks:
            h.remove()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    return acc


def output_grad_moments(
    model: nn.Module, tokens: Tensor, names: Iterable[str], progress: bool = False
) -> dict[str, Tensor]:
    """``E[g g^T]`` (float32 ``[out, out]``) per projection, ``g`` the gradient of the loss at its output.

    ``g`` at token t is the gradient of its sample's SUMMED next-token NLL, and the mean runs over every
    position of every sample: the output factor of the K-FAC Fisher (the input factor is ``X^T X`` / tokens).
    One backward pass per sample with no weight gradients at all: the embedding output is made to require grad
    so that the graph exists, and a tensor hook on each listed projection's output adds ``g^T g``. float32
    sums: SmolLM2-135M's 210 moments take 0.7 GB so, twice that in float64, and the allocator they feed
    compares them only to a few digits.
    """
    projs = projections(model)
    mods = {n: projs[n] for n in names}
    acc = {n: torch.zeros(m.out_features, m.out_features) for n, m in mods.items()}
    scale = float(tokens.shape[1] - 1)  # the per-sample loss below is a mean over L-1 targets

    def on_output(name: str):
        def grad_hook(g: Tensor) -> None:
            g = g.detach().reshape(-1, g.shape[-1]).float().cpu() * scale  # (tokens, out)
            acc[name].addmm_(g.mT, g)

        def hook(_m, _args, out: Tensor) -> None:
            if out.requires_grad:
                out.register_hook(grad_hook)

        return hook

    hooks = [model.model.embed_tokens.register_forward_hook(lambda _m, _a, out: out.requires_grad_())]
    try:
        hooks += [m.register_forward_hook(on_output(n)) for n, m in mods.items()]
        _backward_per_sample(model, tokens, "loss gradients: backward", progress)
    finally:
        for h in hooks:
            h.remove()
    count = tokens.shape[0] * tokens.shape[1]
    return {n: a / count for n, a in acc.items()}


def _backward_per_sample(model: nn.Module, tokens: Tensor, desc: str, progress: bool) -> None:
    """One backward pass of the mean next-token NLL per calibration sample, in eval mode (gradients go to hooks)."""
    was_training = model.training
    model.eval()
    device = model.model.embed_tokens.weight.device
    try:
        with torch.enable_grad():  # also when the caller runs under no_grad
            for i in tqdm(range(tokens.shape[0]), desc=desc, unit="sample", disable=not progress):
                t = tokens[i : i + 1].to(device)  # (1, L)
                logits = model(t)  # (1, L, V)
                loss = F.cross_entropy(logits[0, :-1].float(), t[0, 1:])
                loss.backward()
    finally:
        model.train(was_training)


def projection_names(model: nn.Module) -> dict[str, Projection]:
    """The projections compression acts on: every decoder-layer projection (the LM head is excluded)."""
    return {n: m for n, m in projections(model).items() if n.startswith("model.layers.")}
