"""Benchmark runner: plain target decoding and speculative configurations, same bundle, same run.

For every workload prompt and repeat, all configurations run back to back (plain first), so
slow drifts of the machine hit them alike. Greedy decoding throughout: every configuration's
tokens are also checked against the plain run's (exactness is measured, not assumed).

A workload whose records carry a JSON `schema` (json_extraction) is constrained: every
configuration, plain included, generates under that schema, the grammar-forced drafters
(`grammar`, `grammar+model`, `grammar+ngram`) join the comparison, and each output is parsed and
validated against its schema; summaries add the forced-token share and schema validity.

Peers (--peer) then run on the unconstrained workloads, each in a process of its own, on the same models
and prompt token ids: transformers (peer.py) and llama.cpp (llamacpp_peer.py); results["peers"][name].
With llama.cpp, every configuration's summary gains its decode tok/s and TTFT relative to llama.cpp
plain decoding (median per-prompt ratios).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from spectrt import __version__
from spectrt.errors import ConfigError, FetchError
from spectrt.runtime.scheduler import acceptance_from_mean_accepted, expected_speedup

from spectrt.workloads import WORKLOAD_DIR, Prompt, load_workload


PEERS = ("transformers", "llamacpp")  # transformers generate (+ assistant_model); llama.cpp (+ prompt lookup)
PEER_CHOICES = ("auto", *PEERS, "all", "none")


SUFFIX_CACHE_MODES = ("on", "off", "both")


@dataclass(frozen=True)
class BenchConfig:
    """One `spectrt bench` invocation; fields map 1:1 to its options."""

    bundle: str
    workloads: tuple[str, ...] = ("code", "chat", "extraction")
    drafts: tuple[str, ...] = ("model", "ngram")
    widths: tuple[str | int, ...] = ("auto", 2, 4, 8)
    max_new_tokens: int = 128
    repeats: int = 3
    warmup: int = 1
    prompts: int | None = None  # first N prompts of each workload (None = all)
    threads: int = 0
    out: str = "bench/run"
    peer: str = "auto"  # auto | transformers | llamacpp | all | none (see PEERS); auto = every installed peer
    peer_target: str | None = None  # model path / known name for the peer (default: the bundle's sources)
    peer_draft: str | None = None
    reuse_prefix: bool = False  # off: every run prefills its whole prompt, so TTFT compares like with like
    invariance: str = "measure"  # measure | off: the Generator's row-count invariance (runtime/invariance.py)
    quality: bool = False  # also measure the target's quality against its source (spectrt.quality): results["quality"]
    quality_texts: tuple[str, ...] = ("prose", "code")  # held-out texts scored beside the workloads' prompts
    quality_tokens: int = 4096  # first N tokens of each held-out text
    quality_source: str | None = None  # the target's source model, when the bundle's record does not find it
    # the suffix cache across requests (n-gram drafters): on | off | both (each n-gram configuration twice). A run
    # reads and writes the partition of its workload, configuration and repeat: it sees the outputs of the prompts
    # measured before it in that repeat, never its own earlier runs
    suffix_cache: str = "on"

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.max_new_tokens < 1:
            raise ConfigError("repeats and max_new_tokens must be >= 1 and warmup >= 0.")
        if self.peer not in PEER_CHOICES:
            raise ConfigError(f"peer must be one of {', '.join(PEER_CHOICES)}.")
        if self.quality_tokens < 2:
            raise ConfigError(f"--quality-tokens must be >= 2 (got {self.quality_tokens}).")
        if self.suffix_cache not in SUFFIX_CACHE_MODES:
            raise ConfigError(f"suffix cache must be one of {', '.join(SUFFIX_CACHE_MODES)} (got {self.suffix_cache!r}).")

    @property
    def peers(self) -> tuple[str, ...]:
        """The peers this run asks for: auto and all name every peer (auto skips those not installed)."""
        return PEERS if self.peer in ("auto", "all") else () if self.peer == "none" else (self.peer,)


@dataclass(frozen=True)
class RunSpec:
    draft: str  # none | model | ngram
    width: str | int
    unshaped: bool = False  # plain decoding with the target's calls not shaped for invariance: what shaping costs
    prediction: bool = False  # the prompt's predicted output drafted first, `draft` where the output leaves it
    suffix_cache: bool = True  # an n-gram drafter also drafts from earlier requests (runtime/suffix_cache.py)

    @property
    def reads_cache(self) -> bool:
        return "ngram" in self.draft

    @property
    def label(self) -> str:
        if self.unshaped:
            return "plain-unshaped"
        draft = self.draft + ("-nocache" if self.reads_cache and not self.suffix_cache else "")
        if self.prediction:
            return "prediction" + ("" if self.draft == "none" else f"+{draft}") + f"@{self.width}"
        return "plain" if self.draft == "none" else f"{draft}@{self.width}"


GRAMMAR_DRAFTS = ("grammar", "grammar+model", "grammar+ngram")


def run_specs(config: BenchConfig, built_widths: tuple[int, ...], has_draft: bool,
              constrained: bool = False, has_head: bool = False, shaped: bool = False,
              predicted: bool = False) -> list[RunSpec]:
    """Plain first (and, when the target's calls are shaped for invariance, plain with unshaped calls: the cost of
    the shaping), then each drafter x width. Grammar-forced drafters run on constrained workloads only; there, when
    --draft names none of them, all that the bundle supports are added. A workload whose prompts carry a predicted
    output (edit) adds, per width, the prediction alone and the prediction before each drafter. --suffix-cache
    off / both: the n-gram configurations without the cache / next to their twins without it."""
    drafts = [d for d in config.drafts if constrained or d not in GRAMMAR_DRAFTS]
    if constrained and not any(d in GRAMMAR_DRAFTS for d in drafts):
        drafts += [d for d in GRAMMAR_DRAFTS if has_draft or d != "grammar+model"]
    specs = [RunSpec("none", 0)] + ([RunSpec("none", 0, unshaped=True)] if shaped else [])
    for draft in drafts:
        if draft not in ("model", "head", "ngram", "ngram+model", "ngram+head", *GRAMMAR_DRAFTS):
            raise ConfigError(f"unknown drafter '{draft}'; choose model, head, ngram, ngram+model, ngram+head, grammar, "
                              f"grammar+model or grammar+ngram.")
        if draft in ("model", "grammar+model", "ngram+model") and not has_draft:
            raise ConfigError("this bundle has no draft model; use --draft ngram.")
        if draft.endswith("head") and not has_head:
            raise ConfigError("this bundle has no draft head; train one with `spectrt train-head BUNDLE` or use "
                              "--draft ngram.")
        for width in config.widths:
            if width != "auto" and int(width) not in built_widths:
                raise ConfigError(f"width {width} was not built into this bundle (built: {list(built_widths)}).")
            specs.append(RunSpec(draft, width if width == "auto" else int(width)))
    if predicted:
        widths = [w if w == "auto" else int(w) for w in config.widths]
        specs += [RunSpec(draft, width, prediction=True) for draft in ("none", *drafts) for width in widths]
    if config.suffix_cache == "off":
        specs = [replace(spec, suffix_cache=False) for spec in specs]
    elif config.suffix_cache == "both":  # each configuration that reads the cache, next to its twin without
        specs = [twin for spec in specs
                 for twin in ((spec, replace(spec, suffix_cache=False)) if spec.reads_cache else (spec,))]
    return specs


def draft_head_facts(head: dict[str, Any], workloads: dict[str, list]) -> dict[str, Any]:
    """How the bundle's draft head was trained, and which of the measured prompts it was trained on (an honest
    measurement has none)."""
    training = head.get("training", {})
    trained = set(training.get("prompts", []))
    measured = {prompt.id for prompts in workloads.values() for prompt in prompts}
    return {"training_seconds": training.get("seconds"), "collect_seconds": training.get("collect_seconds"),
            "steps": training.get("steps"), "tokens": training.get("tokens"),
            "held_out_agreement": training.get("validation"),
            "measured_prompts_trained_on": sorted(measured & trained)}


def _acceptance_by_position(runs: list[dict]) -> dict[str, float]:
    """Drafted position (1-based) -> share of the proposals there that were accepted, over all runs."""
    proposed: Counter = Counter()
    accepted: Counter = Counter()
    for run in runs:
        proposed.update({int(p): n for p, n in run.get("proposed_at_position", {}).items()})
        accepted.update({int(p): n for p, n in run.get("accepted_at_position", {}).items()})
    return {str(p): accepted[p] / n for p, n in sorted(proposed.items()) if n}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def predicted_speedup(runs: list[dict], plain_runs: list[dict], width: str | int) -> dict[str, Any] | None:
    """Leviathan et al.'s formula from the measured acceptance and per-call costs of these runs."""
    if width == "auto" or any(r["draft_misses"] for r in runs):
        return None  # the formula assumes K proposals every round: not `auto`, not a drafter that misses
    k = int(width)
    drafted = sum(r["drafted_tokens"] for r in runs)
    rounds = sum(r["speculative_rounds"] for r in runs)
    plain_rounds = sum(r["rounds"] for r in plain_runs)
    if not drafted or not rounds or not plain_rounds:
        return None
    mean_accepted = sum(r["accepted_tokens"] for r in runs) / rounds
    acceptance = acceptance_from_mean_accepted(mean_accepted, k)
    draft_cost = sum(r["draft_seconds"] for r in runs) / drafted  # per drafted token
    verify_cost = sum(r["verify_seconds"] for r in runs) / sum(r["rounds"] for r in runs)
    plain_cost = sum(r["verify_seconds"] for r in plain_runs) / plain_rounds
    return {"per_token_acceptance": acceptance, "draft_seconds_per_token": draft_cost,
            "verify_seconds_per_call": verify_cost, "plain_seconds_per_call": plain_cost,
            "speedup": expected_speedup(acceptance, k, draft_cost, verify_cost, plain_cost)}


def summarize(spec: RunSpec, prompt_results: dict[str, dict], plain_results: dict[str, dict]) -> dict[str, Any]:
    """Aggregate one configuration over the prompts of one workload."""
    runs = [m for result in prompt_results.values() for m in result["metrics"]]
    plain_runs = [m for result in plain_results.values() for m in result["metrics"]]
    tokens_per_second = {pid: _decode_speed(r) for pid, r in prompt_results.items()}
    plain_tps = {pid: _decode_speed(r) for pid, r in plain_results.items()}
    ratios = [tokens_per_second[p] / plain_tps[p] for p in tokens_per_second if tokens_per_second[p] and plain_tps.get(p)]
    drafted = sum(m["drafted_tokens"] for m in runs)
    speculative_rounds = sum(m["speculative_rounds"] for m in runs)
    gaps = [gap for result in prompt_results.values() for gap in result["gaps"]]
    mismatches = [pid for pid, r in prompt_results.items()
                  if r["token_ids"] != plain_results[pid]["token_ids"] or not r["repeats_identical"]
                  or not plain_results[pid]["repeats_identical"]]
    summary = {
        "config": spec.label,
        "draft": spec.draft,
        "prediction": spec.prediction,
        "width": spec.width,
        "prompts": len(prompt_results),
        "runs": len(runs),
        "tokens_per_second": _median(list(tokens_per_second.values())),
        "end_to_end_tokens_per_second": _median([m["end_to_end_tokens_per_second"] for m in runs]),
        "speedup_vs_plain": _median(ratios),
        "acceptance_rate": sum(m["accepted_tokens"] for m in runs) / drafted if drafted else None,
        "acceptance_by_position": _acceptance_by_position(runs),
        "mean_accepted_length": (sum(m["accepted_tokens"] for m in runs) / speculative_rounds
                                 if speculative_rounds else None),
        "tokens_per_round": (sum(max(m["generated_tokens"] - 1, 0) for m in runs)
                             / max(sum(m["rounds"] for m in runs), 1)),
        "fallback_rounds": sum(m["fallback_rounds"] for m in runs),
        "draft_misses": sum(m["draft_misses"] for m in runs),
        "rounds": sum(m["rounds"] for m in runs),
        "time_to_first_token": _median([m["time_to_first_token"] for m in runs]),
        "time_per_output_token": _median([m["time_per_output_token"] for m in runs]),
        "inter_chunk_gap_p50": _percentile(gaps, 50),
        "inter_chunk_gap_p95": _percentile(gaps, 95),
        "inter_chunk_gap_p99": _percentile(gaps, 99),
        "round_latency_p50": _median([m["round_latency_p50"] for m in runs]),
        "round_latency_p95": _median([m["round_latency_p95"] for m in runs]),
        "draft_seconds": sum(m["draft_seconds"] for m in runs),
        "verify_seconds": sum(m["verify_seconds"] for m in runs),
        "total_seconds": sum(m["total_seconds"] for m in runs),
        "exact_match_with_plain": len(prompt_results) - len(mismatches),
        "mismatched_prompts": mismatches,
        "exact": all(m.get("exact") for m in runs),  # every run's target calls stayed on one numeric path
        "pad_rows": sum(m.get("pad_rows", 0) for m in runs),  # rows computed only for invariance
        "pad_guesses_accepted": sum(m.get("pad_guesses_accepted", 0) for m in runs),  # tokens they gained
        "token_shares": _token_shares(runs),
    }
    constrained = [c for result in prompt_results.values() for c in result.get("constraint", [])]
    if constrained:
        generated = sum(m["generated_tokens"] for m in runs)
        forced = sum(c["forced_tokens"] for c in constrained)
        forced_accepted = sum(c["forced_accepted"] for c in constrained)
        summary.update({
            "forced_tokens": forced,
            "forced_accepted": forced_accepted,
            "forced_share": forced_accepted / generated if generated else None,  # output tokens the grammar drafted
            "forced_acceptance": forced_accepted / forced if forced else None,
            "mask_seconds": sum(c["mask_seconds"] for c in constrained),
            "schema_valid_runs": sum(v for result in prompt_results.values() for v in result["valid"]),
            "finish_reasons": dict(Counter(r for result in prompt_results.values() for r in result["finish_reasons"])),
        })
    if spec.prediction:  # OpenAI's usage fields, summed over the runs
        summary.update({key: sum(m.get(key, 0) for m in runs) for key in (
            "prediction_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens")})
    if spec.draft != "none" or spec.prediction:
        summary["predicted"] = predicted_speedup(runs, plain_runs, spec.width)
        summary["costs"] = drafter_costs(runs, plain_runs)
    return summary


def _token_shares(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per drafter that proposed rounds (a composite's parts): its accepted tokens as a share of the generated
    tokens, and its acceptance rate."""
    generated = sum(m["generated_tokens"] for m in runs)
    totals: dict[str, list[int]] = {}
    for m in runs:
        for name, counts in m.get("source_tokens", {}).items():
            total = totals.setdefault(name, [0, 0])
            total[0] += counts["drafted"]
            total[1] += counts["accepted"]
    return {name: {"share": accepted / generated if generated else 0.0,
                   "acceptance": accepted / drafted if drafted else None}
            for name, (drafted, accepted) in sorted(totals.items())}


def drafter_costs(runs: list[dict], plain_runs: list[dict]) -> dict[str, Any] | None:
    """What one drafted token and one verification call cost, in target steps. The unit is the plain run's
    per-token time: its verify seconds / rounds (one single-token target call per round). Measured for every
    width (auto included) and drafter, unlike `predicted`. A draft model's catch-up (reading the prompt, or
    the tokens of plain rounds, before it can propose) is not a drafted token's cost: it is reported apart,
    per run."""
    plain_rounds = sum(r["rounds"] for r in plain_runs)
    if not plain_rounds:
        return None
    step = sum(r["verify_seconds"] for r in plain_runs) / plain_rounds
    drafted = sum(r["drafted_tokens"] for r in runs)
    rounds = sum(r["rounds"] for r in runs)
    drafting = sum(r["draft_seconds"] - r.get("draft_catchup_seconds", 0.0) for r in runs)
    draft_cost = drafting / drafted if drafted else None
    verify_cost = sum(r["verify_seconds"] for r in runs) / rounds if rounds else None
    catch_up = sum(r.get("draft_catchup_seconds", 0.0) for r in runs) / len(runs) if runs else None
    return {"target_step_seconds": step, "draft_seconds_per_token": draft_cost,
            "draft_cost_vs_target_step": draft_cost / step if draft_cost is not None and step else None,
            "catch_up_seconds_per_run": catch_up,
            "verify_seconds_per_call": verify_cost,
            "verify_cost_vs_target_step": verify_cost / step if verify_cost is not None and step else None}


def machine_info() -> dict[str, Any]:
    """CPU model, ISA features (avx2, avx512f, avx512_vnni, amx...), cores, OS, Python, onnxruntime, spectrt."""
    from spectrt.runtime.machine import machine_facts

    facts = machine_facts()
    return {"platform": facts["platform"], "machine": facts["arch"], "python": facts["python"], "cpus": facts["cpus"],
            "spectrt": __version__, "onnxruntime": facts["onnxruntime"], "cpu": facts["cpu"], "isa": facts["isa"]}


def _identical_counts(results: dict[str, Any]) -> dict[str, Any]:
    """Speculative configurations' outputs identical to plain decoding, over every workload: {identical, runs}."""
    identical = runs = 0
    for data in results["workloads"].values():
        for summary in data["summaries"]:
            if summary["config"] not in ("plain", "plain-unshaped"):
                identical += summary["exact_match_with_plain"]
                runs += summary["prompts"]
    return {"identical": identical, "runs": runs}


def load_schemas(name_or_path: str) -> dict[str, Any]:
    """prompt id -> JSON schema for the records of a workload that carry one (`schema`)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = WORKLOAD_DIR / f"{name_or_path}.jsonl"
    schemas = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if "schema" in record:
                schemas[str(record.get("id", f"{path.stem}-{number}"))] = record["schema"]
    return schemas


def schema_valid(text: str, schema: Any) -> bool:
    """The output parses as JSON and validates against its schema."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def run_benchmark(config: BenchConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every workload x configuration, return the full results dict (see report.write_report)."""
    from spectrt.runtime.generator import Generator

    check_peers_installed(config)  # an explicitly asked-for peer that cannot run is refused before any work
    generator = Generator(config.bundle, threads=config.threads, invariance=config.invariance)
    if config.quality:
        check_quality_source(config, generator.manifest.raw)
    say(f"exactness on this machine: {generator.invariance.summary()}")
    has_head = generator.head is not None
    shaped = generator.target is not getattr(generator.target, "inner", generator.target)
    run_specs(config, generator.built_widths, generator.draft is not None, has_head=has_head)  # refuse bad ones first
    workloads = {name: load_workload(name, config.prompts) for name in config.workloads}
    schemas = {name: load_schemas(name) for name in config.workloads}
    specs_of = {name: run_specs(config, generator.built_widths, generator.draft is not None, bool(schemas[name]),
                                has_head, shaped, any(p.prediction for p in workloads[name]))
                for name in workloads}
    say(f"bundle {config.bundle}: " + "; ".join(f"{name}: {len(specs)} configurations ({', '.join(s.label for s in specs)})"
                                                 for name, specs in specs_of.items())
        + f"; {sum(len(p) for p in workloads.values())} prompts, {config.repeats} repeats, {config.max_new_tokens} tokens")
    started = time.perf_counter()
    results: dict[str, Any] = {"workloads": {}}
    plain_ids: dict[str, dict[str, list[int]]] = {}  # workload -> prompt id -> spectrt plain tokens
    plain_sequences: dict[str, list[tuple[list[int], list[int]]]] = {}  # workload -> [(prompt ids, plain output)]
    measured: dict[str, list[Prompt]] = {}  # workload -> the prompts measured (a session: each of its turns)
    for workload, prompts in workloads.items():
        specs = specs_of[workload]

        def request(prompt: Prompt) -> dict[str, Any]:
            schema = schemas[workload].get(prompt.id)
            return prompt.request() | ({"json_schema": schema} if schema is not None else {})

        per_spec: dict[str, dict[str, dict]] = {s.label: {} for s in specs}
        measured[workload] = []

        def record_run(per_prompt: dict[str, dict], prompt: Prompt, result) -> None:
            entry = per_prompt.setdefault(prompt.id, {"token_ids": result.token_ids,
                                                      "prompt_token_ids": result.prompt_token_ids,
                                                      "metrics": [], "gaps": [], "repeats_identical": True})
            entry["repeats_identical"] &= result.token_ids == entry["token_ids"]
            entry["metrics"].append(result.metrics.to_json())
            entry["gaps"].extend(result.metrics.delivery_gaps)
            if result.constraint is not None:
                entry.setdefault("constraint", []).append(result.constraint.to_json())
                entry.setdefault("valid", []).append(schema_valid(result.text, schemas[workload][prompt.id]))
                entry.setdefault("finish_reasons", []).append(result.finish_reason)

        def run(spec: RunSpec, prompt: Prompt, partition: str):
            predicted = {"prediction": prompt.prediction} if spec.prediction and prompt.prediction else {}
            with generator.unshaped() if spec.unshaped else contextlib.nullcontext():
                return generator.generate(**request(prompt), max_new_tokens=config.max_new_tokens, draft=spec.draft,
                                          width=spec.width, reuse_prefix=config.reuse_prefix,
                                          suffix_cache=spec.suffix_cache,
                                          suffix_cache_key=f"{workload}/{spec.label}/{partition}", **predicted)

        for _ in range(config.warmup):  # warm caches, sessions and the auto scheduler's cost model
            for spec in specs:
                run(spec, prompts[0], "warm-up")
        for repeat in range(config.repeats):
            for session in prompts:
                answers: list[str] = []  # a session's turns follow plain decoding's answers (greedy: everyone's)
                for number in range(1, session.turns + 1):
                    prompt = session.turn(number, answers)
                    for spec in specs:
                        result = run(spec, prompt, f"repeat {repeat}")
                        if spec.label == "plain":
                            answers.append(result.text)
                        record_run(per_spec[spec.label], prompt, result)
                    if repeat == 0:
                        measured[workload].append(prompt)
                    say(f"  {workload} {prompt.id} repeat {repeat + 1}: " + ", ".join(
                        f"{s.label} {per_spec[s.label][prompt.id]['metrics'][-1]['tokens_per_second'] or 0:.1f}"
                        for s in specs) + " tok/s")
        summaries = [summarize(s, per_spec[s.label], per_spec["plain"]) for s in specs]
        plain_ids[workload] = {pid: r["token_ids"] for pid, r in per_spec["plain"].items()}
        plain_sequences[workload] = [(r["prompt_token_ids"], r["token_ids"]) for r in per_spec["plain"].values()]
        results["workloads"][workload] = {
            "summaries": summaries,
            "per_prompt": {label: {pid: {"metrics": r["metrics"], "tokens": len(r["token_ids"]),
                                         **({"constraint": r["constraint"], "valid": r["valid"],
                                             "finish_reasons": r["finish_reasons"]} if "constraint" in r else {})}
                                   for pid, r in prompts_.items()} for label, prompts_ in per_spec.items()},
            "inter_chunk_gaps": {label: [gap for r in prompts_.values() for gap in r["gaps"]]
                          for label, prompts_ in per_spec.items()},
        }
        if schemas[workload]:
            results["workloads"][workload]["constrained"] = "json_schema"
        if any(p.tool_results for p in prompts):
            results["workloads"][workload]["turns"] = turn_table(per_spec)
    results["config"] = asdict(config)
    results["bundle"] = {"name": generator.manifest.name, "widths": list(generator.built_widths),
                         "target": generator.manifest.raw["models"]["target"]["source"]["name"],
                         "draft": (generator.manifest.raw["models"]["draft"]["source"]["name"]
                                   if generator.draft is not None else None),
                         "precision": generator.manifest.target.precision,
                         "quantization": {role: (generator.manifest.raw["models"][role].get("quantization") or {})
                                          .get("scheme", "none") for role in generator.manifest.raw["models"]}}
    if generator.manifest.head is not None:
        results["draft_head"] = draft_head_facts(generator.manifest.head.raw, workloads)
    results["machine"] = machine_info()
    results["exactness"] = generator.invariance.to_json()
    results["exactness"]["identical_to_plain"] = _identical_counts(results)
    results["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["command"] = " ".join(sys.argv)
    generator.close()  # its sessions and caches are freed before the peers load their models
    if config.quality:
        results["quality"] = run_quality(config, plain_sequences, say)
    unconstrained = {name: measured[name] for name in workloads if not schemas[name]}
    peers = run_peers(config, unconstrained, results["bundle"], say) if unconstrained else {}
    if peers:  # the peers generate without constraints: unconstrained workloads only
        results["peers"] = peers
        add_llamacpp_ratios(results, plain_ids)
    return results


def check_quality_source(config: BenchConfig, manifest_raw: dict[str, Any]) -> None:
    """--quality needs the target's source model (the reference); refused before any work when it is not found."""
    from spectrt.quality import QualityError
    from spectrt.quality.reference import resolve_source
    from spectrt.quality.texts import load_text

    try:
        for text in config.quality_texts:
            load_text(text)
        resolve_source(manifest_raw, config.quality_source)
    except QualityError as exc:
        raise ConfigError(f"--quality: {exc}") from None


def run_quality(config: BenchConfig, sequences: dict[str, list[tuple[list[int], list[int]]]],
                say: Callable[[str], None]) -> dict[str, Any]:
    """The target's quality against its source in fp32 (spectrt.quality.evaluate), on the held-out texts and on
    every workload's prompts followed by their plain outputs; llama.cpp on the same GGUF beside it when the
    llama.cpp peer is asked for and installed. A failure is recorded, never lets the speed results go."""
    from spectrt.quality.evaluate import EvalConfig, evaluate, format_table, json_default

    say("quality: the target against its source in fp32" + (f", texts {', '.join(config.quality_texts)}"
                                                            if config.quality_texts else "")
        + f", workloads {', '.join(sequences)}")
    try:
        quality = evaluate(EvalConfig(bundle=config.bundle, texts=config.quality_texts, tokens=config.quality_tokens,
                                      llamacpp=config.peer in ("auto", "llamacpp", "all"),
                                      source=config.quality_source, threads=config.threads),
                           say=lambda m: say(f"  quality: {m}"), sequences=sequences)
    except Exception as exc:  # after the speed runs, a failed quality pass must not lose them
        say(f"quality failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}
    say(format_table(quality))
    return json.loads(json.dumps(quality, default=json_default))


def check_peers_installed(config: BenchConfig) -> None:
    """--peer transformers/llamacpp/all need those peers installed; auto only runs what is there."""
    from .llamacpp_peer import INSTALL_HINT, llamacpp_available
    from .peer import peer_available

    if config.peer in ("transformers", "all") and not peer_available():
        raise ConfigError(f"--peer {config.peer} needs torch and transformers (pip install 'spectrt[build]'); "
                          "or use --peer auto to run only the installed peers.")
    if config.peer in ("llamacpp", "all") and not llamacpp_available():
        raise ConfigError(f"--peer {config.peer} needs llama-cpp-python ({INSTALL_HINT}); "
                          "or use --peer auto to run only the installed peers.")


def run_peers(config: BenchConfig, workloads: dict[str, list[Prompt]], bundle: dict[str, Any],
              say: Callable[[str], None]) -> dict[str, Any]:
    """peer name -> its results, each peer in a fresh process (its own memory and threads); a peer that
    cannot run is skipped with one line saying why."""
    requests = {name: [p.request() | {"id": p.id} for p in prompts] for name, prompts in workloads.items()}
    runners = {"transformers": run_transformers, "llamacpp": run_llamacpp}
    peers = {}
    for name in config.peers:
        try:
            result = runners[name](config, requests, bundle, say)
        except Exception as exc:  # a peer's crash must not lose the spectrt measurements taken before it
            say(f"{name} peer failed: {type(exc).__name__}: {exc}")
            continue
        if result is not None:
            peers[name] = result
    return peers


def _in_own_process(function: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()


def run_transformers(config: BenchConfig, requests: dict[str, list[dict]], bundle: dict[str, Any],
                     say: Callable[[str], None]) -> dict[str, Any] | None:
    """transformers `generate`, plain and with `assistant_model` (code workload only: it is slow)."""
    from .peer import peer_available, resolve_peer_models, run_transformers_peer

    if not peer_available():
        say("transformers peer skipped: torch and transformers are not installed (pip install 'spectrt[build]')")
        return None
    try:
        models = resolve_peer_models(config, bundle)
    except FetchError as exc:
        say(f"transformers peer skipped: {exc}")
        return None
    if models is None:
        say("transformers peer skipped: the bundle's source models are not known names "
            "(pass --peer-target/--peer-draft)")
        return None
    say(f"transformers peer: generate on {models[0]} (+ {models[1]} as assistant)")
    return _in_own_process(run_transformers_peer, models[0], models[1], bundle_dir=config.bundle, requests=requests,
                           max_new_tokens=config.max_new_tokens, repeats=config.repeats, threads=config.threads)


def run_llamacpp(config: BenchConfig, requests: dict[str, list[dict]], bundle: dict[str, Any],
                 say: Callable[[str], None]) -> dict[str, Any] | None:
    """llama.cpp (llama-cpp-python) on the bundle's GGUF files: plain, prompt lookup, and a draft GGUF if known."""
    from .llamacpp_peer import INSTALL_HINT, llamacpp_available, resolve_llamacpp_models, run_llamacpp_peer

    if not llamacpp_available():
        say(f"llama.cpp peer skipped: llama-cpp-python is not installed ({INSTALL_HINT})")
        return None
    try:
        target, draft = resolve_llamacpp_models(config, bundle)
    except FetchError as exc:  # after hours of spectrt runs, a bad --peer-target must not lose their results
        say(f"llama.cpp peer skipped: {exc}")
        return None
    if target is None:
        say(f"llama.cpp peer skipped: the bundle's target `{bundle.get('target')}` is not a known GGUF model "
            "(pass --peer-target FILE.gguf)")
        return None
    say(f"llama.cpp peer: llama-cpp-python on {target}" + (f" (+ {draft} as draft model)" if draft else "")
        + f", workloads {', '.join(requests)}")
    result = _in_own_process(run_llamacpp_peer, target, draft, bundle_dir=config.bundle, requests=requests,
                             max_new_tokens=config.max_new_tokens, repeats=config.repeats, threads=config.threads,
                             warmup=config.warmup)
    for workload, data in result["workloads"].items():
        say(f"  llama.cpp {workload}: " + ", ".join(f"{s['mode']} {s['tokens_per_second'] or 0:.1f}"
                                                   for s in data["summaries"]) + " tok/s")
    return result


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def _by_turn(per_prompt: dict[str, dict], value: Callable[[str, dict], float | None]) -> dict[str, float | None]:
    """turn number -> median over the sessions of `value(prompt id, result)` for that turn ('<session>/turn<n>')."""
    by_turn: dict[int, list[float | None]] = {}
    for pid, result in per_prompt.items():
        session, _, number = pid.rpartition("/turn")
        if session and number.isdigit():
            by_turn.setdefault(int(number), []).append(value(pid, result))
    return {str(number): _median([v for v in values if v is not None]) for number, values in sorted(by_turn.items())}


def _decode_speed(result: dict) -> float | None:
    """A prompt's decode tokens/s: the median over its runs."""
    return _median([m["tokens_per_second"] for m in result["metrics"]])


def turn_table(per_spec: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """A multi-turn workload turn by turn, per configuration: decode tokens/s (median over repeats, then over the
    sessions) and its ratio to plain decoding's on the same turn (median over the sessions)."""
    plain = per_spec["plain"]
    return {
        "tokens_per_second": {label: _by_turn(prompts, lambda pid, r: _decode_speed(r))
                              for label, prompts in per_spec.items()},
        "speedup_vs_plain": {label: _by_turn(prompts, lambda pid, r: _ratio(_decode_speed(r), _decode_speed(plain[pid])))
                             for label, prompts in per_spec.items()},
    }


def add_llamacpp_ratios(results: dict[str, Any], spectrt_plain_ids: dict[str, dict[str, list[int]]]) -> None:
    """Each spectrt configuration's summary gains decode tok/s and TTFT relative to llama.cpp plain decoding:
    the median over the workload's prompts of the per-prompt ratio (same prompts, same token ids). Each
    llama.cpp mode's summary gains its decode tok/s relative to spectrt plain and how many of its outputs
    equal spectrt plain decoding's (llama.cpp computes with its own quantized kernels: they need not be equal)."""
    peer = results.get("peers", {}).get("llamacpp")
    if not peer:
        return
    for workload, measured in peer["workloads"].items():
        reference = {pid: modes["plain"] for pid, modes in measured["per_prompt"].items()}
        data = results["workloads"][workload]
        for summary in data["summaries"]:
            prompts = {pid: r for pid, r in data["per_prompt"][summary["config"]].items() if pid in reference}
            summary["decode_vs_llamacpp_plain"] = _median([
                _ratio(_decode_speed(r), reference[pid]["tokens_per_second"])
                for pid, r in prompts.items()])
            summary["ttft_vs_llamacpp_plain"] = _median([
                _ratio(_median([m["time_to_first_token"] for m in r["metrics"]]), reference[pid]["time_to_first_token"])
                for pid, r in prompts.items()])
        if "turns" in data:  # a multi-turn workload: the ratio turn by turn, and llama.cpp's own speed
            data["turns"]["vs_llamacpp_plain"] = {
                label: _by_turn({pid: r for pid, r in prompts.items() if pid in reference},
                                lambda pid, r: _ratio(_decode_speed(r), reference[pid]["tokens_per_second"]))
                for label, prompts in data["per_prompt"].items()}
            data["turns"]["llamacpp_plain_tokens_per_second"] = _by_turn(
                reference, lambda pid, r: r["tokens_per_second"])
        spectrt_plain = {pid: _decode_speed(r) for pid, r in data["per_prompt"]["plain"].items()}
        for summary in measured["summaries"]:
            rows = {pid: modes[summary["mode"]] for pid, modes in measured["per_prompt"].items()}
            summary["decode_vs_spectrt_plain"] = _median([_ratio(r["tokens_per_second"], spectrt_plain.get(pid))
                                                          for pid, r in rows.items()])
            summary["equals_spectrt_plain"] = sum(r["token_ids"] == spectrt_plain_ids[workload].get(pid)
                                                  for pid, r in rows.items())
