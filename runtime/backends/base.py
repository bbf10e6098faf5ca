"""The decoder protocol every backend implements (ONNX Runtime, TensorRT)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Decoder(Protocol):
    """One model with its KV cache.

    `step` runs the graph on `token_ids` at positions cache.length.., writes their KV rows after the
    committed prefix and returns logits; it does not commit. `commit(n)` keeps n of those rows;
    `rollback(length)` forgets everything past `length`.
    """

    max_context: int
    vocab: int

    @property
    def length(self) -> int: ...

    def step(self, token_ids: np.ndarray) -> np.ndarray:  # [S] int64 -> logits [S, V] fp32
        ...

    def commit(self, count: int) -> None: ...

    def rollback(self, length: int) -> None: ...

    def reset(self) -> None: ...


class CacheBookkeeping:
    """commit / rollback / reset / length of a decoder that keeps its rows in `self.cache` (a KVCache)."""

    @property
    def length(self) -> int:
        return self.cache.length

    def commit(self, count: int) -> None:
        self.cache.commit(count)

    def rollback(self, length: int) -> None:
        self.cache.rollback(length)

    def reset(self) -> None:
        self.cache.rollback(0)
