"""benchmarks/corpora.py's plain-prose copy of WikiText: its rules, lm-eval's detokenizer as the reference where
the two mean the same, and the cached file written once and atomically."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpora():
    name = "benchmarks_corpora"  # its dataclass looks its module up in sys.modules while it is defined
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", "corpora.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        del sys.modules[name]


# WikiText-2 style lines (made up here, not copied from the data set)
TOKENIZED = (
    " = = Early life = = \n"
    " \n"
    " The <unk> harbour , built in 1 @,@ 200 , was a well @-@ known port ( see below ) . It 's said that "
    'it was " the finest " ; others disagree : they didn \'t agree ! Why ? 3 @.@ 5 % of ships sank . \n'
)
PLAIN = (
    "== Early life ==\n"
    "\n"
    "The harbour, built in 1,200, was a well-known port (see below). It's said that "
    'it was "the finest"; others disagree: they didn\'t agree! Why? 3.5% of ships sank.\n'
)


def test_wikitext_plain_text_rules(corpora):
    assert corpora.wikitext_plain_text(TOKENIZED) == PLAIN
    assert corpora.wikitext_plain_text(PLAIN) == PLAIN  # plain prose is left alone


def test_wikitext_plain_text_agrees_with_lm_eval(corpora):
    # lm-eval's detokenizer is the reference (a rule set we did not write) wherever the two mean the same: no
    # <unk>, no "n 't", no headings (see _PLAIN_RULES), and its line-edge spaces stripped as ours are
    lm_eval_wikitext = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    line = (
        " The harbour , built in 1 @,@ 200 , was a well @-@ known port ( see below ) . It 's said that it "
        'was " the finest " ; others disagree : 3 @.@ 5 km of quays ! Why ? \n'
    )
    theirs = lm_eval_wikitext.wikitext_detokenizer({"page": line}).strip()
    assert corpora.wikitext_plain_text(line).strip() == theirs


def test_wikitext_plain_file_is_cached(corpora, tmp_path):
    src = tmp_path / "valid.tokens.txt"
    src.write_text("\ufeff" + TOKENIZED, encoding="utf-8")  # WikiText's files start with a byte-order mark
    cache = tmp_path / "cache"
    path = corpora.wikitext_plain(str(src), str(cache))
    assert open(path, encoding="utf-8").read() == PLAIN
    assert os.listdir(cache) == [os.path.basename(path)]  # no temporary file left behind
    os.utime(path, (0, 0))
    assert (
        corpora.wikitext_plain(str(src), str(cache)) == path and os.stat(path).st_mtime == 0
    )  # not rewritten
    src.write_text(TOKENIZED + " More . \n", encoding="utf-8")  # another source: another file
    assert corpora.wikitext_plain(str(src), str(cache)) != path
    with pytest.raises(SystemExit, match="not found"):
        corpora.wikitext_plain(str(tmp_path / "missing.txt"), str(cache))
