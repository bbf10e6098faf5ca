"""`spectrt serve` on a loopback port, driven by the official openai client and by plain HTTP."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from spectrt.runtime.generator import Generator
from spectrt.serve.process import ServerProcess


class Server(ServerProcess):
    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics, parsed with the Prometheus text parser."""
        from prometheus_client.parser import text_string_to_metric_families

        samples = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return samples


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and all((k, v) in sample_labels for k, v in labels.items()))


@pytest.fixture(scope="module")
def tiny_server(tiny_bundle):
    server = Server(tiny_bundle, max_queue=3)
    yield server
    server.stop()


# -- the official client on real weights -----------------------------------------------------------------------

@pytest.mark.slow
def test_openai_client_chat_and_completion_stream_and_not(smollm2_bundle):
    from openai import OpenAI

    server = Server(smollm2_bundle)
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2"]
        generator = Generator(smollm2_bundle, threads=1)
        prompt = "def fibonacci(n):"
        expected = generator.generate(prompt, max_new_tokens=40).text
        completion = client.completions.create(model="smollm2", prompt=prompt, max_tokens=40, temperature=0)
        assert completion.choices[0].text == expected
        usage = completion.usage.model_dump()
        assert usage["completion_tokens"] == 40 and usage["drafted_tokens"] > 0
        assert usage["accepted_tokens"] <= usage["drafted_tokens"] and 0 <= usage["acceptance_rate"] <= 1
        # a speculative round (not a fallback, not a miss) drafts 1 to 4 (the widest built width) tokens
        speculative_rounds = usage["rounds"] - usage["fallback_rounds"] - usage["draft_misses"]
        assert 1 <= speculative_rounds <= usage["drafted_tokens"] <= 4 * speculative_rounds
        plain = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"width": 0}).usage.model_dump()
        own = generator.generate(prompt, max_new_tokens=12, width=0).metrics
        assert (plain["fallback_rounds"], plain["rounds"], plain["drafted_tokens"]) == (
            own.fallback_rounds, own.rounds, own.drafted_tokens)
        assert plain["fallback_rounds"] == plain["rounds"] >= 1 and plain["drafted_tokens"] == 0  # all plain
        streamed = client.completions.create(model="smollm2", prompt=prompt, max_tokens=40, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
        pieces, finish, stream_usage = [], None, None
        for chunk in streamed:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                stream_usage = chunk.usage.model_dump()
        assert "".join(pieces) == expected and finish == "length"
        assert stream_usage["completion_tokens"] == 40 and stream_usage["drafted_tokens"] > 0

        messages = [{"role": "user", "content": "Name three colors."}]
        chat_expected = generator.generate(messages=messages, max_new_tokens=32, draft="ngram").text
        chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=32, temperature=0,
                                              extra_body={"draft": "ngram"})
        assert chat.choices[0].message.content == chat_expected and chat.choices[0].message.role == "assistant"
        chat_stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=32,
                                                     temperature=0, stream=True, extra_body={"draft": "ngram"})
        text = "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices)
        assert text == chat_expected
        # OpenAI's predicted output, through the client's own `prediction` argument
        predicted = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=32, temperature=0,
                                                   prediction={"type": "content", "content": chat_expected},
                                                   extra_body={"draft": "ngram"})
        assert predicted.choices[0].message.content == chat_expected
        details = predicted.usage.completion_tokens_details
        assert details.accepted_prediction_tokens > 0
        assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == len(
            generator.tokenizer.tokenizer.encode(chat_expected, add_special_tokens=False).ids)
    finally:
        server.stop()


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_frees_the_generator(smollm2_bundle):
    server = Server(smollm2_bundle)
    try:
        body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            received = [line for _, line in zip(range(6), lines) if line.startswith("data:")]
        assert len(received) >= 2  # then the connection is closed, 400 tokens from done
        short = {"model": "smollm2", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
        answer = httpx.post(f"{server.url}/v1/completions", json=short, timeout=60).json()
        expected = Generator(smollm2_bundle, threads=1).generate("Hello", max_new_tokens=8).text
        assert answer["choices"][0]["text"] == expected
        # the worker records a request it stops for its client before it frees the generator, so the short
        # request's answer implies the record: the abandoned one stopped early, far from its 400 tokens
        samples = server.metrics()
        assert metric_sum(samples, "spectrt_requests_total", finish_reason="cancelled") == 1
        abandoned = metric_sum(samples, "spectrt_cancelled_generated_tokens_total")
        assert len(received) <= abandoned < 100, abandoned  # each event the client read was one token
    finally:
        server.stop()


# -- load, metrics and errors on the tiny model ----------------------------------------------------------------

def load_requests(count: int = 25) -> list[dict]:
    return [{"model": "tiny", "prompt": [5 + i % 7, 17, 42 + i % 11], "max_tokens": 10 + i % 9,
             "temperature": 0.0 if i % 2 else 0.8, "seed": i, "draft": ("model", "ngram", "none")[i % 3],
             "width": (1, 3, "auto")[i % 3], "stream": i % 4 == 0}
            for i in range(count)]


def post(client: httpx.Client, url: str, body: dict) -> tuple[dict, int]:
    """One request until it is accepted (retrying 429): -> (text, finish_reason, usage), 429s seen."""
    refused = 0
    while True:
        if body["stream"]:
            with client.stream("POST", url, json={**body, "stream_options": {"include_usage": True}}) as response:
                if response.status_code == 429:
                    refused += 1
                    time.sleep(0.05)
                    continue
                assert response.status_code == 200
                events = [json.loads(line[5:]) for line in response.iter_lines()
                          if line.startswith("data:") and line != "data: [DONE]"]
            text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
            finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
            return {"text": text, "finish_reason": finish, "usage": events[-1]["usage"]}, refused
        response = client.post(url, json=body)
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "queue_full" and response.headers["Retry-After"]
            refused += 1
            time.sleep(0.05)
            continue
        assert response.status_code == 200, response.text
        data = response.json()
        return {"text": data["choices"][0]["text"], "finish_reason": data["choices"][0]["finish_reason"],
                "usage": data["usage"]}, refused


def test_eight_clients_get_their_sequential_results_and_metrics_add_up(tiny_server, tiny_bundle):
    generator = Generator(tiny_bundle, threads=1)
    expected = {}
    for client_id in range(8):
        for index, body in enumerate(load_requests()):
            result = generator.generate(prompt_ids=body["prompt"], max_new_tokens=body["max_tokens"],
                                        temperature=body["temperature"], seed=body["seed"], draft=body["draft"],
                                        width=body["width"])
            expected[client_id, index] = result.text
    before = tiny_server.metrics()
    results, refusals = {}, []

    def client(client_id: int) -> None:
        with httpx.Client(timeout=120) as http:
            for index, body in enumerate(load_requests()):
                result, refused = post(http, f"{tiny_server.url}/v1/completions", body)
                results[client_id, index] = result
                refusals.append(refused)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    assert len(results) == 200  # no request lost
    for key, result in results.items():
        assert result["text"] == expected[key], key
    print(f"queue-full answers: {sum(refusals)} over 200 requests")
    after = tiny_server.metrics()
    assert (metric_sum(after, "spectrt_queue_full_rejections_total")
            - metric_sum(before, "spectrt_queue_full_rejections_total")) == sum(refusals)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    usages = [r["usage"] for r in results.values()]
    assert delta("spectrt_requests_total") == 200
    assert delta("spectrt_generated_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("spectrt_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    for field in ("drafted_tokens", "accepted_tokens", "rounds", "fallback_rounds", "draft_misses"):
        assert delta(f"spectrt_{field}_total") == sum(u[field] for u in usages), field
    for drafter in ("model", "ngram", "none"):
        assert delta("spectrt_generated_tokens_total", drafter=drafter) == sum(
            r["usage"]["completion_tokens"] for (_, i), r in results.items() if load_requests()[i]["draft"] == drafter)
    assert delta("spectrt_time_to_first_token_seconds_count") == 200
    assert delta("spectrt_round_latency_seconds_count") == sum(u["rounds"] for u in usages)
    assert metric_sum(after, "spectrt_queue_depth") == 0


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": 5}, 400, "temperature"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ({"prompt": "hi", "width": 4}, 400, "width"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": list(range(1, 300))}, 400, "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "hi", "prediction": {"type": "text", "content": "x"}}, 400, "prediction.type"),
])
def test_bad_requests_get_a_4xx_naming_the_field(tiny_server, body, status, param):
    response = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", **body}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    assert "Traceback" not in response.text
    ok = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
    assert ok.status_code == 200  # nothing was disturbed


def test_bad_chat_requests(tiny_server):
    url = f"{tiny_server.url}/v1/chat/completions"
    empty = httpx.post(url, json={"model": "tiny", "messages": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    role = httpx.post(url, json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})
    assert role.status_code == 400 and role.json()["error"]["param"].startswith("messages.0.role")
    good = httpx.post(url, json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"
    assert good.json()["object"] == "chat.completion"


def test_paced_streaming_delivers_the_same_text(tiny_server):
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 30, "temperature": 0, "draft": "model", "width": 5,
            "stream": True}
    with httpx.Client(timeout=60) as http:
        raw, _ = post(http, f"{tiny_server.url}/v1/completions", body)
        paced, _ = post(http, f"{tiny_server.url}/v1/completions", {**body, "pacing": "paced"})
    assert paced["text"] == raw["text"] and paced["finish_reason"] == raw["finish_reason"]


def test_health_models_and_metric_names(tiny_server):
    health = httpx.get(f"{tiny_server.url}/health").json()
    assert health["status"] == "ok" and health["exact"] is True and health["exactness"].startswith("exact: true")
    assert httpx.get(f"{tiny_server.url}/v1/models").json()["data"][0]["id"] == "tiny"
    assert metric_sum(tiny_server.metrics(), "spectrt_exact") == 1.0  # the row-count check ran in the server
    text = httpx.get(f"{tiny_server.url}/metrics").text
    for name in ("spectrt_requests_total", "spectrt_generated_tokens_total", "spectrt_drafted_tokens_total",
                 "spectrt_accepted_tokens_total", "spectrt_rejected_spans_total", "spectrt_fallback_rounds_total",
                 "spectrt_draft_misses_total", "spectrt_time_to_first_token_seconds_bucket",
                 "spectrt_time_per_output_token_seconds_bucket", "spectrt_inter_chunk_gap_seconds_bucket",
                 "spectrt_round_latency_seconds_bucket", "spectrt_accepted_length_bucket", "spectrt_queue_depth",
                 "spectrt_scheduler_width", "spectrt_acceptance_estimate", "spectrt_pad_rows_total",
                 "spectrt_pad_guesses_accepted_total", "spectrt_exact"):
        assert name in text, name


def test_serving_benchmark_runs_every_configuration(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from spectrt.cli import main

    workload = tmp_path / "turns.jsonl"  # an agent session (tool results come back) and a chat (follow-ups)
    workload.write_text(json.dumps({"id": "s", "messages": [{"role": "user", "content": "do x"}],
                                    "tool_results": ["1"]}) + "\n"
                        + json.dumps({"id": "c", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "serve-bench"
    result = CliRunner().invoke(main, ["bench-serve", str(tiny_bundle), "--clients", "2", "--requests", "1",
                                       "--conversations", "2", "--turns", "2", "--max-new-tokens", "4",
                                       "--workload", str(workload), "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert set(data["concurrency"]) == {"plain", "speculative", "speculative+paced"}
    assert set(data["multi_turn"]) == {"plain", "reuse", "speculative", "speculative+reuse", "ngram+reuse"}
    for part in ("concurrency", "multi_turn"):
        for summary in data[part].values():
            assert summary["identical_to_plain"] == summary["compared"] > 0  # greedy: same texts everywhere
            assert summary["generated_tokens"] > 0 and summary["ttft_p50"] > 0
    assert data["multi_turn"]["plain"]["compared"] == 2 + 2  # the session and the chat, two turns each
    assert set(data["multi_turn"]["ngram+reuse"]["speedup_by_turn"]) == {"1", "2"}
    assert data["multi_turn"]["reuse"]["reused_prompt_tokens"] > 0
    assert data["multi_turn"]["plain"]["reused_prompt_tokens"] == 0
    assert (out / "turns.png").stat().st_size > 0 and "Turn by turn" in (out / "results.md").read_text()
    assert "| speculative+paced |" in (out / "results.md").read_text()
