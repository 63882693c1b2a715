"""Tensors in files, below every loader: safetensors read and written, HF weight-file discovery, and the one
assignment of named tensors onto a model skeleton built on the meta device."""
