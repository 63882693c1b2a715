"""Runtime options, passed down explicitly (never read from the environment on a hot path)."""

from __future__ import annotations

from dataclasses import dataclass

from rankserve.errors import InputError


@dataclass
class RuntimeOptions:
    backend: str = (
        "eager"  # "eager": the reference path; "fast": packed decode, native kernels (rankserve.runtime.fast)
    )
    max_len: int | None = None  # KV cache slots; default: prompt + max_tokens, capped by the model context
    prefill_chunk: int = 512  # long prompts are prefilled in chunks of this many tokens
    # fast backend: capture the decode step with torch.compile. None (default): only when the native decode_layer
    # does not run the step (see FastRunner); True or False forces it.
    compile: bool | None = None
    native: bool = True  # fast backend: use the C++ kernels where they exist
    # fast backend: back the packed weights with 2 MiB pages where Linux can (rankserve.runtime.hugepages)
    hugepages: bool = True
    native_isa: str = "auto"  # vector path: "auto" (best this CPU runs), "avx512", "avx2", "scalar"
    cache_dir: str | None = None  # compiled artifacts (default: rankserve's cache directory)

    def validate(self) -> RuntimeOptions:
        if self.backend not in ("eager", "fast"):
            raise InputError(f"unknown backend {self.backend!r}; use 'eager' or 'fast'")
        from rankserve.runtime.native import ISAS

        if self.native_isa != "auto" and self.native_isa not in ISAS:
            raise InputError(
                f"unknown native_isa {self.native_isa!r}; use 'auto' or one of {', '.join(ISAS)}"
            )
        if self.prefill_chunk < 1:
            raise InputError("prefill_chunk must be >= 1")
        return self
