"""spectrt: speculative decoding for LLM inference, compiled.

    import spectrt
    gen = spectrt.load("engines/qwen-coder")
    out = gen.generate("def fibonacci(n):", max_new_tokens=128)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "Generator", "GenerateConfig", "__version__"]


def __getattr__(name: str):
    # lazy: `import spectrt` stays cheap and never pulls the compiler (torch) in
    if name in ("load", "Generator", "GenerateConfig", "GenerationResult", "StreamChunk"):
        from spectrt.runtime import generator

        return getattr(generator, name)
    raise AttributeError(f"module 'spectrt' has no attribute {name!r}")
