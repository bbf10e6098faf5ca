"""The decoder protocol every backend implements (ONNX Runtime, TensorRT)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..kv_cache import KVCache


class Decoder(Protocol):
    """One model with its KV cache.

    `step` runs the graph on `token_ids` at positions cache.length.., writes their KV rows after the
    committed prefix and returns logits; it does not commit. `commit(n)` keeps n of those rows;
    `rollback(length)` forgets everything past `length`.

    Logits contract: `step` returns an array the caller owns. No later step, rollback, reset or close
    of this decoder (or of another decoder sharing its executor) changes it, so a caller may keep the
    logits of a verification and read its rows lazily. Backends whose graphs write into reused
    buffers copy the rows out (a [1..4, 151936] fp32 copy costs ~25-70 us in numpy on a 2-core x86
    host, small next to a step).

    `close()` (where a decoder has one) frees what the backend holds (sessions, device memory,
    streams, execution contexts); idempotent. Closing one decoder of a shared executor closes the
    executor for all of them; a step after that raises GenerationError.
    """

    max_context: int
    vocab: int

    @property
    def length(self) -> int: ...

    def step(self, token_ids: np.ndarray) -> np.ndarray:  # [S] int64 -> logits [min(S, logits_rows), V] fp32
        ...

    def commit(self, count: int) -> None: ...

    def rollback(self, length: int) -> None: ...

    def reset(self) -> None: ...

    def reuse(self, token_ids: list[int], limit: int) -> int: ...


class CacheBookkeeping:
    """length / step / commit / rollback / reset / reuse of a decoder whose rows live in `self.cache` (a
    KVCache). It also remembers which token each committed row holds, so a later request whose prompt
    starts with the same tokens can keep those rows (`reuse`). Subclasses implement `_forward`."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.cached_tokens: list[int] = []  # the token of each committed row
        self._pending: list[int] = []  # tokens of the last step, not committed yet

    @property
    def length(self) -> int:
        return self.cache.length

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        """token_ids [S] at positions length.. -> logits [R, V] of the last R positions (R = min(S, the graph's
        logits_rows): every position for old graphs, K+1 rows for a verification); rows written, not committed.
        The logits are the caller's (see Decoder): `_forward` must not return a view into a reused buffer."""
        self._pending = np.asarray(token_ids).reshape(-1).tolist()
        return self._forward(token_ids)

    def _forward(self, token_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def commit(self, count: int) -> None:
        assert count <= len(self._pending), "commit only rows of the last step"
        self.cache.commit(count)
        self.cached_tokens.extend(self._pending[:count])
        self._pending = []

    def rollback(self, length: int) -> None:
        self.cache.rollback(length)
        del self.cached_tokens[length:]

    def reset(self) -> None:
        self.rollback(0)

    def reuse(self, token_ids: list[int], limit: int) -> int:
        """Keep the committed rows of the longest common prefix of the cache and `token_ids` (at most
        `limit` rows; 0 = start afresh), drop the rest; returns how many rows were kept."""
        kept = 0
        for cached, wanted in zip(self.cached_tokens[:limit], token_ids):
            if cached != wanted:
                break
            kept += 1
        self.rollback(kept)
        return kept
