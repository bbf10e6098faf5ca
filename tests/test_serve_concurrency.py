"""`spectrt serve` under concurrency: set-up off the event loop, metric scrapes during requests, observation
failures, the queue place of a failed or abandoned set-up, and the server's end closing the generator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from spectrt.runtime.generator import Generator
from spectrt.serve.app import ServeConfig, create_app
from spectrt.serve.engine import Engine, QueueFull
from spectrt.serve.process import ServerProcess, free_port


@contextlib.contextmanager
def served(app):
    """`app` on a loopback port, served by uvicorn (as `spectrt serve` does) on a thread of this process."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # start-up, not a check: uvicorn has no event for it
        assert thread.is_alive(), "uvicorn exited during start-up"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def paced(stream, seconds_per_token: float):
    """`Generator.stream` for a model that takes `seconds_per_token` per token (unconstrained requests; the set-up
    itself is untouched): the stream's usual gap is known and no CPU is spent waiting."""
    def stream_paced(*args, **options):
        chunks = stream(*args, **options)
        if "json_schema" in options:
            return chunks

        def tokens():
            try:
                for chunk in chunks:
                    yield chunk
                    time.sleep(seconds_per_token)
            finally:
                chunks.close()
        return tokens()
    return stream_paced


def big_schema(tag: str, properties: int = 600) -> dict:
    """A JSON schema llguidance needs about a second to compile (2 cores) that is still short text (~60 kB:
    parsing and copying it is not what may stall): each property an integer of a wide range."""
    return {"type": "object", "required": [f"{tag}{i}" for i in range(properties)],
            "properties": {f"{tag}{i}": {"type": "integer", "minimum": -98765432109876 + 7 * i,
                                          "maximum": 12345678901234567 - 13 * i} for i in range(properties)}}


def test_a_constraint_compile_does_not_stall_open_streams(tiny_bundle):
    """A stream keeps its pace while another request compiles a new JSON schema: the compile runs off the event
    loop (llguidance releases the GIL while it compiles)."""
    generator = Generator(tiny_bundle, threads=1)
    generator.eos_ids = set()  # the stream runs its full length
    generator.stream = paced(generator.stream, 0.02)
    app = create_app(generator, ServeConfig(model_name="tiny"))
    stream_body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": min(110, generator.max_context - 8),
                   "temperature": 0, "draft": "none", "stream": True,
                   "regex": "[a-z ]{400}"}  # whole characters: every token is an event
    compile_body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True,
                    "response_format": {"type": "json_schema",
                                        "json_schema": {"name": "big", "schema": big_schema(f"k{time.time_ns()}")}}}
    window = {}

    def compile_request(url: str) -> None:
        window["sent"] = time.monotonic()
        with httpx.stream("POST", f"{url}/v1/completions", json=compile_body, timeout=60) as response:
            window["set_up"] = time.monotonic()  # headers come once the set-up (the compile) is done
            window["status"] = response.status_code
        # closed unread: the queued request is cancelled

    arrivals = []
    with served(app) as url, ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", f"{url}/v1/completions", json=stream_body, timeout=60) as response:
            assert response.status_code == 200
            compiling = None
            for line in response.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic())
                if len(arrivals) == 25 and compiling is None:
                    compiling = pool.submit(compile_request, url)
        compiling.result()
    assert window["status"] == 200
    gaps = [(end, end - start) for start, end in zip(arrivals, arrivals[1:])]
    usual = statistics.median(gap for end, gap in gaps[2:] if end < window["sent"])
    during = [gap for (end, gap), (previous, _) in zip(gaps, [(arrivals[0], 0)] + gaps)
              if end > window["sent"] and previous <= window["set_up"]]
    compile_seconds = window["set_up"] - window["sent"]
    print(f"usual gap {usual * 1000:.1f} ms; compile {compile_seconds:.2f} s; largest gap meanwhile "
          f"{max(during) * 1000:.1f} ms over {len(during)} gaps")
    assert compile_seconds > 10 * usual, "the compile was too quick to show a stall"
    assert arrivals[-1] > window["set_up"], "the stream ended before the compile did"
    assert max(during) < usual + 0.05, "the stream stalled while the schema compiled"


def mixed_requests(count: int = 50) -> list[tuple[str, dict]]:
    """(endpoint, body): streaming and not, completions and chat, constrained and not, several drafters;
    all greedy, so the texts are the Generator's own."""
    requests = []
    for i in range(count):
        body = {"model": "tiny", "max_tokens": 6 + i % 7, "temperature": 0, "stream": i % 3 == 0,
                "draft": ("auto", "model", "ngram", "none")[i % 4]}
        if i % 5 == 1:
            body.update(regex="[a-z]{2,8}", draft=("auto", "grammar+ngram", "grammar")[i % 3])
        elif i % 5 == 3:
            body.update(choice=["yes", "no", "maybe"])
        if i % 2:
            requests.append(("chat/completions", {**body, "messages": [{"role": "user", "content": f"hi {i}"}]}))
        else:
            requests.append(("completions", {**body, "prompt": [5 + i % 7, 17, 42 + i % 11]}))
    return requests


def expected_text(generator: Generator, endpoint: str, body: dict) -> str:
    prompt = ({"messages": body["messages"]} if endpoint == "chat/completions" else {"prompt_ids": body["prompt"]})
    constraint = {key: body[key] for key in ("regex", "choice") if key in body}
    return generator.generate(**prompt, max_new_tokens=body["max_tokens"], draft=body["draft"], **constraint).text


def request_text(http: httpx.Client, url: str, endpoint: str, body: dict) -> str:
    """The generated text of one request (retrying 429: the queue holds a few)."""
    while True:
        if body["stream"]:
            with http.stream("POST", f"{url}/v1/{endpoint}", json=body) as response:
                if response.status_code == 429:
                    continue
                assert response.status_code == 200, response.read()
                events = [json.loads(line[5:]) for line in response.iter_lines()
                          if line.startswith("data:") and line != "data: [DONE]"]
            assert not any("error" in event for event in events), events
            if endpoint == "chat/completions":
                return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
            return "".join(e["choices"][0]["text"] for e in events if e["choices"])
        response = http.post(f"{url}/v1/{endpoint}", json=body)
        if response.status_code == 429:
            continue
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["message"]["content"] if endpoint == "chat/completions" else choice["text"]


def test_metric_scrapes_during_mixed_requests(tiny_bundle):
    """1,000 scrapes of /metrics while 50 mixed requests run: every scrape answers, every request's text is the
    Generator's own. The clients keep the scrapes spread over the requests: after each reply a client waits for
    20 more scrapes, while the other clients' requests run."""
    from prometheus_client.parser import text_string_to_metric_families

    generator = Generator(tiny_bundle, threads=1)
    requests = mixed_requests()
    expected = [expected_text(generator, endpoint, body) for endpoint, body in requests]
    texts: dict[int, str] = {}
    scraped = threading.Condition()
    counts = {"scrapes": 0, "replies": 0, "scraper_done": False}

    with ServerProcess(tiny_bundle, max_queue=4) as server:
        def client(first: int) -> None:
            with httpx.Client(timeout=120) as http:
                for index in range(first, len(requests), 4):
                    texts[index] = request_text(http, server.url, *requests[index])
                    with scraped:
                        counts["replies"] += 1
                        scraped.wait_for(lambda: counts["scrapes"] >= 20 * counts["replies"] or
                                         counts["replies"] == len(requests) or counts["scraper_done"])

        def scraper() -> None:
            with httpx.Client(timeout=60) as http, contextlib.ExitStack() as finally_:
                finally_.callback(lambda: (scraped.acquire(), counts.update(scraper_done=True), scraped.notify_all(),
                                           scraped.release()))  # a failed scrape never leaves a client waiting
                while counts["scrapes"] < 20 * len(requests):
                    response = http.get(f"{server.url}/metrics")
                    assert response.status_code == 200, response.text
                    assert "spectrt_requests_total" in response.text and response.text.endswith("\n")
                    with scraped:
                        counts["scrapes"] += 1
                        if counts["scrapes"] % 100 == 0:  # parse some in full (parsing all would be slow)
                            list(text_string_to_metric_families(response.text))
                        scraped.notify_all()

        with ThreadPoolExecutor(5) as pool:
            scraping = pool.submit(scraper)
            for done in [pool.submit(client, first) for first in range(4)]:
                done.result()
            scraping.result()
        final = httpx.get(f"{server.url}/metrics").text
    assert counts["scrapes"] >= 1000
    assert [texts[i] for i in range(len(requests))] == expected
    samples = {(s.name, s.labels.get("drafter"), s.labels.get("finish_reason")): s.value
               for family in text_string_to_metric_families(final) for s in family.samples}
    assert sum(v for (name, _, reason), v in samples.items() if name == "spectrt_requests_total") == len(requests)
    assert not any(reason == "error" for (_, _, reason) in samples)
    for drafter in ("model", "ngram", "none", "grammar+model", "grammar+ngram", "grammar"):
        assert any(name == "spectrt_requests_total" and d == drafter for (name, d, _) in samples), drafter


def test_a_metrics_failure_never_costs_a_response(tiny_bundle, caplog):
    generator = Generator(tiny_bundle, threads=1)
    expected = generator.generate(prompt_ids=[5, 6, 7], max_new_tokens=8).text

    def broken_state():
        raise RuntimeError("dictionary changed size during iteration")

    generator.scheduler_state = broken_state  # what an unguarded read racing the worker raises
    from fastapi.testclient import TestClient

    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0}
    with TestClient(create_app(generator, ServeConfig(model_name="tiny"))) as client:
        reply = client.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            events = [json.loads(line[5:]) for line in streamed.iter_lines()
                      if line.startswith("data:") and line != "data: [DONE]"]
        assert "".join(e["choices"][0]["text"] for e in events) == expected
        scrape = client.get("/metrics")
        assert scrape.status_code == 200 and "spectrt_requests_total" in scrape.text
    assert "recording metrics failed" in caplog.text and "dictionary changed size" in caplog.text


def test_the_end_of_the_server_stops_the_engine_then_closes_the_generator(tiny_bundle):
    from fastapi.testclient import TestClient

    generator = Generator(tiny_bundle, threads=1)
    closes = []
    close = generator.close

    def spy_close() -> None:
        workers = [t.name for t in threading.enumerate() if t.name.startswith("spectrt-")]
        closes.append(workers)
        close()

    generator.close = spy_close
    with TestClient(create_app(generator, ServeConfig(model_name="tiny"))) as client:
        reply = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 3})
        assert reply.status_code == 200
        assert closes == []
    assert closes == [[]]  # closed once, after the worker and set-up threads had stopped
    with pytest.raises(Exception, match="closed"):
        generator.generate("hi", max_new_tokens=2)


# -- the engine's queue places around the set-up -----------------------------------------------------------

class Places:
    """An Engine over no Generator (the set-ups below make their own streams)."""

    def __init__(self, max_queue: int):
        self.engine = Engine(None, max_queue=max_queue, setup_threads=1)  # one set-up thread: first in, first out

    def __enter__(self) -> Engine:
        return self.engine

    def __exit__(self, *exc) -> None:
        self.engine.shutdown()


def test_a_failed_set_up_frees_its_place():
    from spectrt.errors import GenerationError

    def bad_setup():
        raise GenerationError("the prompt is empty")

    async def scenario(engine: Engine) -> None:
        for _ in range(3):  # more failures than places: each one gave its place back
            with pytest.raises(GenerationError):
                await engine.submit(bad_setup)
        assert engine.in_flight == 0
        job = await engine.submit(lambda: iter(()))
        async for _ in engine.chunks(job):
            pass
        assert engine.in_flight == 0

    with Places(max_queue=0) as engine:
        asyncio.run(scenario(engine))


def test_places_are_taken_before_the_set_up_and_a_caller_gone_during_it_leaves_nothing():
    started, release = threading.Event(), threading.Event()
    read, closed = [], []

    class Stream:
        def __iter__(self):
            return self

        def __next__(self):
            read.append(True)
            raise StopIteration

        def close(self) -> None:
            closed.append(True)

    def slow_setup():
        started.set()
        release.wait()
        return Stream()

    async def scenario(engine: Engine) -> None:
        waiting = asyncio.ensure_future(engine.submit(slow_setup))
        await asyncio.to_thread(started.wait)
        with pytest.raises(QueueFull):  # the only place is taken while the first request sets up
            await engine.submit(lambda: iter(()))
        waiting.cancel()  # the client goes away during the set-up
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        await asyncio.to_thread(engine._setup.submit(lambda: None).result)  # the set-up thread moved on
        await asyncio.to_thread(engine._executor.submit(lambda: None).result)  # and the worker after it
        assert engine.in_flight == 0 and closed == [True] and read == []  # dropped unread

    with Places(max_queue=0) as engine:
        asyncio.run(scenario(engine))
