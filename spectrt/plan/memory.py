"""The plan: per backend, the terms of host and device memory, and whether they fit a device."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from spectrt.runtime.backends.device_plan import Profile, dynamic_profile, plan_memory
from spectrt.runtime.errors import ConfigError
from spectrt.runtime.invariance import CHUNK_CANDIDATES

from . import BACKENDS
from .calibration import CALIBRATION, CUDA_OVERHEAD, Calibration
from .devices import Device
from .shapes import ModelShape, shape_from_entry

PREFILL_CHUNK_MAX = max(CHUNK_CANDIDATES)  # the largest prefill chunk the runtime's call shaping uses (default on)
from .sources import read_source_config, shapes_from_configs



# -- the plan -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One line of a backend's plan."""

    name: str  # weights | kv_cache | logits | activations | staging | token_ids | cuda_runtime | runtime | load
    where: str  # host | device
    nbytes: int
    basis: str  # arithmetic | file size | measured | estimate (and combinations)
    note: str
    phase: str = "always"  # always | run (while generating) | load (while loading the models)


@dataclass(frozen=True)
class BackendPlan:
    """One backend's terms. The peak is the "always" terms plus the larger of the "run" and the "load" ones."""

    backend: str
    precision: str
    terms: tuple[Term, ...]
    notes: tuple[str, ...] = ()

    def _sum(self, phase: str, where: str | None = None) -> int:
        return sum(t.nbytes for t in self.terms if t.phase == phase and where in (None, t.where))

    @property
    def peak_phase(self) -> str:
        """'load' when loading the models needs more than generating does (a large prepacked weight), else 'run'."""
        return "load" if self._sum("load") > self._sum("run") else "run"

    @property
    def device_bytes(self) -> int:
        return self._sum("always", "device") + self._sum(self.peak_phase, "device")

    @property
    def host_bytes(self) -> int:
        return self._sum("always", "host") + self._sum(self.peak_phase, "host")

    @property
    def total(self) -> int:
        """Peak bytes of the process with device and host memory counted together (unified memory)."""
        return self.device_bytes + self.host_bytes

    def term(self, name: str) -> int:
        return sum(t.nbytes for t in self.terms if t.name == name)


@dataclass(frozen=True)
class MemoryPlan:
    name: str
    source: str
    context: int  # tokens of prompt + output planned for
    prefill: int  # the longest prompt, prefilled in one call
    models: dict[str, ModelShape]
    backends: tuple[BackendPlan, ...]
    device: Device | None = None
    calibration: Calibration = field(default=CALIBRATION, repr=False)
    notes: tuple[str, ...] = ()  # backends not planned, and why

    def backend(self, name: str) -> BackendPlan:
        for plan in self.backends:
            if plan.backend == name:
                return plan
        raise KeyError(name)

    def fits(self, name: str) -> bool | None:
        """Whether `name`'s total fits the device's usable memory (None without a device)."""
        return None if self.device is None else self.backend(name).total <= self.device.usable

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "context": self.context, "prefill": self.prefill,
            "models": {role: {k: dict(v) if k == "gguf_types" else v for k, v in asdict(shape).items()
                              if k != "engine_profiles"}
                       | {"weight_bytes": shape.weight_bytes()} for role, shape in self.models.items()},
            "backends": {plan.backend: {"precision": plan.precision, "device_bytes": plan.device_bytes,
                                        "host_bytes": plan.host_bytes, "total_bytes": plan.total,
                                        "fits": self.fits(plan.backend), "terms": [asdict(t) for t in plan.terms],
                                        "notes": list(plan.notes)}
                         for plan in self.backends},
            "device": None if self.device is None else asdict(self.device) | {"usable": self.device.usable},
            "calibration": asdict(self.calibration),
            "notes": list(self.notes),
        }


def _runtime_terms(models: dict[str, ModelShape], tokenizer_bytes: int, calibration: Calibration,
                   sessions: bool = True) -> list[Term]:
    """The host side of the process: the interpreter and libraries, the tokenizer, the ONNX Runtime sessions."""
    terms = [
        Term("runtime", "host", calibration.process_baseline, "measured",
             "Python + numpy + onnxruntime + tokenizers + spectrt.runtime imported"),
        Term("runtime", "host", int(calibration.tokenizer_base + tokenizer_bytes * calibration.tokenizer_per_file_byte),
             "measured", f"the tokenizer: {_human(calibration.tokenizer_base)} + "
                         f"{calibration.tokenizer_per_file_byte:.1f} x tokenizer.json ({_human(tokenizer_bytes)})"),
    ]
    if sessions:
        layers = sum(shape.num_layers for shape in models.values())
        terms.append(Term("runtime", "host", calibration.ort_init + layers * calibration.graph_per_layer, "measured",
                          f"ONNX Runtime: {_human(calibration.ort_init)} at the first session + "
                          f"{_human(calibration.graph_per_layer)} per graph layer ({len(models)} session(s), "
                          f"{layers} layers)"))
    return terms


def _cpu_plan(models: dict[str, ModelShape], context: int, prefill: int, tokenizer_bytes: int,
              calibration: Calibration, cache_slots: int = 1) -> BackendPlan:
    terms = []
    for role, shape in models.items():
        kinds = {k: v for k, v in shape.weight_kinds().items() if v}
        basis = "arithmetic x measured" + (" (= file size)" if shape.weight_file_bytes is not None else "")
        terms.append(Term("weights", "host", calibration.resident_weights(shape), basis,
                          f"{role}: " + ", ".join(f"{kind} {_human(n)}" for kind, n in kinds.items())
                          + " as ONNX Runtime holds them (see Calibration)"))
    for role, shape in models.items():
        slots = f"{cache_slots} cache slots x " if cache_slots > 1 else ""
        terms.append(Term("kv_cache", "host", cache_slots * shape.kv_bytes(context), "arithmetic",
                          f"{role}: {slots}{context} rows x {shape.num_layers} layers x K,V [{shape.num_kv_heads} x "
                          f"{shape.head_dim}] {shape.precision} (rows never written are never resident)", "run"))
    for role, shape in models.items():
        rows = min(shape.logits_rows, shape.max_context)
        terms.append(Term("logits", "host", rows * shape.vocab * 4, "arithmetic",
                          f"{role}: [{rows}, {shape.vocab}] fp32 output buffer", "run"))
    for role, shape in models.items():
        # the target's prefill runs in chunks of at most PREFILL_CHUNK_MAX rows when the runtime shapes its calls
        # for exactness (the default, runtime/invariance.py); a draft reads a prompt in one call
        chunk = PREFILL_CHUNK_MAX if role == "target" else None
        new, past = shape.largest_call(context, prefill, chunk)
        active = shape.activation_bytes(new, past)
        chunked = " (a prefill chunk: the runtime's exactness shaping)" if chunk and new == chunk and past else ""
        terms.append(Term("activations", "host", arena_bytes(active, calibration), "estimate x measured",
                          f"{role}: the session's arena for its largest call ({new} new after {past} cached{chunked}: "
                          f"{_human(active)} alive at once; arena {_human(calibration.arena_base)} + "
                          f"{calibration.arena_per_byte:.1f} x that)", "run"))
    # loading (target first, then draft): while a model's largest weight is prepacked its original is resident too,
    # and the models loaded after it are not there yet
    order = list(models.values())
    excess = {shape.role: shape.largest_prepacked() - sum(calibration.resident_weights(later)
                                                          for later in order[index + 1:])
              for index, shape in enumerate(order)}
    role = max(excess, key=excess.get)
    terms.append(Term("load", "host", max(excess[role], 0), "arithmetic",
                      f"while loading the {role}, its largest weight ({_human(models[role].largest_prepacked())}) is "
                      f"resident twice (original and packed), less the weights of models loaded after it", "load"))
    terms += _runtime_terms(models, tokenizer_bytes, calibration)
    labels = sorted({shape.label for shape in models.values()})
    notes = (("fp16 graphs on ONNX Runtime's CPU provider were not measured (its x86 kernels are mostly fp32: casts "
              "may add memory); the fp32 factors are used",) if any(s.precision == "fp16" for s in models.values())
             else ())
    return BackendPlan("onnxruntime-cpu", "/".join(labels), tuple(terms), notes)


def arena_bytes(active: int, calibration: Calibration = CALIBRATION) -> int:
    """Resident bytes of an ONNX Runtime arena whose largest call has `active` bytes alive at once."""
    return int(calibration.arena_base + calibration.arena_per_byte * active)


def tensorrt_activation_estimate(shape: ModelShape) -> tuple[int, str]:
    """A TensorRT context's device memory before its engine exists: the graph's live intermediates at the shapes
    TensorRT must be ready for, the largest profile's maxima (prefill: S = C new tokens after P = C - 1 cached ones,
    since a profile bounds S and P separately). Without attention fusion this is what TensorRT reserves; when its
    compiler fuses the attention (the scores never stored) it needs less: an upper bound, for planning."""
    if shape.engine_profiles:
        profile = max(shape.engine_profiles, key=lambda p: shape.activation_bytes(p.seq[1], p.past[1]))
        new, past = profile.seq[1], profile.past[1]
        where = f"profile '{profile.name}' maxima"
    else:
        new, past = shape.max_context, shape.max_context - 1
        where = "prefill profile maxima"
    return shape.activation_bytes(new, past), f"{where}: {new} new after {past} cached"


def _gpu_plan(backend: str, models: dict[str, ModelShape], context: int, prefill: int, tokenizer_bytes: int,
              calibration: Calibration) -> BackendPlan:
    notes = []
    profiles = {}
    activation_notes = []
    for role, shape in models.items():
        geometry = shape.geometry()
        if backend == "tensorrt":
            nbytes, why = tensorrt_activation_estimate(shape)
            activation_notes.append(f"{role} {why}")
            profiles[role] = (Profile(0, "planned", (1, shape.max_context), (0, shape.max_context - 1), nbytes),)
        else:
            profiles[role] = (dynamic_profile(geometry),)
    # the arena is allocated once the sessions or engines are loaded: "run" phase, next to the load-time copies
    breakdown = plan_memory([(shape.geometry(), profiles[role]) for role, shape in models.items()]).breakdown()
    terms = []
    for role, shape in models.items():
        if backend == "tensorrt" and shape.engine_file_bytes is not None:
            terms.append(Term("weights", "device", shape.engine_file_bytes, "file size",
                              f"{role}: the TensorRT engine (weights and kernels) as deserialized"))
        else:
            basis = "file size" if shape.weight_file_bytes is not None else "arithmetic"
            what = "ONNX initializers (TensorRT keeps them at the graph's precision)" if backend == "tensorrt" \
                else "ONNX initializers copied to the device"
            terms.append(Term("weights", "device", shape.weight_bytes(), basis, f"{role}: {what}"))
    plan_notes = {"kv_cache": "per layer K,V [max_context, kv_heads, head_dim] of both models",
                  "staging": "rows for new K/V when a row address is not 256-byte aligned",
                  "logits": "logits rows of both models, fp32", "token_ids": "token slots, int64"}
    for name, note in plan_notes.items():
        terms.append(Term(name, "device", breakdown[name], "arithmetic", f"device_plan arena: {note}", "run"))
    if backend == "tensorrt":
        terms.append(Term("activations", "device", breakdown["activations"], "estimate",
                          "one area shared by every context of both models, the largest of: "
                          + "; ".join(activation_notes) + " (an upper bound: see tensorrt_activation_estimate)",
                          "run"))
    else:
        nbytes = sum(arena_bytes(shape.activation_bytes(*shape.largest_call(context, prefill)), calibration)
                     for shape in models.values())
        terms.append(Term("activations", "device", nbytes, "estimate x measured",
                          f"ONNX Runtime's CUDA arena of each session for its largest call (a prefill of {prefill} "
                          f"tokens), counted like the CPU arena (also a BFC arena growing in power-of-two regions)",
                          "run"))
        if any(shape.quantized for shape in models.values()):
            notes.append("the graphs are weight-quantized (MatMulNBits) for the CPU path; ONNX Runtime CUDA runs 4-bit "
                         "MatMulNBits, but build fp16 graphs for a GPU")
    terms.append(Term("cuda_runtime", "device", CUDA_OVERHEAD[backend], "estimate",
                      "CUDA context, library handles and workspaces (typical on Jetson Orin with CUDA 12; not measured)"))
    terms += _runtime_terms(models, tokenizer_bytes, calibration, sessions=backend != "tensorrt")
    if backend == "tensorrt":
        engine = max((shape.engine_file_bytes or shape.weight_bytes()) for shape in models.values())
        terms.append(Term("load", "host", engine, "file size" if any(s.engine_file_bytes for s in models.values())
                          else "estimate",
                          "while loading, the largest engine file is mapped and read by TensorRT (page cache: "
                          "reclaimable, counted to stay on the safe side)",
                          "load"))
    labels = sorted({shape.label for shape in models.values()})
    return BackendPlan(backend, "/".join(labels), tuple(terms), tuple(notes))


def make_plan(name: str, source: str, models: dict[str, ModelShape], *, tokenizer_bytes: int,
              context: int | None = None, prefill: int | None = None, backends: Iterable[str] = BACKENDS,
              device: Device | None = None, calibration: Calibration = CALIBRATION,
              cache_slots: int = 1) -> MemoryPlan:
    """The plan for `models` at `context` tokens (default: max context), the longest prompt `prefill` tokens
    (default: the whole context); `cache_slots`: KV caches the runtime holds (a server's --prefix-slots, default its
    --max-batch; ONNX Runtime CPU only), each planned full at `context`."""
    if cache_slots < 1:
        raise ConfigError(f"cache slots must be >= 1 (got {cache_slots}).")
    max_context = min(shape.max_context for shape in models.values())
    context = max_context if context is None else context
    if not 1 <= context <= max_context:
        raise ConfigError(f"context {context} must be between 1 and the bundle's max context {max_context}.")
    prefill = context if prefill is None else prefill
    if not 1 <= prefill <= context:
        raise ConfigError(f"prefill {prefill} must be between 1 and the context {context}.")
    plans, notes = [], []
    for backend in backends:
        if backend not in BACKENDS:
            raise ConfigError(f"backend '{backend}' unknown; choose from {', '.join(BACKENDS)}.")
        if backend == "onnxruntime-cpu":
            plans.append(_cpu_plan(models, context, prefill, tokenizer_bytes, calibration, cache_slots))
        elif backend == "tensorrt" and any(s.quantized and s.engine_file_bytes is None for s in models.values()):
            notes.append("tensorrt: not planned: weight-quantized (MatMulNBits) graphs are for ONNX Runtime only; "
                         "TensorRT engines are built from unquantized graphs (e.g. --precision fp16, no --quantize)")
        elif cache_slots > 1:
            notes.append(f"{backend}: not planned with {cache_slots} cache slots: batching and kept prefixes run on "
                         f"ONNX Runtime's CPU path only so far")
        else:
            plans.append(_gpu_plan(backend, models, context, prefill, tokenizer_bytes, calibration))
    return MemoryPlan(name, source, context, prefill, models, tuple(plans), device, calibration, tuple(notes))


def plan_bundle(bundle: Path | str, *, context: int | None = None, prefill: int | None = None,
                backends: Iterable[str] = BACKENDS, device: Device | None = None, load_draft: bool = True,
                calibration: Calibration = CALIBRATION, cache_slots: int = 1) -> MemoryPlan:
    """The plan of a built bundle (reads manifest.json only; no file is hashed or loaded)."""
    from spectrt.runtime.manifest import read_manifest

    manifest = read_manifest(bundle)
    entries = [manifest.target] + ([manifest.draft] if load_draft and manifest.draft is not None else [])
    models = {entry.role: shape_from_entry(manifest, entry) for entry in entries}
    tokenizer_bytes = manifest.files.get(manifest.tokenizer_file, {}).get("size", 0)
    if not all(shape.weight_file_bytes is not None for shape in models.values()):
        backends = [b for b in backends if b == "tensorrt"]  # no ONNX graph: only the engines run
    return make_plan(manifest.name, str(bundle), models, tokenizer_bytes=tokenizer_bytes, context=context,
                     prefill=prefill, backends=backends, device=device, calibration=calibration,
                     cache_slots=cache_slots)


def plan_recipe(name: str, sources: dict[str, Path], *, widths: Iterable[int], max_context: int, precision: str,
                quantize: dict[str, str], draft_vocab: int = 0, context: int | None = None,
                prefill: int | None = None, backends: Iterable[str] = BACKENDS, device: Device | None = None,
                calibration: Calibration = CALIBRATION, cache_slots: int = 1) -> MemoryPlan:
    """The plan of a bundle not built yet, from the source models' configs (`sources`: role -> path) and the build
    settings (the fields of compiler/config.py's BuildConfig of the same names)."""
    configs = {role: read_source_config(path) for role, path in sources.items()}
    models = shapes_from_configs(configs["target"], configs["draft"], widths=widths, max_context=max_context,
                                 precision=precision, quantize=quantize, draft_vocab=draft_vocab)
    tokenizer_bytes = configs["target"].tokenizer_bytes  # the build saves the target's tokenizer
    return make_plan(name, ", ".join(str(p) for p in sources.values()), models, tokenizer_bytes=tokenizer_bytes,
                     context=context, prefill=prefill, backends=backends, device=device, calibration=calibration,
                     cache_slots=cache_slots)


# -- text -----------------------------------------------------------------------------------------------------------


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{int(count)} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


TERM_LABELS = {"weights": "weights", "kv_cache": "KV cache", "logits": "logits buffers", "activations": "activations",
               "staging": "KV staging rows", "token_ids": "token slots", "cuda_runtime": "CUDA runtime",
               "runtime": "process (Python, ORT, tokenizer)", "load": "load-time copy"}


def format_plan(plan: MemoryPlan, *, details: bool = True) -> str:
    """A table: one column per backend, one row per kind of memory; then the totals and the device check."""
    lines = [f"memory plan for {plan.name} ({plan.source})",
             f"  context {plan.context} tokens (longest prompt {plan.prefill})"]
    for role, shape in plan.models.items():
        lines.append(f"  {role}: {shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_heads} heads / "
                     f"{shape.num_kv_heads} KV x {shape.head_dim}, vocab {shape.vocab}"
                     + (f" (output layer {shape.output_rows})" if shape.output_rows != shape.vocab else "")
                     + f", {shape.label}, max context {shape.max_context}")
    names = [name for name in TERM_LABELS if any(p.term(name) for p in plan.backends)]
    width = max((len(TERM_LABELS[n]) for n in names), default=20) + 2
    header = " " * width + "".join(f"{p.backend:>20s}" for p in plan.backends)
    lines += ["", header, " " * width + "".join(f"{p.precision:>20s}" for p in plan.backends)]
    for name in names:
        cells = []
        for p in plan.backends:
            where = {t.where for t in p.terms if t.name == name}
            cells.append(f"{_human(p.term(name))} {'dev' if where == {'device'} else 'host'}" if where else "-")
        lines.append(f"{TERM_LABELS[name]:<{width}s}" + "".join(f"{c:>20s}" for c in cells))
    lines.append(f"{'device total':<{width}s}" + "".join(f"{_human(p.device_bytes):>20s}" for p in plan.backends))
    lines.append(f"{'host total':<{width}s}" + "".join(f"{_human(p.host_bytes):>20s}" for p in plan.backends))
    lines.append(f"{'total (unified)':<{width}s}" + "".join(f"{_human(p.total):>20s}" for p in plan.backends))
    lines.append(f"{'peak while':<{width}s}"
                 + "".join(f"{'loading' if p.peak_phase == 'load' else 'generating':>20s}" for p in plan.backends))
    lines.append("  total = weights, process and CUDA runtime + the larger of generating (KV cache, logits, activations, "
                 "arena) and loading (load-time copy)")
    if plan.device is not None:
        device = plan.device
        lines.append(f"{'fits ' + device.name:<{width}s}"
                     + "".join(f"{('yes' if plan.fits(p.backend) else 'NO'):>20s}" for p in plan.backends))
        lines.append(f"  {device.description}: {_human(device.usable)} usable of {_human(device.memory)} "
                     f"({_human(device.reserved)} reserved: {device.why})")
    if details:
        lines.append("")
        for p in plan.backends:
            lines.append(f"{p.backend}:")
            for t in p.terms:
                lines.append(f"  {TERM_LABELS[t.name]:<{width}s}{_human(t.nbytes):>11s} {t.where:6s} {t.phase:6s} "
                             f"[{t.basis}] {t.note}")
            lines += [f"  note: {n}" for n in p.notes]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
