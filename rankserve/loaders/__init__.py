"""Loaders: model sources (alias, HF directory, GGUF, rankserve checkpoint) and the ``rankserve import`` flow."""
