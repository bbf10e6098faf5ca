"""A suffix cache across requests: earlier requests' prompts and outputs, indexed for prompt-lookup drafting.

Agents call the same tools turn after turn, editors resend the same files, chat quotes earlier answers: text a
request outputs has often been seen by the server before, but not in this request. The cache keeps the token
sequences of finished requests (prompt and output) in a fixed-size ring and indexes them so that the n-gram
drafter (`drafters.NgramDrafter`) finds the longest earlier context that matches the end of the current sequence
and drafts what followed it (SuffixDecoding, Oliaro et al. 2024, does the same with suffix trees).

- Memory is bounded by construction: `max_tokens` ring slots (token, sequence, tenant, and per anchor a hash and a
  chain link: 52 bytes each with two anchors) plus, per anchor, one dict entry per distinct live context; the
  oldest tokens are overwritten first and their index entries dropped with them. `stats()` reports the bytes.
- Index: for each anchor length A (3 and 12 tokens), a hash of (tenant, the A tokens before a position) -> the
  latest position that followed them, each position linking to the previous one with the same hash: a lookup
  walks the latest occurrences first and compares them backwards token by token (so hash collisions cost nothing
  but a comparison), keeping those with the longest common context (up to `max_match` tokens). Matches shorter
  than the shortest anchor are left to the request's own index, which covers its prompt and output.
- Multi-turn requests repeat the conversation so far: a request's prompt is stored from where it stops repeating
  the previous request of the same tenant (less `overlap` tokens of context), so a six-turn conversation is held
  about once, not six times.
- Tenants: a request's `suffix_cache_key` names the partition it reads and writes (default: one shared partition).
  Nothing another client sent can change a request's output in any case: every drafted token is verified by the
  target, so the cache changes only how fast an output comes, never what it is. The key keeps one client's text
  out of another's drafts (and timings).
- Thread-safe: a lock guards every call (the server adds finished requests while metrics are read).
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_TOKENS = 1 << 17  # 131,072 tokens: 6.5 MiB of ring; 50 MiB in all at most (`max_bytes`)
ANCHORS = (3, 12)  # context lengths indexed; a lookup tries the longest first
MAX_MATCH = 64  # longest common context compared
MAX_CANDIDATES = 64  # latest occurrences of an anchor examined per lookup
OVERLAP = 32  # context kept before the new part of a multi-turn prompt
RECENT_TENANTS = 64  # tenants whose latest request is remembered for multi-turn de-duplication
_ENTRY_OBJECT_BYTES = 52  # an index entry's int objects: its 64-bit key (36 bytes) and half a position (28 bytes,
# shared by the anchors' dicts), measured with tracemalloc (tests/test_suffix_cache.py)
_ENTRY_TABLE_BYTES = 90  # the most a dict's table takes per entry (CPython 3.11: 84, just after it grows)


def tenant_code(key: str | None) -> int:
    """A stable 63-bit code for a tenant key ('' and None: the shared partition)."""
    if not key:
        return 0
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class CacheMatch:
    """The latest earlier occurrences of the current context: `length` tokens of it match before each position."""

    length: int
    positions: list[int]  # ring positions that followed the matched context, latest last


class SuffixCache:
    """Bounded index over the token sequences of earlier requests; see the module docstring."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, anchors: tuple[int, ...] = ANCHORS,
                 max_match: int = MAX_MATCH, max_candidates: int = MAX_CANDIDATES, overlap: int = OVERLAP):
        if max_tokens < 1:
            raise ValueError("a suffix cache needs max_tokens >= 1 (or no cache at all).")
        self.capacity = int(max_tokens)
        self.anchors = tuple(sorted(anchors))
        self.max_match = max(max_match, self.anchors[-1])
        self.max_candidates = max_candidates
        self.overlap = overlap
        self._tokens = np.zeros(self.capacity, np.int32)  # [capacity]
        self._sequence = np.full(self.capacity, -1, np.int64)  # [capacity] sequence number of each slot
        self._tenant = np.zeros(self.capacity, np.int64)  # [capacity]
        self._keys = np.zeros((len(self.anchors), self.capacity), np.int64)  # [anchors, capacity] hash, 0 = none
        self._links = np.full((len(self.anchors), self.capacity), -1, np.int64)  # previous position, same hash
        self._heads: list[dict[int, int]] = [{} for _ in self.anchors]  # hash -> latest position
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()  # tenant -> its latest request's tokens
        self._end = 0  # positions written so far (the next one)
        self._sequences = 0  # sequences added so far (the next number)
        self._lock = threading.Lock()
        self.requests = 0
        self.evicted_tokens = 0

    # -- writing --------------------------------------------------------------------------------------------------

    def add(self, prompt_ids: list[int], output_ids: list[int], key: str | None = None) -> int:
        """Remember a finished request (its prompt and output) under tenant `key`; returns the tokens stored."""
        tenant = tenant_code(key)
        request = np.asarray([*prompt_ids, *output_ids], np.int32)  # [n]
        with self._lock:
            previous = self._recent.pop(tenant, None)
            self._recent[tenant] = request
            while len(self._recent) > RECENT_TENANTS:
                self._recent.popitem(last=False)
            start = 0
            if previous is not None:  # a later turn: skip what the previous request already stored
                repeated = _common_prefix(previous, request[: len(prompt_ids)])
                start = max(0, repeated - self.overlap)
            stored = request[start:][-self.capacity :]
            if len(stored):
                self._append(stored, tenant)
            self.requests += 1
            return len(stored)

    def _append(self, tokens: np.ndarray, tenant: int) -> None:
        sequence = self._sequences
        self._sequences += 1
        first, count = self._end, len(tokens)
        slots = np.arange(first, first + count) % self.capacity  # [count]
        reusing = max(0, self.capacity - first)  # offsets from here on overwrite the oldest positions
        if count > reusing:  # whose index entries go first
            self._evict(slots[reusing:], first + reusing - self.capacity)
        self._tokens[slots] = tokens
        self._sequence[slots] = sequence
        self._tenant[slots] = tenant
        values = tokens.tolist()
        for a, anchor in enumerate(self.anchors):
            heads = self._heads[a]
            keys = [0] * count  # 0: fewer than `anchor` tokens of this sequence precede the position
            links = [-1] * count
            for offset in range(anchor, count):
                key = hash((tenant, *values[offset - anchor : offset])) or 1
                keys[offset] = key
                links[offset] = heads.get(key, -1)
                heads[key] = first + offset
            self._keys[a, slots] = keys
            self._links[a, slots] = links
        self._end = first + count

    def _evict(self, slots: np.ndarray, first_position: int) -> None:
        """Drop the index entries of the oldest positions (`first_position` on, in `slots`) before they are reused."""
        self.evicted_tokens += len(slots)
        for a in range(len(self.anchors)):
            heads = self._heads[a]
            for offset, key in enumerate(self._keys[a, slots].tolist()):
                if key and heads.get(key) == first_position + offset:  # its latest occurrence: the chain dies with it
                    del heads[key]

    def clear(self) -> None:
        with self._lock:
            for heads in self._heads:
                heads.clear()
            self._recent.clear()
            self._sequence.fill(-1)
            self._keys.fill(0)
            self._links.fill(-1)
            self._end = self._sequences = 0

    # -- reading --------------------------------------------------------------------------------------------------

    def match(self, context: list[int], key: str | None = None) -> CacheMatch | None:
        """The latest earlier positions whose preceding tokens agree longest with the end of `context` (at least the
        shortest anchor; up to `max_match`), in tenant `key`'s partition; None if none agrees that far."""
        tenant = tenant_code(key)
        with self._lock:
            oldest = self._end - self.capacity  # positions before it were overwritten
            for a in range(len(self.anchors) - 1, -1, -1):
                anchor = self.anchors[a]
                if len(context) < anchor:
                    continue
                key = hash((tenant, *(int(t) for t in context[len(context) - anchor :]))) or 1
                position = self._heads[a].get(key, -1)
                found: list[tuple[int, int]] = []  # (match length, position)
                while position >= max(0, oldest) and len(found) < self.max_candidates:
                    length = self._agreement(context, position, tenant)
                    if length >= anchor:
                        found.append((length, position))
                    position = int(self._links[a, position % self.capacity])
                if found:
                    longest = max(length for length, _ in found)
                    return CacheMatch(longest, sorted(p for length, p in found if length == longest))
            return None

    def _agreement(self, context: list[int], position: int, tenant: int) -> int:
        """How many tokens before `position` (in its sequence) agree with the end of `context`, up to max_match."""
        slot = position % self.capacity
        sequence = self._sequence[slot]
        if self._tenant[slot] != tenant:
            return 0
        oldest = max(0, self._end - self.capacity)
        limit = min(self.max_match, len(context), position - oldest)
        count = 0
        while count < limit:
            earlier = (position - 1 - count) % self.capacity
            if self._sequence[earlier] != sequence or self._tokens[earlier] != context[len(context) - 1 - count]:
                break
            count += 1
        return count

    def token_at(self, position: int, origin: int) -> int | None:
        """The token at ring `position` if it continues the sequence that `origin` belongs to (None past its end or
        once overwritten)."""
        with self._lock:
            if not max(0, self._end - self.capacity) <= origin <= position < self._end:
                return None
            if self._sequence[position % self.capacity] != self._sequence[origin % self.capacity]:
                return None
            return int(self._tokens[position % self.capacity])

    # -- reporting ------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """What the cache holds and the memory it takes (bytes: the ring, the index and the recent requests)."""
        with self._lock:
            entries = sum(len(heads) for heads in self._heads)
            ring = sum(a.nbytes for a in (self._tokens, self._sequence, self._tenant, self._keys, self._links))
            index = sum(sys.getsizeof(heads) for heads in self._heads) + entries * _ENTRY_OBJECT_BYTES
            recent = sum(r.nbytes + 112 for r in self._recent.values())
            return {"max_tokens": self.capacity, "tokens": min(self._end, self.capacity), "requests": self.requests,
                    "evicted_tokens": self.evicted_tokens, "index_entries": entries, "bytes": ring + index + recent,
                    "max_bytes": self.max_bytes(), "tenants_remembered": len(self._recent)}

    def max_bytes(self, max_request_tokens: int = 32768) -> int:
        """The most memory the cache can take: ring and index full, the recent requests at `max_request_tokens`."""
        ring = self.capacity * (4 + 8 + 8 + 16 * len(self.anchors))
        index = len(self.anchors) * self.capacity * (_ENTRY_OBJECT_BYTES + _ENTRY_TABLE_BYTES)  # at most one per slot
        return ring + index + RECENT_TENANTS * (4 * max_request_tokens + 112)


class CacheView:
    """One request's view of a SuffixCache: its tenant's partition, read by the n-gram drafter."""

    def __init__(self, cache: SuffixCache, key: str | None = None):
        self.cache = cache
        self.key = key

    def match(self, context: list[int]) -> CacheMatch | None:
        return self.cache.match(context, self.key)

    def read(self, start: int, offset: int, drafted: list[int]) -> int | None:
        """The token `offset` after the cached position `start` (None past the end of its sequence)."""
        return self.cache.token_at(start + offset, start)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
