"""The load sweep of `spectrt bench-serve --load`: at which load speculation, batching, or both win.

Real HTTP clients against `spectrt serve` on one bundle built with `--max-batch B`, greedy chat requests streamed
by server-sent events, measured on the client side. For each concurrency (e.g. 1, 2, 4, 8 clients, each sending
its own prompts back to back) and each configuration:

- plain: one request at a time (`--max-batch 1`), no drafting;
- speculative: one request at a time, `draft auto`;
- batching: up to B requests decode together (`--max-batch B`), no drafting;
- batching+speculative: both (the scheduler prices each round for the whole batch);

throughput (generated tokens / wall time), TTFT and time per output token (TPOT, per request: decode time / tokens
after the first) p50/p95, and exactness per request: its text against the same prompt's text alone under plain
decoding (greedy: identical), plus seeded sampled requests at the top concurrency against the same seeds alone.
An interleaved part runs two multi-turn conversations at once (prefix reuse on) against one conversation alone:
each keeps its own prefix in its own cache slot, so later turns' TTFT stays near a lone client's.
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
from spectrt.workloads import load_workload

from .runner import _percentile, machine_info
from .serving import FOLLOW_UPS, Timing, stream_chat, summarize

LOAD_CONFIGS = {  # label -> (batched server, request options)
    "plain": (False, {"draft": "none"}),
    "speculative": (False, {"draft": "auto"}),
    "batching": (True, {"draft": "none"}),
    "batching+speculative": (True, {"draft": "auto"}),
}
SAMPLING = {"temperature": 0.8, "top_p": 0.95}


@dataclass(frozen=True)
class LoadBenchConfig:
    """One `spectrt bench-serve --load` invocation."""

    bundle: str
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    max_batch: int = 0  # 0: the bundle's batch slots
    requests_per_client: int = 2
    max_new_tokens: int = 64
    workload: str = "chat"
    threads: int = 0
    sampled: int = 4  # seeded sampled requests checked at the top concurrency (0: none)
    turns: int = 3  # turns of each conversation in the interleaved part (0: no such part)
    baseline: str | None = None  # the same weights built with --max-batch 1: one request at a time runs on it

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ConfigError("--load takes concurrencies >= 1, e.g. 1,2,4,8.")
        if min(self.requests_per_client, self.max_new_tokens) < 1 or min(self.sampled, self.turns, self.max_batch) < 0:
            raise ConfigError("requests and max_new_tokens must be >= 1; sampled, turns and max_batch >= 0.")


def tpot(timing: Timing) -> float | None:
    """Seconds per output token after the first (None for a one-token answer)."""
    rate = timing.tokens_per_second
    return 1.0 / rate if rate else None


def run_clients(url: str, model: str, clients: int, requests_per_client: int, prompts: list, options: dict[str, Any],
                max_tokens: int) -> tuple[dict[str, Any], dict[int, str]]:
    """`clients` clients at once, each sending its own prompts back to back; (summary, text per prompt index)."""
    import httpx

    timings: dict[int, Timing] = {}

    def client(client_id: int) -> None:
        with httpx.Client(timeout=900) as http:
            for index in range(requests_per_client):
                number = client_id * requests_per_client + index
                prompt = prompts[number % len(prompts)]
                request = options | {"seed": number} if "temperature" in options else options
                timings[number] = stream_chat(http, url, model, list(prompt.messages), request, max_tokens)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    per_token = [t for t in (tpot(timing) for timing in timings.values()) if t is not None]
    summary = summarize(list(timings.values()), time.perf_counter() - start) | {
        "clients": clients, "tpot_p50": _percentile(per_token, 50), "tpot_p95": _percentile(per_token, 95)}
    return summary, {number: timing.text for number, timing in timings.items()}


def run_conversations(url: str, model: str, conversations: list, turns: int, max_tokens: int
                      ) -> list[list[dict[str, Any]]]:
    """Each conversation on its own client, all at once (turn after turn, the conversation so far resent with a
    follow-up); per conversation, per turn: TTFT, reused prompt tokens, prompt tokens, text."""
    import httpx

    def client(prompt) -> list[dict[str, Any]]:
        messages, out = list(prompt.messages), []
        with httpx.Client(timeout=900) as http:
            for turn in range(turns):
                timing = stream_chat(http, url, model, messages, {"draft": "none", "reuse_prefix": True}, max_tokens)
                out.append({"ttft": timing.ttft, "reused_prompt_tokens": timing.usage.get("reused_prompt_tokens", 0),
                            "prompt_tokens": timing.usage.get("prompt_tokens", 0), "text": timing.text})
                messages += [{"role": "assistant", "content": timing.text},
                             {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
        return out

    with ThreadPoolExecutor(len(conversations)) as pool:
        return list(pool.map(client, conversations))


def _server(bundle: Path, batch: int, slots: int, threads: int, clients: int):
    from spectrt.serve.process import ServerProcess

    return ServerProcess(bundle, "--max-batch", str(batch), "--prefix-slots", str(slots), threads=threads,
                         max_queue=clients, startup_timeout=600.0)


def run_load_benchmark(config: LoadBenchConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Both servers in turn (one request at a time, then batched), every configuration at every concurrency."""
    import httpx

    from spectrt.runtime.manifest import read_manifest

    manifest = read_manifest(config.bundle)
    batch = config.max_batch or manifest.target.batch_slots
    if batch < 2 or batch > manifest.target.batch_slots:
        raise ConfigError(f"the load sweep compares batching with one request at a time: the bundle's graphs hold "
                          f"{manifest.target.batch_slots} sequences per call; rebuild it with --max-batch 4 (and pass "
                          f"--max-batch <= its value here).")
    one_at_a_time = Path(config.baseline or config.bundle)
    if config.baseline:
        baseline = read_manifest(config.baseline)
        if baseline.target.raw.get("source") != manifest.target.raw.get("source") or baseline.target.batch_slots != 1:
            raise ConfigError(f"--baseline {config.baseline} must hold the same target weights as {config.bundle}, "
                              f"built with --max-batch 1 (today's one-sequence graphs).")
    prompts = [p for p in load_workload(config.workload) if p.messages]
    if not prompts:
        raise ConfigError(f"workload '{config.workload}' has no chat prompts; the benchmark sends chat requests.")
    top = max(config.concurrency)
    used = top * config.requests_per_client
    results: dict[str, Any] = {"config": asdict(config) | {"max_batch": batch}, "load": {}, "reference": {},
                               "sampled": {}, "interleaved": {}}
    references: dict[int, str] = {}
    sampled_alone: dict[int, str] = {}
    for batched in (False, True):
        slots = max(batch, 2) if batched else 1
        bundle = Path(config.bundle) if batched else one_at_a_time
        with _server(bundle, batch if batched else 1, slots, config.threads, top) as server:
            say(f"spectrt serve {bundle.name} --max-batch {batch if batched else 1} on {server.url}")
            with httpx.Client(timeout=900) as http:  # warm-up: sessions, caches and the auto scheduler's costs
                stream_chat(http, server.url, server.model, list(prompts[0].messages), {"draft": "auto"}, 8)
            if not batched:  # every prompt alone, plain greedy (and seeded sampled): what each request must equal
                _, references = run_clients(server.url, server.model, 1, used, prompts, {"draft": "none"},
                                            config.max_new_tokens)
                if config.sampled:
                    _, sampled_alone = run_clients(server.url, server.model, 1, config.sampled, prompts,
                                                   {"draft": "auto", **SAMPLING}, config.max_new_tokens)
            for label, (needs_batch, options) in LOAD_CONFIGS.items():
                if needs_batch != batched:
                    continue
                for clients in config.concurrency:
                    summary, texts = run_clients(server.url, server.model, clients, config.requests_per_client,
                                                 prompts, options | {"reuse_prefix": False}, config.max_new_tokens)
                    summary["identical_to_alone"] = sum(texts[n] == references[n] for n in texts)
                    results["load"].setdefault(label, {})[str(clients)] = summary
                    say(f"  {label} x{clients}: {summary['throughput_tokens_per_second']:.2f} tok/s, TPOT p50/p95 "
                        f"{1e3 * summary['tpot_p50']:.0f}/{1e3 * summary['tpot_p95']:.0f} ms, TTFT p95 "
                        f"{summary['ttft_p95']:.2f} s, identical {summary['identical_to_alone']}/{summary['requests']}")
            if batched and config.sampled:
                clients = min(top, config.sampled)
                _, texts = run_clients(server.url, server.model, clients, -(-config.sampled // clients), prompts,
                                       {"draft": "auto", **SAMPLING}, config.max_new_tokens)
                results["sampled"] = {"clients": clients, "requests": config.sampled, "settings": SAMPLING,
                                      "identical_to_alone": sum(texts.get(n) == sampled_alone[n]
                                                                for n in sampled_alone)}
                say(f"  seeded sampling x{clients}: {results['sampled']['identical_to_alone']}/{config.sampled} "
                    f"identical to alone")
            if config.turns:
                conversations = prompts[:2]
                key = "batched" if batched else "one_at_a_time"
                lone = run_conversations(server.url, server.model, conversations[:1], config.turns,
                                         config.max_new_tokens)[0]
                together = run_conversations(server.url, server.model, conversations, config.turns,
                                             config.max_new_tokens)
                results["interleaved"][key] = {"lone": lone, "together": together,
                                               "later_turn_ttft_ratio": _later_turn_ratio(lone, together)}
                say(f"  interleaved ({key}): later turns' TTFT {results['interleaved'][key]['later_turn_ttft_ratio']:.2f}x "
                    f"a lone client's; reused {[[t['reused_prompt_tokens'] for t in c] for c in together]}")
            results.setdefault("server_metrics", {})["batched" if batched else "one_at_a_time"] = server.metrics_text()
    results["reference"] = {"prompts": used, "max_new_tokens": config.max_new_tokens}
    results["crossover"] = crossover(results["load"])
    results["machine"] = machine_info()
    results["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return results


def _later_turn_ratio(lone: list[dict], together: list[list[dict]]) -> float | None:
    """Median TTFT of turns 2.. of the interleaved conversations over the lone conversation's."""
    alone = [t["ttft"] for t in lone[1:]]
    mixed = [t["ttft"] for conversation in together for t in conversation[1:]]
    return statistics.median(mixed) / statistics.median(alone) if alone and mixed else None


def crossover(load: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Per server kind, the lowest concurrency from which speculation no longer adds throughput (None: it pays at
    every concurrency measured), and each configuration's throughput over one-at-a-time plain decoding."""
    def throughput(label: str, clients: str) -> float | None:
        return load.get(label, {}).get(clients, {}).get("throughput_tokens_per_second")

    out: dict[str, Any] = {}
    for plain, both in (("plain", "speculative"), ("batching", "batching+speculative")):
        levels = sorted(load.get(plain, {}), key=int)
        stops = [c for c in levels if (throughput(both, c) or 0) <= (throughput(plain, c) or 0)]
        out[f"{both}_stops_paying_at"] = int(stops[0]) if stops else None
    out["throughput_over_plain"] = {label: {c: (throughput(label, c) / throughput("plain", c)
                                                if throughput(label, c) and throughput("plain", c) else None)
                                            for c in series} for label, series in load.items()}
    return out


def markdown(results: dict[str, Any]) -> str:
    config, load = results["config"], results["load"]

    def fmt(value: Any, spec: str = ".2f", scale: float = 1.0) -> str:
        return "–" if value is None else format(value * scale, spec)

    machine = results["machine"]
    lines = [f"# spectrt load sweep: {Path(config['bundle']).name}", "",
             f"- machine: {machine.get('cpu', '?')} ({', '.join(machine.get('isa') or ['?'])}), {machine.get('cpus')} cores; greedy "
             f"chat requests ({config['workload']} workload), {config['max_new_tokens']} new tokens, streamed (SSE), "
             f"measured by the clients; each client sends {config['requests_per_client']} requests back to back",
             f"- batching: `spectrt serve --max-batch {config['max_batch']}`; the others one request at a time"
             + (f" on `{Path(config['baseline']).name}` (the same weights, one-sequence graphs)" if config.get('baseline')
                else " (`--max-batch 1` on the same bundle)"),
             "- throughput = generated tokens / wall time; TPOT = a request's decode time / its tokens after the "
             "first; identical = texts equal to the same prompt's text alone (plain greedy)", "",
             "| config | clients | throughput tok/s | x plain | TTFT p50 s | TTFT p95 s | TPOT p50 ms | TPOT p95 ms "
             "| acceptance | identical |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = results["crossover"]["throughput_over_plain"]
    for label, series in load.items():
        for clients, s in sorted(series.items(), key=lambda item: int(item[0])):
            lines.append(f"| {label} | {clients} | {fmt(s['throughput_tokens_per_second'])} | "
                         f"{fmt(ratios[label].get(clients))} | {fmt(s['ttft_p50'])} | {fmt(s['ttft_p95'])} | "
                         f"{fmt(s['tpot_p50'], '.0f', 1e3)} | {fmt(s['tpot_p95'], '.0f', 1e3)} | "
                         f"{fmt(s['acceptance_rate'], '.0%')} | {s['identical_to_alone']}/{s['requests']} |")
    cross = results["crossover"]
    lines += ["", "Speculation stops adding throughput at: one request at a time "
              f"{cross['speculative_stops_paying_at'] or 'never (in this range)'} clients; batched "
              f"{cross['batching+speculative_stops_paying_at'] or 'never (in this range)'} clients."]
    if results.get("sampled"):
        s = results["sampled"]
        lines += ["", f"Seeded sampling ({s['settings']}), {s['clients']} clients batched: {s['identical_to_alone']}/"
                      f"{s['requests']} requests identical to the same seeds alone."]
    for key, part in results.get("interleaved", {}).items():
        reused = [[t["reused_prompt_tokens"] for t in c] for c in part["together"]]
        lines += ["", f"Interleaved conversations ({key.replace('_', ' ')}): two clients' later turns' TTFT "
                      f"{fmt(part['later_turn_ttft_ratio'])}x a lone client's; prompt tokens reused per turn {reused}."]
    return "\n".join(lines) + "\n"


def write_load_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "load.json", "markdown": out_dir / "load.md", "plot": out_dir / "load.png"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["markdown"].write_text(markdown(results))
    plot_load(results, paths["plot"])
    return paths


def plot_load(results: dict[str, Any], path: Path) -> None:
    """Throughput and p95 TPOT against concurrency, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, series in results["load"].items():
        levels = sorted(series, key=int)
        xs = [int(c) for c in levels]
        left.plot(xs, [series[c]["throughput_tokens_per_second"] for c in levels], marker="o", label=label)
        right.plot(xs, [1e3 * (series[c]["tpot_p95"] or 0) for c in levels], marker="o", label=label)
    for axis, label in ((left, "throughput (tok/s)"), (right, "TPOT p95 (ms)")):
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"load sweep: {Path(results['config']['bundle']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
