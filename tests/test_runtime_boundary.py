"""spectrt.runtime imports and runs with no torch, onnx, transformers or compiler (Jetson, slim containers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "onnx", "transformers", "tensorrt", "tensorrt_rtx", "gguf", "spectrt.compiler", "safetensors")

SCRIPT = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {blocked!r}):
            raise ImportError("blocked for this test: " + name)
        return None
sys.meta_path.insert(0, Block())
import spectrt
gen = spectrt.load({bundle!r}, threads=1)
out = gen.generate("def add(a, b):", max_new_tokens=6, draft="model", width=2)
stream = "".join(c.text for c in gen.stream("def add(a, b):", max_new_tokens=6, draft="model", width=2))
assert stream == out.text, (stream, out.text)
from spectrt.cli import main  # the CLI module must import too
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "transformers"))
print("OK", len(out.token_ids), out.metrics.rounds, loaded)
"""


def test_runtime_runs_without_build_dependencies(tiny_bundle):
    code = SCRIPT.format(blocked=BLOCKED, bundle=str(tiny_bundle))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK") and result.stdout.strip().endswith("[]")


def test_runtime_sources_never_import_the_compiler_or_torch():
    offenders = []
    for path in (ROOT / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
                if node.level and (node.module or "").startswith("compiler"):
                    names = ["compiler"]
            for name in names:
                if name.split(".")[0] in ("torch", "onnx", "transformers", "compiler") or name.startswith("spectrt.compiler"):
                    offenders.append(f"{path.name}: {name}")
                # the runtime is self-contained: nothing from the CLI's, the bench's or the server's package
                if name.startswith("spectrt.") and not name.startswith("spectrt.runtime"):
                    offenders.append(f"{path.name}: {name}")
    assert not offenders
