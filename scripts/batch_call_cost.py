"""What one target call costs with several sequences in it: the ceiling of what batching can win.

Times a target call of n sequences x r rows (each after `--past` cached rows) of a bundle built with --max-batch,
against n separate calls of one sequence, and (with --classic) the one-sequence graph of the same weights, so the
overhead of the batched graph at one sequence is measured too. Medians of --repeats after a warm-up; JSON out.

    python scripts/batch_call_cost.py engines/qwen-coder-cpu-b4 --classic engines/qwen-coder-cpu --out cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from spectrt.bench.runner import machine_info
from spectrt.runtime.backends.onnxruntime_backend import OrtDecoder, OrtOptions
from spectrt.runtime.batching import open_batched_graph
from spectrt.runtime.manifest import read_manifest


def timed(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--classic", type=Path, help="The same weights built with --max-batch 1.")
    parser.add_argument("--past", type=int, default=256)
    parser.add_argument("--rows", default="1,2,4,9", help="Rows per sequence per call.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    manifest = read_manifest(args.bundle)
    entry = manifest.target
    options = OrtOptions(threads=args.threads, provider="cpu")
    graph = open_batched_graph(manifest.file(entry.onnx_path), entry, options, ["CPUExecutionProvider"],
                               entry.batch_slots)
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, entry.logits_vocab, args.past).astype(np.int64)
    for index in range(entry.batch_slots):
        cache = graph.caches[index]
        for start in range(0, args.past, 64):
            graph.run([(index, prefix[start : start + 64])])
            cache.commit(len(prefix[start : start + 64]))
    results = {"bundle": str(args.bundle.name), "past": args.past, "slots": entry.batch_slots, "calls": [],
               "machine": machine_info()}
    for rows in (int(r) for r in args.rows.split(",")):
        tokens = rng.integers(0, entry.logits_vocab, rows).astype(np.int64)
        for sequences in range(1, entry.batch_slots + 1):
            together = timed(lambda: graph.run([(i, tokens) for i in range(sequences)]), args.repeats)
            results["calls"].append({"rows": rows, "sequences": sequences, "seconds": together})
            print(f"{sequences} x {rows} rows: {1e3 * together:7.1f} ms per call, "
                  f"{1e3 * together / sequences:7.1f} ms per sequence")
    if args.classic is not None:
        classic = read_manifest(args.classic).target
        decoder = OrtDecoder(read_manifest(args.classic).file(classic.onnx_path), num_layers=classic.num_layers,
                             kv_heads=classic.num_kv_heads, head_dim=classic.head_dim, precision=classic.precision,
                             max_context=classic.max_context, vocab=classic.logits_vocab, options=options,
                             io=(classic.inputs, classic.outputs), logits_rows=classic.logits_rows)
        for start in range(0, args.past, 64):
            decoder.step(prefix[start : start + 64])
            decoder.commit(len(prefix[start : start + 64]))
        results["classic"] = []
        for rows in (int(r) for r in args.rows.split(",")):
            tokens = rng.integers(0, entry.logits_vocab, rows).astype(np.int64)
            alone = timed(lambda: decoder.step(tokens), args.repeats)
            results["classic"].append({"rows": rows, "seconds": alone})
            print(f"classic graph, 1 x {rows} rows: {1e3 * alone:7.1f} ms per call")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
