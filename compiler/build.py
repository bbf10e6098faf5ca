"""The build pipeline: resolve → check pair → (load → export → validate) × 2 → compile → bundle.

Each step is a small function; `build_bundle` strings them together with progress output. The
bundle is assembled in a temporary folder next to the destination and swapped into place at the
end (see bundle_io), so a failed build never leaves a half-written bundle behind and never
deletes anything but its own temporary folder or the old bundle it replaced.
"""

from __future__ import annotations

import gc
import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spectrt import __version__
from spectrt.errors import ConfigError
from spectrt.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, expected_graph_io, file_facts, parse_manifest

from .arch import ModelArch, arch_from_config
from .bundle_io import check_out_dir, replace_dir_atomically
from .config import BuildConfig
from .loading import load_config, load_model, load_tokenizer
from .onnx_graph import GraphSpec
from .pair import check_pair, shared_logits_vocab
from .progress import Progress, peak_rss_mb

ROLES = ("target", "draft")


@dataclass
class BuildResult:
    bundle_dir: Path
    manifest: dict[str, Any]
    seconds: float
    peak_rss_mb: float
    step_times: dict[str, float] = field(default_factory=dict)


def resolve_source(name_or_path: str) -> Path:
    """A path as given, or a known model name fetched into the cache (see `spectrt models list`)."""
    from .fetch import resolve_model

    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    return Path(resolve_model(name_or_path))


def check_archs(config: BuildConfig, sources: dict[str, Path]) -> dict[str, ModelArch]:
    """Refuse unsupported architectures and impossible contexts from the configs alone (cheap)."""
    configs = {path: load_config(path) for path in dict.fromkeys(sources[role] for role in ROLES)}  # a self-draft
    # reads its file once (a GGUF's metadata holds its whole vocabulary)
    archs = {role: arch_from_config(configs[sources[role]], source=f"{role} '{sources[role]}'") for role in ROLES}
    for role, arch in archs.items():
        original = (arch.rope_scaling or {}).get("original_max_position_embeddings")
        if arch.rope_type == "longrope" and original and config.max_context > original:
            raise ConfigError(f"max context {config.max_context} exceeds the {role}'s original context ({original}) "
                              f"of its LongRoPE scaling: beyond it transformers switches every position to the long "
                              f"factors once the sequence grows past {original}, which a fixed graph cannot follow "
                              f"exactly; pass --max-context <= {original}.")
        if config.max_context > arch.max_position_embeddings:
            raise ConfigError(f"max context {config.max_context} exceeds the {role}'s trained maximum "
                              f"({arch.max_position_embeddings} positions); pass a smaller --max-context.")
    return archs


def tensor_specs(arch: ModelArch, precision: str, vocab: int, logits_rows: int | None = None,
                 features: bool = False, slots: int = 1) -> dict[str, list[dict[str, Any]]]:
    """The manifest's graph I/O: the runtime's contract (manifest.expected_graph_io)."""
    inputs, outputs = expected_graph_io(arch.num_layers, arch.num_kv_heads, arch.head_dim, precision, vocab,
                                        logits_rows, arch.hidden_size if features else None, slots)
    return {kind: [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in specs]
            for kind, specs in (("inputs", inputs), ("outputs", outputs))}


def logits_rows_for(role: str, config: BuildConfig) -> int:
    """Positions per call whose logits the runtime reads: K+1 for a target's verification (a prefill needs only
    its last one), the last one for a draft."""
    return max(config.widths) + 1 if role == "target" else 1


def draft_output_ids(config: BuildConfig, vocab: int, special_ids: tuple[int, ...]) -> tuple[int, ...] | None:
    """Token ids the draft's output layer covers: the `draft_vocab` lowest ids (byte-level BPE vocabularies are
    in merge order, roughly by frequency) plus every added/special token (end of turn, end of text); None = all."""
    if not config.draft_vocab or config.draft_vocab >= vocab:
        return None
    return tuple(sorted(set(range(config.draft_vocab)) | {i for i in special_ids if i < vocab}))


def export_and_validate(role: str, source: Path, config: BuildConfig, vocab: int, work_dir: Path,
                        progress: Progress, *, arch: ModelArch, tokenizer: Any,
                        output_ids: tuple[int, ...] | None = None, kept: dict[Path, Any] | None = None,
                        keep: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load one model, write <role>.onnx(+.data), validate it.

    `kept`: loaded models by source, shared between roles (a self-draft reuses its target's load: a GGUF file's
    load parses its whole vocabulary); `keep` leaves this one there for the next role. Returns its manifest entry
    (without TensorRT) and its generation settings (eos ids, chat template)."""
    from .export import export_onnx
    from .validate import require_passed, validate_graph

    loaded = kept.pop(source, None) if kept is not None else None
    if loaded is None:
        with progress.step(f"load {role} ({source.name})"):
            loaded = load_model(source, arch=arch, tokenizer=tokenizer)
    else:
        progress.say(f"    {role}: the same source as the target, already loaded")
    onnx_path = work_dir / f"{role}.onnx"
    quantize = config.quantize_for(role)
    # Quantized layers compute with int8 activations (MatMulNBits accuracy level 4): fast, and on the CPUs
    # measured, row-invariant for calls of 2+ rows (AVX-512/VNNI: for every row count, with the attention's padded
    # query rows, GraphSpec.pad_attention_rows; AVX2 only: a 1-row call differs, and the runtime shapes calls
    # around it, runtime/invariance.py). fp32 compute (level 0) is not row-invariant at all (measured ~7e-5
    # logits on SmolLM2), so it is not offered.
    level = 4
    logits_rows = logits_rows_for(role, config)
    features = config.head and role == "target"  # a draft head reads the target's final hidden states
    spec = GraphSpec(config.precision, config.max_context, vocab, quantize=quantize, accuracy_level=level,
                     logits_rows=logits_rows, output_ids=output_ids, features=features, batch_slots=config.max_batch)
    label = config.precision + (f", {quantize} weights" if spec.quantized else "")
    held = None
    with progress.step(f"export {role} ONNX ({label}, {loaded.arch.num_layers} layers)"):
        if quantize == "gguf":
            held = export_gguf_blocks(loaded, spec, onnx_path)
        else:
            export_onnx(loaded, spec, onnx_path)
    validation = None
    if config.validate:
        with progress.step(f"validate {role} against transformers"):
            report = validate_graph(onnx_path, loaded, precision=config.precision, max_context=config.max_context,
                                    vocab=vocab, widths=config.widths if role == "target" else (1,),
                                    quantize=quantize, logits_rows=logits_rows, output_ids=output_ids,
                                    features=loaded.arch.hidden_size if features else None,
                                    batch_slots=config.max_batch)
        progress.say(f"    {role}: {report.summary()}")
        require_passed(report, role)
        validation = report.to_json()
    entry = {
        "role": role,
        "arch": loaded.arch.to_json(),
        "precision": config.precision,
        "max_context": config.max_context,
        "logits_vocab": vocab,
        "logits_rows": logits_rows,
        "features": loaded.arch.hidden_size if features else None,
        "batch_slots": config.max_batch,
        "output_vocab": (None if output_ids is None else
                         {"size": len(output_ids), "lowest_ids": config.draft_vocab,
                          "special_ids": [i for i in output_ids if i >= config.draft_vocab],
                          "rule": "the lowest token ids (BPE merge order) plus added/special tokens; logits of the "
                                  "other ids are -inf"}),
        "widths": list(config.widths) if role == "target" else [],
        "graph": tensor_specs(loaded.arch, config.precision, vocab, logits_rows, features, config.max_batch),
        "quantization": (gguf_quantization_record(held, spec) if held is not None else
                         {"scheme": quantize,
                          "method": ("affine 4-bit blocks (integer zero point, fitted scale)" if quantize == "int4"
                                     else "symmetric 8-bit blocks") + ", onnxruntime MatMulNBits; lm_head "
                                    + ("fp32" if spec.accuracy_level == 0 else "int8"),
                          "block_size": spec.block_size, "accuracy_level": spec.accuracy_level}
                         if spec.quantized else None),
        "backends": {"onnx": {"path": onnx_path.name, "data": onnx_path.name + ".data", "opset": 17,
                              "contrib_ops": ["com.microsoft.MatMulNBits"] if spec.quantized else []}},
        "validation": validation,
        "source": {"name": source.name, "files": loaded.source_files},
    }
    generation = generation_settings(loaded.tokenizer, loaded.generation_config)
    if keep and kept is not None:
        kept[source] = loaded
    del loaded
    gc.collect()
    return entry, generation


def export_gguf_blocks(loaded: Any, spec: GraphSpec, onnx_path: Path) -> Any:
    """quantize=gguf: write the graph with every linear weight and the embeddings taken from the GGUF file's own
    blocks (loading.GgufBlocks), each checked bit for bit against transformers' loaded weight of that name before
    it is written. Returns the GgufBlocks, which knows what was held."""
    from .export import rope_tables, state_dict_weights
    from .loading import GgufBlocks, verify_blocks
    from .onnx_graph import build_decoder_onnx

    weights = state_dict_weights(loaded)
    held = GgufBlocks(loaded.source, loaded.arch, list(loaded.model.state_dict()))

    def blocks(name: str) -> Any:
        weight = held(name)
        if weight is not None:
            verify_blocks(weight, weights(name), name)
        return weight

    build_decoder_onnx(loaded.arch, weights, rope_tables(loaded, spec.max_context), spec, onnx_path, blocks=blocks)
    return held


def gguf_quantization_record(held: Any, spec: GraphSpec) -> dict[str, Any]:
    """The manifest's quantization record of a quantize=gguf model: what the file held and how it runs."""
    record = held.record()
    return {"scheme": "gguf",
            "method": "the GGUF file's own blocks, not re-quantized: onnxruntime MatMulNBits codes with fp32 scales "
                      "(+ an fp32 block-minimum correction, x's 32-element block sums @ correction, for types with a "
                      "minimum); token embeddings gathered from the same blocks; F32/F16/BF16 tensors as float "
                      "MatMul; every tensor checked bit for bit against transformers' dequantized weight",
            "accuracy_level": spec.accuracy_level,
            "block_types": record["block_types"],  # GGUF type -> how many of the file's tensors the graph holds so
            "tensors": record["tensors"],  # GGUF tensor name -> its type
            "zero_point_folded": record["zero_point_folded"],
            "rope_rows_unpermuted": record["rope_rows_unpermuted"]}


def compile_tensorrt(role: str, entry: dict[str, Any], config: BuildConfig, work_dir: Path,
                     progress: Progress) -> dict[str, Any]:
    """Build `role`'s engine next to its graph in `work_dir`; returns its manifest record (tensorrt_build.
    compile_model_engine, shared with `spectrt compile`)."""
    from .tensorrt_build import compile_model_engine, entry_profiles

    profiles = entry_profiles(role, entry, config.widths, config.prefill_opt)
    with progress.step(f"compile {role} TensorRT engine ({len(profiles)} profiles)"):
        # a fresh process: TensorRT's peak (about 2x the weights) does not stack on what export left behind
        return compile_model_engine(work_dir / f"{role}.onnx", work_dir / f"{role}.engine", profiles,
                                    workspace_mb=config.workspace_mb,
                                    timing_cache=Path(config.timing_cache) if config.timing_cache else None,
                                    compute_capabilities=config.compute_capabilities)


def generation_settings(tokenizer: Any, generation_config: Any) -> dict[str, Any]:
    eos = getattr(generation_config, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    return {
        "eos_token_ids": eos_ids,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
    }


def save_tokenizer(tokenizer: Any, work_dir: Path) -> str:
    tokenizer.backend_tokenizer.save(str(work_dir / "tokenizer.json"))
    return "tokenizer.json"


def tool_versions(config: BuildConfig) -> dict[str, str]:
    versions = {"spectrt": __version__, "python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "transformers", "onnx", "onnxruntime", "gguf", "tokenizers", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    if config.wants_tensorrt:
        from .tensorrt_build import import_tensorrt

        trt = import_tensorrt()
        versions[trt.__name__] = trt.__version__
    return versions


def file_table(work_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.name: file_facts(p) for p in sorted(work_dir.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}


def remove_own_temp(work_dir: Path) -> None:
    """Remove the temporary folder this build created (never a link, never anything else)."""
    if work_dir.is_dir() and not work_dir.is_symlink():
        shutil.rmtree(work_dir, ignore_errors=True)


def build_bundle(config: BuildConfig, *, engines_root: Path = Path("engines"), progress: Progress | None = None,
                 overwrite: bool = False) -> BuildResult:
    """Run the whole build for `config` and return where the bundle went.

    The out folder must be missing, empty, or (with `overwrite`) an earlier bundle; see check_out_dir."""
    progress = progress or Progress()
    start = time.perf_counter()
    out_dir = config.out_dir(engines_root)
    check_out_dir(out_dir, overwrite=overwrite)
    if config.wants_tensorrt:
        from .tensorrt_build import import_tensorrt

        import_tensorrt()  # fail fast with the install hint, before hours of export
    progress.say(f"spectrt build → {out_dir}")
    with progress.step("resolve models"):
        sources = {role: resolve_source(getattr(config, role)) for role in ROLES}
        config.check_sources(sources)
    with progress.step("check architectures and tokenizers"):
        archs = check_archs(config, sources)
        loaded_tokenizers = {path: load_tokenizer(path) for path in dict.fromkeys(sources[role] for role in ROLES)}
        tokenizers = {role: loaded_tokenizers[sources[role]] for role in ROLES}  # a self-draft shares its target's
        facts = check_pair(tokenizers["target"], tokenizers["draft"])
        vocab = shared_logits_vocab(facts, archs["target"].vocab_size, archs["draft"].vocab_size)
    progress.say(f"    shared tokenizer: {facts.size} ids; logits width {vocab}")

    destination = out_dir.absolute()
    destination.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{destination.name}.building-", dir=destination.parent))
    try:
        entries, generation, kept = {}, {}, {}
        self_draft = sources["target"] == sources["draft"]
        for role in ROLES:
            entries[role], generation[role] = export_and_validate(
                role, sources[role], config, vocab, work_dir, progress, arch=archs[role], tokenizer=tokenizers[role],
                output_ids=draft_output_ids(config, vocab, tuple(t[0] for t in facts.added_tokens))
                if role == "draft" else None, kept=kept, keep=self_draft and role == "target")
        if config.wants_tensorrt:
            for role in ROLES:
                entries[role]["backends"]["tensorrt"] = compile_tensorrt(role, entries[role], config, work_dir, progress)
        with progress.step("write bundle"):
            tokenizer_file = save_tokenizer(tokenizers["target"], work_dir)
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "name": out_dir.name,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "build": config.to_json() | {"target": sources["target"].name, "draft": sources["draft"].name,
                                             "out": None,  # no machine-specific paths in the bundle
                                             "timing_cache": Path(config.timing_cache).name if config.timing_cache else None},
                "tokenizer": {"file": tokenizer_file, "size": facts.size},
                "generation": generation["target"],
                "models": entries,
                "files": file_table(work_dir),
                "provenance": {"tool_versions": tool_versions(config), "platform": platform.platform(),
                               "machine": platform.machine()},
            }
            parse_manifest(work_dir, manifest)  # the runtime must accept what we write
            (work_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
            check_out_dir(out_dir, overwrite=overwrite)  # again: the folder may have changed during the build
            replace_dir_atomically(work_dir, destination)
    except BaseException:
        remove_own_temp(work_dir)
        raise
    if config.head:
        from .head import HeadConfig, train_head

        manifest["models"]["head"] = train_head(destination, HeadConfig(minutes=config.head_minutes), progress)
    return BuildResult(out_dir, manifest, time.perf_counter() - start, peak_rss_mb(), dict(progress.times))

