"""Packaging: the built wheel ships every module and data file, and the runtime-only install that edge
devices use (the wheel plus the `onnxruntime` extra, in a fresh venv: no torch, onnx or transformers)
generates exactly what the editable install generates.

The wheel is built from a copy of the files setuptools reads (pyproject.toml, the readme, the package
folders), not in the checkout: an in-tree build leaves build/lib behind, and a stale build/lib would put
deleted modules into the next wheel (and concurrent runs would share it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):"
NOT_SHIPPED_PARTS = {"__pycache__"}
NOT_SHIPPED_SUFFIXES = (".pyc", ".pyo", "~")


def _setuptools_config(root: Path = ROOT) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_roots(root: Path = ROOT) -> dict[str, Path]:
    """package-dir: installed package name -> source folder."""
    return {name: root / folder for name, folder in sorted(_setuptools_config(root).get("package-dir", {}).items())}


def _walk(name: str, folder: Path, roots: dict[str, Path]):
    """(installed name parts of the folder, file) for every file under a mapped folder, minus caches and
    hidden files, and minus folders that another package-dir entry maps (they are walked under that name)."""
    others = [f for f in roots.values() if f != folder and f.is_relative_to(folder)]
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (not path.is_file() or any(path.is_relative_to(o) for o in others) or path.name.endswith(NOT_SHIPPED_SUFFIXES)
                or any(part in NOT_SHIPPED_PARTS or part.startswith(".") or part.endswith(".egg-info") for part in rel.parts)):
            continue
        yield (*filter(None, name.split(".")), *rel.parts), path


def source_packages(root: Path = ROOT) -> set[str]:
    """Every importable package in the source tree (a folder with __init__.py), by its installed name."""
    roots = _package_roots(root)
    return {".".join(parts[:-1]) for name, folder in roots.items()
            for parts, path in _walk(name, folder, roots) if path.name == "__init__.py"}


def expected_wheel_files(root: Path = ROOT) -> dict[str, Path]:
    """Wheel path -> source file, for every file under the package folders (modules and data alike)."""
    roots = _package_roots(root)
    return {"/".join(parts): path for name, folder in roots.items() for parts, path in _walk(name, folder, roots)}


def test_pyproject_lists_every_package():
    """`packages` is listed by hand (find() can't map compiler/ and runtime/ into spectrt.*): a new
    subpackage must be added there, or installs from the wheel silently lack it."""
    listed = set(_setuptools_config()["packages"])
    found = source_packages()
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"listed in pyproject.toml but not in the source tree: {sorted(listed - found)}"


# --- the wheel and the runtime-only venv (slow: pip downloads onnxruntime & co. the first time) -------------


def _isolated_env(cache: Path, venv: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", SPECTRT_CACHE=str(cache))
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    return env


def _run(cmd: list, *, env: dict, cwd: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def wheel_and_source(tmp_path_factory) -> tuple[Path, Path]:
    """`pip wheel --no-deps --no-build-isolation` of a snapshot of the project (the files setuptools reads),
    and that snapshot: expectations come from the same files the wheel was built from, so concurrent edits
    of the checkout cannot race the comparison."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    readme = project.get("readme")
    readme = readme if isinstance(readme, str) or readme is None else readme.get("file")
    for name in ["pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", readme, *(p.name for p in ROOT.glob("LICEN[CS]E*"))]:
        if name and (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in sorted({p.relative_to(ROOT).parts[0] for p in _package_roots().values()}):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    dist = work / "dist"
    # the test's own interpreter has setuptools + wheel (the build requirements), so no isolated build env
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src],
         env=_isolated_env(work / "cache"), cwd=work)
    wheels = list(dist.glob("spectrt-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], src


@pytest.fixture(scope="module")
def wheel(wheel_and_source) -> Path:
    return wheel_and_source[0]


@pytest.mark.slow
def test_wheel_ships_every_module_and_data_file(wheel_and_source):
    wheel, src = wheel_and_source
    assert source_packages(src) == set(_setuptools_config(src)["packages"])
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if ".dist-info/" not in n}
    expected = expected_wheel_files(src)
    # the data files the runtime and the benchmarks read, computed from the tree (must exist, must ship)
    data = [src / "spectrt" / "py.typed", *(src / "spectrt" / "workloads").glob("*.jsonl"),
            *(src / "spectrt" / "workloads").glob("*.md"), *(src / "runtime").rglob("*.json")]
    assert (src / "spectrt" / "py.typed").is_file() and any(p.suffix == ".jsonl" for p in data)
    assert set(data) <= set(expected.values())
    modules = [p for p in expected.values() if p.suffix == ".py"]
    assert len(modules) >= 30 and any("backends" in p.parts for p in modules) and any("bench" in p.parts for p in modules)
    missing = sorted(set(expected) - shipped)
    assert not missing, (f"the wheel lacks {missing}: add the package to [tool.setuptools] packages or a glob "
                         f"to [tool.setuptools.package-data] in pyproject.toml")
    extra = sorted(shipped - set(expected))
    assert not extra, f"the wheel holds files that are not in the source tree: {extra}"
    for path, source in expected.items():  # byte-identical copies
        assert zipfile.ZipFile(wheel).read(path) == source.read_bytes(), path
    print(f"\n{wheel.name}: {len(modules)} modules, {len(expected) - len(modules)} data files")


@pytest.fixture(scope="module")
def runtime_venv(wheel, tmp_path_factory, record_testsuite_property) -> tuple[Path, dict[str, str], Path]:
    """A fresh venv (no system site packages) with only `<wheel>[onnxruntime]` installed: the edge install."""
    work = tmp_path_factory.mktemp("runtime-venv")
    venv = work / "venv"
    env = _isolated_env(work / "spectrt-cache", venv)
    start = time.perf_counter()
    _run([sys.executable, "-m", "venv", venv], env=_isolated_env(work / "spectrt-cache"), cwd=work)
    created = time.perf_counter() - start
    _run([venv / "bin" / "python", "-m", "pip", "install", f"{wheel}[onnxruntime]"], env=env, cwd=work, timeout=1800)
    installed = time.perf_counter() - start - created
    print(f"\nruntime venv: created in {created:.1f} s, {wheel.name}[onnxruntime] installed in {installed:.1f} s")
    record_testsuite_property("runtime_venv_install_seconds", f"{installed:.1f}")
    return venv, env, work


def _venv_python(runtime_venv, code: str, check: bool = True) -> subprocess.CompletedProcess:
    venv, env, work = runtime_venv
    return _run([venv / "bin" / "python", "-c", code], env=env, cwd=work, check=check)


@pytest.mark.slow
def test_runtime_venv_has_no_build_stack(runtime_venv):
    venv, _, _ = runtime_venv
    for module in ("torch", "onnx", "transformers"):
        result = _venv_python(runtime_venv, f"import {module}", check=False)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (module, result.stderr)
    # ...and spectrt plus the runtime deps come from the venv, not from the checkout or the test's venv
    out = _venv_python(runtime_venv, "import json, spectrt, numpy, tokenizers, onnxruntime, click, jinja2; "
                                     "print(json.dumps([m.__file__ for m in (spectrt, numpy, onnxruntime)]))")
    for path in json.loads(out.stdout):
        assert Path(path).resolve().is_relative_to(venv.resolve()), path


@pytest.mark.slow
def test_runtime_venv_imports_backends_and_workloads(runtime_venv, wheel_and_source):
    _venv_python(runtime_venv, "import spectrt.runtime.backends, spectrt.workloads")
    out = _venv_python(runtime_venv, "import json; from spectrt.workloads import available_workloads, load_workload; "
                                     "print(json.dumps({'available': available_workloads(), "
                                     "'code': [p.id for p in load_workload('code', 2)]}))")
    result = json.loads(out.stdout)
    assert result["available"] == sorted(p.stem for p in (wheel_and_source[1] / "spectrt" / "workloads").glob("*.jsonl"))
    assert len(result["code"]) == 2


@pytest.mark.slow
def test_runtime_venv_cli_matches_editable_install(runtime_venv, smollm2_bundle):
    from spectrt.runtime.generator import Generator

    reference = Generator(smollm2_bundle).generate(PROMPT, max_new_tokens=24)
    expected = reference.token_ids
    assert expected, "the editable install generated nothing"
    venv, env, work = runtime_venv
    spectrt_cli = venv / "bin" / "spectrt"
    result = _run([spectrt_cli, "generate", smollm2_bundle, "--max-new-tokens", "24", "--json", PROMPT],
                  env=env, cwd=work)
    out = json.loads(result.stdout)
    assert out["token_ids"] == list(expected)
    assert out["finish_reason"] == reference.finish_reason
    assert out["metrics"]["generated_tokens"] == len(expected)
    verify = _run([spectrt_cli, "inspect", smollm2_bundle, "--verify"], env=env, cwd=work)
    assert "all files match their sha256" in verify.stdout
