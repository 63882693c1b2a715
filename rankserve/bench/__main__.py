"""The bench workers' entry point: ``python -m rankserve.bench worker|memory|llama-prompt-probe ARG SPEC_JSON``.

``worker BACKEND,BACKEND,...`` times backends (a JSON list of results on stdout); ``memory BACKEND`` measures
one backend's memory in this fresh process (a JSON object); ``llama-prompt-probe GGUF`` evaluates the bench
prompt batched in llama.cpp, and its exit status says whether that works here. Threads are set here, once, for
the whole process.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict

import torch

from rankserve.bench.backends import llama_cpp_prompt_probe
from rankserve.bench.harness import run_worker
from rankserve.bench.memory import measure_memory
from rankserve.bench.spec import BenchSpec


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("worker", "memory", "llama-prompt-probe"):
        sys.exit("this module runs bench workers; use `rankserve bench`")
    logging.basicConfig(level=logging.WARNING)
    command, arg, spec = argv[0], argv[1], BenchSpec(**json.loads(argv[2]))
    torch.set_num_threads(spec.threads)
    if command == "memory":
        print(json.dumps(measure_memory(spec, arg)))
    elif command == "llama-prompt-probe":
        llama_cpp_prompt_probe(arg, spec)
    else:
        print(json.dumps([asdict(r) for r in run_worker(spec, arg.split(","))]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
