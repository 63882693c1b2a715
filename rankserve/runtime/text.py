"""Token ids to text for one generation: incremental detokenization, stop tokens and stop strings."""

from __future__ import annotations

from rankserve.runtime.sampling import SamplingParams


class TextStream:
    """Token ids in, text deltas out, for one request: stop strings held back and cut, EOS, max_tokens.

    The one implementation behind :func:`rankserve.runtime.generate.stream_generate` and the server's
    scheduler, so that a request served in a batch returns the same text as the request run alone.
    """

    def __init__(self, tokenizer, params: SamplingParams):
        self.params = params
        self.decoder = tokenizer.stream_decoder()
        self.stop_ids = set(tokenizer.eos_ids) | set(params.stop_token_ids)
        self.stops = [s for s in params.stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # text that may still become a stop
        self.pending = ""  # decoded but not yet emitted
        self.n = 0  # tokens pushed

    def ends_on(self, tok: int) -> bool:
        """Whether ``tok`` is a stop token that ends the request (its text is never emitted)."""
        return tok in self.stop_ids and not self.params.ignore_eos

    def push(self, tok: int) -> tuple[str, str | None]:
        """(text to emit now, finish reason or None)."""
        self.n += 1
        finish = None
        if self.ends_on(tok):
            finish = "stop"
        else:
            self.pending += self.decoder.push(tok)
        cut = _stop_hit(self.pending, self.stops)
        if cut >= 0:
            self.pending, finish = self.pending[:cut], "stop"
        if finish is None and self.n >= self.params.max_tokens:
            finish = "length"
        if finish is None:
            safe = max(0, len(self.pending) - self.hold)
            piece, self.pending = self.pending[:safe], self.pending[safe:]
            return piece, None
        if cut < 0 and finish != "stop":
            self.pending += self.decoder.flush()
            c = _stop_hit(self.pending, self.stops)
            if c >= 0:
                self.pending, finish = self.pending[:c], "stop"
        piece, self.pending = self.pending, ""
        return piece, finish

    def flush(self) -> str:
        """Everything still held back (the generation ended without a verdict: the cache ran out)."""
        piece, self.pending = self.pending + self.decoder.flush(), ""
        return piece


def _stop_hit(text: str, stops: list[str]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1
