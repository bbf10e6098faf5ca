"""Row-count invariance, measured where the runtime runs, and target calls shaped to stay on one numeric path.

Greedy speculative output equals plain decoding only if the target gives a position the same logits (and the
same KV rows) whether it is computed alone, inside a K+1-row verification, or inside a prefill. Kernels pick
their path by row count: on an AMD EPYC with AVX2 (onnxruntime 1.32), the int4 `MatMulNBits` computes a 1-row
call another way than a call of 2+ rows; other CPUs, GPUs and library versions dispatch otherwise. So nothing
is assumed: before its first request a Generator asks the bundle's own target graph, on this machine, with this
library and thread count, which row counts agree bit for bit (`measure_row_invariance`; seconds, cached per
machine, CPU features, library version, threads and bundle), and every target call is then shaped from the
counts that agree (`ShapedDecoder`):

- a call of n rows whose count is off the common path is padded to the cheapest agreeing count (the extra rows
  carry a filler token, or a free guess the loop may accept: see `loop.py`), or split into agreeing calls;
- a prefill is cut into chunks of a verified chunk size, the rest shaped like any call, so prefix reuse and
  chunking give every row the bits a one-call prefill would.

If no set of counts agrees, generation still works but reports `exact: false` and why (`InvarianceReport`)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from spectrt.runtime.errors import GenerationError

from .machine import cache_root, machine_facts

PROBE_VERSION = 2  # bump when the probe's method changes: cached results are then measured again
CHUNK_CANDIDATES = (64, 32, 16)  # prefill chunk sizes tried, largest first (int4 Qwen 1.5B, 2 AVX2 cores: 23-28 ms
# per row from 16 to 128 rows, 64 the cheapest; a one-call 128-row check alone would cost 7 s)
PREFIXES = (3, 29)  # cached rows before the probed calls (two attention lengths)


@dataclass(frozen=True)
class InvarianceReport:
    """What the row-count check measured and the call shaping in use (JSON-serialisable)."""

    exact: bool  # every kept row is computed on one numeric path (as far as measured)
    strategy: str  # as-is (every count agrees) | pad (calls padded/split to agreeing counts) | off | none-found
    reason: str  # one line: why exact or not
    rows: tuple[int, ...]  # row counts calls are shaped to (ascending); empty: calls run as asked
    chunk_rows: int | None  # prefill chunk size (verified), None: prefills run in one call
    checked: tuple[int, ...]  # every row count the check ran
    classes: tuple[tuple[int, ...], ...]  # counts whose rows agree with each other, one group each
    call_seconds: dict[str, float]  # row count -> seconds of one call (the check's own timing)
    plain_step_rows: int  # rows a plain (1-token) step computes
    plain_step_cost: float | None  # its time over a 1-row call's (1.0: no cost)
    probe_seconds: float  # how long the check took when it ran
    cached: bool = False  # read from the cache rather than measured now
    machine: dict[str, Any] = field(default_factory=dict)  # cpu, isa, onnxruntime, threads, backend

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"], data["checked"] = list(self.rows), list(self.checked)
        data["classes"] = [list(c) for c in self.classes]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "InvarianceReport":
        data = dict(data)
        data["rows"], data["checked"] = tuple(data["rows"]), tuple(data["checked"])
        data["classes"] = tuple(tuple(c) for c in data["classes"])
        return cls(**data)

    def summary(self) -> str:
        """One line for humans."""
        shaped = (f"calls shaped to {_ranges(self.rows)} rows" if self.rows else "calls run as asked")
        chunk = f", prefill chunks of {self.chunk_rows}" if self.chunk_rows else ""
        cost = (f", plain step {self.plain_step_rows} rows ({self.plain_step_cost:.2f}x a 1-row call)"
                if self.plain_step_cost is not None and self.plain_step_rows != 1 else "")
        return f"exact: {str(self.exact).lower()} ({self.strategy}: {shaped}{chunk}{cost}); {self.reason}"


@dataclass(frozen=True)
class CallShape:
    """The row counts a target call may have, and what each costs; `plan(n)` splits n tokens into calls."""

    rows: tuple[int, ...]  # agreeing row counts, ascending
    seconds: tuple[float, ...]  # measured seconds per call, one per entry of `rows`
    visible: int | None  # the graph returns logits for the last `visible` rows of a call (None: all)

    def __post_init__(self) -> None:
        assert self.rows and len(self.rows) == len(self.seconds) and list(self.rows) == sorted(set(self.rows))
        object.__setattr__(self, "_plans", {})

    @property
    def max_pad(self) -> int:
        """The most pad rows any call gets: a short call padded to the next agreeing count (never more; the cache
        keeps that many rows free at the end of the context)."""
        padded_max = self.visible if self.visible is not None else max(self.rows)
        pads = [0 if c in self.rows else min((r for r in self.rows if c < r <= padded_max), default=c) - c
                for c in range(1, padded_max)]
        return max(pads, default=0)

    def plan(self, count: int) -> tuple[tuple[int, int], ...]:
        """(real rows, call rows) per call for `count` tokens, in order. An agreeing count runs as one call; a count
        below an agreeing count that returns all its rows' logits is padded to it; any other (a prefill, or a count
        above every such agreeing count) is split into agreeing calls at the least measured cost, longest first,
        the last one padded if that is cheaper."""
        plans = self._plans  # type: ignore[attr-defined]
        if count not in plans:
            plans[count] = self._best_plan(count)
        return plans[count]

    def _costs(self) -> dict[int, float]:
        """Measured seconds per call, made non-decreasing in the row count (one timing each is noisy; a call of
        more rows is never cheaper)."""
        costs, running = {}, 0.0
        for rows, seconds in zip(self.rows, self.seconds):
            running = max(running, seconds)
            costs[rows] = running
        return costs

    def _best_plan(self, count: int) -> tuple[tuple[int, int], ...]:
        # a padded call must return the logits of all its rows (the caller needs its real rows' logits), so it is
        # at most `visible` rows long; exact calls before it, longest first, cover the rows before
        padded_max = self.visible if self.visible is not None else max(self.rows)
        if count in self.rows:
            return ((count, count),)
        single = [rows for rows in self.rows if count < rows <= padded_max]
        if single:  # a short call: pad it to the next agreeing count
            return ((count, single[0]),)
        cost = self._costs()
        best = self._exact_splits(count, cost)
        options = []  # (total cost, pad rows, real rows of the last call, its rows)
        for rows in self.rows:
            for real in range(max(1, rows - self.max_pad), min(rows, count) + 1):
                if (real == rows or rows <= padded_max) and best[0][count - real] < float("inf"):
                    options.append((best[0][count - real] + cost[rows], rows - real, real, rows))
        assert options, f"no plan for {count} rows from {self.rows}"
        _, _, last_real, last_rows = min(options)
        parts, n = [], count - last_real
        while n:
            parts.append(best[1][n])
            n -= best[1][n]
        return tuple((rows, rows) for rows in sorted(parts, reverse=True)) + ((last_real, last_rows),)

    def _exact_splits(self, count: int, cost: dict[int, float]) -> tuple[list[float], list[int]]:
        """(cheapest cost of n rows in exact calls of agreeing counts, the last call's rows) for n = 0..count."""
        best = [0.0] + [float("inf")] * count
        choice = [0] * (count + 1)
        for n in range(1, count + 1):
            for rows in self.rows:
                if rows <= n and best[n - rows] + cost[rows] < best[n]:
                    best[n], choice[n] = best[n - rows] + cost[rows], rows
        return best, choice


# -- measurement ------------------------------------------------------------------------------------------------

def _rows_of_call(decoder, prefix: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, float]:
    """Logits [R, V] (copied) of one call of `tokens` after `prefix` (already committed), and its seconds."""
    decoder.rollback(len(prefix))
    started = time.perf_counter()
    logits = np.array(decoder.step(tokens), copy=True)
    return logits, time.perf_counter() - started


def _visible_positions(count: int, visible: int | None) -> range:
    """Positions (within a call of `count` rows) whose logits the graph returns."""
    return range(count - min(count, visible or count), count)


def _agree(a: tuple[int, dict[int, np.ndarray]], b: tuple[int, dict[int, np.ndarray]]) -> bool:
    """Two calls' logits agree bit for bit at every position both return (per prefix)."""
    rows_a, rows_b = a[1], b[1]
    common = set(rows_a) & set(rows_b)
    return bool(common) and all(np.array_equal(rows_a[p], rows_b[p]) for p in common)


def _common_path(counts: list[int], results: dict[int, list[dict[int, np.ndarray]]]) -> list[list[int]]:
    """Group row counts whose calls agree (at every prefix) with every member; the biggest group first."""
    def agree(a: int, b: int) -> bool:
        return all(_agree((a, ra), (b, rb)) for ra, rb in zip(results[a], results[b]))

    degree = {c: sum(agree(c, o) for o in counts if o != c) for c in counts}
    left, groups = sorted(counts, key=lambda c: (-degree[c], -c)), []
    while left:
        group = [left.pop(0)]
        for c in list(left):
            if all(agree(c, g) for g in group):
                group.append(c)
                left.remove(c)
        groups.append(sorted(group))
    groups.sort(key=lambda g: (-len(g), -max(g)))
    return groups


def measure_row_invariance(decoder, *, max_rows: int, seed: int = 0,
                           chunk_candidates: tuple[int, ...] = CHUNK_CANDIDATES) -> tuple[CallShape | None, dict]:
    """Run the target's own graph at row counts 1..max_rows (at two cache lengths) and at prefill chunk sizes, and
    find the counts that give every row the same bits. Returns (the call shape, or None if no two counts agree;
    facts for the report). The decoder's cache is reset afterwards."""
    started = time.perf_counter()
    visible = getattr(decoder, "logits_rows", None)
    vocab = int(decoder.vocab)
    longest = max(PREFIXES) + max(max_rows + 1, *chunk_candidates) + max_rows + 1
    rng = np.random.default_rng(seed)
    sequence = rng.integers(0, vocab, size=longest).astype(np.int64)  # arbitrary ids: numerics, not meaning
    counts = list(range(1, max_rows + 2))  # max_rows + 1: a witness whose rows cover the last row of a max_rows call
    results: dict[int, list[dict[int, np.ndarray]]] = {c: [] for c in counts}
    seconds: dict[int, float] = {}
    try:
        for prefix_len in [p for p in PREFIXES if p + max_rows + 1 <= decoder.max_context] or [1]:
            prefix = sequence[:prefix_len]
            decoder.reset()
            decoder.step(prefix)
            decoder.commit(prefix_len)
            for count in counts:
                logits, took = _rows_of_call(decoder, prefix, sequence[prefix_len : prefix_len + count])
                seconds[count] = min(took, seconds.get(count, took))  # the faster of two cache lengths
                results[count].append(dict(zip(_visible_positions(count, visible), logits)))
        groups = _common_path(counts, results)
        common = [c for c in groups[0] if c <= max_rows]  # the witness checks others; its own last row is unchecked
        if len(common) < min(2, max_rows):  # no two counts agree: nothing to shape calls to
            return None, _facts(counts, groups, seconds, None, started)
        shape = CallShape(tuple(common), tuple(seconds[c] for c in common), visible)
        chunks = _verified_chunks(decoder, sequence, shape, chunk_candidates, seconds)
        if chunks:
            rows = tuple(sorted({*common, *chunks}))
            shape = CallShape(rows, tuple(seconds[c] for c in rows), visible)
        return shape, _facts(counts, groups, seconds, max(chunks, default=None), started,
                             tried=[c for c in chunk_candidates if c in seconds])
    finally:
        decoder.reset()


def _verified_chunks(decoder, sequence: np.ndarray, shape: CallShape, candidates: tuple[int, ...],
                     seconds: dict[int, float]) -> list[int]:
    """The prefill chunk sizes whose one call gives its rows (and the rows after it) the bits that calls shaped to
    the agreeing small counts give them."""
    prefix_len = PREFIXES[0]
    prefix = sequence[:prefix_len]
    shaped = ShapedDecoder(decoder, shape, None)
    verified = []
    for chunk in candidates:
        if chunk <= max(shape.rows) or prefix_len + chunk + shape.rows[0] + shape.max_pad > decoder.max_context:
            continue
        tokens = sequence[prefix_len : prefix_len + chunk]
        follow = sequence[prefix_len + chunk : prefix_len + chunk + shape.rows[0]]  # reads the chunk's KV rows
        outputs = []
        for runner in (decoder, shaped):
            decoder.reset()
            decoder.step(prefix)
            decoder.commit(prefix_len)
            started = time.perf_counter()
            rows = np.array(runner.step(tokens), copy=True)  # [min(chunk, R), V]
            if runner is decoder:
                seconds[chunk] = time.perf_counter() - started
            runner.commit(chunk)
            outputs.append((rows, np.array(runner.step(follow), copy=True)))
        (big, after_big), (parts, after_parts) = outputs
        if np.array_equal(big, parts) and np.array_equal(after_big, after_parts):
            verified.append(chunk)
    return verified


def _facts(checked: list[int], groups: list[list[int]], seconds: dict[int, float], chunk: int | None,
           started: float, tried: list[int] | None = None) -> dict[str, Any]:
    return {"checked": tuple(sorted({*checked, *(tried or [])})),
            "classes": tuple(tuple(g) for g in groups), "call_seconds": {str(c): s for c, s in sorted(seconds.items())},
            "chunk_rows": chunk, "probe_seconds": time.perf_counter() - started}


def report_for(shape: CallShape | None, facts: dict[str, Any], *, enabled: bool, machine: dict[str, Any]
               ) -> InvarianceReport:
    """The report for a measured shape, with shaping on (`enabled`) or off."""
    classes = facts["classes"]
    all_counts = sorted(c for group in classes for c in group)
    seconds = facts["call_seconds"]
    one_row = seconds.get("1")
    every_count_agrees = shape is not None and len(classes) == 1
    if shape is None:
        exact, strategy = False, "none-found"
        reason = (f"no two row counts of {_ranges(all_counts)} give a row the same logits on this machine: a "
                  f"verification may pick other tokens than plain decoding")
    elif not enabled:
        exact, strategy = every_count_agrees and facts["chunk_rows"] is not None, "off"
        reason = ("call shaping is off, but every row count checked agrees here" if exact else
                  f"call shaping is off and row counts {_ranges(all_counts)} fall into {len(classes)} groups "
                  f"that compute a row differently ({' | '.join(_ranges(g) for g in classes)}): speculative output "
                  f"may differ from plain decoding")
    else:
        exact = True
        strategy = "as-is" if every_count_agrees else "pad"
        reason = ("every row count checked gives a row the same logits" if every_count_agrees else
                  f"row counts fall into {len(classes)} groups that compute a row differently "
                  f"({' | '.join(_ranges(g) for g in classes)}); calls use {_ranges(shape.rows)} only")
        if facts["chunk_rows"] is None:
            reason += "; no prefill chunk size agreed, so prefills run in calls of at most " \
                      f"{max(shape.rows)} rows"
    plain_rows = shape.plan(1)[-1][1] if (shape is not None and enabled) else 1
    plain_cost = (seconds.get(str(plain_rows)) / one_row) if one_row and seconds.get(str(plain_rows)) else None
    return InvarianceReport(exact=exact, strategy=strategy, reason=reason,
                            rows=tuple(shape.rows) if (shape is not None and enabled) else (),
                            chunk_rows=facts["chunk_rows"] if enabled else None, checked=tuple(facts["checked"]),
                            classes=tuple(classes), call_seconds=dict(seconds), plain_step_rows=plain_rows,
                            plain_step_cost=plain_cost, probe_seconds=facts["probe_seconds"], machine=machine)


def _ranges(counts) -> str:
    """(1, 2, 3, 5, 9) -> '1-3, 5, 9'."""
    counts, out = sorted(counts), []
    start = prev = None
    for c in counts + [None]:
        if start is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = c
    return ", ".join(out) or "none"


# -- the cache ----------------------------------------------------------------------------------------------------

def cache_key(manifest, *, backend: str, threads: int, decoder) -> tuple[str, dict[str, Any]]:
    """(hex key, the facts it hashes): bundle target files' sha256, CPU, ISA, library, threads, backend."""
    files = {path: manifest.files.get(path, {}).get("sha256") for path in manifest.target.used_files()}
    facts = dict(machine_facts())
    machine = {"cpu": facts["cpu"], "isa": facts["isa"], "arch": facts["arch"], "onnxruntime": facts["onnxruntime"],
               "threads": threads, "backend": backend, "decoder": type(decoder).__name__,
               "providers": list(getattr(decoder, "providers", []) or [])}
    keyed = {"probe": PROBE_VERSION, "files": files, **machine}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:32], machine


def _cache_path(key: str) -> Path:
    return cache_root() / "invariance" / f"{key}.json"


def load_cached(key: str) -> tuple[CallShape | None, dict[str, Any]] | None:
    try:
        data = json.loads(_cache_path(key).read_text())
        shape = None if data["shape"] is None else CallShape(tuple(data["shape"]["rows"]),
                                                             tuple(data["shape"]["seconds"]), data["shape"]["visible"])
        facts = data["facts"]
        facts["classes"] = tuple(tuple(c) for c in facts["classes"])
        return shape, facts
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return None


def save_cached(key: str, shape: CallShape | None, facts: dict[str, Any]) -> None:
    data = {"shape": None if shape is None else {"rows": list(shape.rows), "seconds": list(shape.seconds),
                                                 "visible": shape.visible},
            "facts": {**facts, "checked": list(facts["checked"]), "classes": [list(c) for c in facts["classes"]]}}
    store_json(key, data)


def store_json(key: str, data: dict[str, Any]) -> None:
    """Write a measurement to the cache under `key` (atomically); a read-only cache is no error."""
    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs measuring again next time


# -- the shaped decoder -------------------------------------------------------------------------------------------

class ShapedDecoder:
    """A target decoder whose calls are shaped by a CallShape: the Decoder protocol, same results, but every call
    that reaches the backend has an agreeing row count. Pad rows carry `filler` tokens (the last real token)
    unless the caller put guesses there itself (`spare_rows`)."""

    def __init__(self, inner, shape: CallShape, report: InvarianceReport):
        self.inner = inner
        self.shape = shape
        self.report = report
        self.max_context = inner.max_context - shape.max_pad  # pad rows past the last position need cache rows
        self.vocab = inner.vocab
        self.logits_rows = getattr(inner, "logits_rows", None)
        self.features_size = getattr(inner, "features_size", None)
        self._done = 0  # rows of the latest step already committed in the inner decoder (earlier calls of it)
        self._count = 0  # rows the latest step was asked for
        self.last_features: np.ndarray | None = None
        self.rows_computed = 0  # rows run by the backend (pad rows included), for measurement
        self.rows_asked = 0

    def __getattr__(self, name: str):  # executors' extras (cache, executor, session, ...) read through
        return getattr(self.inner, name)

    @property
    def length(self) -> int:
        return self.inner.length

    def spare_rows(self, count: int) -> int:
        """Pad rows a call of `count` tokens computes after its last real row: room for free guesses."""
        real, rows = self.shape.plan(count)[-1]
        return max(0, min(rows - real, self.max_context - self.inner.length - count))

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)  # [S]
        count = len(token_ids)
        plan = self.shape.plan(count) if count else ((0, 0),)
        self._count, self._done = count, 0
        if self.inner.length + count > self.max_context:
            raise GenerationError(f"context limit reached: {self.inner.length} cached + {count} new tokens exceed "
                                  f"{self.max_context} (the bundle's max context {self.inner.max_context}, less "
                                  f"{self.shape.max_pad} rows kept free for calls padded to an agreeing row count); "
                                  f"rebuild with a larger --max-context.")
        if len(plan) == 1 and plan[0][0] == plan[0][1]:  # agreeing already
            logits = self.inner.step(token_ids)
            self.last_features = getattr(self.inner, "last_features", None)
            self._account(count, count)
            return logits
        visible_rows = min(count, self.logits_rows or count)
        out = np.empty((visible_rows, self.vocab), np.float32)  # [R, V] assembled from the calls; the caller's
        first_visible = count - visible_rows
        filled = 0
        position = 0
        features_out = None  # [S, H] assembled from the calls, when the target returns features
        for index, (real, rows) in enumerate(plan):
            call = token_ids[position : position + real]
            if rows > real:
                call = np.concatenate([call, np.full(rows - real, call[-1], np.int64)])
            logits = self.inner.step(call)  # [min(rows, R), V]
            self._account(real, rows)
            for offset, row in zip(_visible_positions(rows, self.logits_rows), logits):
                if offset < real and position + offset >= first_visible:
                    out[position + offset - first_visible] = row
                    filled += 1
            features = getattr(self.inner, "last_features", None)
            if features is not None:
                if features_out is None:
                    features_out = np.empty((count, features.shape[-1]), np.float32)
                features_out[position : position + real] = features[:real]
            if index < len(plan) - 1:
                self.inner.commit(real)
                self._done += real
            position += real
        assert filled == visible_rows, f"plan {plan} returned {filled} of the last {visible_rows} rows' logits"
        if features_out is not None:
            self.last_features = features_out
        return out

    def _account(self, real: int, rows: int) -> None:
        self.rows_asked += real
        self.rows_computed += rows

    def commit(self, count: int) -> None:
        assert count <= self._count, "commit only rows of the last step"
        if count >= self._done:
            self.inner.commit(count - self._done)
        else:
            self.inner.rollback(self.inner.length - self._done + count)
        self._count = self._done = 0

    def rollback(self, length: int) -> None:
        self.inner.rollback(length)

    def reset(self) -> None:
        self.inner.reset()

    def reuse(self, token_ids: list[int], limit: int) -> int:
        return self.inner.reuse(token_ids, limit)


def establish_invariance(manifest, target, *, mode: str, backend: str, threads: int):
    """(report, the target decoder to use): the row-count check for `target` on this machine (cached), and the
    target wrapped in a ShapedDecoder when mode is 'measure'; mode 'off' measures too (so the report can say
    whether output is exact) but leaves calls as they are."""
    key, machine = cache_key(manifest, backend=backend, threads=threads, decoder=target)
    cached = load_cached(key)
    if cached is None:
        max_rows = max(manifest.target.widths, default=0) + 1
        shape, facts = measure_row_invariance(target, max_rows=max_rows)
        save_cached(key, shape, facts)
    else:
        shape, facts = cached
    enabled = mode == "measure"
    report = report_for(shape, facts, enabled=enabled, machine={**machine, "cache_key": key})
    if cached is not None:
        report = replace(report, cached=True)
    if enabled and shape is not None:
        return report, ShapedDecoder(target, shape, report)
    return report, target
