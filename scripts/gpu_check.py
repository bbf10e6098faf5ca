"""Check every executor this machine can run against the CPU reference, and time it; one JSON file out.

Per executor (onnxruntime CPU reference, cpu-planned, ONNX Runtime CUDA, TensorRT):
- exactness: greedy output of each prompt, for every drafter (model, ngram) and width (0, each built
  one, auto), compared token for token with the executor's own plain greedy decoding (must be equal:
  the product's promise) and with the CPU reference (reported: other kernels may flip a near-tie);
  the first step's logits compared with the reference's (max |difference|, within a tolerance: 1e-3
  for fp32, 0.25 for fp16 graphs and engines);
- row-count invariance: which call row counts give a row the same logits on this executor (on TensorRT the
  prefill profile against every verify_k profile), measured by the runtime at load, and the call shaping it uses
  (`invariance`; an executor with no agreeing counts fails the check);
- speed: plain and speculative decode tokens/s (median over prompts, after a warm-up run).
An executor that cannot run here is listed with the reason. Nothing is claimed for an executor that
did not run.

    python scripts/gpu_check.py --bundle BUNDLE --out gpu_check.json
    python scripts/gpu_check.py --tiny --out gpu_check.json    # builds a tiny random bundle first (needs torch)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

PROMPTS = ["def fibonacci(n):", "The capital of France is", "a b a b a b a b a b",
           "Write a list of three colours: red, green,"]


def _executors() -> list[tuple[str, dict]]:
    return [("onnxruntime-cpu", {"provider": "cpu"}), ("cpu-planned", {"provider": "cpu-planned"}),
            ("onnxruntime-cuda", {"provider": "cuda"}), ("tensorrt", {"backend": "tensorrt"})]


def _first_logits(generator, prompt: str) -> np.ndarray:
    ids = generator.encode(prompt, None, None)
    generator.target.reset()
    logits = np.array(generator.target.step(np.asarray(ids, np.int64))[-1], np.float64)
    generator.target.reset()
    return logits


def _tokens_per_second(generator, prompt: str, max_new_tokens: int, **options) -> float:
    result = generator.generate(prompt, max_new_tokens=max_new_tokens, **options)
    m = result.metrics
    decode_seconds = m.total_seconds - m.prefill_seconds
    return (m.generated_tokens - 1) / decode_seconds if decode_seconds > 0 and m.generated_tokens > 1 else 0.0


def check(bundle: Path, max_new_tokens: int, bench_tokens: int) -> dict:
    from spectrt.runtime.generator import Generator

    reference = Generator(bundle, provider="cpu")
    widths = [0, *reference.built_widths, "auto"]
    drafts = ["model", "ngram"] if reference.draft is not None else ["ngram"]
    expected = {(d, str(w), p): reference.generate(p, max_new_tokens=max_new_tokens, draft=d, width=w).token_ids
                for d in drafts for w in widths for p in PROMPTS}
    reference_logits = {p: _first_logits(reference, p) for p in PROMPTS}
    precision = reference.manifest.target.precision
    tolerance = 1e-3 if precision == "fp32" else 0.25  # the same graph on other kernels (fp16: 10 bits of mantissa)
    report = {"bundle": str(bundle), "precision": precision, "widths": [str(w) for w in widths], "drafts": drafts,
              "prompts": PROMPTS, "max_new_tokens": max_new_tokens, "executors": {}}
    for name, options in _executors():
        entry: dict = {}
        report["executors"][name] = entry
        try:
            generator = Generator(bundle, **options)
        except Exception as exc:  # not available here: say why
            entry.update(ran=False, reason=" ".join(str(exc).split())[:400])
            print(f"{name}: not run ({entry['reason'][:160]})", flush=True)
            continue
        try:
            entry["ran"] = True
            entry["decoder"] = type(getattr(generator.target, "inner", generator.target)).__name__
            # which row counts give a row the same logits on this executor (TensorRT: the prefill profile against
            # the verify_k profiles), measured when the Generator loaded, and the call shaping in use
            entry["invariance"] = generator.invariance.to_json()
            print(f"{name}: {generator.invariance.summary()}", flush=True)
            executor = getattr(generator.target, "executor", None)
            entry["executor"] = getattr(executor, "name", "onnxruntime-host-cache")
            mismatches, inexact = [], []
            own_plain = {p: generator.generate(p, max_new_tokens=max_new_tokens, draft="none").token_ids
                         for p in PROMPTS}
            for (draft, width, prompt), tokens in expected.items():
                got = generator.generate(prompt, max_new_tokens=max_new_tokens, draft=draft,
                                         width=width if width == "auto" else int(width)).token_ids
                if got != tokens:
                    mismatches.append({"draft": draft, "width": width, "prompt": prompt,
                                       "first_difference": _first_difference(got, tokens)})
                if got != own_plain[prompt]:
                    inexact.append({"draft": draft, "width": width, "prompt": prompt,
                                    "first_difference": _first_difference(got, own_plain[prompt])})
            entry["greedy_runs"] = len(expected)
            # the product's promise: speculative output = this executor's own plain greedy output
            entry["greedy_identical_to_own_plain"] = len(expected) - len(inexact)
            entry["not_identical_to_own_plain"] = inexact
            # and the same tokens as the CPU reference (other kernels: a near-tie may flip; see the logits)
            entry["greedy_identical_to_cpu_reference"] = len(expected) - len(mismatches)
            entry["differs_from_cpu_reference"] = mismatches
            diffs = [float(np.max(np.abs(_first_logits(generator, p) - reference_logits[p]))) for p in PROMPTS]
            entry["max_abs_logit_difference"] = max(diffs)
            entry["logits_within_tolerance"] = max(diffs) <= tolerance
            entry["logit_tolerance"] = tolerance
            speed = {}
            for config, options_ in (("plain", {"draft": "none"}), ("model@auto", {"draft": "model", "width": "auto"}),
                                     ("ngram@auto", {"draft": "ngram", "width": "auto"})):
                if options_["draft"] == "model" and generator.draft is None:
                    continue
                _tokens_per_second(generator, PROMPTS[0], bench_tokens, **options_)  # warm-up
                speed[config] = statistics.median(_tokens_per_second(generator, p, bench_tokens, **options_)
                                                  for p in PROMPTS)
            entry["decode_tokens_per_second"] = speed
            print(f"{name}: {entry['greedy_identical_to_own_plain']}/{entry['greedy_runs']} greedy runs identical "
                  f"to its plain decoding, {entry['greedy_identical_to_cpu_reference']} to the CPU reference, "
                  f"max |logit diff| {entry['max_abs_logit_difference']:.3g}, tok/s {speed}", flush=True)
        except Exception as exc:
            entry.update(error=" ".join(str(exc).split())[:800], traceback=traceback.format_exc()[-3000:])
            print(f"{name}: FAILED: {entry['error'][:300]}", flush=True)
    return report


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tiny_bundle(out: Path) -> Path:
    """A tiny random-weight pair built here (needs the build extra: torch, transformers, onnx)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import make_model

    from spectrt.compiler.build import build_bundle
    from spectrt.compiler.config import BuildConfig
    from spectrt.compiler.progress import Progress

    target = make_model(out / "target", "llama", layers=3, seed=1)
    draft = make_model(out / "draft", "llama", layers=1, hidden=32, heads=2, kv_heads=1, seed=2)
    bundle = out / "bundle"
    build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(1, 2, 3, 5), max_context=256,
                             out=str(bundle)), progress=Progress(quiet=True))
    return bundle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a built bundle (ONNX, and TensorRT engines if any)")
    parser.add_argument("--tiny", action="store_true", help="build a tiny random bundle first (into --work)")
    parser.add_argument("--work", type=Path, default=Path("gpu_check_work"))
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--bench-tokens", type=int, default=64)
    parser.add_argument("--build-only", action="store_true", help="with --tiny: build, print the bundle path, stop")
    parser.add_argument("--require", default="", help="comma-separated executors that must run and be exact "
                                                      "(exit 1 otherwise), e.g. onnxruntime-cuda,tensorrt")
    args = parser.parse_args()
    start = time.perf_counter()
    bundle = args.bundle if args.bundle else tiny_bundle(args.work) if args.tiny else None
    if bundle is None:
        parser.error("give --bundle or --tiny")
    if args.build_only:
        print(bundle)
        return 0
    report = check(bundle, args.max_new_tokens, args.bench_tokens)
    from spectrt.runtime.machine import machine_facts

    report["machine"] = {**machine_facts(), "platform": platform.platform(), "python": platform.python_version(),
                         "gpu": _gpu_name()}
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['seconds']} s)")
    failed = []
    for name, entry in report["executors"].items():
        if entry.get("error") or (entry.get("ran") and (
                entry["greedy_identical_to_own_plain"] != entry["greedy_runs"] or not entry["logits_within_tolerance"]
                or not entry["invariance"]["exact"])):
            failed.append(name)
    for name in filter(None, args.require.split(",")):
        if not report["executors"].get(name, {}).get("ran"):
            failed.append(f"{name} (required, did not run)")
    if failed:
        print("FAILED: " + ", ".join(failed))
        return 1
    return 0


def _gpu_name() -> str | None:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
