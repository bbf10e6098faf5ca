"""BuildConfig: the one frozen dataclass behind `spectrt build` options, recipe files and the manifest."""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from spectrt.errors import ConfigError

PRECISIONS = ("fp32", "fp16")
BACKENDS = ("onnx", "tensorrt", "all")
QUANTIZE = ("none", "int8", "int4", "gguf")  # gguf: the source GGUF file's own blocks, not re-quantized
DEFAULT_WIDTHS = (2, 4, 8)


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs; each field is one CLI option / recipe key of the same name."""

    target: str  # HF folder, .gguf file, or a known model name (see `spectrt models list`)
    draft: str
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    max_context: int = 2048
    precision: str = "fp32"
    backend: str = "onnx"
    out: str | None = None  # default: engines/<name>
    name: str | None = None  # default: derived from the target
    validate: bool = True
    workspace_mb: int | None = None  # TensorRT builder workspace limit
    timing_cache: str | None = None  # TensorRT timing cache file (read if present, written after build)
    compute_capabilities: tuple[str, ...] = field(default=())  # TensorRT-RTX targets, e.g. ("SM86",)
    prefill_opt: int = 128  # TensorRT prefill profile's optimal length
    quantize: str = "none"  # none | int8 | int4 | gguf: weight-only quantized ONNX for the ONNX Runtime CPU path
    # (gguf: every linear layer and the embeddings from the .gguf source's own blocks, exactly as stored)
    draft_quantize: str | None = None  # the draft's scheme if different (None = same as quantize)
    draft_vocab: int = 0  # 0 = all; N: the draft's output layer covers the N lowest token ids (BPE merge order,
    # roughly frequency) plus the added/special tokens; the draft never proposes others, the target verifies all
    head: bool = False  # also train a draft head for the target after the build (`spectrt train-head` defaults)
    head_minutes: float = 45.0  # its time budget
    max_batch: int = 1  # sequences one call of each graph holds (concurrent requests decode together); 1: classic

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(sorted(set(int(w) for w in self.widths))))
        object.__setattr__(self, "compute_capabilities", tuple(self.compute_capabilities))
        self.check()

    def check(self) -> None:
        """Refuse impossible options before any work starts."""
        if not self.widths:
            raise ConfigError("no speculation width given; pass e.g. --widths 2,4,8.")
        if any(w < 1 for w in self.widths):
            raise ConfigError(f"speculation widths must be >= 1 (got {list(self.widths)}); width 0 is plain decoding, "
                              f"which every bundle supports without building it.")
        if self.max_context < 2:
            raise ConfigError(f"max context {self.max_context} is too small.")
        if max(self.widths) + 1 >= self.max_context:
            raise ConfigError(f"max context {self.max_context} is too small for width {max(self.widths)}: verifying "
                              f"K={max(self.widths)} needs K+1 new tokens plus at least one cached token.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision '{self.precision}' unknown; choose one of {', '.join(PRECISIONS)}.")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend '{self.backend}' unknown; choose one of {', '.join(BACKENDS)}.")
        for option in ("quantize", "draft_quantize"):
            value = getattr(self, option)
            if value is not None and value not in QUANTIZE:
                raise ConfigError(f"{option} '{value}' unknown; choose one of {', '.join(QUANTIZE)}.")
        if self.wants_tensorrt and (self.quantize_for("target"), self.quantize_for("draft")) != ("none", "none"):
            raise ConfigError("--quantize/--draft-quantize make onnxruntime MatMulNBits graphs for the CPU path, which "
                              "TensorRT cannot parse; use --backend onnx with it, or build TensorRT engines "
                              "without --quantize (e.g. --precision fp16).")
        if "gguf" in (self.quantize_for("target"), self.quantize_for("draft")) and self.precision != "fp32":
            raise ConfigError(f"--quantize gguf holds the GGUF file's blocks with fp32 scales and computes in fp32; "
                              f"--precision {self.precision} cannot be combined with it: use --precision fp32.")
        if self.draft_vocab < 0:
            raise ConfigError(f"draft_vocab must be >= 0 (got {self.draft_vocab}); 0 keeps the whole vocabulary.")
        if not 1 <= self.max_batch <= 64:
            raise ConfigError(f"max_batch must be 1..64 (got {self.max_batch}).")
        if self.max_batch > 1 and self.wants_tensorrt:
            raise ConfigError("--max-batch > 1 builds batched ONNX graphs, which run on ONNX Runtime's CPU path only "
                              "so far (no TensorRT profiles or GPU executors for them yet); use --backend onnx with "
                              "it, or build TensorRT engines with --max-batch 1.")
        if self.max_batch > 1 and self.head:
            raise ConfigError("--max-batch > 1 and --head cannot be combined yet (the draft head reads one "
                              "sequence's features); build one bundle for each.")
        if self.workspace_mb is not None and self.workspace_mb <= 0:
            raise ConfigError("workspace_mb must be positive.")
        if self.prefill_opt < 1:
            raise ConfigError("prefill_opt must be >= 1 (it is capped at max_context).")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ConfigError(f"bundle name '{self.name}' may only hold letters, digits, '.', '_' and '-'.")

    def check_sources(self, sources: dict[str, Path]) -> None:
        """Refuse options the resolved model sources cannot serve (cheap: before anything is loaded)."""
        for role, source in sources.items():
            if self.quantize_for(role) == "gguf" and not (Path(source).is_file() and Path(source).suffix == ".gguf"):
                option = "--draft-quantize" if role == "draft" and self.draft_quantize is not None else "--quantize"
                raise ConfigError(f"{option} gguf takes the {role}'s weights from its GGUF file's own blocks, but the "
                                  f"{role} '{source}' is not a .gguf file; give a .gguf {role}, or choose int4/int8 "
                                  f"(re-quantized) or none for it" + (" with --draft-quantize" if role == "draft"
                                                                       else "") + ".")

    def quantize_for(self, role: str) -> str:
        """Weight quantization scheme of the target or the draft."""
        if role == "draft" and self.draft_quantize is not None:
            return self.draft_quantize
        return self.quantize

    @property
    def wants_onnx_only(self) -> bool:
        return self.backend == "onnx"

    @property
    def wants_tensorrt(self) -> bool:
        return self.backend in ("tensorrt", "all")

    def bundle_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.target).name
        stem = re.sub(r"\.gguf$", "", stem)
        return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-").lower() or "bundle"

    def out_dir(self, engines_root: Path = Path("engines")) -> Path:
        return Path(self.out) if self.out else engines_root / self.bundle_name()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["widths"] = list(self.widths)
        data["compute_capabilities"] = list(self.compute_capabilities)
        return data


def parse_widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"widths '{text}' must be comma-separated integers, e.g. 2,4,8.") from None


def load_recipe(path: Path, **overrides: Any) -> BuildConfig:
    """Read a TOML recipe (keys = BuildConfig fields); relative model paths resolve against the recipe folder."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' not found.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe '{path}' is not valid TOML: {exc}") from exc
    data = data.get("build", data)
    known = {f.name for f in fields(BuildConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"recipe '{path}' has unknown keys {unknown}; known keys: {sorted(known)}.")
    for key in ("target", "draft"):
        value = data.get(key)
        if isinstance(value, str) and ("/" in value or value.endswith(".gguf")) and not Path(value).is_absolute():
            data[key] = str((path.parent / value).resolve())
    if isinstance(data.get("widths"), str):
        data["widths"] = parse_widths(data["widths"])
    data.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("target", "draft") if k not in data]
    if missing:
        raise ConfigError(f"recipe '{path}' lacks {missing}.")
    return BuildConfig(**data)
