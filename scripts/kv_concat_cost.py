"""What the graph's concatenation of past and new K/V costs in a one-token step as the past length P grows.

ONNX Runtime (CPU provider) profiling of one model of a bundle: per P, the step time and the share of the
Concat nodes' kernel time in all kernel time.

    python scripts/kv_concat_cost.py BUNDLE [target|draft]
"""
import json, sys, time, os
import numpy as np
import onnxruntime as ort

bundle = sys.argv[1]
role = sys.argv[2] if len(sys.argv) > 2 else "target"
m = json.load(open(f"{bundle}/manifest.json"))
e = m["models"][role]
arch = e["arch"]
L, kv, hd = arch["num_layers"], arch["num_kv_heads"], arch["head_dim"]
results = []
for P in (64, 512, 1024, 2000):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.enable_profiling = True
    so.profile_file_prefix = f"kv_concat_profile_{role}_{P}"
    s = ort.InferenceSession(f"{bundle}/{e['backends']['onnx']['path']}", so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["MatMulScaleFusion"])
    feeds = {"input_ids": np.array([[42]], np.int64)}
    for i in range(L):
        for k in ("key", "value"):
            feeds[f"past_{k}_{i}"] = np.random.randn(1, P, kv, hd).astype(np.float32)
    for _ in range(3):
        s.run(None, feeds)
    t0 = time.perf_counter()
    n = 10
    for _ in range(n):
        s.run(None, feeds)
    wall = (time.perf_counter() - t0) / n
    path = s.end_profiling()
    events = json.load(open(path))
    node = [ev for ev in events if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time")]
    total = sum(ev["dur"] for ev in node)
    concat = sum(ev["dur"] for ev in node if ev["args"].get("op_name") == "Concat")
    results.append({"P": P, "step_ms": round(wall * 1000, 2), "concat_share": round(concat / total, 4),
                    "concat_ms_per_step": round(concat / (n + 3) / 1000, 3)})
    print(results[-1], flush=True)
    os.remove(path)
print(json.dumps(results))
