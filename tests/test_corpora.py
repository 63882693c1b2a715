"""benchmarks/corpora.py's plain-prose copy of WikiText (rankserve.textstyle's rules, tests/test_textstyle.py): the cached
file written once and atomically."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
from test_textstyle import PLAIN, TOKENIZED

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
