"""Several sequences per model call: the batched graph computes each sequence's rows as a call of its rows alone
does, concurrent requests get their solo outputs token for token (greedy and seeded sampling, every drafter),
kept prefixes survive interleaved conversations, and bad combinations are refused with what to do."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from spectrt.errors import ConfigError
from spectrt.runtime.errors import GenerationError

PROMPTS = ["def add(a, b):", "The quick brown fox", "for i in range(10):", "Paris is the capital of",
           "import numpy as np", "Speculative decoding drafts tokens"]


def _build(target: Path, draft: Path, out: Path, **options) -> Path:
    from spectrt.compiler.build import build_bundle
    from spectrt.compiler.config import BuildConfig
    from spectrt.compiler.progress import Progress

    build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(1, 2, 3, 5), max_context=160, out=str(out),
                             **options), progress=Progress(quiet=True))
    return out


@pytest.fixture(scope="module")
def batched_bundle(tiny_batched_bundle) -> Path:
    return tiny_batched_bundle


@pytest.fixture(scope="module")
def classic_int8_bundle(tiny_llama_pair, tmp_path_factory) -> Path:
    """The batched bundle's weights built with --max-batch 1 (one-sequence graphs)."""
    target, draft = tiny_llama_pair
    return _build(target, draft, tmp_path_factory.mktemp("classic") / "b1-int8", quantize="int8")


@pytest.fixture(scope="module")
def classic_fp32_bundle(tiny_llama_pair, tmp_path_factory) -> Path:
    target, draft = tiny_llama_pair
    return _build(target, draft, tmp_path_factory.mktemp("classic") / "b1")


# -- the graph ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_batched_graph_gives_each_sequence_the_bits_of_its_call_alone(tiny_llama_pair, tmp_path, quantize):
    """One call of a 3-slot graph holding sequences of different cache lengths and row counts (a 1-row step, a
    verification, a prefill chunk, an empty cache, unused slots) returns, for every sequence, the logits and new cache rows the
    one-sequence graph returns for its rows alone, bit for bit."""
    import onnxruntime as ort

    from spectrt.compiler.export import export_onnx
    from spectrt.compiler.loading import load_model
    from spectrt.compiler.onnx_graph import GraphSpec
    from spectrt.runtime.backends.onnxruntime_backend import BATCH_DEPENDENT_OPTIMIZERS

    loaded = load_model(tiny_llama_pair[0])
    arch = loaded.arch
    level = 4 if quantize != "none" else 0
    sessions = {}
    for slots in (1, 3):
        spec = GraphSpec("fp32", 160, arch.vocab_size, quantize=quantize, accuracy_level=level, logits_rows=6,
                         batch_slots=slots)
        path = export_onnx(loaded, spec, tmp_path / f"g{slots}.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        sessions[slots] = ort.InferenceSession(str(path), options, disabled_optimizers=BATCH_DEPENDENT_OPTIMIZERS)
    layers, kv, dim = arch.num_layers, arch.num_kv_heads, arch.head_dim
    rng = np.random.default_rng(0)

    def sequence(past: int, rows: int):
        caches = [tuple(rng.standard_normal((1, past, kv, dim)).astype(np.float32) for _ in range(2))
                  for _ in range(layers)]
        return rng.integers(0, arch.vocab_size, rows).astype(np.int64), caches

    def alone(ids, caches):
        feed = {"input_ids": ids[None]}
        for layer, (key, value) in enumerate(caches):
            feed[f"past_key_{layer}"], feed[f"past_value_{layer}"] = key, value
        return sessions[1].run(None, feed)

    empty = np.zeros((1, 0, kv, dim), np.float32)
    names = [o.name for o in sessions[3].get_outputs()]
    for combo in ([(3, 1), (10, 4), None], [(0, 7), None, None], [(20, 6), (1, 1), (0, 2)], [(4, 3)] * 3,
                  [(6, 64), (9, 5), (2, 1)]):  # the used slots come first (the contract)
        members = [sequence(*c) if c else None for c in combo]
        feed = {"input_ids": np.concatenate([m[0] for m in members if m])[None],
                "seq_lens": np.array([len(m[0]) if m else 0 for m in members], np.int64)}
        for slot, member in enumerate(members):
            for layer in range(layers):
                key, value = member[1][layer] if member else (empty, empty)
                feed[f"past_key_{layer}_slot{slot}"], feed[f"past_value_{layer}_slot{slot}"] = key, value
        batched = sessions[3].run(None, feed)
        row = 0
        for slot, member in enumerate(members):
            if member is None:
                continue
            solo = alone(*member)
            visible = min(len(member[0]), 6)
            assert np.array_equal(solo[0][0], batched[0][0][row : row + visible]), (combo, slot)
            row += visible
            for layer in range(layers):
                for offset, kind in enumerate(("key", "value")):
                    assert np.array_equal(solo[1 + 2 * layer + offset],
                                          batched[names.index(f"new_{kind}_{layer}_slot{slot}")]), (combo, slot, kind)
        assert row == batched[0].shape[1]


# -- the generator -----------------------------------------------------------------------------------------------------

def _solo_outputs(bundle: Path, runs: list[dict]) -> list[list[int]]:
    from spectrt.runtime.generator import Generator

    with Generator(bundle, threads=1) as solo:
        return [solo.generate(**run).token_ids for run in runs]


def _concurrent_outputs(generator, runs: list[dict]) -> list[list[int]]:
    """Every run on its own thread, all started together; outputs in run order."""
    outputs: list = [None] * len(runs)
    start = threading.Barrier(len(runs))
    errors = []

    def work(index: int) -> None:
        try:
            start.wait()
            outputs[index] = generator.generate(**runs[index]).token_ids
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return outputs


RUNS = ([{"prompt": p, "max_new_tokens": 40, "draft": draft} for draft in ("none", "ngram", "model") for p in PROMPTS]
        + [{"prompt": p, "max_new_tokens": 30, "draft": "model", "width": 3, "temperature": 0.9, "seed": 11 + i}
           for i, p in enumerate(PROMPTS)]
        + [{"prompt": p, "max_new_tokens": 30, "draft": "none", "temperature": 0.7, "top_p": 0.9, "seed": 5}
           for p in PROMPTS[:3]])


def test_concurrent_requests_get_their_solo_outputs(batched_bundle):
    """27 requests at once on 3 batch slots (greedy with no draft, n-gram and draft model; seeded sampling with the
    draft model at width 3 and plain sampling): each one's tokens are those it gets alone, and the calls really held
    several sequences."""
    from spectrt.runtime.generator import Generator

    solo = _solo_outputs(batched_bundle, RUNS)
    with Generator(batched_bundle, threads=1, max_batch=3) as generator:
        assert generator.exact, generator.invariance.summary()
        together = _concurrent_outputs(generator, RUNS)
        stats = generator.batch_stats()
    assert together == solo
    assert stats["max_sequences_per_call"] >= 2, stats
    assert stats["sequences"]["target"] > stats["calls"]["target"], stats
    assert stats["running_requests"] == 0


def test_two_requests_share_nearly_every_call(batched_bundle):
    """Two plain requests of 40 tokens at once share their decode steps' calls: a request whose batch just ran counts
    as computing until it queues its next step (not only once its thread wakes up), so the next batch waits for
    it. (That bug let the other request run alone every other step: 1.34 sequences per call instead of ~1.9.)"""
    from spectrt.runtime.generator import Generator

    with Generator(batched_bundle, threads=1, max_batch=3) as generator:
        generator.eos_ids = set()  # both run their full 40 tokens
        runs = [{"prompt": p, "max_new_tokens": 40, "draft": "none"} for p in PROMPTS[:2]]
        assert [len(tokens) for tokens in _concurrent_outputs(generator, runs)] == [40, 40]
        stats = generator.batch_stats()
    assert stats["mean_sequences_per_call"]["target"] >= 1.6, stats  # 1.78-1.95 measured; the bug gave 1.34


def test_batched_graph_alone_is_the_classic_graph(batched_bundle, classic_int8_bundle):
    """The same weights built with --max-batch 1 and 3 decode the same tokens one request at a time."""
    runs = [{"prompt": p, "max_new_tokens": 40, "draft": "model"} for p in PROMPTS[:3]]
    assert _solo_outputs(classic_int8_bundle, runs) == _solo_outputs(batched_bundle, runs)


def test_batch_totals_only_agreeing_ones_run(batched_bundle):
    """The batcher runs a target batch only at a measured agreeing total: the last call carries filler rows of its own
    where its cache has room and its rows' logits stay visible, else a filler sequence takes a free slot, else the last
    call waits for the next batch; a prefill chunk runs alone."""
    from types import SimpleNamespace

    from spectrt.runtime.batching import Batcher, _Call

    graph = SimpleNamespace(slots=3, max_context=100, logits_rows=6,
                            caches=[SimpleNamespace(length=0) for _ in range(3)])
    batcher = Batcher({"target": graph}, small_rows=6, target_totals=frozenset({2, 3, 4, 8, 12}))
    queue = batcher._queues["target"]

    def take(*rows: int):
        queue.extend(_Call(i, np.zeros(n, np.int64)) for i, n in enumerate(rows))
        model, batch, filler = batcher._take()
        return [(c.cache, len(c.tokens), c.pad) for c in batch], filler

    assert take(2, 3) == ([(0, 2, 0), (1, 3, 3)], 0)  # 5 rows -> 8: the last call pads itself
    assert take(1) == ([(0, 1, 1)], 0)  # alone: padded as one sequence's calls are
    assert take(3, 6) == ([(0, 3, 0), (1, 6, 0)], 3)  # 9 -> 12: 6 + 3 rows would hide its logits: a filler sequence
    assert take(5, 5, 5) == ([(0, 5, 0), (1, 5, 0)], 2)  # 15 reaches no total: the third waits; 10 -> 12
    assert batcher.stats.deferred == 1
    queue.append(_Call(0, np.zeros(40, np.int64)))
    assert batcher._take()[1][0].cache == 2  # the deferred call, queued first
    model, batch, filler = batcher._take()
    assert [len(c.tokens) for c in batch] == [40] and filler == 0  # a prefill chunk runs alone


def test_call_costs_are_measured_per_row_count_and_fitted_between():
    """What the scheduler prices batches with: a running average per row count, a straight line elsewhere, nothing
    before two counts were measured."""
    from types import SimpleNamespace

    from spectrt.runtime.batching import Batcher

    batcher = Batcher({"target": SimpleNamespace(slots=2)}, small_rows=4, target_totals=None)
    assert batcher.call_cost("target", 3) is None
    batcher._record("target", 2, 0.10)
    assert batcher.call_cost("target", 2) == 0.10 and batcher.call_cost("target", 3) is None
    batcher._record("target", 4, 0.14)
    batcher._record("target", 4, 0.14)
    assert batcher.call_cost("target", 3) == pytest.approx(0.12)
    assert batcher.call_cost("target", 8) == pytest.approx(0.22)
    batcher._record("target", 2, 0.20)  # a slower call moves the average by 0.3 of the difference
    assert batcher.call_cost("target", 2) == pytest.approx(0.13)


def test_a_brief_pause_is_waited_for_and_a_long_one_is_not(monkeypatch):
    """A request whose consumer holds a token for less than PAUSE_GRACE still counts as computing: another request's
    step waits and both share the call (a server's worker hands each token over in microseconds). One whose consumer
    keeps holding it stops counting: the other request runs alone instead of waiting for it."""
    import time
    from types import SimpleNamespace

    import spectrt.runtime.batching as batching

    monkeypatch.setattr(batching, "PAUSE_GRACE", 0.3)  # generous: thread switches on a loaded CI machine
    batches = []
    graph = SimpleNamespace(slots=2, max_context=100, logits_rows=None,
                            caches=[SimpleNamespace(length=0) for _ in range(2)],
                            run=lambda calls, filler_rows=0: (batches.append(len(calls)),
                                                              [np.zeros((1, 4)) for _ in calls])[1])
    batcher = batching.Batcher({"target": graph}, small_rows=4, target_totals=None)
    for brief, expected in ((True, [2]), (False, [1])):
        batches.clear()
        paused, done = threading.Event(), threading.Event()

        def first() -> None:
            batcher.enter()
            batcher.pause()
            paused.set()
            while not batcher._queues["target"]:  # the other request's step is queued meanwhile
                time.sleep(0.0005)
            if brief:  # the token handed over: back to computing, then its own step
                batcher.resume()
                batcher.call("target", 0, np.zeros(1, np.int64))
            else:  # keeps holding its token until the other request is through
                done.wait(5)
                batcher.resume()
            batcher.leave()

        def second() -> None:
            batcher.enter()
            paused.wait()
            batcher.call("target", 1, np.zeros(1, np.int64))
            batcher.leave()
            done.set()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert batches == expected, (brief, batches)
        if not brief:
            assert time.perf_counter() - started >= 0.3  # it did wait the grace out first


def test_an_open_stream_does_not_stall_the_others(batched_bundle):
    """A stream whose consumer holds a token does not hold up the batch: another request finishes meanwhile."""
    from spectrt.runtime.generator import Generator

    with Generator(batched_bundle, threads=1, max_batch=3) as generator:
        held = generator.stream("def add(a, b):", max_new_tokens=20, draft="none")
        next(held)  # the consumer now holds its first token
        finished = []
        other = threading.Thread(target=lambda: finished.append(
            generator.generate("The quick brown fox", max_new_tokens=20, draft="ngram").token_ids))
        other.start()
        other.join(60)
        assert finished and len(finished[0]) > 0
        rest = [chunk.token_id for chunk in held if chunk.token_id is not None]
        assert len(rest) >= 1


def test_interleaved_conversations_each_reuse_their_prefix(classic_fp32_bundle):
    """With two kept prefixes, two conversations that alternate each reuse their own earlier turn; with one, the
    other conversation's turn evicts it. Outputs are the same either way."""
    from spectrt.runtime.generator import Generator

    first = {"a": "def add(a, b):\n    return a + b\n\n# now subtract", "b": "The quick brown fox jumps over the"}
    outputs, reused = {}, {}
    for slots in (0, 2):
        with Generator(classic_fp32_bundle, threads=1, prefix_slots=slots) as generator:
            turns = {}
            for name in ("a", "b"):
                turns[name] = generator.generate(first[name], max_new_tokens=12, draft="none")
            for name in ("a", "b"):
                follow_up = turns[name].prompt_token_ids + turns[name].token_ids + [17, 23]
                result = generator.generate(prompt_ids=follow_up, max_new_tokens=12, draft="none")
                outputs[slots, name] = result.token_ids
                reused[slots, name] = (result.metrics.reused_prompt_tokens, len(turns[name].prompt_token_ids))
    for name in ("a", "b"):
        assert outputs[0, name] == outputs[2, name]
        kept, prompt = reused[2, name]
        assert kept >= prompt, reused
    assert reused[0, "a"][0] < reused[0, "a"][1]  # one cache: conversation b's turn evicted a's


# -- refusals ------------------------------------------------------------------------------------------------------------

def test_max_batch_beyond_the_graph_is_refused(classic_fp32_bundle):
    from spectrt.runtime.generator import Generator

    with pytest.raises(GenerationError, match="rebuild it with --max-batch 2"):
        Generator(classic_fp32_bundle, threads=1, max_batch=2)
    with pytest.raises(GenerationError, match="max_batch must be an integer >= 1"):
        Generator(classic_fp32_bundle, threads=1, max_batch=0)


def test_batched_builds_refuse_what_they_cannot_do(tiny_llama_pair):
    from spectrt.compiler.config import BuildConfig

    target, draft = tiny_llama_pair
    with pytest.raises(ConfigError, match="ONNX Runtime's CPU path only"):
        BuildConfig(target=str(target), draft=str(draft), backend="tensorrt", max_batch=4)
    with pytest.raises(ConfigError, match="--head cannot be combined"):
        BuildConfig(target=str(target), draft=str(draft), head=True, max_batch=4)
    with pytest.raises(ConfigError, match="max_batch must be 1..64"):
        BuildConfig(target=str(target), draft=str(draft), max_batch=0)


def test_the_draft_head_is_refused_on_cache_slots(batched_bundle):
    from spectrt.runtime.generator import Generator

    with Generator(batched_bundle, threads=1, max_batch=2) as generator:
        with pytest.raises(GenerationError, match="draft head does not run on cache slots"):
            generator.generate("def add(a, b):", draft="head")


# -- the load sweep ------------------------------------------------------------------------------------------------------

def test_load_sweep_runs_every_configuration_and_checks_each_request(batched_bundle, classic_int8_bundle, tmp_path):
    """`spectrt bench-serve --load 1,3` on the 3-slot bundle, one request at a time on the one-sequence build of the
    same weights: four configurations at both concurrencies, every request identical to its prompt alone (greedy and
    seeded sampling), interleaved conversations reusing their own prefixes, the crossover and the plot written."""
    import json

    from click.testing import CliRunner

    from spectrt.cli import main

    chats = [{"id": f"c{i}", "messages": [{"role": "user", "content": text}]}
             for i, text in enumerate(["hi there", "def add(a, b):", "the quick brown fox"])]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    out = tmp_path / "load"
    options = {"--load": "1,3", "--requests": "2", "--max-new-tokens": "12", "--turns": "2", "--sampled": "3",
               "--workload": str(tmp_path / "chat.jsonl"), "--threads": "1", "--out": str(out),
               "--baseline": str(classic_int8_bundle)}
    result = CliRunner().invoke(main, ["bench-serve", str(batched_bundle), *(x for pair in options.items() for x in pair)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "load.json").read_text())
    assert set(data["load"]) == {"plain", "speculative", "batching", "batching+speculative"}
    for label, series in data["load"].items():
        assert set(series) == {"1", "3"}
        for clients, summary in series.items():
            assert summary["requests"] == 2 * int(clients)
            assert summary["identical_to_alone"] == summary["requests"], (label, clients)
            assert summary["tpot_p95"] > 0 and summary["throughput_tokens_per_second"] > 0
    assert data["sampled"]["identical_to_alone"] == 3
    together = data["interleaved"]["batched"]["together"]
    assert all(conversation[1]["reused_prompt_tokens"] > 0 for conversation in together)
    assert "spectrt_batch_max_sequences_per_call" in data["server_metrics"]["batched"]
    assert set(data["crossover"]) >= {"speculative_stops_paying_at", "batching+speculative_stops_paying_at"}
    assert (out / "load.png").stat().st_size > 0 and "| batching+speculative | 3 |" in (out / "load.md").read_text()


def test_the_bench_runs_on_a_batched_bundle_one_request_at_a_time(batched_bundle):
    """`spectrt bench`'s plain-unshaped configuration (what call shaping costs) works on cache slots too: unshaped
    calls reach the graph as asked and report exact only where every row count agrees."""
    from spectrt.runtime.generator import Generator

    with Generator(batched_bundle, threads=1, prefix_slots=2) as generator:
        shaped = generator.generate("def add(a, b):", max_new_tokens=20, draft="none")
        with generator.unshaped():
            unshaped = generator.generate("def add(a, b):", max_new_tokens=20, draft="none")
            assert all(not hasattr(target, "inner") for target in generator.batch.targets)
        assert all(hasattr(target, "inner") for target in generator.batch.targets)
        assert shaped.metrics.exact
        assert unshaped.metrics.exact == (len(generator.invariance.classes) == 1)
    with Generator(batched_bundle, threads=1, max_batch=2) as generator:
        with pytest.raises(GenerationError, match="shaped together"):
            with generator.unshaped():
                pass
