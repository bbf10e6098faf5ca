#!/usr/bin/env python
"""One linear layer of Qwen2.5-1.5B's shapes on onnxruntime CPU: GGUF blocks held as stored
(compiler/gguf_blocks.py) against today's re-quantized int4 (issue 19).

    .venv/bin/python scripts/gguf_linear_bench.py /tmp/gguf_linear_bench.json [--runs 300] [--threads 2]

Variants (MatMulNBits accuracy level 4 = int8 activations; weights are random codes in each layout,
kernel speed does not depend on their values):
  a  int4-zp          today's recipe: 4-bit blocks of 32, uint8 zero points
  b  q4k-f32corr      Q4_K held: 4-bit codes, zero point 0, + fp32 correction MatMul over 32-element block sums
  b0 q4k-nocorr       the same MatMulNBits without the correction (what the correction costs = b - b0)
  bf q4k-fold-f32corr Q4_K with the zero point folded into the correction (default zero point 8, no zp input)
  c  q4k-f16corr      as b, correction stored fp16 (Cast -> fp16 MatMul -> Cast)
  d  q6k-int8-b16     Q6_K held: 8-bit codes, blocks of 16, default zero point
  e  int8-b32         Q8_0 / Q5_0 held: 8-bit codes, blocks of 32, default zero point
Runs are interleaved (one call of each variant per round) and the median of each is reported; the
machine may be shared, so compare ratios within one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from spectrt.compiler.gguf_blocks import LAYOUTS, BlockWeight, block_weight_from_raw, onnx_linear
from spectrt.errors import ModelLoadError

SHAPES = ((1536, 8960), (8960, 1536))  # (K, N): ffn_gate/up and ffn_down of Qwen2.5-1.5B
ROWS = (1, 4)
FP16_FIELDS = {"Q4_K": (0, 4), "Q6_K": (208, 210), "Q8_0": (0, 2)}  # byte ranges holding fp16 d (, dmin)


def random_raw(qtype: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in a GGUF type's layout with sane fp16 scale fields."""
    _, _, type_size, per_block = LAYOUTS[qtype]
    blocks = rng.integers(0, 256, (n * k // per_block, type_size), dtype=np.uint8)
    lo, hi = FP16_FIELDS[qtype]
    blocks[:, lo:hi] = rng.uniform(1e-4, 1e-2, (blocks.shape[0], (hi - lo) // 2)).astype(np.float16).view(np.uint8)
    return blocks.reshape(n, -1)


def todays_int4(n: int, k: int, rng: np.random.Generator) -> BlockWeight:
    """Today's layout (onnx_graph.quantize_blockwise): 4-bit codes, blocks of 32, packed uint8 zero points."""
    blocks = k // 32
    packed = rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8)
    zeros = rng.integers(0, 256, n * -(-blocks // 2), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, (n, blocks)).astype(np.float32)
    return BlockWeight("int4", n, k, 4, 32, packed, scales, zeros, None)


def variants(k: int, n: int, rng: np.random.Generator) -> dict[str, tuple[BlockWeight, type]]:
    q4k_raw = random_raw("Q4_K", n, k, rng)
    q4k = block_weight_from_raw(q4k_raw, "Q4_K", n, k)
    try:
        q4k_fold = block_weight_from_raw(q4k_raw, "Q4_K", n, k, fold_offset=True)
    except ModelLoadError:  # random sub-scales can make the fold inexact: bench it anyway (speed does not care)
        q4k_fold = BlockWeight("Q4_K", n, k, 4, 32, q4k.packed, q4k.scales, None, q4k.correction)
    no_corr = BlockWeight("Q4_K", n, k, 4, 32, q4k.packed, q4k.scales, q4k.zero_points, None)
    return {
        "a int4-zp": (todays_int4(n, k, rng), np.float32),
        "b q4k-f32corr": (q4k, np.float32),
        "b0 q4k-nocorr": (no_corr, np.float32),
        "bf q4k-fold-f32corr": (q4k_fold, np.float32),
        "c q4k-f16corr": (q4k, np.float16),
        "d q6k-int8-b16": (block_weight_from_raw(random_raw("Q6_K", n, k, rng), "Q6_K", n, k), np.float32),
        "e int8-b32": (block_weight_from_raw(random_raw("Q8_0", n, k, rng), "Q8_0", n, k), np.float32),
    }


def session(weight: BlockWeight, correction_dtype: type, threads: int) -> ort.InferenceSession:
    nodes, inits = onnx_linear(weight, "x", "y", "w", accuracy_level=4, rank=2, correction_dtype=correction_dtype)
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight.n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def weight_bytes(weight: BlockWeight, correction_dtype: type) -> int:
    total = weight.packed.nbytes + weight.scales.nbytes
    total += 0 if weight.zero_points is None else weight.zero_points.nbytes
    total += 0 if weight.correction is None else weight.correction.size * np.dtype(correction_dtype).itemsize
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_out")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = []
    for k, n in SHAPES:
        built = variants(k, n, rng)
        sessions = {name: session(w, dt, args.threads) for name, (w, dt) in built.items()}
        for rows in ROWS:
            x = rng.standard_normal((rows, k)).astype(np.float32)
            for s in sessions.values():
                for _ in range(args.warmup):
                    s.run(None, {"x": x})
            times = {name: [] for name in sessions}
            for _ in range(args.runs):  # interleaved: one call of each variant per round
                for name, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, {"x": x})
                    times[name].append(time.perf_counter() - start)
            base = float(np.median(times["a int4-zp"]))
            for name, t in times.items():
                median = float(np.median(t))
                weight, dt = built[name]
                results.append({"variant": name, "k": k, "n": n, "rows": rows, "median_ms": median * 1e3,
                                "p10_ms": float(np.percentile(t, 10)) * 1e3, "p90_ms": float(np.percentile(t, 90)) * 1e3,
                                "vs_today": median / base, "weight_mb": weight_bytes(weight, dt) / 1e6})
            print(f"\nK={k} N={n} rows={rows} ({args.runs} interleaved runs, {args.threads} threads, level 4)")
            print(f"  {'variant':22s} {'median ms':>9s} {'p10':>7s} {'p90':>7s} {'x today':>8s} {'weights MB':>10s}")
            for r in results[-len(times):]:
                print(f"  {r['variant']:22s} {r['median_ms']:9.3f} {r['p10_ms']:7.3f} {r['p90_ms']:7.3f} "
                      f"{r['vs_today']:8.2f} {r['weight_mb']:10.2f}")
    meta = {"onnxruntime": ort.__version__, "machine": platform.processor() or platform.machine(),
            "threads": args.threads, "runs": args.runs, "accuracy_level": 4,
            "note": "interleaved medians; the machine may be shared: compare ratios within one run"}
    with open(args.json_out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
