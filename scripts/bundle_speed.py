#!/usr/bin/env python
"""Decode speed of several bundles of the same target, in one run: which weight scheme costs what.

    .venv/bin/python scripts/bundle_speed.py OUT.json BUNDLE [BUNDLE ...] [--workload code,chat] [--prompts 4]
        [--max-new-tokens 128] [--repeats 3] [--threads 2] [--draft none,ngram]

For every prompt, repeat and configuration (drafter at width auto; `none` is plain decoding) the bundles run one
after the other (interleaved, so a machine that slows down or heats up affects them alike), each prompt prefilled
cold. Reported per bundle and configuration: median tokens/s over all runs, median time per output token, and
whether every output equals that bundle's own plain output (exactness). Outputs of different bundles differ where
their weights do; that is what `spectrt eval` measures. The JSON records the machine (CPU, ISA) and each bundle's
quantization record. Compare numbers within one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from spectrt.runtime.generator import Generator
from spectrt.runtime.machine import machine_facts
from spectrt.workloads import load_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--workload", default="code,chat")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft", default="none,ngram")
    args = parser.parse_args()

    generators = {bundle: Generator(bundle, threads=args.threads) for bundle in args.bundles}
    drafts = args.draft.split(",")
    prompts = [(name, p) for name in args.workload.split(",") for p in load_workload(name, args.prompts)]
    runs: dict[tuple[str, str], list[dict]] = {(b, d): [] for b in generators for d in drafts}
    plain_ids: dict[tuple[str, str], list[int]] = {}

    def run(bundle: str, draft: str, prompt) -> dict:
        result = generators[bundle].generate(**prompt.request(), max_new_tokens=args.max_new_tokens, draft=draft,
                                             width=0 if draft == "none" else "auto", reuse_prefix=False)
        m = result.metrics
        return {"tokens": len(result.token_ids), "seconds": m.total_seconds,
                "tpot": m.time_per_output_token, "ids": result.token_ids, "exact": m.exact}

    for bundle in generators:  # warm-up: sessions, caches and the auto scheduler's costs
        for draft in drafts:
            run(bundle, draft, prompts[0][1])
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for workload, prompt in prompts:
            for draft in drafts:
                for bundle in generators:
                    record = run(bundle, draft, prompt)
                    key = (bundle, f"{workload}/{prompt.id}")
                    if draft == "none":
                        plain_ids.setdefault(key, record["ids"])
                    record["identical_to_plain"] = record["ids"] == plain_ids.get(key)
                    record.pop("ids")
                    runs[(bundle, draft)].append(record)
    summary = {}
    for (bundle, draft), records in runs.items():
        summary.setdefault(bundle, {})[draft] = {
            "tokens_per_second_median": statistics.median(r["tokens"] / r["seconds"] for r in records),
            "tpot_median": statistics.median(r["tpot"] for r in records if r["tpot"] is not None),
            "runs": len(records),
            "all_identical_to_plain": all(r["identical_to_plain"] for r in records),
            "all_exact": all(r["exact"] for r in records)}
    first = args.bundles[0]
    for bundle in generators:
        for draft in drafts:
            entry = summary[bundle][draft]
            entry["speed_vs_first_bundle_same_draft"] = (entry["tokens_per_second_median"]
                                                        / summary[first][draft]["tokens_per_second_median"])
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "settings": vars(args),
        "seconds": round(time.perf_counter() - started, 1),
        "bundles": {b: {"quantization": {role: g.manifest.raw["models"][role].get("quantization")
                                         for role in g.manifest.raw["models"]},
                        "exactness": g.invariance.summary()} for b, g in generators.items()},
        "summary": summary,
    }
    Path(args.out).write_text(json.dumps(results, indent=2))
    for bundle, per_draft in summary.items():
        for draft, entry in per_draft.items():
            print(f"{bundle:40s} {draft:6s} {entry['tokens_per_second_median']:7.2f} tok/s  "
                  f"x{entry['speed_vs_first_bundle_same_draft']:.3f}  identical to plain: "
                  f"{entry['all_identical_to_plain']}  exact: {entry['all_exact']}")


if __name__ == "__main__":
    main()
