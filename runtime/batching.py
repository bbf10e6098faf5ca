"""Several sequences per model call: cache slots, one batched graph, and the batcher that merges the calls of
concurrently running requests (docs/batching.md).

A batched graph (built with `--max-batch B`, manifest `batch_slots`) takes the rows of up to B sequences in one
call: `input_ids` [1, N] holds them one sequence after another, `seq_lens` [B] says how many rows each has (the
used slots first, then 0s) and every graph slot has its own past/new cache tensors. The weight products run once
over all N rows (the weights are read once for the batch); each sequence's attention is the very subgraph, with
the very shapes, a call of its rows alone runs, so it gets the same bits.

`BatchedGraph` holds any number of per-sequence KV caches (the spare ones keep earlier conversations' prefixes;
`SlotPool` hands them out, longest shared prefix first, else least recently used); a call binds whichever caches
it serves to the graph slots. A `SlotDecoder` is the Decoder protocol over one cache: on its own (`batcher=None`)
a step is one call of the graph; under a `Batcher` a step waits for the other running requests' steps and runs
with them.

Exactness across sequences: the rows of the weight products see the batch's total row count N, and kernels may
compute a row differently for other totals (onnxruntime's CPU int4 MatMulNBits on AVX2 gives a 1-row call other
bits). So the totals are measured like the row counts of one sequence (`measure_batch_totals`): a sequence's rows
in a batch of N rows, first and last, against the same rows as a shaped one-sequence call gives them. The batcher
only runs totals that agreed, padding a batch to one (the last call's own filler rows, or a filler sequence in a
free graph slot), else leaving a call for the next batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectrt.runtime.errors import GenerationError

from .backends.base import CacheBookkeeping
from .backends.onnxruntime_backend import bind_kv_rows
from .kv_cache import KVCache
from .manifest import slot_suffix


class BatchedGraph:
    """An ONNX Runtime session of a decoder graph with `slots` sequence slots (1: a classic one-sequence graph), and
    the caches it can serve."""

    def __init__(self, session, entry, cache_count: int):
        self.session = session
        self.slots = entry.batch_slots
        self.num_layers = entry.num_layers
        self.max_context = entry.max_context
        self.vocab = entry.logits_vocab
        self.logits_rows = entry.logits_rows
        self.providers = ["CPUExecutionProvider"]
        self.caches = [KVCache(entry.num_layers, entry.max_context, entry.num_kv_heads, entry.head_dim, entry.precision)
                       for _ in range(cache_count)]
        shape = (1, 0, entry.num_kv_heads, entry.head_dim)
        self._empty = np.zeros(shape, self.caches[0].dtype)  # [1, 0, kv, D]: an unused slot's past and new rows
        self._dtype = self.caches[0].dtype
        self._filler_cache = KVCache(entry.num_layers, max(entry.logits_rows or 1, 1) * self.slots * 4 + 64,
                                     entry.num_kv_heads, entry.head_dim, entry.precision)  # a padding sequence's rows
        self._binding = session.io_binding()  # kept between calls: unused slots stay bound to the empty arrays
        self._unused = [False] * self.slots  # slot -> bound to the empty arrays now

    def visible(self, count: int) -> int:
        """Logits rows a call of `count` rows of one sequence returns."""
        return min(count, self.logits_rows or count)

    def run(self, calls: list[tuple[int, np.ndarray]], filler_rows: int = 0) -> list[np.ndarray]:
        """One graph call for `calls` = (cache index, token ids [S_b]) in graph slot order (at most `slots`, each
        cache at most once), plus a filler sequence of `filler_rows` rows (no cache of its own) in the next free
        slot. Returns each call's logits [min(S_b, logits_rows), V], new arrays. Rows are written after each cache's
        committed length, not committed."""
        if self.session is None:
            raise GenerationError("this decoder was closed (its ONNX Runtime session released); load the bundle "
                                  "again to generate.")
        assert 1 <= len(calls) + (filler_rows > 0) <= self.slots
        members = [(self.caches[index], np.asarray(tokens, np.int64).reshape(-1)) for index, tokens in calls]
        if filler_rows:
            self._filler_cache.rollback(0)
            members.append((self._filler_cache, np.zeros(filler_rows, np.int64)))
        for cache, tokens in members:
            if len(tokens) == 0:
                raise GenerationError("a decoder step needs at least one token.")
            if cache.length + len(tokens) > cache.max_context:
                raise GenerationError(f"context limit reached: {cache.length} cached + {len(tokens)} new tokens exceed "
                                      f"max context {cache.max_context} of this bundle (rebuild with a larger "
                                      f"--max-context).")
        token_ids = np.concatenate([tokens for _, tokens in members]).reshape(1, -1)  # [1, N]
        visible = [self.visible(len(tokens)) for _, tokens in members]
        logits = np.empty((1, sum(visible), self.vocab), np.float32)  # [1, sum R_b, V]
        binding = self._binding
        binding.bind_cpu_input("input_ids", token_ids)
        if self.slots > 1:
            seq_lens = np.zeros(self.slots, np.int64)  # [B]
            seq_lens[: len(members)] = [len(tokens) for _, tokens in members]
            binding.bind_cpu_input("seq_lens", seq_lens)
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        for slot in range(self.slots):
            if slot >= len(members) and self._unused[slot]:
                continue  # still bound to the empty arrays (binding ~450 tensors a call cost 2.7 ms in Python)
            cache, tokens = members[slot] if slot < len(members) else (None, None)
            rows = ((lambda layer: (self._empty,) * 4) if cache is None else
                    (lambda layer, cache=cache, count=len(tokens): (*cache.past(layer), *cache.new_rows(layer, count))))
            bind_kv_rows(binding, self.num_layers, self._dtype, rows, slot_suffix(self.slots, slot))
            self._unused[slot] = cache is None
        self.session.run_with_iobinding(binding)
        bounds = np.cumsum([0] + visible)
        return [logits[0, bounds[i] : bounds[i + 1]] for i in range(len(calls))]

    def close(self) -> None:
        self.session = self._binding = None
        self.caches = []


class SlotDecoder(CacheBookkeeping):
    """The Decoder protocol over cache `index` of a BatchedGraph; steps run alone or through a Batcher."""

    def __init__(self, graph: BatchedGraph, index: int, batcher: "Batcher | None" = None, model: str = "target"):
        super().__init__(graph.caches[index])
        self.graph, self.index, self.batcher, self.model = graph, index, batcher, model
        self.max_context = graph.max_context
        self.vocab = graph.vocab
        self.logits_rows = graph.logits_rows
        self.providers = graph.providers
        self.features_size = None
        self.last_features = None

    def _forward(self, token_ids: np.ndarray) -> np.ndarray:
        token_ids = np.asarray(token_ids, np.int64).reshape(-1)  # [S]
        if self.batcher is None:
            return self.graph.run([(self.index, token_ids)])[0]
        return self.batcher.call(self.model, self.index, token_ids)


# -- the batcher ---------------------------------------------------------------------------------------------------

PAUSE_GRACE = 0.005  # seconds a request's consumer may hold a token before batches stop waiting for that request


@dataclass
class _Call:
    cache: int
    tokens: np.ndarray  # [S]
    pad: int = 0  # filler rows appended to this call (its last token again) so the batch's total agrees
    result: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False  # its batch ran: its thread counts as running again (before it has even woken up)


@dataclass
class BatchStats:
    """What the batcher did: calls, sequences per call, pads."""

    calls: dict[str, int] = field(default_factory=dict)  # model -> graph calls
    sequences: dict[str, int] = field(default_factory=dict)  # model -> sequences served by them
    filler_rows: int = 0  # padding rows (target): a filler sequence's, or a call's own
    deferred: int = 0  # calls left for the next batch because no agreeing total was reachable
    running: int = 0  # requests in the batch loop now
    max_sequences: int = 0  # the most sequences one call held

    def to_json(self) -> dict[str, Any]:
        mean = {m: (self.sequences[m] / self.calls[m]) if self.calls.get(m) else None for m in self.sequences}
        return {"calls": dict(self.calls), "sequences": dict(self.sequences), "mean_sequences_per_call": mean,
                "max_sequences_per_call": self.max_sequences, "filler_rows": self.filler_rows,
                "deferred_calls": self.deferred, "running_requests": self.running}


class Batcher:
    """Merges the steps of concurrently running requests into batched graph calls.

    A request thread `enter`s when it starts decoding and `leave`s when done; `pause`/`resume` mark the time it
    spends outside the loop (its consumer holds a yielded token): a pause longer than PAUSE_GRACE (a slow consumer,
    a stream left unread) stops counting as computing. A step (`call`) waits until no entered thread is still
    computing, i.e. every running request has its next step queued (or is paused); then one waiting thread runs a
    batch of the model with the most queued steps (the target on a tie), the others wait for their results. Calls
    of more than `small_rows` rows (prefill chunks) run alone, so a prefill stalls running sequences by at most one
    chunk between their rounds. Target batches run only at totals in `target_totals` (measured to give each row its
    bits, `measure_batch_totals`), padded to reach one: the last call carries filler rows of its own where its cache
    has room and its rows' logits stay visible (as one sequence's shaped calls are padded), else a filler sequence
    takes a free graph slot, else the last call waits for the next batch."""

    def __init__(self, graphs: dict[str, BatchedGraph], *, small_rows: int, target_totals: frozenset[int] | None):
        self.graphs = graphs
        self.small_rows = small_rows
        self.target_totals = target_totals  # None: every total (only when exactness is not promised)
        self._cond = threading.Condition()
        self._queues: dict[str, list[_Call]] = {model: [] for model in graphs}
        self._running = 0
        self._paused: dict[int, float] = {}  # thread ident -> when its consumer took a token
        self._busy = False
        self.stats = BatchStats(calls={m: 0 for m in graphs}, sequences={m: 0 for m in graphs})
        self._seconds: dict[str, dict[int, float]] = {m: {} for m in graphs}  # model -> rows of a call -> EMA s

    def call_cost(self, model: str, rows: int) -> float | None:
        """Seconds one call of `model` with `rows` rows in all takes here: measured (a running average per row count),
        else a straight line through the measured counts (calls cost about a + b rows on a CPU), else None."""
        measured = dict(self._seconds.get(model, {}))
        if rows in measured:
            return measured[rows]
        if len(measured) < 2:
            return None
        counts = np.array(sorted(measured), np.float64)
        seconds = np.array([measured[c] for c in sorted(measured)], np.float64)
        slope, intercept = np.polyfit(counts, seconds, 1)
        return max(float(intercept + slope * rows), float(seconds.min()))

    def _record(self, model: str, rows: int, seconds: float) -> None:
        table = self._seconds[model]
        table[rows] = seconds if rows not in table else 0.7 * table[rows] + 0.3 * seconds

    def enter(self) -> None:
        with self._cond:
            self._running += 1
            self.stats.running += 1

    def leave(self) -> None:
        with self._cond:
            self._paused.pop(threading.get_ident(), None)
            self._running -= 1
            self.stats.running -= 1
            self._cond.notify_all()

    def pause(self) -> None:
        """This thread's consumer holds a token: after PAUSE_GRACE seconds the batch stops waiting for it."""
        with self._cond:
            self._paused[threading.get_ident()] = time.perf_counter()

    def resume(self) -> None:
        with self._cond:
            self._paused.pop(threading.get_ident(), None)

    def _computing(self) -> int:
        """Entered threads still computing their next step (a pause shorter than the grace counts as computing: a
        consumer that hands a token over in microseconds must not make every other request run alone)."""
        now = time.perf_counter()
        return self._running - sum(1 for since in self._paused.values() if now - since >= PAUSE_GRACE)

    def call(self, model: str, cache: int, tokens: np.ndarray) -> np.ndarray:
        """Queue one step and wait for its logits (this thread may run the batch that holds it, or others)."""
        call = _Call(cache, tokens)
        with self._cond:
            self._queues[model].append(call)
            self._running -= 1
            try:
                while not call.done:
                    if not self._busy and self._computing() <= 0:
                        picked = self._take()
                        if picked is not None:
                            self._run(*picked)
                            continue
                    self._cond.wait(PAUSE_GRACE if self._paused else None)
            finally:
                if not call.done:  # interrupted while queued: take it back
                    if call in self._queues[model]:
                        self._queues[model].remove(call)
                    self._running += 1
        if call.error is not None:
            raise call.error
        return call.result

    def _take(self) -> tuple[str, list[_Call], int] | None:
        """(model, calls, filler rows) of the next batch, removed from its queue; None if nothing is queued."""
        queued = [(len(q), model == "target", model) for model, q in self._queues.items() if q]
        if not queued:
            return None
        model = max(queued)[2]
        queue, graph = self._queues[model], self.graphs[model]
        first = queue[0]
        if len(first.tokens) > self.small_rows:  # a prefill chunk runs alone (cut to an agreeing size already)
            return model, [queue.pop(0)], 0
        batch: list[_Call] = []
        for call in queue:
            if len(batch) == graph.slots:
                break
            if len(call.tokens) <= self.small_rows and all(c.cache != call.cache for c in batch):
                batch.append(call)
        filler = 0
        if model == "target" and self.target_totals is not None:
            while True:
                total = sum(len(c.tokens) for c in batch)
                if total in self.target_totals:
                    break
                reachable = [t - total for t in sorted(self.target_totals) if t > total]
                last = batch[-1]
                if reachable and self._can_pad(graph, last, reachable[0]):
                    last.pad = reachable[0]  # cheaper than a filler sequence: no attention of its own
                    break
                if len(batch) < graph.slots and reachable:
                    filler = reachable[0]
                    break
                if len(batch) == 1:  # cannot happen for calls shaped by a ShapedDecoder; run it as asked
                    break
                batch.pop()  # no agreeing total with these: the last call waits for the next batch
                self.stats.deferred += 1
        for call in batch:
            queue.remove(call)
        return model, batch, filler

    @staticmethod
    def _can_pad(graph: BatchedGraph, call: _Call, rows: int) -> bool:
        """The call can carry `rows` filler rows of its own: its cache has room, and its real rows' logits are still
        among the rows the graph returns."""
        count = len(call.tokens)
        room = graph.caches[call.cache].length + count + rows <= graph.max_context
        return room and (graph.logits_rows is None or count + rows <= graph.logits_rows)

    def _run(self, model: str, batch: list[_Call], filler: int) -> None:
        """Run one batch with the lock released; results (or the error) go to the calls."""
        self._busy = True
        self._cond.release()
        try:
            calls = [(c.cache, np.concatenate([c.tokens, np.full(c.pad, c.tokens[-1], np.int64)]) if c.pad
                      else c.tokens) for c in batch]
            started = time.perf_counter()
            results = self.graphs[model].run(calls, filler_rows=filler)
            self._record(model, sum(len(tokens) for _, tokens in calls) + filler, time.perf_counter() - started)
            for call, logits in zip(batch, results):
                call.result = logits[: len(logits) - call.pad] if call.pad else logits  # the real rows' logits
        except BaseException as exc:  # every caller of this batch sees the error
            for call in batch:
                call.error = exc
        finally:
            self._cond.acquire()
            self._busy = False
            for call in batch:  # their threads compute again from now on: the next batch waits for their steps
                call.done = True
            self._running += len(batch)
            self.stats.calls[model] += 1
            self.stats.sequences[model] += len(batch)
            self.stats.max_sequences = max(self.stats.max_sequences, len(batch))
            self.stats.filler_rows += filler + sum(c.pad for c in batch)
            self._cond.notify_all()


# -- which totals keep a row's bits ----------------------------------------------------------------------------------

def measure_batch_totals(graph: BatchedGraph, *, agreeing_rows: tuple[int, ...], max_total: int,
                         probe_cache: int = 0, seed: int = 1) -> tuple[frozenset[int], dict[str, Any]]:
    """The batch totals N (2..max_total) at which a sequence's rows come out with the bits they have when it runs
    alone, shaped as one sequence's calls are (`agreeing_rows`: the row counts that agree; a call of another count is
    padded with filler rows of its own to the next one). For each N, a probe sequence of 1 row and one of the
    smallest agreeing count, each after a short prefix, placed first and then last in a batch with a filler sequence
    of the remaining rows. Uses caches `probe_cache` and the next one (reset afterwards). Returns (agreeing totals,
    facts for the report)."""
    started = time.perf_counter()
    if graph.slots < 2:
        return frozenset(), {"checked": [], "agreeing": [], "seconds": 0.0}
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, graph.vocab, 7).astype(np.int64)
    sizes = sorted({1, agreeing_rows[0]})
    other = (probe_cache + 1) % len(graph.caches)

    for index in (probe_cache, other):
        graph.caches[index].rollback(0)
    graph.run([(probe_cache, prefix)])
    graph.caches[probe_cache].commit(len(prefix))

    def with_prefix(run) -> np.ndarray:  # probe rows go after the prefix, never committed
        return np.array(run(), copy=True)

    def alone(tokens: np.ndarray) -> np.ndarray:
        """The rows' logits as a one-sequence call shaped to an agreeing count gives them."""
        rows = min((r for r in agreeing_rows if r >= len(tokens)), default=len(tokens))
        padded = np.concatenate([tokens, np.full(rows - len(tokens), tokens[-1], np.int64)])
        return with_prefix(lambda: graph.run([(probe_cache, padded)])[0])[: len(tokens)]

    def together(tokens: np.ndarray, total: int, first: bool) -> np.ndarray:
        filler = (other, np.zeros(total - len(tokens), np.int64))
        calls = [(probe_cache, tokens), filler] if first else [filler, (probe_cache, tokens)]
        return with_prefix(lambda: graph.run(calls)[0 if first else 1])

    try:
        probes = {size: rng.integers(0, graph.vocab, size).astype(np.int64) for size in sizes}
        expected = {size: alone(tokens) for size, tokens in probes.items()}
        agreeing, checked = [], []
        for total in range(2, max_total + 1):
            checked.append(total)
            if all(np.array_equal(expected[size], together(tokens, total, first))
                   for size, tokens in probes.items() if size < total for first in (True, False)):
                agreeing.append(total)
        return frozenset(agreeing), {"checked": checked, "agreeing": agreeing, "probe_rows": sizes,
                                     "seconds": time.perf_counter() - started}
    finally:
        for index in (probe_cache, other):
            graph.caches[index].rollback(0)


def open_batched_graph(onnx_path: Path, entry, options, providers: list[str], cache_count: int) -> BatchedGraph:
    """A BatchedGraph for a manifest ModelEntry (its I/O checked against the manifest) with `cache_count` caches."""
    from .backends.onnxruntime_backend import open_checked_session

    session = open_checked_session(onnx_path, entry, options, providers)
    graph = BatchedGraph(session, entry, cache_count)
    graph.providers = providers
    return graph


class SlotPool:
    """The caches requests run on: a free one is handed to each new request, preferring the one whose cached tokens
    share the longest prefix with its prompt (prefix reuse across interleaved conversations), else the least
    recently used. At most `capacity` requests hold one at a time; others wait."""

    def __init__(self, caches: int, capacity: int):
        self.capacity = capacity
        self._cond = threading.Condition()
        self._free = list(range(caches))
        self._held = 0
        self._used_at = [0.0] * caches

    def acquire(self, prompt_ids: list[int], tokens_of) -> int:
        """Block until a cache is free and this request may run; returns its index. `tokens_of(index)` -> the
        tokens cached there."""
        with self._cond:
            while self._held >= self.capacity or not self._free:
                if self.capacity == 0:
                    raise GenerationError("this Generator was closed; load the bundle again (spectrt.load) to "
                                          "generate.")
                self._cond.wait()

            def shared(index: int) -> int:
                count = 0
                for cached, wanted in zip(tokens_of(index), prompt_ids):
                    if cached != wanted:
                        break
                    count += 1
                return count

            best = max(self._free, key=lambda i: (shared(i), -self._used_at[i]))  # longest prefix, else LRU
            self._free.remove(best)
            self._held += 1
            return best

    def drain(self) -> None:
        """Wait until no request holds a cache, then hand out none (the Generator is closing)."""
        with self._cond:
            self.capacity = 0
            while self._held:
                self._cond.wait()

    def release(self, index: int) -> None:
        with self._cond:
            self._used_at[index] = time.monotonic()
            self._free.append(index)
            self._held -= 1
            self._cond.notify_all()


# -- the generator's setup ---------------------------------------------------------------------------------------------

@dataclass
class BatchSetup:
    """What a Generator runs requests on when it holds cache slots: per cache its (shaped) target decoder and draft
    decoder, the pool handing caches out, the batcher and the graphs."""

    graphs: dict[str, BatchedGraph]
    targets: list[Any]
    drafts: list[Any]
    pool: SlotPool
    batcher: Batcher
    report: Any  # the InvarianceReport, its reason extended by the batch totals
    totals: dict[str, Any]  # measure_batch_totals' facts (empty: one request at a time)


def setup_batching(manifest, entries: dict[str, Any], *, backend: str, provider: str, threads: int, max_batch: int,
                   cache_slots: int, invariance: str) -> BatchSetup:
    """Open the bundle's graphs with `cache_slots` caches each, measure row-count invariance on a cache alone and,
    for `max_batch` > 1, the batch totals that keep a row's bits; shape every cache's target calls."""
    from dataclasses import replace

    from .backends.onnxruntime_backend import OrtOptions
    from .invariance import CallShape, ShapedDecoder, _ranges, establish_invariance

    if backend == "tensorrt" or provider not in ("auto", "cpu"):
        raise GenerationError("several sequences per call (max_batch) and kept prefixes (prefix_slots) run on ONNX "
                              "Runtime's CPU path only so far; use backend onnxruntime with provider cpu, or load "
                              "without them.")
    target_entry = entries["target"]
    if max_batch > target_entry.batch_slots:
        raise GenerationError(f"max_batch {max_batch} needs a target graph that holds {max_batch} sequences per call; "
                              f"this bundle's holds {target_entry.batch_slots}: rebuild it with --max-batch "
                              f"{max_batch} (or pass max_batch <= {target_entry.batch_slots}).")
    if any(entry.onnx_path is None for entry in entries.values()):
        raise GenerationError("the bundle has no ONNX graph for every model; rebuild with --backend onnx or all.")
    options = OrtOptions(threads=threads, provider="cpu")
    graphs = {}
    for role, entry in entries.items():
        if entry.onnx_data is not None:
            manifest.file(entry.onnx_data)
        graphs[role] = open_batched_graph(manifest.file(entry.onnx_path), entry,
                                          replace(options, spinning=role == "target"), ["CPUExecutionProvider"],
                                          cache_slots)
    alone = SlotDecoder(graphs["target"], 0)
    report, shaped = establish_invariance(manifest, alone, mode=invariance, backend=backend, threads=threads)
    shape = shaped.shape if isinstance(shaped, ShapedDecoder) else None
    visible = target_entry.logits_rows
    small_rows = max(target_entry.widths, default=0) + 1  # the largest call that shares a batch (a verification)
    totals = None
    if max_batch > 1 and shape is not None:
        batch_totals, facts = _batch_totals(graphs["target"], shape.rows, max_batch * small_rows,
                                            report.machine["cache_key"])
        totals = frozenset(batch_totals) | frozenset(shape.rows)
        reason = (f"; with up to {max_batch} sequences per call a sequence's own calls are not padded, a call's "
                  f"total is (a filler sequence) to {_ranges(totals)} rows, where a sequence's rows keep their "
                  f"one-sequence bits (batch totals checked: {_ranges(facts['checked'])})")
        report = replace(report, reason=report.reason + reason)
        # the batcher pads a batch's total, so one sequence's small calls need no padding of their own; large calls
        # (prefills) are still cut into agreeing chunks
        seconds = {int(rows): value for rows, value in report.call_seconds.items()}
        rows = sorted(set(shape.rows) | {r for r in range(1, small_rows + 1) if r in seconds})
        shape = CallShape(tuple(rows), tuple(seconds.get(r, max(shape.seconds)) for r in rows), visible)
    else:
        facts = {}
    batcher = Batcher(graphs, small_rows=small_rows, target_totals=totals)
    targets, drafts = [], []
    for index in range(cache_slots):
        decoder = SlotDecoder(graphs["target"], index, batcher if max_batch > 1 else None)
        targets.append(ShapedDecoder(decoder, shape, report) if shape is not None else decoder)
        drafts.append(SlotDecoder(graphs["draft"], index, batcher if max_batch > 1 else None, model="draft")
                      if "draft" in graphs else None)
    return BatchSetup(graphs, targets, drafts, SlotPool(cache_slots, max_batch), batcher, report, facts)


def _batch_totals(graph: BatchedGraph, rows: tuple[int, ...], max_total: int, key: str
                  ) -> tuple[frozenset[int], dict[str, Any]]:
    """measure_batch_totals, cached beside the row-count check under its key (machine, library, threads, bundle)."""
    import json

    from .invariance import _cache_path, store_json

    key = f"{key}-batch{graph.slots}-{max_total}-v2"
    try:
        facts = json.loads(_cache_path(key).read_text())
        return frozenset(facts["agreeing"]), facts
    except (OSError, ValueError, KeyError, TypeError):
        pass
    totals, facts = measure_batch_totals(graph, agreeing_rows=rows, max_total=max_total)
    store_json(key, facts)
    return totals, facts
