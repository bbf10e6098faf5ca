"""`spectrt compile`: TensorRT engines added to an existing ONNX bundle, with TensorRT alone.

The SmolLM2-135M fp16 bundle is exported here (torch), then compiled in a fresh process where torch,
transformers and onnx cannot be imported, as on a Jetson. tensorrt_rtx builds engines without a GPU; no
machine here can run one, so these tests check the build, the recorded profiles, the hashed manifest and
that the bundle is never lost, not execution.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from spectrt.cli import main
from spectrt.compiler.build import build_bundle
from spectrt.compiler.config import BuildConfig
from spectrt.compiler.progress import Progress
from spectrt.errors import BundleError, EngineBuildError
from spectrt.runtime.manifest import MANIFEST_NAME, read_manifest, verify_files

pytestmark = [pytest.mark.slow, pytest.mark.tensorrt]

WIDTHS = (2, 4)
MAX_CONTEXT = 256
HEAVY = ("torch", "transformers", "onnx")
ENGINE_KEYS = {"path", "module", "version", "profiles", "compute_capabilities", "built_on_gpu_compute_capability",
               "build_seconds", "strongly_typed"}

# Runs `spectrt compile ...` through the click group, then reports which heavy modules this process imported.
DRIVER = """
import json, sys
from spectrt.cli import main
code = main(args=sys.argv[1:], prog_name="spectrt", standalone_mode=False)
heavy = sorted(name for name in ("torch", "transformers", "onnx") if name in sys.modules)
print("HEAVY_MODULES=" + json.dumps(heavy), file=sys.stderr)
sys.exit(code or 0)
"""


@pytest.fixture(scope="module")
def trt():
    from spectrt.compiler.tensorrt_build import import_tensorrt
    from spectrt.errors import BackendUnavailableError

    try:
        return import_tensorrt()
    except BackendUnavailableError:
        pytest.skip("needs tensorrt or tensorrt_rtx to build engines")


def run_compile(bundle: Path, *args: str, blocked: Path) -> SimpleNamespace:
    """`spectrt compile BUNDLE --json ARGS` in a fresh process (and its build processes) where torch,
    transformers and onnx raise ImportError, like on a device that has only TensorRT."""
    for name in HEAVY:
        (blocked / name).mkdir(parents=True, exist_ok=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this device')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(blocked), os.environ.get("PYTHONPATH")) if p))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DRIVER, "compile", str(bundle), "--json", *args],
                          capture_output=True, text=True, env=env, timeout=900)
    seconds = time.perf_counter() - start
    heavy = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY_MODULES=")]
    return SimpleNamespace(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, seconds=seconds,
                           heavy=json.loads(heavy[-1].split("=", 1)[1]) if heavy else None)


def snapshot(bundle: Path) -> dict[str, tuple[int, int]]:
    """Every entry of the bundle folder with its size and mtime (manifest included)."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(bundle.iterdir())}


def generate_hello(bundle: Path) -> list[int]:
    from spectrt.runtime.generator import Generator

    generator = Generator(bundle, backend="onnxruntime", threads=2, verify="full")
    return generator.generate("Hello", max_new_tokens=4).token_ids


@pytest.fixture(scope="module")
def onnx_bundle(smollm2_gguf, tmp_path_factory, trt):
    """SmolLM2-135M target + its first 4 layers as the draft (real weights, a quick engine build), fp16 ONNX only (no
    validation: only the graphs matter here)."""
    from conftest import layer_skip_draft

    draft = layer_skip_draft(smollm2_gguf, tmp_path_factory.mktemp("smollm2-4l"), 4)
    out = tmp_path_factory.mktemp("compile") / "smollm2-fp16"
    config = BuildConfig(target=str(smollm2_gguf), draft=str(draft), widths=WIDTHS,
                         max_context=MAX_CONTEXT, precision="fp16", backend="onnx", validate=False, out=str(out))
    build_bundle(config, progress=Progress(quiet=True))
    return SimpleNamespace(bundle=out, tokens=generate_hello(out),
                           manifest=json.loads((out / MANIFEST_NAME).read_text()))


@pytest.fixture(scope="module")
def compiled(onnx_bundle, tmp_path_factory):
    run = run_compile(onnx_bundle.bundle, blocked=tmp_path_factory.mktemp("blocked"))
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout)
    timings = ", ".join(f"{role} {engine['build_seconds']:.1f} s ({engine['size_bytes'] / 2**20:.0f} MiB)"
                        for role, engine in summary["engines"].items())
    print(f"\n[spectrt compile, SmolLM2-135M fp16] {timings}; whole command {run.seconds:.1f} s")
    return SimpleNamespace(run=run, summary=summary, **vars(onnx_bundle))


def test_compile_imports_neither_torch_transformers_nor_onnx(compiled, trt):
    assert compiled.run.heavy == []
    assert set(compiled.summary["engines"]) == {"target", "draft"}
    for engine in compiled.summary["engines"].values():
        assert engine["module"] == trt.__name__ and engine["build_seconds"] > 0


def test_engines_have_the_profiles_build_gives(compiled, trt):
    from spectrt.compiler.tensorrt_build import entry_profiles

    manifest = read_manifest(compiled.bundle)
    for role in ("target", "draft"):
        entry = manifest.raw["models"][role]
        record = entry["backends"]["tensorrt"]
        assert set(record) == ENGINE_KEYS
        assert record["path"] == f"{role}.engine" and record["strongly_typed"] is True
        assert record["module"] == trt.__name__ and record["version"] == trt.__version__
        assert (compiled.bundle / record["path"]).stat().st_size > 1_000_000
        # exactly what `spectrt build --backend tensorrt` records for the same graph
        expected = [{"index": i, **spec.to_json()} for i, spec in enumerate(entry_profiles(role, entry, WIDTHS))]
        assert record["profiles"] == expected
        kv = (entry["arch"]["num_kv_heads"], entry["arch"]["head_dim"])
        lengths = [k + 1 for k in WIDTHS] if role == "target" else [1, 2]
        names = [f"verify_k{k}" for k in WIDTHS] if role == "target" else ["decode", "decode_s2"]
        assert [p["name"] for p in record["profiles"]] == ["prefill", *names]
        prefill = record["profiles"][0]["shapes"]
        assert prefill["input_ids"] == [[1, 1], [1, 128], [1, MAX_CONTEXT]]
        for profile, length in zip(record["profiles"][1:], lengths):
            past_max = MAX_CONTEXT - length
            assert profile["shapes"]["input_ids"] == [[1, length]] * 3
            assert profile["shapes"]["past_key_0"] == [[1, 0, *kv], [1, past_max // 2, *kv], [1, past_max, *kv]]
    assert manifest.raw["compile"]["tool_versions"][trt.__name__] == trt.__version__


def test_manifest_hashes_the_engines_and_the_bundle_still_generates(compiled):
    manifest = read_manifest(compiled.bundle)
    verify_files(manifest)
    assert {"target.engine", "draft.engine"} <= set(manifest.files)
    for name, facts in compiled.manifest["files"].items():  # every ONNX-bundle file kept as it was
        assert manifest.files[name] == facts
    assert sorted(p.name for p in compiled.bundle.iterdir()) == sorted([*manifest.files, MANIFEST_NAME])
    assert generate_hello(compiled.bundle) == compiled.tokens


def test_second_compile_refuses_without_overwrite_and_changes_nothing(compiled):
    before = snapshot(compiled.bundle)
    result = CliRunner().invoke(main, ["compile", str(compiled.bundle)])
    assert result.exit_code == 2, result.output
    assert "already has TensorRT engines" in result.output and "--overwrite" in result.output
    assert snapshot(compiled.bundle) == before


@pytest.mark.parametrize("failure", ["build", "interrupt", "swap"])
def test_a_failed_overwrite_leaves_the_bundle_intact(compiled, monkeypatch, failure):
    """The second engine's build fails (or is interrupted, or the manifest cannot be replaced after the engines
    were renamed): the old manifest and every file it lists stay valid, and no temporary file is left."""
    _assert_failure_leaves_bundle_intact(compiled.bundle, monkeypatch, failure)


def test_a_failed_first_compile_leaves_the_onnx_bundle_intact(tiny_llama_pair, tmp_path, monkeypatch, trt):
    target, draft = tiny_llama_pair
    out = tmp_path / "tiny"
    build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(2,), max_context=32, precision="fp16",
                             validate=False, out=str(out)), progress=Progress(quiet=True))
    for failure in ("build", "swap"):
        _assert_failure_leaves_bundle_intact(out, monkeypatch, failure)
    assert "tensorrt" not in read_manifest(out).raw["models"]["target"]["backends"]


def _assert_failure_leaves_bundle_intact(bundle: Path, monkeypatch, failure: str) -> None:
    from spectrt.compiler import engines
    from spectrt.compiler.tensorrt_build import partial_path

    before, manifest_bytes = snapshot(bundle), (bundle / MANIFEST_NAME).read_bytes()
    calls = []

    def fake_compile(onnx_path, engine_path, profiles, *, record_path=None, **options):
        calls.append(Path(engine_path))
        assert Path(engine_path).parent == bundle and Path(engine_path).name.startswith(".")
        partial_path(engine_path).write_bytes(b"half an engine")
        if len(calls) == 2 and failure == "build":
            raise EngineBuildError("simulated: TensorRT failed on the second engine")
        if len(calls) == 2 and failure == "interrupt":
            raise KeyboardInterrupt
        partial_path(engine_path).rename(engine_path)
        return {"path": record_path, "module": "tensorrt_rtx", "version": "0", "strongly_typed": True,
                "profiles": [{"index": i, **p.to_json()} for i, p in enumerate(profiles)]}

    def failing_install(manifest_tmp, manifest_path):
        raise OSError(28, "No space left on device (simulated)")

    expected = {"build": EngineBuildError, "interrupt": KeyboardInterrupt, "swap": BundleError}[failure]
    with monkeypatch.context() as patch, pytest.raises(expected):
        patch.setattr(engines, "compile_model_engine", fake_compile)
        patch.setattr(engines, "_install_manifest", failing_install)
        engines.compile_bundle(bundle, engines.CompileConfig(overwrite=True), progress=Progress(quiet=True))
    assert len(calls) == 2
    assert (bundle / MANIFEST_NAME).read_bytes() == manifest_bytes
    assert snapshot(bundle) == before  # no temporary file left, nothing replaced (old engines back in place)
    verify_files(read_manifest(bundle))


def test_overwrite_rebuilds_the_engines(tiny_llama_pair, tmp_path, trt):
    """A compiled bundle compiled again with --overwrite and other settings: new engines, the settings recorded.
    On a tiny fp16 bundle (the SmolLM2 engines above cost a minute per build; overwriting does not depend on the
    model's size)."""
    target, draft = tiny_llama_pair
    bundle = tmp_path / "tiny-fp16"
    build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=WIDTHS, max_context=64, precision="fp16",
                             backend="onnx", validate=False, out=str(bundle)), progress=Progress(quiet=True))
    first = run_compile(bundle, blocked=tmp_path / "blocked")
    assert first.returncode == 0, first.stderr[-4000:]
    first_engines = {role: (bundle / e["path"]).read_bytes() for role, e in json.loads(first.stdout)["engines"].items()}
    options = ["--overwrite", "--prefill-opt", "32", "--timing-cache", str(tmp_path / "timing.cache")]
    if trt.__name__ == "tensorrt_rtx":
        options += ["--compute-capabilities", "SM86"]
    run = run_compile(bundle, *options, blocked=tmp_path / "blocked")
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.heavy == []
    assert (tmp_path / "timing.cache").stat().st_size > 0
    print("\n[spectrt compile --overwrite] " + ", ".join(f"{role} {e['build_seconds']:.1f} s"
                                                        for role, e in json.loads(run.stdout)["engines"].items()))
    manifest = read_manifest(bundle)
    # other profiles (prefill opt 32), so other engine files
    assert all((bundle / manifest.raw["models"][role]["backends"]["tensorrt"]["path"]).read_bytes() != engine
               for role, engine in first_engines.items())
    verify_files(manifest)
    assert manifest.raw["compile"]["prefill_opt"] == 32
    assert manifest.raw["compile"]["timing_cache"] == "timing.cache"  # its name only: no machine paths
    for role in ("target", "draft"):
        record = manifest.raw["models"][role]["backends"]["tensorrt"]
        assert record["compute_capabilities"] == (["SM86"] if trt.__name__ == "tensorrt_rtx" else [])
        assert record["profiles"][0]["name"] == "prefill" and record["profiles"][0]["shapes"]["input_ids"][1] == [1, 32]
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*manifest.files, MANIFEST_NAME])


def test_weight_quantized_bundle_is_refused_with_what_to_do(tiny_llama_pair, tmp_path, trt):
    target, draft = tiny_llama_pair
    out = tmp_path / "int4"
    build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(2,), max_context=32, quantize="int4",
                             validate=False, out=str(out)), progress=Progress(quiet=True))
    before = snapshot(out)
    result = CliRunner().invoke(main, ["compile", str(out)])
    assert result.exit_code == 2, result.output
    assert "MatMulNBits" in result.output and "TensorRT cannot parse" in result.output
    assert "rebuild without --quantize (fp16 recommended for TensorRT" in result.output
    assert snapshot(out) == before
