"""The eager reference runner, and the batch layout every runner shares (left padding, attention masks).

:class:`EagerRunner` runs the model's own forward over a preallocated dense KV cache; the fast runner
(``fast.py``) is tested against it.
"""

from __future__ import annotations

import torch

from rankserve.models.llama import KVCache
from rankserve.runtime.options import RuntimeOptions


def padded_batch(prompts: list[list[int]], pad_id: int, device="cpu"):
    """Left-pad prompts: tokens [B, P], positions [B, P], pad lengths [B]."""
    P = max(len(p) for p in prompts)
    pads = torch.tensor([P - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)
    positions = (torch.arange(P, device=device)[None] - pads[:, None]).clamp(min=0)  # (B, P)
    return tokens, positions, pads


def attention_mask(valid_from: torch.Tensor, start: int, T: int) -> torch.Tensor | None:
    """Bool mask [B, 1, T, start+T] for queries at slots [start, start+T): causal, and each row's slots before
    ``valid_from[b]`` (left padding, or another request's stale keys) hidden.

    A padded query would see nothing and SDPA would return NaN, so it is allowed its own slot; its output is
    never read. Returns None when every row starts at slot 0 (plain causal attention is then exact and cheaper).
    """
    if not bool(valid_from.any()):
        return None
    q = torch.arange(start, start + T, device=valid_from.device)[None, :, None]  # (1, T, 1)
    kv = torch.arange(start + T, device=valid_from.device)[None, None, :]  # (1, 1, S)
    valid = (kv <= q) & (kv >= valid_from[:, None, None])  # (B, T, S)
    valid |= kv == q
    return valid[:, None]


@torch.inference_mode()
def chunked_prefill(model, cache: KVCache, tokens, positions, valid_from, chunk: int) -> torch.Tensor:
    """The model's own forward over a prompt in chunks of ``chunk`` tokens, k/v written at cache slots [0, P).

    Every runner prefills this way (GEMM-shaped; chunks bound the activation memory of long prompts). Returns
    the logits [B, V] of the last prompt token.
    """
    P = tokens.shape[1]
    for s in range(0, P, chunk):
        e = min(P, s + chunk)
        mask = attention_mask(valid_from, s, e - s)
        logits = model(tokens[:, s:e], positions[:, s:e], cache, s, mask, last_only=True)
    return logits[:, -1]


class EagerRunner:
    """The reference execution path: the model's own forward over a preallocated dense KV cache."""

    def __init__(self, model, batch: int, max_len: int, options: RuntimeOptions | None = None):
        self.model = model
        self.options = options or RuntimeOptions()
        p = next(model.parameters())
        self.cache = KVCache(model.config, batch, max_len, device=p.device, dtype=p.dtype)

    def prefill(self, tokens, positions, valid_from, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, V] of the last prompt token; k/v of all prompt tokens land in slots [0, P) of ``cache``
        (default: the whole runner cache; the server passes a window of it to prefill one row)."""
        cache = self.cache if cache is None else cache
        return chunked_prefill(self.model, cache, tokens, positions, valid_from, self.options.prefill_chunk)

    @torch.inference_mode()
    def decode(self, tokens, positions, slot: int, valid_from) -> torch.Tensor:
        """Logits [B, V] for one new token per row [B, 1] written at ``slot``; row b attends to slots
        [valid_from[b], slot].

        Slots below every row's ``valid_from`` are dead (the server's older requests): attention runs on a
        window of the cache from the lowest ``valid_from`` on, so they cost nothing.
        """
        lo = int(valid_from.min())
        cache = self.cache.window(0, self.cache.k.shape[1], lo) if lo else self.cache
        mask = attention_mask(valid_from - lo, slot - lo, 1)
        return self.model(tokens, positions, cache, slot - lo, mask)[:, -1]

    def report(self) -> dict:
        """Which kernels ran: the eager path is PyTorch's own."""
        return {"native_kernels": False, "native_isa": None}
