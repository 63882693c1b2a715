"""The style of training text: rules that rewrite it and a test that spots it; pure functions on ``str``, no
files, no models.

WikiText's files are in its tokenized style: spaces around punctuation (" , " " . " " 's"), " @-@ " for an
in-word hyphen, and, in ``wiki.valid.tokens``, ``<unk>`` for every rare word. Healing on that text teaches the
student the style as well as the language: on SmolLM2 SVD-LLM 0.2, the same WikiText-2 valid text healed as plain
prose gave 1.48x dense perplexity on other prose (the Lee corpus) at 393k tokens where the tokenized text stayed
at 1.57x (README, #11). :func:`wikitext_plain_text` undoes the style; ``heal --detokenize wikitext`` applies it to
``--data`` files as they are read.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from rankserve.errors import InputError

# WikiText's tokenized style -> plain prose, applied in this order. Own rules rather than lm-eval's
# ``wikitext_detokenizer`` (an optional extra with a heavy dependency tree; it also keeps ``<unk>``, leaves "don 't"
# and half-joins headings); tests/test_textstyle.py checks the two agree on text that has none of those.
_PLAIN_RULES = [
    # the rare word is gone: "a species of <unk> lobster" reads as prose without it
    (re.compile(r" ?<unk>"), ""),
    (re.compile(r" @([-,.])@ "), r"\1"),  # 1 @,@ 000 -> 1,000; guest @-@ starring -> guest-starring
    (re.compile(r" ([,.;:!?%])(?= |$)", re.M), r"\1"),
    (re.compile(r"(?<=n) 't\b|(?<=\w) ('s|'re|'ve|'ll|'d|'m)\b", re.I), lambda m: m.group(0)[1:]),
    (re.compile(r"s ' "), "s' "),
    (re.compile(r"([(\[]) "), r"\1"),
    (re.compile(r" ([)\]])"), r"\1"),
    (re.compile(r'" ([^"\n]*?) "'), r'"\1"'),
    (re.compile(r"=(?: =)+"), lambda m: m.group(0).replace(" ", "")),  # = = Heading = = -> == Heading ==
    (re.compile(r"^ | $", re.M), ""),  # every line starts and ends with a space
]
# marks no ordinary prose has: " @-@ ", " @,@ ", " @.@ " and a lone "<unk>" word
_WIKITEXT_MARKS = re.compile(r" @[-,.]@ |(?:^| )<unk>(?= |$)", re.M)
WIKITEXT_MIN_MARKS = 3  # fewer could be a quotation of the style, not text written in it


def wikitext_plain_text(text: str) -> str:
    """WikiText's tokenized style as plain prose (see the module docstring); plain prose is left alone."""
    for pattern, repl in _PLAIN_RULES:
        text = pattern.sub(repl, text)
    return text


def wikitext_marks(text: str) -> int:
    """How many of WikiText's tokenized-style marks ``text`` has (:data:`WIKITEXT_MIN_MARKS` or more: it is
    in that style)."""
    return len(_WIKITEXT_MARKS.findall(text))


# --detokenize NAME -> the rule set; one entry per text style we know
DETOKENIZERS: dict[str, Callable[[str], str]] = {"wikitext": wikitext_plain_text}


def detokenizer(name: str, what: str = "detokenize") -> Callable[[str], str]:
    """The rules :data:`DETOKENIZERS` names ``name``; an unknown name raises one line (``what``: what the caller
    calls the setting)."""
    if name not in DETOKENIZERS:
        raise InputError(f"{what} must be one of {', '.join(DETOKENIZERS)}, got {name!r}")
    return DETOKENIZERS[name]
