"""spectrt: speculative decoding for LLM inference, compiled."""

__version__ = "0.1.0"
