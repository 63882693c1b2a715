"""Loaders: model sources (HF directory, GGUF, alias, rankserve checkpoint) and foreign checkpoint importers."""
