"""rankserve: SVD-family compression of decoder LLMs and a runtime that serves them fast."""

__version__ = "0.1.0"
