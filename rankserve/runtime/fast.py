"""The fast runtime: a decode step built for one token at a time.

What makes it fast:
- packed projections: one first-stage GEMV for q/k/v and one for gate/up, then the small low-rank lifts;
- native kernels (``rankserve.runtime.native``) where PyTorch's M=1 linear streams far below bandwidth: each
  decoder layer is one OpenMP region (``decode_layer``), and all layers run in one call from Python
  (``LayerStack``);
- one-token attention over the valid prefix of a dense, preallocated KV cache;
- without the native kernels (no compiler, CUDA), the whole step traced by ``torch.compile`` over static shapes,
  so per-op Python overhead disappears and elementwise work is fused.

Prefill uses the model's own (GEMM-shaped, chunked) forward over the same cache. The eager runner
(``eager.py``) stays the reference this runner is tested against.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from rankserve.models.llama import KVCache
from rankserve.runtime import hugepages
from rankserve.runtime.eager import chunked_prefill
from rankserve.runtime.options import RuntimeOptions
from rankserve.runtime.packing import PackedGroup, float_matrix, pack_, packed_bytes

log = logging.getLogger(__name__)


class Kernels:
    """The primitive ops of the decode step, native where available, PyTorch otherwise.

    The choice is fixed at construction, so a traced graph holds one path (no branching at run time).
    """

    def __init__(self, native=None):
        self.native = native  # a rankserve.runtime.native.NativeKernels or None
        self.ops = native.ops if native is not None else None
        # the whole decoder layer as one native call (one OpenMP region instead of ~15 ops)
        self.has_layer = native is not None and hasattr(self.ops, "decode_layer")

    def layer_on(self, device: torch.device) -> bool:
        """Whether the native ``decode_layer`` runs a decode step on ``device``."""
        return self.has_layer and device.type == "cpu"

    def report(self) -> dict:
        """Which kernels the decode step runs: ``native_kernels`` and the vector path (None without them)."""
        return {"native_kernels": self.native is not None, "native_isa": getattr(self.native, "isa", None)}

    def linear(self, x, W, bias=None, scale=None):
        """[B, in] x [out, in] -> [B, out]; with ``scale``, W is int8 (``rankserve.quant`` layout)."""
        native = self.ops is not None and x.device.type == "cpu"
        if scale is not None:
            if native:
                return self.ops.int8_gemv(x, W, scale, bias)
            return F.linear(x, float_matrix(W, scale, x.dtype), bias)
        if native:
            return self.ops.gemv(x, W, bias)
        return F.linear(x, W, bias)

    def lowrank(self, x, V, U, bias=None):
        """U (V x) + b, [B, in] -> [B, out]."""
        if self.ops is not None and x.device.type == "cpu":
            return self.ops.lowrank_gemv(x, V, U, bias)
        return F.linear(F.linear(x, V), U, bias)

    def group(self, g: PackedGroup, x):
        """A packed group: one GEMV over the stacked first stages, then the per-member lifts."""
        if len(g.lifts) == 1:
            lift = g.lifts[0]
            if lift is None:
                return self.linear(x, g.first, g.bias, g.first_scale)
            if g.first_scale is None and g.lift_scales is None:
                return self.lowrank(x, g.first, lift, g.bias)
        t = self.linear(x, g.first, scale=g.first_scale)  # (B, sum r_i)
        if g.all_dense:
            return t if g.bias is None else t + g.bias
        outs = []
        for i, (part, lift) in enumerate(zip(t.split(g.splits, -1), g.lifts, strict=True)):
            outs.append(part if lift is None else self.linear(part.contiguous(), lift, scale=g.lift_scale(i)))
        y = torch.cat(outs, -1)
        return y if g.bias is None else y + g.bias

    def attention(self, q, k_cache, v_cache, slot, valid_from, scale: float):
        """One query per row over cache slots [valid_from_b, slot]: q [B, H, hd], caches [B, K, S, hd]."""
        B, H, hd = q.shape
        K, S = k_cache.shape[1], k_cache.shape[2]
        qg = q.view(B, K, H // K, hd)  # (B, K, rep, hd): query heads grouped by their kv head
        scores = torch.einsum("bkrd,bksd->bkrs", qg.float(), k_cache.float()) * scale  # (B, K, rep, S)
        s = torch.arange(S, device=q.device)
        valid = (s[None, :] <= slot) & (s[None, :] >= valid_from[:, None])  # (B, S)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        p = torch.softmax(scores, -1)
        out = torch.einsum("bkrs,bksd->bkrd", p, v_cache.float())  # (B, K, rep, hd)
        return out.reshape(B, H, hd).to(q.dtype)


def _rms(x, w, eps: float):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rope(x, cos, sin):
    """x [B, heads, hd]; cos/sin [B, 1, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def layer_groups(layer) -> list[list]:
    """A decoder layer's projections as the fast path packs them: q/k/v, o, gate/up, down."""
    at, mlp = layer.self_attn, layer.mlp
    return [[at.q_proj, at.k_proj, at.v_proj], [at.o_proj], [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]]


def native_group(g: PackedGroup) -> tuple:
    """A packed group as the native kernels take it: first, its int8 scale or None, lifts, their int8 scales
    (none, or an empty tensor for a float lift), splits, bias."""
    empty = g.first.new_empty(0, 0, dtype=torch.float32)
    lifts = [empty if lift is None else lift for lift in g.lifts]
    scales = [] if g.lift_scales is None else [empty if s is None else s for s in g.lift_scales]
    return g.first, g.first_scale, lifts, scales, list(g.splits), g.bias


def flat_group(group: tuple, empty: torch.Tensor) -> tuple[list, list]:
    """One ``native_group`` as the ``LayerStack`` reads it: (its tensors, its layout entries)."""
    first, first_scale, lifts, scales, splits, bias = group
    tensors = [first, empty if first_scale is None else first_scale, *lifts, *scales]
    tensors.append(empty if bias is None else bias)
    return tensors, [len(splits), *splits, len(lifts), len(scales)]


class FastLayer(nn.Module):
    def __init__(self, layer, arena: hugepages.Arena | None = None):
        super().__init__()
        # In place: the layer's projections become views of these buffers (one copy of the weights).
        self.qkv, self.o, self.gate_up, self.down = (pack_(g, arena) for g in layer_groups(layer))
        self.w_in = layer.input_layernorm.weight.detach()
        self.w_post = layer.post_attention_layernorm.weight.detach()
        self.eps = layer.input_layernorm.eps

    def native_groups(self) -> list[tuple]:
        """The packed groups (qkv, o, gate_up, down) as the native kernels take them (``native_group``)."""
        return [native_group(g) for g in (self.qkv, self.o, self.gate_up, self.down)]

    def native_args(self) -> list:
        """The groups' arguments of the ``decode_layer`` op, in order."""
        return [a for group in self.native_groups() for a in group]


class FastDecoder(nn.Module):
    """The one-token forward of a whole model over a shared KV cache, in a traceable form."""

    def __init__(self, model, cache: KVCache, kernels: Kernels, arena: hugepages.Arena | None = None):
        super().__init__()
        cfg = model.config
        dtype = next(model.parameters()).dtype
        self.cfg, self.kernels, self.cache = cfg, kernels, cache
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = 1.0 / self.hd**0.5
        self.embed = model.model.embed_tokens.weight.detach()
        self.layers = []
        for layer in model.model.layers:
            self.layers.append(FastLayer(layer, arena))
            if arena is not None:  # the weights it copied from, freed, back to the OS now: else they stay
                hugepages.trim_heap()  # mapped beside the arena (fp32 SmolLM2 peaked 1306 MB, not ~1030)
        self._native = [L.native_args() for L in self.layers]
        self._stacks = {}  # op namespace -> its LayerStack of these layers (built on first use)
        # one native call for all layers; False: one decode_layer call per layer (an A/B baseline)
        self.stacked = True
        self.w_norm = model.model.norm.weight.detach()
        self.eps = model.model.norm.eps
        self.head = pack_([model.lm_head])
        # RoPE tables for every position the cache can hold: [S, hd]
        pos = torch.arange(cache.max_len, device=self.embed.device, dtype=torch.float32)
        freqs = pos[:, None] * model.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), -1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def weights(self) -> list[torch.Tensor]:
        """Every tensor a decode step streams: the layers' packed groups and norms, the final norm and the head."""
        out = [self.w_norm]
        for g in [grp for L in self.layers for grp in (L.qkv, L.o, L.gate_up, L.down)] + [self.head]:
            out += g.tensors()
        out += [w for L in self.layers for w in (L.w_in, L.w_post)]
        return out

    def _layer_stack(self):
        """The native ``LayerStack`` (csrc/decode_layer.h) of the current kernels: every layer's ``native_groups``
        flattened once, so that a decode step crosses from Python into the kernels once, not once per layer."""
        ns = self.kernels.ops.name
        if ns not in self._stacks:
            empty = self.embed.new_empty(0)
            tensors, layout = [], []
            for L in self.layers:
                tensors.append(L.w_in)
                tensors.append(L.w_post)
                for group in L.native_groups():
                    t, lay = flat_group(group, empty)
                    tensors += t
                    layout += lay
            eps = [float(L.eps) for L in self.layers]
            stack = getattr(torch.classes, ns).LayerStack(
                tensors, layout, eps, self.n_heads, self.n_kv, self.scale
            )
            head, head_layout = flat_group(native_group(self.head), empty)
            stack.set_ends([self.embed, self.cos, self.sin, self.w_norm, *head], head_layout, float(self.eps))
            self._stacks[ns] = stack
        return self._stacks[ns]

    def forward(self, tokens, positions, slot, valid_from):
        """tokens [B], positions [B], slot [1] (int64 tensor), valid_from [B] -> logits [B, V]."""
        kern, B = self.kernels, tokens.shape[0]
        H, K, hd = self.n_heads, self.n_kv, self.hd
        kc_all, vc_all = self.cache.k, self.cache.v  # (L, B, K, S, hd)
        if self.stacked and kern.layer_on(tokens.device) and not torch.compiler.is_compiling():
            # the whole step, embedding to logits, in one native call; a traced graph takes the paths below
            return self._layer_stack().step(tokens, positions, kc_all, vc_all, slot, valid_from)  # (B, V)
        x = self.embed[tokens]  # (B, D)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, hd)
        if kern.layer_on(x.device):
            cos2, sin2 = cos[:, 0], sin[:, 0]  # (B, hd)
            for i, L in enumerate(self.layers):
                x = kern.ops.decode_layer(
                    x,
                    L.w_in,
                    L.w_post,
                    L.eps,
                    *self._native[i],
                    kc_all[i],
                    vc_all[i],
                    cos2,
                    sin2,
                    slot,
                    valid_from,
                    H,
                    K,
                    self.scale,
                )
            x = _rms(x, self.w_norm, self.eps)
            return kern.group(self.head, x)  # (B, V)
        for i, L in enumerate(self.layers):
            h = _rms(x, L.w_in, L.eps)
            qkv = kern.group(L.qkv, h)  # (B, (H + 2K) * hd)
            q, k, v = qkv.split([H * hd, K * hd, K * hd], -1)
            q = _rope(q.reshape(B, H, hd), cos, sin)
            k = _rope(k.reshape(B, K, hd), cos, sin)
            kc, vc = kc_all[i], vc_all[i]  # (B, K, S, hd)
            kc.index_copy_(2, slot, k[:, :, None])  # write this token's k/v at its slot
            vc.index_copy_(2, slot, v.reshape(B, K, 1, hd))
            o = kern.attention(q, kc, vc, slot, valid_from, self.scale)  # (B, H, hd)
            x = x + kern.group(L.o, o.reshape(B, H * hd))
            h = _rms(x, L.w_post, L.eps)
            g, u = (
                kern.group(L.gate_up, h).chunk(2, -1)
                if L.gate_up.out_features[0] == L.gate_up.out_features[1]
                else kern.group(L.gate_up, h).split(L.gate_up.out_features, -1)
            )
            x = x + kern.group(L.down, F.silu(g) * u)
        x = _rms(x, self.w_norm, self.eps)
        return kern.group(self.head, x)  # (B, V)


# Cache lengths are rounded up to this, so prompts of similar length share one compiled step.
SLOT_BUCKET = 256


def bucketed_len(max_len: int, limit: int) -> int:
    """The cache length the fast path allocates: ``max_len`` rounded up to a bucket, capped by ``limit``.

    The compiled step is specialised to the cache shape; attention reads only the valid prefix, so extra slots
    cost memory, not time, and one graph serves every request that fits the bucket.
    """
    return max(max_len, min(limit, -(-max_len // SLOT_BUCKET) * SLOT_BUCKET))


class FastRunner:
    """Runner with the same interface as ``EagerRunner``: chunked GEMM prefill, compiled one-token decode."""

    def __init__(self, model, batch: int, max_len: int, options: RuntimeOptions | None = None):
        from rankserve.runtime.native import NativeKernels

        self.model = model
        self.options = options or RuntimeOptions(backend="fast")
        p = next(model.parameters())
        self.device = p.device
        max_len = bucketed_len(max_len, model.config.max_position_embeddings)
        self.cache = KVCache(model.config, batch, max_len, device=p.device, dtype=p.dtype)
        use_native = self.options.native and p.device.type == "cpu"
        native = NativeKernels.load(self.options.native_isa) if use_native else None
        self.kernels = Kernels(native)
        t0 = time.perf_counter()
        arena = None
        if self.options.hugepages and p.device.type == "cpu":  # the layers' weights copied onto 2 MiB pages
            groups = [g for layer in model.model.layers for g in layer_groups(layer)]
            arena = hugepages.model_arena(model, sum(map(packed_bytes, groups)))
        self.decoder = FastDecoder(model, self.cache, self.kernels, arena)
        # bytes of the weights on 2 MiB pages (the arena's, and the head's where it collapses; 0 where the OS
        # cannot): rankserve.runtime.hugepages
        self.huge_bytes = hugepages.collapse(self.decoder.weights()) if arena is not None else 0
        hugepages.trim_heap()  # the copied-from weights' memory, freed, back to the OS
        self.pack_s = time.perf_counter() - t0
        self.step = self.decoder
        self.compile_s = 0.0
        self.artifacts = None
        if self.compiles(self.options, self.kernels, p.device):
            self.artifacts = CompileCache(self.options.cache_dir, self._signature(batch))
            self.artifacts.load()
            self.step = torch.compile(self.decoder, fullgraph=True, dynamic=False)
        self._compiled_once = False

    @staticmethod
    def compiles(options: RuntimeOptions, kernels: Kernels, device: torch.device) -> bool:
        """Whether the decode step is captured with torch.compile: ``options.compile``, or when that is None,
        only if the native ``decode_layer`` does not run the step.

        With it the step is ~30 opaque native calls plus a few small ops, and the compiled graph's guards and
        wrapper cost more than they fuse: measured on AMD EPYC (Zen 3, 2 threads), both runners in one process,
        8 interleaved rounds of 128 tokens, the uncompiled step decoded 1.08x faster (8 of 8 rounds) for int8
        dense SmolLM2 and for bf16 SVD-LLM 0.4. Without the native kernels (a CPU without a compiler, CUDA)
        the step is ~15 PyTorch ops per layer, which compile fuses.
        """
        if options.compile is not None:
            return options.compile
        return not kernels.layer_on(device)

    def _signature(self, batch: int) -> str:
        """What the compiled step depends on: shapes and dtypes of every packed tensor, the kernel path, torch."""
        d = self.decoder
        parts = [
            torch.__version__,
            str(self.device),
            str(d.embed.dtype),
            f"B{batch}",
            f"S{self.cache.max_len}",
            f"native={self.kernels.native!r}:{self.kernels.has_layer}",
            repr(self.model.config),
        ]
        for L in d.layers:
            for g in (L.qkv, L.o, L.gate_up, L.down):
                parts.append(
                    f"{tuple(g.first.shape)}{g.first.dtype}{g.splits}"
                    f"{[None if u is None else (tuple(u.shape), u.dtype) for u in g.lifts]}{g.bias is not None}"
                    f"{None if g.first_scale is None else tuple(g.first_scale.shape)}"
                    f"{[None if s is None else tuple(s.shape) for s in g.lift_scales or []]}"
                )
        parts.append(f"{tuple(d.head.first.shape)}{d.head.first.dtype}")
        return "|".join(parts)

    def prefill(self, tokens, positions, valid_from, cache: KVCache | None = None) -> torch.Tensor:
        """As :meth:`EagerRunner.prefill`: the model's own chunked forward (GEMM-shaped, nothing to compile)."""
        cache = self.cache if cache is None else cache
        return chunked_prefill(self.model, cache, tokens, positions, valid_from, self.options.prefill_chunk)

    @torch.inference_mode()
    def decode(self, tokens, positions, slot: int, valid_from) -> torch.Tensor:
        slot_t = torch.tensor([slot], device=self.device)
        t0 = time.perf_counter()
        out = self.step(tokens.reshape(-1), positions.reshape(-1), slot_t, valid_from)
        if not self._compiled_once:
            self._compiled_once = True
            self.compile_s = time.perf_counter() - t0
            if self.artifacts is not None:
                self.artifacts.save()
        return out

    def report(self) -> dict:
        """Which kernels the decode step runs (``native_kernels``, ``native_isa``), for --json outputs."""
        return self.kernels.report()

    def warmup(self) -> float:
        """Compile (or load from the on-disk cache) by running one throwaway step; returns seconds spent.

        The step writes slot 0 of the cache, which every real generation overwrites in prefill.
        """
        B = self.cache.k.shape[1]
        z = torch.zeros(B, dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        self.decode(z[:, None], z[:, None], 0, z)
        return time.perf_counter() - t0


class CompileCache:
    """Compiled decode-step artifacts on disk (``torch.compiler`` cache artifacts), keyed by the step's signature,
    so that a second start of the same model skips Inductor's code generation."""

    def __init__(self, cache_dir: str | None, signature: str):
        import hashlib

        from rankserve.fsutil import cache_dir as default_cache_dir

        root = cache_dir or default_cache_dir("compiled")
        self.path = os.path.join(root, hashlib.sha256(signature.encode()).hexdigest()[:24] + ".bin")
        self.loaded = False

    def load(self) -> bool:
        if not os.path.isfile(self.path):
            return False
        try:
            with open(self.path, "rb") as f:
                torch.compiler.load_cache_artifacts(f.read())
            self.loaded = True
        except Exception as e:  # a stale or damaged entry only costs a recompile
            log.warning("ignoring compiled-step cache %s: %s", self.path, e)
        return self.loaded

    def save(self) -> None:
        if self.loaded:
            return
        try:
            art = torch.compiler.save_cache_artifacts()
            if art is None:
                return
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(art[0])
            os.replace(tmp, self.path)
        except Exception as e:
            log.warning("could not save the compiled-step cache %s: %s", self.path, e)
