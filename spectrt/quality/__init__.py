"""Model quality against a reference: `spectrt eval`.

spectrt's speculative output is exact with respect to spectrt's own target, which may be a quantized copy of
the model the user handed over. This package measures how far that target (and llama.cpp on the same GGUF) is
from the source weights computed in fp32 with transformers: perplexity, KL(reference || engine) per token and
top-1 agreement, teacher-forced over shipped held-out texts (see docs/quality.md).

The runtime stays free of torch: the engine is driven through `spectrt.runtime` only, the reference
(transformers) and llama.cpp are imported lazily, and a cached reference needs neither.
"""

from .errors import QualityError

__all__ = ["QualityError"]
