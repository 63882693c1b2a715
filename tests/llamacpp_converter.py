"""llama.cpp's own HF -> GGUF converter, taken at test time from the llama-cpp-python source distribution.

The sdist vendors llama.cpp, with ``convert_hf_to_gguf.py``, its ``conversion/`` package and ``gguf-py/``. Only
those are extracted (never committed), once per machine, into rankserve's cache directory.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from rankserve.fsutil import cache_dir

# Pinned: the converter's rules per architecture are what the tests check rankserve against.
LLAMA_CPP_PYTHON = "0.3.36"
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")


class ConverterUnavailable(RuntimeError):
    """The sdist could not be downloaded (no network, or PyPI unreachable)."""


def converter_dir() -> str:
    """A directory holding llama.cpp's ``convert_hf_to_gguf.py`` (downloaded and extracted on first use)."""
    target = cache_dir("test-llamacpp-src", LLAMA_CPP_PYTHON)
    script = os.path.join(target, "convert_hf_to_gguf.py")
    if os.path.isfile(script):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    # one download per machine, even with concurrent test sessions; the directory appears whole or not at all
    with open(os.path.join(parent, f".{LLAMA_CPP_PYTHON}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(script):
            return target
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        try:
            _download_and_extract(os.path.join(tmp, "sdist"), os.path.join(tmp, "out"))
            os.rename(os.path.join(tmp, "out"), target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _download_and_extract(download: str, out: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += [f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", download, "--quiet"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise ConverterUnavailable(
            f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON} took over 30 minutes"
        ) from None
    sdists = glob.glob(os.path.join(download, "*.tar.gz"))
    if r.returncode != 0 or not sdists:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConverterUnavailable(f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON} failed: {tail[0]}")
    with tarfile.open(sdists[0]) as tar:
        for m in tar:
            rel = m.name[len(_VENDOR) :] if m.name.startswith(_VENDOR) else ""
            if not (m.isfile() and rel.startswith(_KEEP)) or ".." in rel.split("/"):
                continue
            dest = os.path.join(out, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with tar.extractfile(m) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)


# Runs the unmodified script once per job inside one interpreter: importing torch, transformers and the
# converter's ~90 modules takes 6 s of CPU (20+ s on a loaded machine), more than converting a tiny model.
_DRIVER = """
import json, os, runpy, sys
script, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(script))  # as running the script directly would (for its conversion/)
for hf_dir, outfile, outtype in jobs:
    sys.argv = [script, hf_dir, "--outfile", outfile, "--outtype", outtype]
    runpy.run_path(script, run_name="__main__")
"""


def convert(directory: str, jobs: list[tuple[str, str, str]]) -> None:
    """Run llama.cpp's converter on each ``(hf_dir, outfile, outtype)`` (in a subprocess, with its own
    vendored gguf-py, which the script puts first on its path)."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    script = os.path.join(directory, "convert_hf_to_gguf.py")
    cmd = [sys.executable, "-c", _DRIVER, script, json.dumps([list(j) for j in jobs])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise AssertionError(f"convert_hf_to_gguf.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
