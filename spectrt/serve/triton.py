"""`spectrt triton-repo`: write a Triton Inference Server model repository that serves a bundle.

The repository holds one model, `<OUT>/<name>/`:

    config.pbtxt   Python backend, decoupled (streaming), instance_group [{ count: N, kind: KIND_CPU }],
                   the inputs/outputs of spectrt/serve/triton_model.py, parameters (bundle path, threads...)
    1/model.py     a copy of spectrt/serve/triton_model.py
    1/bundle/      only with --copy-bundle: the bundle itself (hard links where the file system allows)

By default the config names the bundle by its absolute path (or --bundle-path, the path the server
will see it at, e.g. a volume mounted in a container): a bundle is large (about 4 bytes per
parameter), is verified against its manifest's sha256 when it loads, and is rebuilt atomically
in place, so the repository refers to it instead of holding a second copy. --copy-bundle makes
the repository self-contained (for a container image or a repository in object storage, where
Triton downloads the model folder and an outside path would not exist).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

from spectrt.errors import ConfigError

MODEL_TEMPLATE = Path(__file__).with_name("triton_model.py")
MARKER = "# Written by `spectrt triton-repo`"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}

# (name, Triton data type, dims); every input is optional, model.py checks the combination
INPUTS = (
    ("prompt", "TYPE_STRING", "[ 1 ]"),
    ("prompt_ids", "TYPE_INT64", "[ -1 ]"),
    ("messages", "TYPE_STRING", "[ 1 ]"),
    ("max_tokens", "TYPE_INT32", "[ 1 ]"),
    ("temperature", "TYPE_FP32", "[ 1 ]"),
    ("top_p", "TYPE_FP32", "[ 1 ]"),
    ("top_k", "TYPE_INT64", "[ 1 ]"),
    ("seed", "TYPE_INT64", "[ 1 ]"),
    ("stop", "TYPE_STRING", "[ -1 ]"),
    ("draft", "TYPE_STRING", "[ 1 ]"),
    ("width", "TYPE_STRING", "[ 1 ]"),
    ("accept", "TYPE_STRING", "[ 1 ]"),
    ("prediction", "TYPE_STRING", "[ 1 ]"),
)
OUTPUTS = (
    ("text", "TYPE_STRING", "[ 1 ]"),
    ("token_ids", "TYPE_INT64", "[ -1 ]"),
    ("finish_reason", "TYPE_STRING", "[ 1 ]"),
    ("metrics", "TYPE_STRING", "[ 1 ]"),
)


@dataclass(frozen=True)
class TritonRepoConfig:
    """One `spectrt triton-repo` run; each field is the option of the same name."""

    name: str | None = None  # model name [default: the bundle's name]
    instances: int = 1  # instance_group count (per GPU with kind gpu): one process and Generator each
    kind: str = "cpu"  # cpu | gpu
    max_queue: int = 0  # requests waiting per model beyond which Triton rejects at once; 0 = unbounded
    max_queue_delay_ms: int = 0  # a queued request older than this is rejected; 0 = never
    threads: int = 0  # ONNX Runtime intra-op threads per instance; 0 = cores / instances (KIND_CPU)
    backend: str = "auto"
    provider: str = "auto"
    verify: str = "cached"
    bundle_path: str | None = None  # the bundle's path as the server sees it [default: its absolute path here]
    copy_bundle: bool = False
    python_env: str | None = None  # EXECUTION_ENV_PATH: a venv/conda env folder for the stub (server path)
    allow_numpy2: bool = False  # only for a Triton whose Python backend stub reads NumPy 2 arrays correctly
    overwrite: bool = False
    max_batch: int = 1  # requests each instance decodes together (a bundle built with --max-batch >= it)
    prefix_slots: int = 0  # KV caches each instance keeps for earlier conversations (0: max_batch of them)

    def __post_init__(self) -> None:
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise ConfigError(f"model name {self.name!r} is not usable as a Triton model folder; use letters, digits, "
                              f"'_', '.' and '-' (starting with a letter or digit).")
        if self.instances < 1:
            raise ConfigError(f"--instances must be >= 1 (got {self.instances}).")
        if self.kind not in KINDS:
            raise ConfigError(f"--kind must be one of {', '.join(KINDS)} (got {self.kind!r}).")
        if self.max_queue < 0 or self.max_queue_delay_ms < 0:
            raise ConfigError("--max-queue and --max-queue-delay-ms must be >= 0 (0 = no limit).")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0 (got {self.threads}).")
        if self.max_batch < 1 or self.prefix_slots < 0:
            raise ConfigError(f"--max-batch must be >= 1 and --prefix-slots >= 0 (got {self.max_batch}, "
                              f"{self.prefix_slots}).")
        if self.verify not in ("full", "cached", "none"):
            raise ConfigError(f"--verify must be full, cached or none (got {self.verify!r}).")
        if self.copy_bundle and self.bundle_path is not None:
            raise ConfigError("--bundle-path and --copy-bundle exclude each other: a copied bundle lives in the "
                              "repository (1/bundle) and is found there.")
        for option, path in (("--bundle-path", self.bundle_path), ("--python-env", self.python_env)):
            if path is not None and not (os.path.isabs(path) or path.startswith("$$TRITON_MODEL_DIRECTORY")):
                raise ConfigError(f"{option} must be an absolute path as the server sees it (got {path!r}).")


def _quote(value: str) -> str:
    return json.dumps(value)  # a protobuf text-format string literal for plain paths and names


def render_config(name: str, bundle: str, config: TritonRepoConfig) -> str:
    """The model's config.pbtxt."""
    parameters = {"spectrt_bundle": bundle, "spectrt_threads": str(config.threads), "spectrt_backend": config.backend,
                  "spectrt_provider": config.provider, "spectrt_verify": config.verify,
                  "spectrt_max_batch": str(config.max_batch), "spectrt_prefix_slots": str(config.prefix_slots)}
    if config.allow_numpy2:
        parameters["spectrt_allow_numpy2"] = "true"
    if config.python_env is not None:
        parameters["EXECUTION_ENV_PATH"] = config.python_env
    tensor = '  {{ name: "{}" data_type: {} dims: {}{} }}'
    lines = [
        f"{MARKER} (spectrt {_version()}); rewrite it with the same command rather than by hand.",
        f"name: {_quote(name)}",
        'backend: "python"',
        "max_batch_size: 0  # one request = one sequence; each instance decodes up to spectrt_max_batch of them "
        "together",
        "model_transaction_policy { decoupled: true }  # streaming: one response per token, then a final one",
        f"instance_group [ {{ count: {config.instances} kind: {KINDS[config.kind]} }} ]",
        "input [",
        ",\n".join(tensor.format(n, t, d, " optional: true") for n, t, d in INPUTS),
        "]",
        "output [",
        ",\n".join(tensor.format(n, t, d, "") for n, t, d in OUTPUTS),
        "]",
        "parameters [",
        ",\n".join(f"  {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}" for k, v in parameters.items()),
        "]",
    ]
    if config.max_queue or config.max_queue_delay_ms:
        policy = []
        if config.max_queue:
            policy.append(f"max_queue_size: {config.max_queue}")
        if config.max_queue_delay_ms:
            policy += ["timeout_action: REJECT", f"default_timeout_microseconds: {config.max_queue_delay_ms * 1000}"]
        lines.append(f"dynamic_batching {{ default_queue_policy {{ {' '.join(policy)} }} }}"
                     "  # queue limits (no batching: max_batch_size 0)")
    return "\n".join(lines) + "\n"


def _version() -> str:
    from spectrt import __version__

    return __version__


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_triton_repository(bundle: str | Path, out: str | Path, config: TritonRepoConfig | None = None) -> Path:
    """Write `<out>/<name>/` (config.pbtxt, 1/model.py[, 1/bundle/]); returns the model folder.

    `out` is a model repository: it may hold other models. An existing `<out>/<name>` is replaced
    only with overwrite=True and only if spectrt wrote it; the new folder is assembled next to it
    and swapped in, so a failure leaves the old one."""
    from spectrt.runtime.manifest import read_manifest

    config = config or TritonRepoConfig()
    bundle = Path(bundle).resolve()
    manifest = read_manifest(bundle)  # refuses a folder that is not a bundle, before anything is written
    name = config.name or re.sub(r"[^A-Za-z0-9_.-]", "-", manifest.name).lstrip("-_.") or "spectrt"
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"the bundle's name {manifest.name!r} is not a usable model name; pass --name.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is not a folder; pass a model repository folder (new or existing).")
    model_dir = out / name
    if model_dir.is_symlink() or (model_dir.exists() and not model_dir.is_dir()):
        raise ConfigError(f"{model_dir} exists and is not a folder; choose another --name or OUT.")
    if model_dir.exists() and any(model_dir.iterdir()):
        config_file = model_dir / "config.pbtxt"
        ours = config_file.is_file() and config_file.read_text(errors="replace").startswith(MARKER)
        if not ours:
            raise ConfigError(f"{model_dir} exists and was not written by `spectrt triton-repo`; it is never touched. "
                              f"Choose another --name or OUT.")
        if not config.overwrite:
            raise ConfigError(f"{model_dir} exists; pass --overwrite to replace it.")
    bundle_param = "bundle" if config.copy_bundle else (config.bundle_path or str(bundle))
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out))
    try:
        (staging / "1").mkdir()
        (staging / "config.pbtxt").write_text(render_config(name, bundle_param, config))
        shutil.copyfile(MODEL_TEMPLATE, staging / "1" / "model.py")
        if config.copy_bundle:
            shutil.copytree(bundle, staging / "1" / "bundle", copy_function=_link_or_copy)
        staging.chmod(0o755)
        if model_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=out))
            os.replace(model_dir, old / name)
            os.replace(staging, model_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, model_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return model_dir


@click.command("triton-repo")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--name", help="Model name (the folder in OUT and the name clients use) [default: the bundle's name].")
@click.option("--instances", type=int, default=1, show_default=True,
              help="Model instances (processes, each with its own Generator); per GPU with --kind gpu.")
@click.option("--kind", type=click.Choice(sorted(KINDS)), default="cpu", show_default=True,
              help="instance_group kind: KIND_CPU, or KIND_GPU (onnxruntime-gpu in the stub's environment).")
@click.option("--max-queue", type=int, default=0, show_default=True,
              help="Requests allowed to wait for an instance; more are rejected at once (0 = no limit).")
@click.option("--max-queue-delay-ms", type=int, default=0, show_default=True,
              help="Reject a request that waited this long for an instance (0 = never).")
@click.option("--threads", type=int, default=0, show_default=True,
              help="ONNX Runtime threads per instance (0 = the cores divided among the CPU instances).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--verify", type=click.Choice(["full", "cached", "none"]), default="cached", show_default=True,
              help="Bundle file checks when an instance loads (as spectrt.load).")
@click.option("--bundle-path", help="The bundle's absolute path as the server sees it (a container mount) "
                                    "[default: BUNDLE's absolute path].")
@click.option("--copy-bundle", is_flag=True, help="Put the bundle into the repository (1/bundle, hard links where "
                                                  "possible) instead of referring to it.")
@click.option("--python-env", help="Absolute path (as the server sees it) of a Python environment for the stub: a venv "
                                   "or conda folder with bin/activate, or a conda-pack .tar.gz, holding spectrt and "
                                   "numpy<2 (written as the EXECUTION_ENV_PATH parameter).")
@click.option("--allow-numpy2", is_flag=True,
              help="Let the model load under NumPy 2 (only for a Triton newer than 2.51 whose Python backend stub "
                   "reads NumPy 2 arrays correctly; 2.51's corrupts request tensors, so the model refuses NumPy 2).")
@click.option("--max-batch", type=int, default=1, show_default=True,
              help="Requests each instance decodes together, their steps in shared model calls (a bundle built "
                   "with --max-batch >= N); the rest wait in Triton's queue.")
@click.option("--prefix-slots", type=int, default=0, show_default=True,
              help="KV caches each instance keeps for earlier conversations [0: --max-batch of them].")
@click.option("--overwrite", is_flag=True, help="Replace OUT/NAME if an earlier `spectrt triton-repo` wrote it.")
def triton_repo_command(bundle: Path, out: Path, **options) -> None:
    """Write a Triton Inference Server model repository that serves BUNDLE (Python backend, streaming).

    \b
    OUT is a model repository (it may hold other models); the model goes to OUT/NAME. Start it with
      tritonserver --model-repository OUT
    or, without Docker, from a spectrt checkout:
      bash scripts/triton_env.sh tritonserver --model-repository OUT
    Each instance is a process with its own Generator. See docs/triton.md.
    """
    model_dir = write_triton_repository(bundle, out, TritonRepoConfig(**options))
    click.echo(f"wrote {model_dir} (config.pbtxt, 1/model.py{', 1/bundle' if options['copy_bundle'] else ''})")
