"""Runtime: KV cache, sampling, generation, compiled decode and native kernels."""
