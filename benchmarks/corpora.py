"""Text the benchmarks read besides WikiText-2 itself, fetched or derived at run time into a cache, never committed.

The Lee background corpus (300 ABC news articles, one per line, about 360 kB) ships as test data inside the
PyPI wheel of gensim. :func:`fetch` runs ``pip download --no-deps gensim==4.4.0`` into a temporary directory, reads
only that one member out of the wheel (a zip), checks its sha256 and writes it atomically to
``corpora/lee_background.txt`` in rankserve's cache (``$RANKSERVE_CACHE``, else ``~/.cache/rankserve``). gensim
itself is never installed or imported. The text is never used for calibration or healing: it only measures how a
model compressed on WikiText does on other prose.

    python benchmarks/corpora.py          # prints the cached path, fetching it first if needed
    python benchmarks/corpora.py --wikitext-valid-plain   # the plain-prose copy of WikiText-2 valid (below)

WikiText-2's files are in its tokenized style (" , ", " @-@ ", ``<unk>``; ``rankserve.textstyle``). ``rankserve heal
--detokenize wikitext`` heals on them as plain prose as it reads them; :func:`wikitext_plain` writes the same plain
text into the cache as a file (derived at run time, never committed), for tools that take a file.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: rankserve below

from rankserve.fsutil import cache_dir  # noqa: E402
from rankserve.hashing import file_sha256  # noqa: E402
from rankserve.textstyle import wikitext_plain_text  # noqa: E402

CACHE = cache_dir("corpora")
# WikiText-2 (test: perplexity only; valid.tokens: calibration and healing only), read in place, never copied
WIKITEXT = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext2")
WIKI_TEST = os.path.join(WIKITEXT, "test.txt")
WIKI_VALID = os.path.join(WIKITEXT, "valid.tokens.txt")


def require(prog: str, *paths: str) -> None:
    """Exit with one line naming the missing text files and the fix, before any model is loaded."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        sys.exit(
            f"{prog}: {', '.join(missing)} not found. The benchmarks read WikiText-2 from {WIKITEXT} (the "
            "checkout's sibling ../shared/data/wikitext2); put test.txt and valid.tokens.txt there, or pass "
            "the files' paths where the command takes them."
        )


@dataclass(frozen=True)
class Corpus:
    name: str
    title: str
    package: str  # the pip requirement whose wheel carries the file
    member: str  # path of the file inside the wheel
    sha256: str
    filename: str


LEE = Corpus(
    name="lee",
    title="Lee background corpus (ABC news prose; gensim test data)",
    package="gensim==4.4.0",
    member="gensim/test/test_data/lee_background.cor",
    sha256="5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    filename="lee_background.txt",
)


def fetch(corpus: Corpus = LEE, cache_dir: str = CACHE) -> str:
    """Path of the corpus text in ``cache_dir``, downloaded and checked first if it is not there yet."""
    path = os.path.join(cache_dir, corpus.filename)
    if os.path.isfile(path) and file_sha256(path) == corpus.sha256:
        return path
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        proc = subprocess.run([*cmd, corpus.package], capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {corpus.package} to read {corpus.member} (pip said: "
                f"{proc.stderr.strip().splitlines()[-1:] or proc.returncode}); pass the text file by path instead"
            )
        part = os.path.join(tmp, corpus.filename)
        with zipfile.ZipFile(wheels[0]) as whl, open(part, "wb") as f:
            f.write(whl.read(corpus.member))
        got = file_sha256(part)
        if got != corpus.sha256:
            raise RuntimeError(
                f"{corpus.member} from {corpus.package} has sha256 {got}, expected {corpus.sha256}"
            )
        os.replace(part, path)  # atomic: a reader never sees half a file
    return path


def wikitext_plain(src: str = WIKI_VALID, cache_dir: str = CACHE) -> str:
    """Path of ``rankserve.textstyle.wikitext_plain_text`` of ``src`` in ``cache_dir`` (named by the source's sha256,
    written atomically), made first if it is not there yet."""
    require("corpora.py", src)
    digest = file_sha256(src)
    path = os.path.join(cache_dir, f"{os.path.splitext(os.path.basename(src))[0]}.plain-{digest[:12]}.txt")
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    with open(src, encoding="utf-8-sig") as f:
        text = wikitext_plain_text(f.read())
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(wikitext_plain() if sys.argv[1:] == ["--wikitext-valid-plain"] else fetch())
