"""The lm-evaluation-harness model ``rankserve``: lm-eval's tasks scored by rankserve's own model and runtime.

Needs the ``[eval]`` extra; importing this module registers the name ``rankserve`` with lm-eval, so
``lm_eval.simple_evaluate(model="rankserve", model_args={"pretrained": ...})`` works too.

- ``loglikelihood``: the choices of one question share its context. Each question becomes one packed row, the
  context then every choice's tokens, and an attention mask lets a choice see the context and its own earlier
  tokens only (its positions restart right after the context). The context's keys and values are so computed
  once per question instead of once per choice, which is what prefilling a KV cache and forking it would save,
  without copying cache rows; and the LM head runs on the scored positions only. A question with one choice
  packs to exactly the plain forward, so the packed path is never the more expensive one.
- ``loglikelihood_rolling``: the windows of ``rankserve eval --data`` (:func:`rankserve.eval.document_nll`).
- ``generate_until``: rankserve's generator with stop strings, one runner (eager or fast) for all requests.

Tokenization follows lm-eval's ``hf`` model (its ``TemplateLM`` split of context and continuation, BOS as
the prefix of an empty context), so both models score the same token ids.
"""

from __future__ import annotations

import functools
import sys
from collections import defaultdict

import lm_eval.models  # noqa: F401  lm-eval fills its model registry lazily only while it is empty: keep `hf` & co
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from rankserve.errors import InputError
from rankserve.eval import document_nll, target_logprobs, tokenize
from rankserve.runtime.options import RuntimeOptions
from rankserve.runtime.sampling import SamplingParams
from rankserve.threads import num_threads


def _own_threads(method):
    """Run one of lm-eval's calls with the adapter's ``threads``, then give the caller's setting back: lm-eval's
    process is not ours to change."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with num_threads(self.threads):
            return method(self, *args, **kwargs)

    return run


_PAD_SEGMENT = -2  # segment id of right padding in a packed row
_CONTEXT_SEGMENT = -1  # segment id of the shared context; choice i is segment i


def pack_choices(context: list[int], continuations: list[list[int]]):
    """One row for a question: tokens, positions and segment ids [T], and per choice the slots whose logits
    predict its tokens (the context's last slot, then the choice's own slots but its last)."""
    c = len(context)
    tokens, positions, segments = list(context), list(range(c)), [_CONTEXT_SEGMENT] * c
    scored = []
    for i, cont in enumerate(continuations):
        body = cont[:-1]  # the last token is only predicted, never fed
        start = len(tokens)
        tokens += body
        positions += range(c, c + len(body))
        segments += [i] * len(body)
        scored.append([c - 1, *range(start, start + len(body))])
    return tokens, positions, segments, scored


def packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, 1, T, T] for packed rows with segment ids [B, T]: causal, and a choice's query sees the
    context and its own segment; a padding query sees only itself (SDPA would give NaN otherwise; never read)."""
    T = segments.shape[1]
    slot = torch.arange(T, device=segments.device)
    causal = slot[None, :, None] >= slot[None, None, :]  # (1, T, T)
    q, k = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
    visible = causal & ((k == _CONTEXT_SEGMENT) | (k == q)) & (k != _PAD_SEGMENT)  # (B, T, T)
    visible |= slot[None, :, None] == slot[None, None, :]
    return visible[:, None]


@register_model("rankserve")
class RankserveLM(TemplateLM):
    """lm-eval model over a rankserve model (any source ``load_model`` takes, or an already loaded one)."""

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "fp32",
        backend: str = "eager",
        threads: int | None = None,
        batch_size: int | str | None = 8,
        seq_len: int = 2048,
        max_gen_toks: int = 256,
        device: str | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it to every model; no automatic batch size here
        loaded=None,
    ):
        super().__init__()
        from rankserve.loaders.source import load_model

        if device not in (None, "cpu"):
            raise InputError(f"rankserve runs on the CPU; got device={device!r}")
        if batch_size is None:
            batch_size = 8
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(seq_len) < 2:
            raise InputError(f"seq_len must be at least 2, got {seq_len}")
        if threads is not None and int(threads) < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        self.threads = None if threads is None else int(threads)  # set around each call (see _own_threads)
        if loaded is None:
            if pretrained is None:
                raise InputError("pass pretrained=MODEL (a model directory, .gguf file, checkpoint or alias)")
            loaded = load_model(pretrained, dtype=dtype)
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer  # rankserve's facade
        self.tokenizer = loaded.tokenizer.hf  # what TemplateLM's chat-template helpers read
        self.options = RuntimeOptions(backend=backend).validate()
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = int(self.model.config.max_position_embeddings)

    # -- tokens, as lm-eval's hf model has them --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos) if eos is not None else self.tok.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # a string that already starts with BOS gets no second one
            prefix = self.tokenizer.decode(self.prefix_token_id)
            add_special_tokens = not (prefix and string.startswith(prefix))
        return self.tok.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # -- loglikelihood ---------------------------------------------------------------------------------------
    @_own_threads
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) per (strings, context ids, continuation ids) request."""
        questions: dict[tuple[int, ...], list[int]] = defaultdict(list)  # context ids -> request indices
        conts = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise InputError("lm-eval sent an empty continuation to score")
            if len(cont) > self.max_length:
                raise InputError(
                    f"a continuation of {len(cont)} tokens exceeds the model context {self.max_length}"
                )
            keep = self.max_length + 1 - len(cont)  # left-truncate the context as lm-eval's hf model does
            questions[tuple(ctx[-keep:])].append(i)
            conts.append(cont)
        packed = []
        for ctx, idx in questions.items():
            tokens, positions, segments, scored = pack_choices(list(ctx), [conts[i] for i in idx])
            packed.append((idx, tokens, positions, segments, scored))
        packed.sort(key=lambda p: -len(p[1]))  # longest first: rows of a batch have similar lengths
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        with (
            torch.inference_mode(),
            tqdm(total=len(requests), desc="loglikelihood", file=sys.stderr, disable=disable_tqdm) as bar,
        ):
            for s in range(0, len(packed), self.batch_size):
                batch = packed[s : s + self.batch_size]
                for i, result in zip(
                    (i for p in batch for i in p[0]), self._score_packed(batch, conts), strict=True
                ):
                    out[i] = result
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
                bar.update(sum(len(p[0]) for p in batch))
        return out

    def _score_packed(self, batch, conts) -> list[tuple[float, bool]]:
        """Results for every request of a batch of packed questions, in the batch's order."""
        device = next(self.model.parameters()).device
        T = max(len(p[1]) for p in batch)
        tokens = torch.full((len(batch), T), self.tok.pad_id, dtype=torch.long)
        positions = torch.zeros((len(batch), T), dtype=torch.long)
        segments = torch.full((len(batch), T), _PAD_SEGMENT, dtype=torch.long)
        rows, slots, targets, lengths = [], [], [], []
        for b, (idx, tok, pos, seg, scored) in enumerate(batch):
            n = len(tok)
            tokens[b, :n], positions[b, :n], segments[b, :n] = (torch.tensor(x) for x in (tok, pos, seg))
            for i, sl in zip(idx, scored, strict=True):
                rows += [b] * len(sl)
                slots += sl
                targets += conts[i]
                lengths.append(len(sl))
        tokens, positions, segments = tokens.to(device), positions.to(device), segments.to(device)
        h = self.model.hidden_states(tokens, positions, mask=packed_mask(segments))  # (B, T, D)
        logp, greedy = target_logprobs(
            self.model, h[torch.tensor(rows), torch.tensor(slots)], torch.tensor(targets, device=device)
        )  # (N,), (N,)
        return [
            (float(lp.double().sum()), bool(g.all()))
            for lp, g in zip(logp.split(lengths), greedy.split(lengths), strict=True)
        ]

    # -- rolling loglikelihood -------------------------------------------------------------------------------
    @_own_threads
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each document under ``rankserve eval --data``'s windows of ``seq_len``."""
        out = []
        with torch.inference_mode():
            for req in tqdm(requests, desc="loglikelihood_rolling", file=sys.stderr, disable=disable_tqdm):
                (text,) = req.args
                nll, _ = document_nll(self.model, tokenize(self.tok, text), self.seq_len, self.batch_size)
                out.append(-nll)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), -nll)
        return out

    # -- generation ------------------------------------------------------------------------------------------
    def _sampling(self, gen_kwargs: dict) -> SamplingParams:
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(kw.pop("do_sample", False))
        return SamplingParams(
            max_tokens=int(kw.pop("max_gen_toks", self.max_gen_toks)),
            temperature=float(kw.pop("temperature", 0.0)) if sample else 0.0,
            top_p=float(kw.pop("top_p", 1.0) or 1.0) if sample else 1.0,
            top_k=int(kw.pop("top_k", 0) or 0) if sample else 0,
            stop=until,
        ).validate()

    @_own_threads
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) text until a stop string, EOS or ``max_gen_toks``."""
        from rankserve.runtime.generate import complete
        from rankserve.runtime.runners import make_runner

        jobs = []
        for req in requests:
            context, gen_kwargs = req.args
            params = self._sampling(gen_kwargs)
            if params.max_tokens >= self.max_length:
                raise InputError(
                    f"max_gen_toks {params.max_tokens} leaves no room for a prompt in the model context "
                    f"{self.max_length}"
                )
            ids = self.tok_encode(context)[-(self.max_length - params.max_tokens) :]  # left-truncated
            jobs.append((context, gen_kwargs, ids, params))
        if not jobs:
            return []
        # One runner (and its cache) for every request: the fast backend packs and compiles once.
        max_len = min(self.max_length, max(len(ids) + p.max_tokens for _, _, ids, p in jobs))
        runner = make_runner(self.model, 1, max_len, self.options)
        out = []
        for context, gen_kwargs, ids, params in tqdm(
            jobs, desc="generate_until", file=sys.stderr, disable=disable_tqdm
        ):
            text = complete(self.model, self.tok, ids, params, self.options, runner).text
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
