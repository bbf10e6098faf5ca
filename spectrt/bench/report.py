"""Write benchmark results: full JSON, markdown tables and PNG plots.

Peers (results["peers"]): transformers and llama.cpp, each with its own section; with llama.cpp, the spectrt
tables gain "vs llama.cpp plain" columns and the speed-up plot a line per llama.cpp mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


LLAMACPP_COLUMNS = (" vs llama.cpp plain: the median per-prompt ratio of decode tok/s to llama.cpp plain decoding's on "
                    "the same prompts (same token ids) and GGUF, above 1 = spectrt decodes faster; TTFT vs llama.cpp: "
                    "the same ratio of TTFT, above 1 = spectrt's first token comes later.")


def markdown_table(results: dict[str, Any]) -> str:
    bundle = results["bundle"]
    config = results["config"]
    lines = [
        f"# spectrt benchmark: {bundle['name']}",
        "",
        f"- target `{bundle['target']}`, draft `{bundle['draft']}`, precision {bundle['precision']}, "
        f"weights {bundle['quantization']}",
        f"- {config['max_new_tokens']} new tokens, greedy, {config['repeats']} repeats (median), warm-up {config['warmup']}, "
        f"prompts per workload: {config['prompts'] or 'all'}",
        f"- machine: {results['machine'].get('cpu', '?')}, {results['machine'].get('cpus')} cores, "
        f"ISA {', '.join(results['machine'].get('isa') or []) or '?'}, "
        f"onnxruntime {results['machine'].get('onnxruntime')}",
        *_exactness_lines(results.get("exactness")),
        f"- command: `{results['command']}`",
        *_head_lines(results.get("draft_head")),
        "",
        "Tokens/s are decode tokens/s (after the first token), median over prompts of the per-prompt median; "
        "speed-up is the median per-prompt ratio to plain decoding of the same target in the same run; "
        "predicted is the Leviathan et al. formula from the measured acceptance and per-call costs. "
        "TPOT is the time per output token after the first (median over runs); a gap is the time between two "
        "deliveries a streaming client sees (the tokens of one round arrive together), p50/p95 over all gaps. "
        "Exact = prompts whose tokens equal plain decoding's."
        + (LLAMACPP_COLUMNS if "llamacpp" in peers_of(results) else ""),
        "",
    ]
    for workload, data in results["workloads"].items():
        lines += [f"## {workload}", ""] + _config_table(data["summaries"]) + [""] + _cost_table(data["summaries"])
        lines += _turn_section(data.get("turns"))
    lines += _transformers_section(results) + _llamacpp_section(results) + _quality_section(results)
    return "\n".join(lines)


def _turn_section(turns: dict[str, Any] | None) -> list[str]:
    """A multi-turn workload turn by turn: decode tok/s relative to plain decoding (and to llama.cpp plain)."""
    if not turns:
        return []
    numbers = list(next(iter(turns["speedup_vs_plain"].values())))
    lines = ["", "Turn by turn (sessions: each turn resends the conversation with the earlier answers and their tool "
             "results; cells: median over the sessions of decode tok/s relative to spectrt plain on that turn"
             + ("; after the slash: relative to llama.cpp plain" if "vs_llamacpp_plain" in turns else "") + "):", "",
             "| config | " + " | ".join(f"turn {n}" for n in numbers) + " |",
             "|---|" + "---:|" * len(numbers)]
    llamacpp = turns.get("vs_llamacpp_plain", {})
    for label, by_turn in turns["speedup_vs_plain"].items():
        cells = [_x(by_turn.get(n)) + (f" / {_x(llamacpp[label].get(n))}" if label in llamacpp else "")
                 for n in numbers]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    plain = turns["tokens_per_second"].get("plain", {})
    lines.append("| plain tok/s | " + " | ".join(_fmt(plain.get(n), ".1f") for n in numbers) + " |")
    if "llamacpp_plain_tokens_per_second" in turns:
        ours = turns["llamacpp_plain_tokens_per_second"]
        lines.append("| llama.cpp plain tok/s | " + " | ".join(_fmt(ours.get(n), ".1f") for n in numbers) + " |")
    return lines + [""]


def _quality_section(results: dict[str, Any]) -> list[str]:
    """--quality: the target (and llama.cpp on the same GGUF) against the source in fp32."""
    quality = results.get("quality")
    if not quality:
        return []
    if "error" in quality:
        return ["## quality", "", f"not measured: {quality['error']}", ""]
    from spectrt.quality.evaluate import format_table

    return ["## quality against the source weights", "",
            "Teacher-forced over the held-out texts and over each workload's prompts followed by spectrt's plain "
            "output for them (segments prompt and output: the positions predicting prompt tokens, and those "
            "predicting output tokens); see docs/quality.md.", "", format_table(quality), ""]


def _exactness_lines(exactness: dict[str, Any] | None) -> list[str]:
    """The row-count invariance check of the run (results.json before it existed: nothing)."""
    if not exactness:
        return []
    identical = exactness.get("identical_to_plain") or {}
    seconds = exactness.get("call_seconds", {})
    plain_rows = exactness.get("plain_step_rows", 1)
    cost = (f"; a plain step computes {plain_rows} rows ({exactness['plain_step_cost']:.2f}x a 1-row call; "
            f"plain-unshaped measures the difference end to end)" if plain_rows != 1 and exactness.get(
                "plain_step_cost") else "")
    return [f"- exact: **{str(exactness['exact']).lower()}** (strategy {exactness['strategy']}: "
            f"{exactness['reason']}){cost}; {identical.get('identical', '?')} of {identical.get('runs', '?')} "
            f"speculative prompt runs identical to plain decoding",
            f"- row counts checked: {', '.join(str(c) for c in exactness.get('checked', []))}; "
            f"seconds per call: {', '.join(f'{k}: {v * 1e3:.0f} ms' for k, v in sorted(seconds.items(), key=lambda i: int(i[0])))}"]


def peers_of(results: dict[str, Any]) -> dict[str, Any]:
    """peer name -> results; results.json files written before results["peers"] kept transformers in "peer"."""
    return results.get("peers") or ({"transformers": results["peer"]} if results.get("peer") else {})


def _config_table(summaries: list[dict[str, Any]]) -> list[str]:
    vs_llamacpp = any("decode_vs_llamacpp_plain" in s for s in summaries)
    header = ("| config | tok/s | speed-up | predicted | acceptance | accepted/round | tokens/round | TTFT s "
              "| TPOT ms | gap p50 ms | gap p95 ms | plain rounds | no-draft rounds | exact |")
    lines = [header + (" vs llama.cpp plain | TTFT vs llama.cpp |" if vs_llamacpp else ""),
             "|---" * (14 + 2 * vs_llamacpp) + "|"]
    for s in summaries:
        predicted = (s.get("predicted") or {}).get("speedup")
        row = (f"| {s['config']} | {_fmt(s['tokens_per_second'])} | {_fmt(s['speedup_vs_plain'])}x | "
               f"{_fmt(predicted)}{'x' if predicted else ''} | {_fmt(s['acceptance_rate'], '.0%')} | "
               f"{_fmt(s['mean_accepted_length'])} | {_fmt(s['tokens_per_round'])} | {_fmt(s['time_to_first_token'], '.3f')} | "
               f"{_fmt(_ms(s['time_per_output_token']), '.1f')} | {_fmt(_ms(s['inter_chunk_gap_p50']), '.1f')} | "
               f"{_fmt(_ms(s['inter_chunk_gap_p95']), '.1f')} | {s['fallback_rounds']}/{s['rounds']} | "
               f"{s['draft_misses']}/{s['rounds']} | {s['exact_match_with_plain']}/{s['prompts']} |")
        if vs_llamacpp:
            row += f" {_x(s.get('decode_vs_llamacpp_plain'))} | {_x(s.get('ttft_vs_llamacpp_plain'))} |"
        lines.append(row)
    shared = [s for s in summaries if len(s.get("token_shares") or {}) > 1]
    if shared:  # composite drafters: who drafted what
        lines += ["", "Drafter shares (a composite drafter's parts: accepted tokens as a share of the output, their "
                  "acceptance): " + "; ".join(
                      f"{s['config']}: " + ", ".join(f"{name} {part['share']:.0%} ({_fmt(part['acceptance'], '.0%')})"
                                                     for name, part in s["token_shares"].items())
                      for s in shared)]
    return lines


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _head_lines(head: dict[str, Any] | None) -> list[str]:
    if not head:
        return []
    trained_on = head["measured_prompts_trained_on"]
    return [f"- draft head: {head['steps']} steps on {head['tokens']} tokens, "
            f"{_fmt(head['training_seconds'], '.0f')} s in its last training run (data collection "
            f"{_fmt(head['collect_seconds'], '.0f')} s of it); measured prompts it was trained on: "
            + (", ".join(trained_on) if trained_on else "none")]


def _cost_table(summaries: list[dict[str, Any]]) -> list[str]:
    """Each drafter's cost per drafted token, and each verification call's, in target steps (the plain run's
    time per token)."""
    costs = [(s["config"], s["costs"], s.get("acceptance_by_position") or {}) for s in summaries if s.get("costs")]
    if not costs:
        return []
    step = costs[0][1]["target_step_seconds"]
    lines = [f"Cost in target steps (one step = the plain run's target call per token, {_fmt(_ms(step), '.1f')} ms): "
             "draft = drafting seconds / drafted tokens, verify = verify seconds / rounds; catch-up = a draft "
             "model reading the prompt and the tokens of plain rounds before it proposes (per request).", "",
             "| config | draft ms/token | draft / target step | verify ms/call | verify / target step "
             "| catch-up ms/request | acceptance at drafted position 1, 2, 3, ... |",
             "|---|---|---|---|---|---|---|"]
    for label, c, by_position in costs:
        positions = ", ".join(f"{rate:.0%}" for _, rate in sorted(by_position.items(), key=lambda i: int(i[0]))[:8])
        lines.append(f"| {label} | {_fmt(_ms(c['draft_seconds_per_token']), '.2f')} | "
                     f"{_fmt(c['draft_cost_vs_target_step'], '.3f')} | {_fmt(_ms(c['verify_seconds_per_call']), '.1f')} | "
                     f"{_fmt(c['verify_cost_vs_target_step'], '.2f')} | "
                     f"{_fmt(_ms(c.get('catch_up_seconds_per_run')), '.0f')} | {positions or '–'} |")
    return lines + [""]


def _transformers_section(results: dict[str, Any]) -> list[str]:
    peer = peers_of(results).get("transformers")
    if not peer:
        return []
    lines = [f"## peer: {peer['tool']} {peer['version']} ({peer['workload']} workload, {peer['precision']})", "",
             f"{peer['metric']}: plain {_fmt(peer['plain_tokens_per_second'])} tok/s, `assistant_model` "
             f"{_fmt(peer['assisted_tokens_per_second'])} tok/s ({_fmt(peer['assisted_speedup'])}x); assisted output "
             f"equal to its plain output on {peer['assisted_exact_prompts']}/{len(peer['per_prompt'])} prompts.", ""]
    code = results["workloads"].get(peer["workload"])
    if code:
        best = max((s for s in code["summaries"] if s["draft"] != "none"),
                   key=lambda s: s["end_to_end_tokens_per_second"] or 0, default=None)
        if best:
            lines.append(f"spectrt on the same workload, end-to-end: plain "
                         f"{_fmt(code['summaries'][0]['end_to_end_tokens_per_second'])} tok/s, best speculative "
                         f"({best['config']}) {_fmt(best['end_to_end_tokens_per_second'])} tok/s.")
            lines.append("")
    return lines


def _llamacpp_section(results: dict[str, Any]) -> list[str]:
    peer = peers_of(results).get("llamacpp")
    if not peer:
        return []
    modes = "; ".join(f"{mode} {', '.join(f'{k}={v}' for k, v in params.items())}".strip()
                      for mode, params in peer["modes"].items())
    lines = [f"## peer: llama.cpp (llama-cpp-python {peer['version']}), {peer['precision']}", "",
             f"`{Path(peer['target']).name}`" + (f" + draft `{Path(peer['draft']).name}`" if peer.get("draft") else "")
             + f", {peer['threads']} thread{'s' if peer['threads'] != 1 else ''}, n_ctx {peer['n_ctx']}, greedy; "
             f"modes: {modes}. {peer['metric']}. "
             "Exact = prompts whose tokens equal llama.cpp plain decoding's; spectrt plain = prompts whose tokens "
             "equal spectrt plain decoding's (llama.cpp's quantized kernels need not give the same argmax).", "",
             "| workload | mode | tok/s | TTFT s | speed-up vs llama.cpp plain | vs spectrt plain (tok/s) | exact "
             "| same as spectrt plain |",
             "|---|---|---|---|---|---|---|---|"]
    for workload, data in peer["workloads"].items():
        for s in data["summaries"]:
            lines.append(f"| {workload} | {s['mode']} | {_fmt(s['tokens_per_second'])} | "
                         f"{_fmt(s['time_to_first_token'], '.3f')} | {_x(s['speedup_vs_plain'])} | "
                         f"{_x(s.get('decode_vs_spectrt_plain'))} | {s['exact_match_with_plain']}/{s['prompts']} | "
                         f"{s.get('equals_spectrt_plain', '–')}/{s['prompts']} |")
    for mode, error in (peer.get("failed_modes") or {}).items():  # llama-cpp-python raised: no numbers for it
        lines.append(f"\nllama.cpp {mode} failed and is left out: `{error}`")
    return lines + [""]


def _figure(results: dict[str, Any]):
    """One panel per workload, headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["workloads"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    return plt, fig, zip(axes[0], workloads)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(results: dict[str, Any], path: Path) -> None:
    plt, fig, panels = _figure(results)
    for ax, workload in panels:
        summaries = results["workloads"][workload]["summaries"]
        lines = [(draft, marker, False) for draft, marker in (("model", "o"), ("ngram", "s"))]
        lines += [("none", "^", True)] if any(s.get("prediction") for s in summaries) else []  # the prediction alone
        for draft, marker, prediction in lines:
            chosen = [s for s in summaries if s["draft"] == draft and bool(s.get("prediction")) == prediction
                      and s["speedup_vs_plain"]]
            name = "prediction" if prediction else f"{draft} drafter"
            fixed = sorted((s["width"], s["speedup_vs_plain"]) for s in chosen if s["width"] != "auto")
            if fixed:
                ax.plot([w for w, _ in fixed], [v for _, v in fixed], marker=marker, label=name)
            auto = [s for s in chosen if s["width"] == "auto"]
            if auto:
                ax.axhline(auto[0]["speedup_vs_plain"], linestyle=":",
                           color="tab:green" if prediction else "grey" if draft == "ngram" else "black",
                           label=f"{name} auto")
        ax.axhline(1.0, color="red", linewidth=0.8, label="spectrt plain decoding")
        llamacpp = (peers_of(results).get("llamacpp") or {}).get("workloads", {}).get(workload, {})
        for s, color in zip(llamacpp.get("summaries", []), ("tab:purple", "tab:brown", "tab:olive")):
            if s.get("decode_vs_spectrt_plain"):
                ax.axhline(s["decode_vs_spectrt_plain"], linestyle="--", color=color, label=f"llama.cpp {s['mode']}")
        ax.set_title(workload)
        ax.set_xlabel("speculation width K")
        ax.set_ylabel("decode tok/s relative to spectrt plain")
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_turn_series(ax, series: dict[str, dict[str, float | None]]) -> None:
    """One line per configuration: its value (label -> turn number -> value) turn by turn, gaps left out."""
    for label, by_turn in series.items():
        points = [(int(n), v) for n, v in by_turn.items() if v is not None]
        if points:
            ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=label)


def plot_turns(results: dict[str, Any], path: Path) -> bool:
    """Decode tok/s relative to spectrt plain, turn by turn, for each multi-turn workload; False if there is none."""
    sessions = {name: data["turns"] for name, data in results["workloads"].items() if data.get("turns")}
    if not sessions:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sessions), figsize=(6 * len(sessions), 4), squeeze=False)
    for ax, (workload, turns) in zip(axes[0], sessions.items()):
        plot_turn_series(ax, turns.get("vs_llamacpp_plain") or turns["speedup_vs_plain"])
        ax.axhline(1.0, color="red", linewidth=0.8)
        ax.set_title(f"{workload}: turn by turn")
        ax.set_xlabel("turn")
        ax.set_ylabel("decode tok/s relative to " + ("llama.cpp plain" if "vs_llamacpp_plain" in turns
                                                      else "spectrt plain"))
        ax.legend(fontsize=7)
    _save(plt, fig, path)
    return True


def plot_latency(results: dict[str, Any], path: Path) -> None:
    import numpy as np

    plt, fig, panels = _figure(results)
    for ax, workload in panels:
        gaps = results["workloads"][workload]["inter_chunk_gaps"]
        for label, values in gaps.items():
            if not values:
                continue
            ordered = np.sort(np.asarray(values) * 1000.0)
            ax.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label)
        ax.set_title(f"{workload}: inter-chunk delivery gap")
        ax.set_xlabel("ms between consecutive deliveries")
        ax.set_ylabel("fraction of gaps")
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md",
             "speedup_plot": out_dir / "speedup_vs_width.png", "latency_plot": out_dir / "latency_cdf.png"}
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["markdown"].write_text(markdown_table(results))
    plot_speedup(results, paths["speedup_plot"])
    plot_latency(results, paths["latency_plot"])
    if plot_turns(results, out_dir / "turns.png"):
        paths["turns_plot"] = out_dir / "turns.png"
    return paths
