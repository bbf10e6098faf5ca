"""Preallocated KV cache for one model; rollback is moving `length`, never copying.

Layout per layer: key/value [1, max_context, kv_heads, head_dim] (sequence-major), so the
committed prefix cache[:, :length] is one contiguous block that a backend can hand to the
graph as `past_*` without a copy, and the graph's `new_*` rows are written in place at row `length`.
"""

from __future__ import annotations

import numpy as np

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class RowCounter:
    """The bookkeeping of a KV cache: how many rows are committed (the rows live elsewhere)."""

    def __init__(self, max_context: int):
        self.max_context = max_context
        self.length = 0  # committed rows

    def commit(self, count: int) -> None:
        assert 0 <= self.length + count <= self.max_context
        self.length += count

    def rollback(self, length: int) -> None:
        assert 0 <= length <= self.length
        self.length = length


class KVCache(RowCounter):
    """Rows in host memory (numpy), one K and one V array per layer."""

    def __init__(self, num_layers: int, max_context: int, kv_heads: int, head_dim: int, precision: str):
        super().__init__(max_context)
        self.dtype = NP_DTYPES[precision]
        shape = (1, max_context, kv_heads, head_dim)
        self.keys = [np.zeros(shape, self.dtype) for _ in range(num_layers)]  # each [1, C, kv, D]
        self.values = [np.zeros(shape, self.dtype) for _ in range(num_layers)]

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Committed prefix views [1, length, kv, D] (contiguous, no copy)."""
        return self.keys[layer][:, : self.length], self.values[layer][:, : self.length]

    def new_rows(self, layer: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Views [1, count, kv, D] right after the committed prefix, where a step writes its new rows."""
        end = self.length + count
        assert end <= self.max_context, "caller must check the context limit before stepping"
        return self.keys[layer][:, self.length : end], self.values[layer][:, self.length : end]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)
