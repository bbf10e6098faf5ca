"""Serving benchmark: real HTTP clients against `spectrt serve`, measured on the client side.

Two parts, both on one server process, greedy chat requests streamed by server-sent events:
- concurrency: N clients at once, each sending its own workload prompts back to back, under plain
  decoding, speculation, and speculation with paced streaming: throughput (generated tokens per
  second of wall time), TTFT and the inter-chunk gaps a client sees (p50/p95), tokens/s per request;
- multi-turn: one client holding conversations (each turn resends the conversation so far plus a
  new user message, or, for an agent session, the next tool result), under plain decoding, KV-cache
  reuse, speculation, both, and n-gram lookup with the suffix cache: TTFT and tokens/s, overall and turn
  by turn, show which of the simpler wins pays on this workload.
Every configuration's texts are compared with plain decoding's (greedy: they must be identical). Each
configuration sends its own prompt_cache_key, so no configuration drafts from another's earlier answers.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from spectrt.errors import ConfigError

from .report import plot_turn_series
from .runner import _percentile, machine_info
from spectrt.workloads import load_workload

CONCURRENCY_CONFIGS = {
    "plain": {"draft": "none", "reuse_prefix": False},
    "speculative": {"draft": "auto", "reuse_prefix": False},
    "speculative+paced": {"draft": "auto", "reuse_prefix": False, "pacing": "paced"},
}
MULTI_TURN_CONFIGS = {
    "plain": {"draft": "none", "reuse_prefix": False},
    "reuse": {"draft": "none", "reuse_prefix": True},
    "speculative": {"draft": "auto", "reuse_prefix": False},
    "speculative+reuse": {"draft": "auto", "reuse_prefix": True},
    "ngram+reuse": {"draft": "ngram", "reuse_prefix": True},  # prompt lookup with the suffix cache of earlier turns
}
FOLLOW_UPS = ("Can you give a short example?", "Summarize that in one sentence.", "What is a common mistake here?")


@dataclass(frozen=True)
class ServeBenchConfig:
    """One `spectrt bench-serve` invocation; fields map 1:1 to its options."""

    bundle: str
    clients: int = 4
    requests_per_client: int = 2
    turns: int = 3
    conversations: int = 2
    max_new_tokens: int = 64
    workload: str = "chat"
    threads: int = 0
    out: str = "bench/serve"

    def __post_init__(self) -> None:
        if min(self.clients, self.requests_per_client, self.turns, self.conversations, self.max_new_tokens) < 1:
            raise ConfigError("clients, requests, turns, conversations and max_new_tokens must be >= 1.")


@dataclass
class Timing:
    """What one client saw of one streamed request."""

    text: str
    ttft: float  # request sent -> first text chunk
    gaps: list[float]  # between consecutive text chunks
    seconds: float  # request sent -> stream end
    usage: dict[str, Any]

    @property
    def tokens_per_second(self) -> float | None:
        decode = self.seconds - self.ttft
        tokens = self.usage["completion_tokens"] - 1
        return tokens / decode if tokens > 0 and decode > 0 else None


def stream_chat(client, url: str, model: str, messages: list[dict], options: dict[str, Any],
                max_tokens: int) -> Timing:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **options}
    start = time.perf_counter()
    pieces, stamps, usage = [], [], None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"server answered {response.status_code}: {response.read().decode()[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"generation failed: {event['error']['message']}")
            if event.get("usage"):
                usage = event["usage"]
            content = event["choices"][0]["delta"].get("content") if event["choices"] else None
            if content:
                pieces.append(content)
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return Timing("".join(pieces), (stamps[0] if stamps else end) - start, gaps, end - start, usage or {})


def summarize(timings: list[Timing], wall_seconds: float) -> dict[str, Any]:
    gaps = [gap for t in timings for gap in t.gaps]
    tokens = sum(t.usage.get("completion_tokens", 0) for t in timings)
    drafted = sum(t.usage.get("drafted_tokens", 0) for t in timings)
    rates = [t.tokens_per_second for t in timings if t.tokens_per_second]
    return {
        "requests": len(timings),
        "generated_tokens": tokens,
        "wall_seconds": wall_seconds,
        "throughput_tokens_per_second": tokens / wall_seconds if wall_seconds > 0 else None,
        "tokens_per_second_median": statistics.median(rates) if rates else None,
        "ttft_p50": _percentile([t.ttft for t in timings], 50),
        "ttft_p95": _percentile([t.ttft for t in timings], 95),
        "inter_chunk_gap_p50": _percentile(gaps, 50),
        "inter_chunk_gap_p95": _percentile(gaps, 95),
        "acceptance_rate": (sum(t.usage.get("accepted_tokens", 0) for t in timings) / drafted) if drafted else None,
        "reused_prompt_tokens": sum(t.usage.get("reused_prompt_tokens", 0) for t in timings),
        "prompt_tokens": sum(t.usage.get("prompt_tokens", 0) for t in timings),
    }


def run_concurrency(url: str, model: str, config: ServeBenchConfig, options: dict[str, Any],
                    prompts: list) -> tuple[dict[str, Any], dict[tuple[int, int], str]]:
    import httpx

    timings, texts = {}, {}

    def client(client_id: int) -> None:
        with httpx.Client(timeout=600) as http:
            for index in range(config.requests_per_client):
                prompt = prompts[(client_id * config.requests_per_client + index) % len(prompts)]
                timing = stream_chat(http, url, model, list(prompt.messages), options, config.max_new_tokens)
                timings[client_id, index] = timing
                texts[client_id, index] = timing.text

    start = time.perf_counter()
    with ThreadPoolExecutor(config.clients) as pool:
        list(pool.map(client, range(config.clients)))
    return summarize(list(timings.values()), time.perf_counter() - start), texts


def run_multi_turn(url: str, model: str, config: ServeBenchConfig, options: dict[str, Any],
                   prompts: list) -> tuple[dict[str, Any], dict[tuple[int, int], str]]:
    import httpx

    timings, texts = [], {}
    by_turn: dict[int, list[float]] = {}
    start = time.perf_counter()
    with httpx.Client(timeout=600) as http:
        for conversation in range(config.conversations):
            prompt = prompts[conversation % len(prompts)]
            messages = list(prompt.messages)
            turns = min(config.turns, prompt.turns) if prompt.tool_results else config.turns
            for turn in range(turns):
                timing = stream_chat(http, url, model, messages, options, config.max_new_tokens)
                timings.append(timing)
                texts[conversation, turn] = timing.text
                if timing.tokens_per_second:
                    by_turn.setdefault(turn + 1, []).append(timing.tokens_per_second)
                if turn + 1 < turns:
                    follow_up = ({"role": "tool", "content": prompt.tool_results[turn]} if prompt.tool_results
                                 else {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]})
                    messages += [{"role": "assistant", "content": timing.text}, follow_up]
    summary = summarize(timings, time.perf_counter() - start)
    summary["tokens_per_second_by_turn"] = {str(n): statistics.median(v) for n, v in sorted(by_turn.items())}
    return summary, texts


def run_serving_benchmark(config: ServeBenchConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Start `spectrt serve` on the bundle, run both parts, return every number."""
    import httpx

    from spectrt.serve.process import ServerProcess

    prompts = [p for p in load_workload(config.workload) if p.messages]
    if not prompts:
        raise ConfigError(f"workload '{config.workload}' has no chat prompts; the serving benchmark sends chat requests.")
    results: dict[str, Any] = {"config": asdict(config), "concurrency": {}, "multi_turn": {}, "exact": {}}
    with ServerProcess(Path(config.bundle), threads=config.threads, max_queue=max(config.clients, 1)) as server:
        say(f"spectrt serve on {server.url}: model '{server.model}'")
        with httpx.Client(timeout=600) as http:  # warm-up: sessions, caches and the auto scheduler's costs
            stream_chat(http, server.url, server.model, list(prompts[0].messages), {"draft": "auto"}, 8)
        for part, configs, run in (("concurrency", CONCURRENCY_CONFIGS, run_concurrency),
                                   ("multi_turn", MULTI_TURN_CONFIGS, run_multi_turn)):
            plain_texts = None
            for label, options in configs.items():
                options = options | {"prompt_cache_key": f"{part}/{label}"}  # its own suffix cache partition
                summary, texts = run(server.url, server.model, config, options, prompts)
                plain_texts = texts if plain_texts is None else plain_texts
                summary["identical_to_plain"] = sum(texts[k] == plain_texts[k] for k in texts)
                summary["compared"] = len(texts)
                results[part][label] = summary
                say(f"  {part} {label}: {summary['throughput_tokens_per_second']:.2f} tok/s overall, TTFT p50 "
                    f"{summary['ttft_p50']:.3f} s, gap p95 {1e3 * (summary['inter_chunk_gap_p95'] or 0):.0f} ms, "
                    f"identical {summary['identical_to_plain']}/{summary['compared']}")
        plain_by_turn = results["multi_turn"]["plain"]["tokens_per_second_by_turn"]
        for summary in results["multi_turn"].values():
            summary["speedup_by_turn"] = {n: (v / plain_by_turn[n] if plain_by_turn.get(n) else None)
                                          for n, v in summary["tokens_per_second_by_turn"].items()}
        results["server_metrics"] = server.metrics_text()
    results["machine"] = machine_info()
    results["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return results


def markdown(results: dict[str, Any]) -> str:
    config = results["config"]

    def fmt(value: Any, spec: str = ".2f", scale: float = 1.0) -> str:
        return "–" if value is None else format(value * scale, spec)

    lines = [f"# spectrt serving benchmark: {Path(config['bundle']).name}", "",
             f"- machine: {results['machine'].get('cpu', '?')}, {results['machine'].get('cpus')} cores; greedy chat "
             f"requests ({config['workload']} workload), {config['max_new_tokens']} new tokens, streamed (SSE), "
             f"measured by the clients",
             "- throughput = generated tokens / wall time of the part; TTFT = request sent to first text chunk; "
             "gap = time between two text chunks a client received; identical = texts equal to plain decoding's",
             "", f"## {config['clients']} concurrent clients x {config['requests_per_client']} requests", "",
             "| config | throughput tok/s | tok/s per request (median) | TTFT p50 s | TTFT p95 s | gap p50 ms "
             "| gap p95 ms | acceptance | identical |", "|---|---|---|---|---|---|---|---|---|"]
    for label, s in results["concurrency"].items():
        lines.append(f"| {label} | {fmt(s['throughput_tokens_per_second'])} | {fmt(s['tokens_per_second_median'])} | "
                     f"{fmt(s['ttft_p50'], '.3f')} | {fmt(s['ttft_p95'], '.3f')} | "
                     f"{fmt(s['inter_chunk_gap_p50'], '.0f', 1e3)} | {fmt(s['inter_chunk_gap_p95'], '.0f', 1e3)} | "
                     f"{fmt(s['acceptance_rate'], '.0%')} | {s['identical_to_plain']}/{s['compared']} |")
    lines += ["", f"## multi-turn: 1 client, {config['conversations']} conversations x {config['turns']} turns", "",
              "| config | throughput tok/s | tok/s per request (median) | TTFT p50 s | TTFT p95 s | prompt tokens "
              "reused | acceptance | identical |", "|---|---|---|---|---|---|---|---|"]
    for label, s in results["multi_turn"].items():
        lines.append(f"| {label} | {fmt(s['throughput_tokens_per_second'])} | {fmt(s['tokens_per_second_median'])} | "
                     f"{fmt(s['ttft_p50'], '.3f')} | {fmt(s['ttft_p95'], '.3f')} | "
                     f"{s['reused_prompt_tokens']}/{s['prompt_tokens']} | {fmt(s['acceptance_rate'], '.0%')} | "
                     f"{s['identical_to_plain']}/{s['compared']} |")
    turns = sorted({n for s in results["multi_turn"].values() for n in s.get("speedup_by_turn", {})}, key=int)
    if turns:
        lines += ["", "Turn by turn: tok/s per request (median over the conversations) relative to plain decoding on "
                  "the same turn:", "", "| config | " + " | ".join(f"turn {n}" for n in turns) + " |",
                  "|---|" + "---:|" * len(turns)]
        for label, s in results["multi_turn"].items():
            lines.append(f"| {label} | " + " | ".join(fmt(s["speedup_by_turn"].get(n)) for n in turns) + " |")
    return "\n".join(lines) + "\n"


def write_serving_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["markdown"].write_text(markdown(results))
    if plot_turns(results, out_dir / "turns.png"):
        paths["turns_plot"] = out_dir / "turns.png"
    return paths


def plot_turns(results: dict[str, Any], path: Path) -> bool:
    """The multi-turn part's tok/s relative to plain decoding, turn by turn; False without per-turn numbers."""
    series = {label: s.get("speedup_by_turn") or {} for label, s in results["multi_turn"].items()}
    if not any(series.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_turn_series(ax, series)
    ax.set_xlabel("turn")
    ax.set_ylabel("tok/s per request relative to plain")
    ax.set_title(f"multi-turn ({results['config']['workload']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
