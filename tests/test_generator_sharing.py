"""One Generator shared by threads, interleaved or abandoned streams, and failures mid-request: every
request gets exactly the output it would get alone, or a clear error."""

from __future__ import annotations

import gc
import threading

import pytest

from spectrt.errors import GenerationError

REQUESTS = [
    dict(prompt_ids=[5 + i, 17, 42 + i], max_new_tokens=12 + i % 5,
         draft=("model", "ngram", "none")[i % 3], width=(1, 3, "auto", 5)[i % 4],
         **({"temperature": 0.9, "top_p": 0.95, "seed": i} if i % 2 else {}))
    for i in range(50)
]


def sequential(generator):
    return [generator.generate(**request).token_ids for request in REQUESTS]


def test_two_threads_get_exactly_the_sequential_outputs(tiny_generator):
    generator = tiny_generator
    generator.eos_ids = set()
    expected = sequential(generator)
    results: dict[tuple[int, int], list[int]] = {}
    errors = []
    start = threading.Barrier(2)

    def worker(thread: int) -> None:
        try:
            start.wait()
            order = range(50) if thread == 0 else reversed(range(50))
            for i in order:
                results[thread, i] = generator.generate(**REQUESTS[i]).token_ids
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    for (thread, i), tokens in results.items():
        assert tokens == expected[i], f"thread {thread}, request {i}"
    assert len(results) == 100
    assert generator.aggregate.requests == 150
    assert generator.aggregate.to_json()["latency"]["queue"]["max"] > 0  # the threads really waited


def test_interleaved_streams_in_one_thread_are_refused_not_corrupted(tiny_generator):
    generator = tiny_generator
    generator.eos_ids = set()
    alone = generator.generate(**REQUESTS[0]).token_ids
    first = generator.stream(**REQUESTS[0])
    next(first)
    with pytest.raises(GenerationError, match="already runs a request.*close"):
        next(generator.stream(**REQUESTS[1]))
    rest = [chunk.token_id for chunk in first]
    assert [alone[0], *rest[:-1]] == alone  # the first stream was not disturbed
    assert generator.generate(**REQUESTS[0]).token_ids == alone


def test_without_the_guard_interleaving_corrupts(tiny_generator, monkeypatch):
    """Control for the test above: with the guard switched off, two interleaved streams share the KV cache
    and the output changes, so the refusal is what keeps outputs exact."""
    generator = tiny_generator
    generator.eos_ids = set()
    request = dict(prompt_ids=[5, 17, 42], max_new_tokens=20, draft="none", width=0)
    other = dict(prompt_ids=[90, 91, 92, 93, 94, 95], max_new_tokens=20, draft="none", width=0)
    alone = generator.generate(**request).token_ids
    monkeypatch.setattr(type(generator), "_acquire", lambda self: 0.0)
    monkeypatch.setattr(type(generator), "_release", lambda self: None)
    first, second = generator.stream(**request), generator.stream(**other)
    tokens = []
    for chunk_a, _ in zip(first, second):
        tokens.append(chunk_a.token_id)
    assert tokens[:-1] != alone


def test_abandoned_stream_does_not_disturb_the_next_request(tiny_generator):
    generator = tiny_generator
    generator.eos_ids = set()
    alone = generator.generate(**REQUESTS[3]).token_ids
    stream = generator.stream(**REQUESTS[3])
    next(stream), next(stream)
    del stream  # dropped mid-way: closed by the garbage collector, which frees the Generator
    gc.collect()
    assert generator.generate(**REQUESTS[3]).token_ids == alone
    stream = generator.stream(**REQUESTS[4])
    next(stream)
    stream.close()  # or closed explicitly
    assert generator.generate(**REQUESTS[3]).token_ids == alone


def test_a_request_failing_mid_generation_leaves_the_generator_usable(tiny_generator, monkeypatch):
    """The failure happens after the caches hold this request's state (prefill done, rounds committed)."""
    generator = tiny_generator
    generator.eos_ids = set()
    request = dict(prompt_ids=[5, 6, 7], max_new_tokens=16, draft="model", width=3)
    alone = generator.generate(**request).token_ids
    real_step, calls = generator.target.step, []

    def failing_step(token_ids):
        calls.append(len(token_ids))
        if len(calls) == 4:
            raise RuntimeError("device lost")
        return real_step(token_ids)

    monkeypatch.setattr(generator.target, "step", failing_step)
    with pytest.raises(RuntimeError, match="device lost"):
        generator.generate(**request)
    assert generator.target.length > 0  # the failed request left state behind
    monkeypatch.undo()
    assert generator.generate(**request).token_ids == alone
    assert generator.generate(**dict(request, draft="none")).token_ids == alone


def test_a_stream_read_up_to_its_finish_reason_frees_the_generator(tiny_generator):
    """A consumer that stops at the final chunk (finish reason) without exhausting the iterator must not keep
    the Generator: the final chunk is yielded after the release."""
    generator = tiny_generator
    stream = generator.stream(prompt_ids=[5, 6, 7], max_new_tokens=6)
    while next(stream).finish_reason is None:
        pass
    assert generator.generate(prompt_ids=[5, 6, 7], max_new_tokens=6).finish_reason in ("length", "eos")
    assert next(stream, "exhausted") == "exhausted"


@pytest.mark.parametrize("options,message", [
    ({"temprature": 0.7}, "unknown generation option.*temprature"),
    ({"temperature": 1.0, "seed": True}, "seed must be an integer"),
])
def test_option_mistakes_are_generation_errors(tiny_generator, options, message):
    with pytest.raises(GenerationError, match=message):
        tiny_generator.generate(prompt_ids=[1, 2], **options)
