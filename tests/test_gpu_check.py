"""scripts/gpu_check.py, the check a GPU machine runs, runs here too: the CPU executors, and one line of reason
for each executor this machine cannot run (so the script cannot rot between GPU sessions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_available_executor_and_says_why_the_others_did_not(tiny_bundle, tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--bundle", str(tiny_bundle),
                             "--out", str(out), "--max-new-tokens", "10", "--bench-tokens", "8",
                             "--require", "onnxruntime-cpu,cpu-planned"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    executors = report["executors"]
    assert set(executors) == {"onnxruntime-cpu", "cpu-planned", "onnxruntime-cuda", "tensorrt"}
    for name in ("onnxruntime-cpu", "cpu-planned"):
        entry = executors[name]
        assert entry["ran"] and entry["greedy_runs"] == 2 * 6 * 4  # drafts x widths (0, 1, 2, 3, 5, auto) x prompts
        assert entry["greedy_identical_to_own_plain"] == entry["greedy_runs"]
        assert entry["greedy_identical_to_cpu_reference"] == entry["greedy_runs"]
        assert entry["max_abs_logit_difference"] == 0.0  # the same kernels on the same machine
        assert set(entry["decode_tokens_per_second"]) == {"plain", "model@auto", "ngram@auto"}
    assert executors["cpu-planned"]["executor"] == "onnxruntime-host"
    for name in ("onnxruntime-cuda", "tensorrt"):
        if not executors[name]["ran"]:  # no GPU here: the reason is given, nothing is claimed
            assert executors[name]["reason"] and "greedy_runs" not in executors[name]
