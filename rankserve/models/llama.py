"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) in one readable file.

Tensor names follow Hugging Face (``model.layers.0.self_attn.q_proj.weight``) so that loaders need no name map
for HF directories. Every linear is a :class:`~rankserve.layers.Projection`, built here as ``DenseLinear``;
compression swaps projections in place. This file never reads files and never imports transformers.

Shapes: B batch, T tokens in this call, S cache slots attended, D hidden, H query heads, K kv heads, hd head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rankserve.config import ModelConfig
from rankserve.layers import DenseLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 then cast back before the weight, exactly as HF does, so bf16 matches too.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [hd/2] in fp32, with Llama-3 frequency-dependent scaling if configured."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    sc = cfg.rope_scaling
    if not sc:
        return inv_freq
    factor = float(sc["factor"])
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B, 1, T, hd] for integer positions [B, T]."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hd/2): the HF layout (GGUF's interleaved layout is undone by the loader)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated dense KV cache: k, v [L, B, K, S_max, hd]. Slot s holds the token written at step s."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__()
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def row_view(self, b: int) -> KVCache:
        """A cache over row ``b`` only, sharing storage (to prefill one request into a running batch)."""
        return self.window(b, b + 1)

    def window(self, r0: int, r1: int, lo: int = 0) -> KVCache:
        """Rows [r0, r1) and slots [lo, max_len), sharing storage: the view's slot i is slot lo + i."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[:, r0:r1, :, lo:], persistent=False)  # (L, r1-r0, K, S_max-lo, hd)
        view.register_buffer("v", self.v[:, r0:r1, :, lo:], persistent=False)
        return view

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, K, T, hd] at slots [start, start+T); return the valid prefix [B, K, start+T, hd]."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        # Attend over the valid prefix only, never the whole preallocated length.
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, device=None, dtype=None):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, qkv_bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = DenseLinear(D, self.n_heads * self.hd, qkv_bias, device, dtype)
        self.k_proj = DenseLinear(D, self.n_kv * self.hd, qkv_bias, device, dtype)
        self.v_proj = DenseLinear(D, self.n_kv * self.hd, qkv_bias, device, dtype)
        self.o_proj = DenseLinear(self.n_heads * self.hd, D, cfg.o_bias, device, dtype)

    def forward(self, x, cos, sin, cache: KVCache | None, start: int, mask: torch.Tensor | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # (B, K, S, hd), S = start + T
        if self.n_kv != self.n_heads:  # GQA: each kv head serves H/K query heads
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
        if mask is None and start > 0 and T > 1:
            mask = causal_mask(T, start, x.device)  # a chunk continuing a cached prefix
        if mask is None:
            # No padding: causal within this call; one new token sees the whole valid prefix.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B, 1, T, S) bool
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, T, H*hd)
        return self.o_proj(y)


def causal_mask(T: int, start: int, device) -> torch.Tensor:
    """Bool [1, 1, T, start+T]: query t (at slot start+t) sees slots <= start+t."""
    q = torch.arange(start, start + T, device=device)[:, None]
    kv = torch.arange(start + T, device=device)[None, :]
    return (kv <= q)[None, None]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        D, F_, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = DenseLinear(D, F_, b, device, dtype)
        self.up_proj = DenseLinear(D, F_, b, device, dtype)
        self.down_proj = DenseLinear(F_, D, b, device, dtype)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.self_attn = Attention(cfg, layer, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.mlp = MLP(cfg, device, dtype)

    def norm_consumers(self):
        """Each RMSNorm with the projections that read its output, and nothing else does."""
        a, m = self.self_attn, self.mlp
        return (
            (self.input_layernorm, (a.q_proj, a.k_proj, a.v_proj)),
            (self.post_attention_layernorm, (m.gate_proj, m.up_proj)),
        )

    def forward(self, x, cos, sin, cache=None, start=0, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """The ``model.`` prefix of HF names: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, device, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg, device, dtype)
        self.lm_head = DenseLinear(cfg.hidden_size, cfg.vocab_size, False, device, dtype)
        self.init_buffers(device)

    def init_buffers(self, device=None) -> None:
        """(Re)compute non-checkpoint buffers: the fp32 RoPE inverse frequencies, always from the config."""
        self.register_buffer("inv_freq", rope_inv_freq(self.config).to(device), persistent=False)

    def tie_weights(self) -> None:
        """Share the embedding matrix as the LM head (SmolLM, Qwen2-0.5B, Llama-3.2-1B do)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, tokens, positions, cache=None, start=0, mask=None) -> torch.Tensor:
        """Final normed hidden states [B, T, D] for tokens [B, T] at integer positions [B, T]."""
        x = self.model.embed_tokens(tokens)  # (B, T, D)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, start, mask)
        return self.model.norm(x)

    def forward(
        self,
        tokens,
        positions=None,
        cache: KVCache | None = None,
        start: int = 0,
        mask=None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with ``last_only``).

        With a cache, k/v of these tokens are written at slots [start, start+T) and attention covers slots
        [0, start+T). ``mask`` (bool [B, 1, T, start+T], True = attend) carries left padding; without it
        attention is causal.
        """
        if positions is None:
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None].expand_as(
                tokens
            )
        h = self.hidden_states(tokens, positions, cache, start, mask)
        if last_only:
            # 2-D: a 3-D [B, 1, D] input to F.linear can take matmul's bmm path, which first copies the whole
            # transposed LM head (147 ms instead of 6 ms for SmolLM2's tied head in bf16, every prefill)
            return self.lm_head(h[:, -1])[:, None]
        return self.lm_head(h)
