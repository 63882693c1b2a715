"""Perplexity with the protocol of the SVD-compression papers (SVD-LLM, ASVD, GPTQ).

Tokenize the whole text once with the tokenizer's default call (``tokenizer(text)``: a Llama tokenizer adds one
BOS at the very start, a GPT-2-style one adds nothing), cut the ids into non-overlapping windows of ``seq_len``,
drop the remainder, and average the next-token cross-entropy over every window (each window predicts its tokens
2..seq_len from scratch: no context carries over). Perplexity is ``exp`` of that mean.
"""

from __future__ import annotations

import logging
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from rankserve.errors import InputError

log = logging.getLogger(__name__)

# Positions of the LM head evaluated at once: bounds the fp32 logits to chunk × vocab (512 × 49152 = 100 MB)
# instead of seq_len × vocab (2048 × 49152 = 400 MB), plus as much again for log-softmax.
_HEAD_CHUNK = 512


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [N] of the whole text, as ``tokenizer(text)`` gives them (special tokens by its defaults)."""
    # verbose=False: the text is far longer than the model context on purpose; skip transformers' warning.
    return torch.tensor(tokenizer.hf(text, verbose=False)["input_ids"], dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [W, seq_len] of ids [N]; the remainder (N mod seq_len) is dropped."""
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"max_windows must be at least 1, got {max_windows}")
    n = ids.numel() // seq_len
    if n == 0:
        raise InputError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "pass a longer text or a smaller seq_len"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)  # (W, seq_len)


def window_nll(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (fp64 scalar) of tokens [B, T]: positions 0..T-2 predict tokens 1..T-1."""
    B, T = tokens.shape
    positions = torch.arange(T, device=tokens.device)[None].expand(B, T)
    h = model.hidden_states(tokens, positions)  # (B, T, D): the plain forward, no KV cache
    total = torch.zeros((), dtype=torch.float64, device=tokens.device)
    for s in range(0, T - 1, _HEAD_CHUNK):
        e = min(s + _HEAD_CHUNK, T - 1)
        logits = model.lm_head(h[:, s:e]).float()  # (B, e-s, V) in fp32 whatever the model dtype
        targets = tokens[:, s + 1 : e + 1]  # (B, e-s)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total += nll.double()
        del logits  # free before the next chunk
    return total


def _exp(x: float) -> float:
    """``math.exp`` that returns inf instead of raising OverflowError."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def target_logprobs(
    model: nn.Module, h: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) (fp32 [N]) and whether the target is the argmax ([N] bool) for hidden states h [N, D].

    The LM head runs only on these N positions, ``_HEAD_CHUNK`` at a time, with fp32 logits.
    """
    logps, greedy = [], []
    for s in range(0, h.shape[0], _HEAD_CHUNK):
        logits = model.lm_head(h[s : s + _HEAD_CHUNK]).float()  # (n, V)
        t = targets[s : s + _HEAD_CHUNK]
        logps.append(torch.log_softmax(logits, dim=-1).gather(-1, t[:, None])[:, 0])
        greedy.append(logits.argmax(-1) == t)
    return torch.cat(logps), torch.cat(greedy)


def document_nll(model: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 1) -> tuple[float, int]:
    """(summed NLL, scored tokens) of one document's ids [N] under the same windows as :func:`perplexity`.

    The remainder is kept as a last, shorter window instead of dropped: lm-eval's rolling loglikelihood must
    score every document, however short. A text of whole windows gives exactly ``perplexity``'s sum.
    """
    ids = ids.to(next(model.parameters()).device)
    full = ids.numel() // seq_len
    total, scored = 0.0, 0
    if full:
        batches = windows(ids, seq_len)  # (W, seq_len)
        for start in range(0, full, batch_size):
            total += window_nll(model, batches[start : start + batch_size]).item()
        scored += full * (seq_len - 1)
    tail = ids[full * seq_len :]
    if tail.numel() >= 2:  # a one-token tail has nothing to predict within its window
        total += window_nll(model, tail[None]).item()
        scored += tail.numel() - 1
    return total, scored


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on ``text`` (see the module docstring for the protocol).

    ``tokenizer`` is a :class:`~rankserve.tokenizer.Tokenizer`. Returns ``perplexity``, ``nll`` (mean per scored
    token), ``windows``, ``tokens`` (scored tokens: windows × (seq_len - 1)), ``text_tokens`` (the whole text)
    and ``seq_len``. ``progress`` shows a bar on stderr.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    ids = tokenize(tokenizer, text)
    batches = windows(ids, seq_len, max_windows)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and seq_len > limit:
        log.warning("seq_len %d exceeds the model's max_position_embeddings %d", seq_len, limit)
    device = next(model.parameters()).device
    total = 0.0
    with (
        torch.inference_mode(),
        tqdm(
            total=len(batches), desc="perplexity", unit="window", file=sys.stderr, disable=not progress
        ) as bar,
    ):
        for start in range(0, len(batches), batch_size):
            chunk = batches[start : start + batch_size].to(device)  # (b, seq_len)
            nll = window_nll(model, chunk).item()
            if not math.isfinite(nll):  # the papers' scripts silently skip such windows; a number would lie
                raise InputError(
                    f"windows {start}..{start + len(chunk) - 1} give a non-finite loss ({nll}): the model "
                    "computes NaN or Inf logits; its weights or its dtype are broken"
                )
            total += nll
            bar.update(len(chunk))
            bar.set_postfix(ppl=f"{_exp(total / ((start + len(chunk)) * (seq_len - 1))):.3f}")
    scored = len(batches) * (seq_len - 1)
    nll = total / scored
    if not math.isfinite(_exp(nll)):
        raise InputError(f"mean loss {nll:.1f} nats per token: the perplexity overflows; the model is broken")
    log.info("perplexity %.4f over %d windows of %d tokens", _exp(nll), len(batches), seq_len)
    return {
        "perplexity": _exp(nll),
        "nll": nll,
        "windows": len(batches),
        "tokens": scored,
        "text_tokens": ids.numel(),
        "seq_len": seq_len,
    }
