"""What int8 *activations* would cost in quality: perplexity with every linear's input rounded to int8, simulated.

Issue #12 asks to try integer dot products (VNNI / AVX2 maddubs) with the activations quantized to int8 as well
as the weights. Before writing such kernels, this measures the quality they would serve: the int8-weight model
(``quantize_`` with its default config) evaluated with every matrix product's input rounded to symmetric int8
(scale = max|x| / 127) either per row (one scale per token: what ``int8_gemv(..., int8_act=True)`` does) or per
block of 32 values along the row (llama.cpp's Q8_0 activation blocks; a partial last block for rank vectors).
Every ``F.linear`` inside ``rankserve.layers`` is wrapped, so for factorized layers both the input of V and the
rank vector (the input of U) are rounded, as a kernel on each factor would round them.

    python benchmarks/int8_act_quality.py --svd-llm DIR [--windows 8]

WikiText-2 test and the Lee corpus, first ``--windows`` windows of 512 tokens, eager backend; deterministic.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import corpora  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from results_report import cpu_model  # noqa: E402

import rankserve.layers  # noqa: E402
from rankserve.eval import perplexity  # noqa: E402
from rankserve.loaders.source import load_model  # noqa: E402
from rankserve.quantize import Int8Config, quantize_  # noqa: E402


def round_int8(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """x with each row (block None) or each block of ``block`` values along the last dim rounded to int8."""
    K = x.shape[-1]
    b = K if block is None else block
    pad = (-K) % b
    rows = F.pad(x.float().reshape(-1, K), (0, pad)).reshape(-1, (K + pad) // b, b)
    s = rows.abs().amax(-1, keepdim=True) / 127
    q = torch.clamp(torch.round(rows * torch.where(s > 0, 1 / s, torch.zeros_like(s))), -127, 127)
    return (q * s).reshape(-1, K + pad)[:, :K].reshape(x.shape).to(x.dtype)


@contextlib.contextmanager
def int8_activations(block: int | None):
    """Every ``F.linear`` called from ``rankserve.layers`` takes its input rounded by :func:`round_int8`."""
    shim = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    shim.linear = lambda x, w, b=None: F.linear(round_int8(x, block), w, b)
    saved = rankserve.layers.F
    rankserve.layers.F = shim
    try:
        yield
    finally:
        rankserve.layers.F = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--svd-llm", required=True, help="an SVD-LLM checkpoint (e.g. ratio 0.4) to measure too")
    p.add_argument("--windows", type=int, default=8)
    args = p.parse_args(argv)
    corpora.require("int8_act_quality.py", corpora.WIKI_TEST)
    with open(corpora.WIKI_TEST, encoding="utf-8") as f, open(corpora.fetch(), encoding="utf-8") as g:
        texts = {"WikiText-2": f.read(), "Lee": g.read()}
    print(f"{cpu_model()}; first {args.windows} windows of 512 tokens; int8 weights = Int8Config() defaults")
    print("| model | weights | activations | " + " | ".join(texts) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in texts) + " |")
    for name, src in (("dense", "smollm2-135m"), ("svd-llm", args.svd_llm)):
        lm = load_model(src)
        base = {}
        for weights in ("fp32", "int8"):
            if weights == "int8":
                quantize_(lm.model, Int8Config())
            for act, block in (("float", "off"), ("int8 per row", None), ("int8 per 32", 32)):
                if weights == "fp32" and act != "float":
                    continue
                ctx = contextlib.nullcontext() if block == "off" else int8_activations(block)
                cells = []
                with ctx, torch.inference_mode():
                    for t, text in texts.items():
                        ppl = perplexity(lm.model, lm.tokenizer, text, 512, args.windows, progress=False)[
                            "perplexity"
                        ]
                        base.setdefault(t, ppl)
                        cells.append(f"{ppl:.3f} ({ppl / base[t] - 1:+.2%})")
                print(f"| {name} | {weights} | {act} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
