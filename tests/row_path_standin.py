"""A stand-in target decoder whose numerics depend on the row count of the call, as real CPU kernels' do.

Measured on an AMD EPYC with AVX2 (onnxruntime 1.32, int4 MatMulNBits): a 1-row call, and the trailing single
row of a call of 4n + 1 rows, take another kernel path than rows computed in groups. This wrapper reproduces that
on any machine: rows on the "odd path" get their logits and their KV rows moved by a deterministic amount (a
function of position and token only, so the same call shape always gives the same bits, as a kernel does), big
enough to flip greedy choices. Tests use it to prove the runtime's call shaping, whatever CPU runs them."""

from __future__ import annotations

import numpy as np


def odd_path_rows(count: int) -> list[int]:
    """Rows of a `count`-row call the stand-in computes on the odd path."""
    if count == 1:
        return [0]
    return [count - 1] if count % 4 == 1 else []


def _shift(shape: tuple[int, ...], position: int, token: int, stream: int) -> np.ndarray:
    """A fixed pseudo-random offset for (position, token, what it moves)."""
    return np.random.default_rng([position, token, stream]).standard_normal(shape).astype(np.float32)


class RowPathStandIn:
    """Wraps a host-memory decoder (OrtDecoder); the Decoder protocol, with row-count-dependent numerics."""

    def __init__(self, inner, scale: float = 0.5):
        self.inner = inner
        self.scale = scale
        self.max_context = inner.max_context
        self.vocab = inner.vocab
        self.logits_rows = inner.logits_rows
        self.calls: list[int] = []  # row count of every call, in order

    @property
    def length(self) -> int:
        return self.inner.length

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        count = len(token_ids)
        self.calls.append(count)
        start = self.inner.length
        logits = self.inner.step(token_ids)  # [R, V], a view: perturbed in place like a kernel's own output
        first_returned = count - len(logits)
        for row in odd_path_rows(count):
            position, token = start + row, int(token_ids[row])
            if row >= first_returned:
                moved = logits[row - first_returned]
                moved += _shift(moved.shape, position, token, 0) * self.scale * float(moved.std() or 1.0)
            cache = self.inner.cache
            for layer in range(len(cache.keys)):
                key = cache.keys[layer][0, position]  # [kv, D], written by this call
                key += (_shift(key.shape, position, token, layer + 1) * self.scale
                        * float(np.abs(key).mean() or 1.0)).astype(key.dtype)
        return logits

    def commit(self, count: int) -> None:
        self.inner.commit(count)

    def rollback(self, length: int) -> None:
        self.inner.rollback(length)

    def reset(self) -> None:
        self.inner.reset()

    def reuse(self, token_ids: list[int], limit: int) -> int:
        return self.inner.reuse(token_ids, limit)
