"""Memory planner: how much memory a bundle (or a recipe, before building it) needs, per backend, and whether it
fits a device.

Two inputs, one model of memory:
- bundle mode (`plan_bundle`): the manifest's architecture numbers, and the sizes of the files the runtime loads;
- recipe mode (`plan_recipe`): the two models' configs (a Hugging Face folder's config.json and tokenizer.json,
  or a GGUF file's metadata, read with the `gguf` package: imported only here) and the build settings; the
  weights are then the initializer bytes the graph builder (compiler/onnx_graph.py) would write.

Per backend (`BACKENDS`), a list of `Term`s, each with where it lives (host or device), its bytes and what the
number rests on (`basis`): "arithmetic" (exact from shapes), "file size", "measured" (a constant measured on the
machine named in CALIBRATION) or "estimate" (an argument, stated in the term's note, not a measurement).

- onnxruntime-cpu: every term in host memory: weights as ONNX Runtime holds them (measured factor x initializer
  bytes), both KV caches (runtime/kv_cache.py: rows in use only, numpy's zeroed pages are resident once written),
  the decoders' logits buffers, each session's activation arena for its largest call, and the process baseline
  (Python, numpy, onnxruntime, tokenizers; the tokenizer; each session's fixed cost).
- onnxruntime-cuda and tensorrt: the device arena of runtime/backends/device_plan.py (KV caches at max context,
  staging rows, logits rows, token slots, the shared activation area), the weights on the device, the CUDA
  runtime's own memory (an estimate: no GPU was measured), plus the host side of the process.

On Jetson, memory is unified: device and host share the RAM, so a plan fits when device + host bytes fit into
what the OS leaves (see `DEVICES`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from spectrt.runtime.errors import ConfigError, ModelLoadError

from .backends.device_plan import DTYPE_BYTES, ModelGeometry, Profile, dynamic_profile, plan_memory
from .manifest import Manifest, ModelEntry

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
DATA_ALIGN = 4096  # compiler/onnx_graph.py starts every external tensor on a page boundary
GRAPH_BYTES_PER_LAYER = 7 * KiB  # .onnx protobuf per decoder layer (Qwen2.5 1.5B: 201875 B / 28 layers)


# -- calibration ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Constants of the ONNX Runtime CPU model, each measured on `machine` in a fresh process (VmRSS / VmHWM deltas
    from /proc/self/status); tests/test_memory_plan.py checks their sum against a real generation's peak RSS.

    - process_baseline: VmHWM after importing numpy, tokenizers, onnxruntime and spectrt.runtime.generator: 57.3 MB.
    - tokenizer: VmRSS growth of tokenizers.Tokenizer.from_file: 30.9 MB for SmolLM2's 3.5 MB tokenizer.json, 89.9 MB
      for Qwen2.5's 11.4 MB one: 4.5 MB + 7.5 bytes per file byte.
    - ort_init, graph_per_layer: the first InferenceSession of a process costs 10.3 MB beyond its weights (a 3-layer
      tiny graph), any session about 0.26 MB per decoder layer (SmolLM2's 30-layer session: 6.9 MB).
    - weights, per kind (ModelShape.weights), resident bytes per file byte once a session is created:
      float: 1.0 (MatMul/Gemm prepack a copy of the same size and release the original: one fp32 MatMul alone,
      1.00; SmolLM2's fp32 sessions: +669.0 and +625.7 MB for 538.6 and 496.1 MB of files, the difference being
      the 113.2 MB table of its tied embeddings, mapped and read by the output layer's prepack, plus that copy);
      int8: 1.335 (MatMulNBits 8-bit, accuracy level 4, one node alone: 1.334-1.340 at three sizes);
      int4: 1.45 (MatMulNBits 4-bit, level 4: fitted on the Qwen2.5-Coder 1.5B target and 0.5B draft sessions,
      +1564.8 and +397.8 MB, the int8 term above given; one node alone measures 1.59);
      table: 0 (an embedding table only a Gather reads stays memory-mapped; only the rows read become resident).
      While a weight is prepacked its original is resident too: the load peak adds the largest one (Qwen 1.5B
      target: VmHWM 233 MB above its settled RSS, its 262.5 MB int8 output layer; a fp32 MatMul alone: 1.0x).
    - arena: a session's CPU arena (BFC, growing in power-of-two regions that it keeps) grew 11.4, 21.4, 43.6 and
      55.1 MB for SmolLM2 prefills of 100, 200, 440 and 511 tokens (their KV rows subtracted), against 4.0, 7.1,
      20.4 and 26.2 MB alive at once by ModelShape.activation_bytes: arena_base + arena_per_byte x that."""

    machine: str
    process_baseline: int
    tokenizer_base: int
    tokenizer_per_file_byte: float
    ort_init: int
    graph_per_layer: int
    float_weights: float
    int8_weights: float
    int4_weights: float
    table_weights: float
    arena_base: int
    arena_per_byte: float

    def resident_weights(self, shape: "ModelShape") -> int:
        """Bytes ONNX Runtime's CPU provider keeps resident for `shape`'s weights once its session exists."""
        kinds = shape.weight_kinds()
        packed = self.int8_weights if shape.quantized else self.float_weights  # the shared table's output layer
        return int(kinds["float"] * self.float_weights + kinds["int8"] * self.int8_weights
                   + kinds["int4"] * self.int4_weights + kinds["table"] * self.table_weights
                   + kinds["shared"] * (1 + packed) + kinds["small"])


CALIBRATION = Calibration(
    machine="x86-64 (AVX-512), 2 cores, Linux 6.18, Python 3.11.7, onnxruntime 1.32.0, numpy 2.4.6, tokenizers 0.23.3",
    process_baseline=57_300_000,
    tokenizer_base=4_500_000,
    tokenizer_per_file_byte=7.5,
    ort_init=10_300_000,
    graph_per_layer=256 * KiB,
    float_weights=1.0,
    int8_weights=1.335,
    int4_weights=1.45,
    table_weights=0.0,
    arena_base=4 * MiB,
    arena_per_byte=2.0,
)

# The CUDA runtime's own memory (context, cuBLAS/cuDNN or TensorRT runtime handles and workspaces, loaded kernels,
# the libraries' resident code: on Jetson all of it in the same RAM). Not measured (no GPU in the calibration run):
# typical values for CUDA 12 with lazy module loading on Jetson Orin, stated so that a reader can replace them.
CUDA_OVERHEAD = {"onnxruntime-cuda": 600 * MiB, "tensorrt": 400 * MiB}


# -- devices --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """A machine whose memory is shared by the CPU and the GPU (Jetson), or a plain budget (`--memory-gb`)."""

    name: str
    description: str
    memory: int  # bytes of RAM on the module
    reserved: int  # bytes the process cannot have: firmware/GPU carve-outs and the OS
    why: str

    @property
    def usable(self) -> int:
        return self.memory - self.reserved


# What the kernel sees (tegrastats' "RAM used/total") is the module's RAM minus carve-outs for firmware, the GPU and
# the video/camera engines; on top of that a headless JetPack (Ubuntu 22.04/24.04: systemd, networking, nvargus,
# docker) keeps about 1 GiB resident. A desktop session takes about 1 GiB more: pass --memory-gb then.
OS_RESIDENT = 1 * GiB
DEVICES = {
    "orin-nano-8gb": Device("orin-nano-8gb", "Jetson Orin Nano 8 GB", 8 * GiB, 8 * GiB - 7620 * MiB + OS_RESIDENT,
                            "about 7620 MB visible, as tegrastats commonly reports on JetPack 6; headless OS 1 GiB"),
    "orin-nx-16gb": Device("orin-nx-16gb", "Jetson Orin NX 16 GB", 16 * GiB, 16 * GiB - 15400 * MiB + OS_RESIDENT,
                           "about 15.0 GiB visible (assumed: the Orin Nano's carve-outs plus CMA); headless OS 1 GiB"),
    "agx-orin-64gb": Device("agx-orin-64gb", "Jetson AGX Orin 64 GB", 64 * GiB, 64 * GiB - 62841 * MiB + OS_RESIDENT,
                            "62841 MB visible (a tegrastats line in a public issue); headless OS 1 GiB"),
    "agx-thor-128gb": Device("agx-thor-128gb", "Jetson AGX Thor 128 GB", 128 * GiB, 128 * GiB - 125 * GiB + OS_RESIDENT,
                             "about 125 GiB visible (assumed: carve-outs as on AGX Orin); headless OS 1 GiB"),
}


def device_named(name: str | None, memory_gb: float | None) -> Device | None:
    """The device to check against: a known name, or `memory_gb` GiB the process may use (nothing reserved)."""
    if name is not None and memory_gb is not None:
        raise ConfigError("pass --device or --memory-gb, not both.")
    if memory_gb is not None:
        if not memory_gb > 0:
            raise ConfigError(f"--memory-gb must be positive (got {memory_gb}).")
        return Device("custom", f"{memory_gb:g} GiB", int(memory_gb * GiB), 0, "--memory-gb: all of it usable")
    if name is None:
        return None
    if name not in DEVICES:
        raise ConfigError(f"device '{name}' unknown; known devices: {', '.join(DEVICES)} (or pass --memory-gb N).")
    return DEVICES[name]


# -- models ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """One model's graph as the planner sees it: architecture numbers plus how the build stores it."""

    role: str  # target | draft
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab: int  # logits width (the shared tokenizer's size)
    output_rows: int  # rows of the output layer: vocab, or the draft's subset (draft_vocab)
    tie_word_embeddings: bool
    attention_bias: bool
    precision: str  # fp32 | fp16
    quantize: str  # none | int8 | int4 (MatMulNBits, int8 activations; the output layer int8)
    block_size: int
    max_context: int
    logits_rows: int  # the graph returns logits for the last min(S, logits_rows) positions
    widths: tuple[int, ...]  # target: built speculation widths; draft: ()
    weight_file_bytes: int | None = None  # bundle mode: sizes of the ONNX graph + its external data
    engine_file_bytes: int | None = None  # bundle mode with TensorRT engines: the engine's size
    engine_profiles: tuple[Profile, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.quantize != "none"

    @property
    def label(self) -> str:
        return self.precision + (f"+{self.quantize}" if self.quantized else "")

    def geometry(self) -> ModelGeometry:
        """The device plan's view of this model (as runtime/backends/planned.py derives it from a manifest)."""
        max_fixed_step = (max(self.widths) + 1) if self.widths else 2
        return ModelGeometry(self.role, self.num_layers, self.num_kv_heads, self.head_dim, self.precision, self.vocab,
                             self.max_context, self.logits_rows, max_fixed_step)

    def kv_bytes(self, rows: int) -> int:
        """Both caches (keys and values) of every layer for `rows` positions, as runtime/kv_cache.py lays them out."""
        return 2 * self.num_layers * rows * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.precision]

    def weights(self) -> list[tuple[str, tuple[int, ...]]]:
        """(kind, tensor bytes) of every weight compiler/onnx_graph.py writes to the external-data file, in its order
        (a quantized weight is several tensors: levels, scales, and for int4 zero points).

        The kind says how ONNX Runtime's CPU provider holds it: "float" and "int4"/"int8" weights are prepacked by
        their MatMul/Gemm/MatMulNBits kernel (the original released), a "table" only read by a Gather (untied
        embeddings) stays memory-mapped from the file, resident only where rows are read, a "shared" table (tied
        embeddings and output layer) is read by both, "small" tensors (norms, biases, rope tables) are held as is."""
        b = DTYPE_BYTES[self.precision]
        weights: list[tuple[str, tuple[int, ...]]] = []

        def table_int8(kind: str, rows: int, k: int) -> None:  # int8 blocks: uint8 levels, scales
            weights.append((kind, (rows * k, rows * (k // self.block_size) * b)))

        def linear(n: int, k: int) -> None:  # y = x @ W^T, W [N, K]
            if not self.quantized:
                weights.append(("float", (n * k * b,)))
                return
            bits = 8 if self.quantize == "int8" else 4
            blocks = k // self.block_size
            tensors = (n * blocks * self.block_size * bits // 8, n * blocks * b)
            if bits == 4:
                tensors += (n * math.ceil(blocks / 2),)  # zero points, two per byte
            weights.append((f"int{bits}", tensors))

        shared = self.tie_word_embeddings and self.output_rows == self.vocab  # one table: embeddings and output layer
        if self.quantized:  # the output layer (and the embeddings read from it) stay int8 blocks
            table_int8("shared" if shared else "int8", self.output_rows, self.hidden_size)
            if not shared:
                table_int8("table", self.vocab, self.hidden_size)
        else:
            weights.append(("shared" if shared else "table", (self.vocab * self.hidden_size * b,)))
            if not shared:
                weights.append(("float", (self.output_rows * self.hidden_size * b,)))
        weights += [("small", (self.max_context * self.head_dim * b,))] * 2  # rope cos, sin
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        for _ in range(self.num_layers):
            weights.append(("small", (self.hidden_size * b,)))  # input norm
            linear(qkv, self.hidden_size)
            if self.attention_bias:
                weights.append(("small", (qkv * b,)))
            linear(self.hidden_size, self.num_heads * self.head_dim)
            weights.append(("small", (self.hidden_size * b,)))  # post-attention norm
            linear(2 * self.intermediate_size, self.hidden_size)  # gate and up, one matrix
            linear(self.hidden_size, self.intermediate_size)
        weights.append(("small", (self.hidden_size * b,)))  # final norm
        return weights

    def data_file_bytes(self) -> int:
        """Size of the external-data file compiler/onnx_graph.py writes: every tensor starts on a page."""
        sizes = [size for _, tensors in self.weights() for size in tensors]
        return sum(-(-size // DATA_ALIGN) * DATA_ALIGN for size in sizes[:-1]) + sizes[-1]

    def weight_kinds(self) -> dict[str, int]:
        """Bytes per kind of weight (see `weights`); the graph's own protobuf counts as "small"."""
        kinds = {"float": 0, "int4": 0, "int8": 0, "table": 0, "shared": 0, "small": self.graph_file_bytes()}
        for kind, tensors in self.weights():
            kinds[kind] += sum(tensors)
        return kinds

    def largest_prepacked(self) -> int:
        """Bytes of the largest weight a kernel prepacks: while it is packed, its original is resident too."""
        return max((sum(tensors) for kind, tensors in self.weights() if kind != "table" and kind != "small"),
                   default=0)

    def graph_file_bytes(self) -> int:
        """Size of the .onnx graph itself: nodes and small constants (about GRAPH_BYTES_PER_LAYER per layer, measured
        on the bundles built here) plus the draft's output-id table [1, Vo] int64 when its vocabulary is reduced."""
        inline = 8 * self.output_rows if self.output_rows != self.vocab else 0
        return GRAPH_BYTES_PER_LAYER * self.num_layers + inline

    def weight_bytes(self) -> int:
        """The ONNX graph's weights and constants: the bundle's files when known, else their sizes from the
        architecture (data_file_bytes + graph_file_bytes)."""
        if self.weight_file_bytes is not None:
            return self.weight_file_bytes
        return self.data_file_bytes() + self.graph_file_bytes()

    def activation_bytes(self, new: int, past: int) -> int:
        """Intermediate tensors alive at once in one call of `new` tokens after `past` cached rows: the peak of
        the graph compiler/onnx_graph.py builds, when each tensor is freed after its last consumer.

        Alive throughout: the residual stream and its norm [S, H], the causal mask [S+1, T] fp32, rope cos/sin.
        At the attention's softmax: scores and probabilities [heads, S+1, T] fp32 (S+1: the padded query row),
        the queries, and past+new keys and values, concatenated and transposed [T, kv, D] (x4).
        At the MLP's split: gate_up [S, 2I] and its halves [S, I] (x2).
        Quantized graphs add MatMulNBits' int8 copy of its input (with a scale per block); the output layer
        adds its logits rows (over the draft's subset, then scattered to the whole vocabulary)."""
        b = DTYPE_BYTES[self.precision]
        rows, total = new + 1, past + new
        resident = 2 * new * self.hidden_size * b + rows * total * 4 + 2 * new * self.head_dim * b
        attention = (2 * self.num_heads * rows * total * 4 + self.num_heads * rows * self.head_dim * b
                     + 4 * total * self.num_kv_heads * self.head_dim * b)
        mlp = 4 * new * self.intermediate_size * b
        quantized_input = (new * max(self.hidden_size, self.intermediate_size) * (1 + 4 / self.block_size)
                           if self.quantized else 0)
        logit_rows = min(new, self.logits_rows)
        logits = logit_rows * self.output_rows * 4 + (logit_rows * self.vocab * 4 if self.output_rows != self.vocab
                                                      else 0)
        return int(resident + max(attention, mlp) + quantized_input + logits)

    def largest_call(self, context: int, prefill: int) -> tuple[int, int]:
        """(new, past) of the call with the most activation memory among: the prompt's prefill, and the widest
        step this model takes at the end of `context` tokens."""
        step = (max(self.widths) + 1) if self.widths else 2
        step = min(step, context)
        calls = [(min(prefill, context), 0), (step, context - step)]
        return max(calls, key=lambda call: self.activation_bytes(*call))


# -- bundle mode ----------------------------------------------------------------------------------------------------


def shape_from_entry(manifest: Manifest, entry: ModelEntry) -> ModelShape:
    """ModelShape of a manifest model, with the sizes of its files."""
    arch, raw = entry.raw["arch"], entry.raw
    quantization = raw.get("quantization") or {}
    output_vocab = raw.get("output_vocab") or {}
    onnx_files = [p for p in (entry.onnx_path, entry.onnx_data) if p is not None]
    weight_bytes = sum(manifest.files[p]["size"] for p in onnx_files) if onnx_files else None
    engine_bytes = manifest.files[entry.tensorrt_path]["size"] if entry.tensorrt_path else None
    profiles: tuple[Profile, ...] = ()
    if entry.tensorrt:
        from .backends.planned import profiles_from_manifest

        profiles = profiles_from_manifest(entry, {})
    return ModelShape(
        role=entry.role, num_layers=entry.num_layers, hidden_size=arch["hidden_size"], num_heads=arch["num_heads"],
        num_kv_heads=entry.num_kv_heads, head_dim=entry.head_dim, intermediate_size=arch["intermediate_size"],
        vocab=entry.logits_vocab, output_rows=output_vocab.get("size", entry.logits_vocab),
        tie_word_embeddings=bool(arch.get("tie_word_embeddings")), attention_bias=bool(arch.get("attention_bias")),
        precision=entry.precision, quantize=quantization.get("scheme", "none"),
        block_size=quantization.get("block_size", 32), max_context=entry.max_context,
        logits_rows=entry.logits_rows if entry.logits_rows is not None else entry.max_context,
        widths=tuple(entry.widths), weight_file_bytes=weight_bytes, engine_file_bytes=engine_bytes,
        engine_profiles=profiles)


# -- recipe mode: model configs without torch ----------------------------------------------------------------------


@dataclass(frozen=True)
class SourceConfig:
    """The architecture numbers of a source model (HF folder or GGUF file) the planner needs."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tokenizer_size: int  # ids the tokenizer produces (the logits width of a bundle)
    added_token_ids: tuple[int, ...]  # added/special tokens (a reduced draft vocabulary keeps them)
    tie_word_embeddings: bool
    attention_bias: bool
    tokenizer_bytes: int  # size of the tokenizer.json a build writes (measured or estimated)


def read_source_config(path: Path) -> SourceConfig:
    """Read a Hugging Face folder's config.json (+ tokenizer.json) or a GGUF file's metadata; never loads weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_config(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_config(path)
    raise ModelLoadError(f"'{path}' is neither a .gguf file nor a Hugging Face folder with config.json; pass one "
                         f"(or a known model name that `spectrt models fetch` has fetched).")


def _hf_config(folder: Path) -> SourceConfig:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read {folder / 'config.json'}: {exc}") from exc
    config = config.get("text_config", config)
    try:
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        hidden = int(config["hidden_size"])
        vocab_rows = int(config["vocab_size"])
        model_type = str(config.get("model_type"))
        size, added, tokenizer_bytes = vocab_rows, (), 0
        tokenizer_file = folder / "tokenizer.json"
        if tokenizer_file.is_file():
            size, added = _tokenizer_json_facts(tokenizer_file)
            tokenizer_bytes = tokenizer_file.stat().st_size
        return SourceConfig(
            model_type=model_type, num_layers=int(config["num_hidden_layers"]), hidden_size=hidden, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]), tokenizer_size=size, added_token_ids=added,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            tokenizer_bytes=tokenizer_bytes)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'} lacks an architecture number the planner needs ({exc}).") from exc


def _tokenizer_json_facts(path: Path) -> tuple[int, tuple[int, ...]]:
    """(len(tokenizer), added token ids) of a tokenizer.json, as transformers' len(tokenizer) counts them."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read {path}: {exc}") from exc
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
    added = tuple(sorted(int(t["id"]) for t in data.get("added_tokens", [])))
    ids |= set(added)
    return len(ids), added


GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # gguf TokenType values of special and added tokens
# tokenizer.json bytes per byte of a GGUF file's token and merge strings (JSON quoting, ids, the merges as pairs):
# 3.95 for Qwen2.5 (11.4 MB), 4.48 for SmolLM2 (3.5 MB)
TOKENIZER_JSON_PER_GGUF_STRING_BYTE = 4.2


def _gguf_config(path: Path) -> SourceConfig:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError("planning from a .gguf file reads its metadata with the `gguf` package: "
                          "pip install 'spectrt[build]' (or pip install gguf).") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors on a corrupt file
        raise ModelLoadError(f"could not read the GGUF metadata of '{path}': {exc}") from exc

    def value(key: str, default: Any = None) -> Any:
        found = reader.fields.get(key)
        if found is None:
            if default is None:
                raise ModelLoadError(f"GGUF file '{path}' has no '{key}' metadata; it is not a llama-family model "
                                     f"spectrt can build.")
            return default
        return found.contents()

    arch = value("general.architecture")
    heads = int(value(f"{arch}.attention.head_count"))
    hidden = int(value(f"{arch}.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    types = value("tokenizer.ggml.token_type", [])
    tensor_names = {tensor.name for tensor in reader.tensors}
    strings = 0
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        found = reader.fields.get(key)
        if found is not None:
            strings += sum(len(found.parts[i]) for i in found.data)
    return SourceConfig(
        model_type=str(arch), num_layers=int(value(f"{arch}.block_count")), hidden_size=hidden, num_heads=heads,
        num_kv_heads=int(value(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(value(f"{arch}.attention.key_length", hidden // heads)),
        intermediate_size=int(value(f"{arch}.feed_forward_length")),
        tokenizer_size=len(tokens.data) if tokens is not None else int(value(f"{arch}.vocab_size")),
        added_token_ids=tuple(i for i, t in enumerate(types) if t in (GGUF_CONTROL, GGUF_USER_DEFINED)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        tokenizer_bytes=int(strings * TOKENIZER_JSON_PER_GGUF_STRING_BYTE))


def shapes_from_configs(target: SourceConfig, draft: SourceConfig, *, widths: Iterable[int], max_context: int,
                        precision: str, quantize: dict[str, str], draft_vocab: int = 0,
                        block_size: int = 32) -> dict[str, ModelShape]:
    """The bundle's two models as a build with these settings would write them (compiler/build.py)."""
    widths = tuple(sorted(set(int(w) for w in widths)))
    vocab = target.tokenizer_size
    shapes = {}
    for role, source in (("target", target), ("draft", draft)):
        output_rows = vocab
        if role == "draft" and draft_vocab and draft_vocab < vocab:
            output_rows = len(set(range(draft_vocab)) | {i for i in source.added_token_ids if i < vocab})
        shapes[role] = ModelShape(
            role=role, num_layers=source.num_layers, hidden_size=source.hidden_size, num_heads=source.num_heads,
            num_kv_heads=source.num_kv_heads, head_dim=source.head_dim, intermediate_size=source.intermediate_size,
            vocab=vocab, output_rows=output_rows, tie_word_embeddings=source.tie_word_embeddings,
            attention_bias=source.attention_bias, precision=precision, quantize=quantize[role], block_size=block_size,
            max_context=max_context, logits_rows=max(widths) + 1 if role == "target" else 1,
            widths=widths if role == "target" else ())
    return shapes


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
            "models": {role: {k: v for k, v in asdict(shape).items() if k != "engine_profiles"}
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
              calibration: Calibration) -> BackendPlan:
    terms = []
    for role, shape in models.items():
        kinds = {k: v for k, v in shape.weight_kinds().items() if v}
        basis = "arithmetic x measured" + (" (= file size)" if shape.weight_file_bytes is not None else "")
        terms.append(Term("weights", "host", calibration.resident_weights(shape), basis,
                          f"{role}: " + ", ".join(f"{kind} {_human(n)}" for kind, n in kinds.items())
                          + " as ONNX Runtime holds them (see Calibration)"))
    for role, shape in models.items():
        terms.append(Term("kv_cache", "host", shape.kv_bytes(context), "arithmetic",
                          f"{role}: {context} rows x {shape.num_layers} layers x K,V [{shape.num_kv_heads} x "
                          f"{shape.head_dim}] {shape.precision} (rows never written are never resident)", "run"))
    for role, shape in models.items():
        rows = min(shape.logits_rows, shape.max_context)
        terms.append(Term("logits", "host", rows * shape.vocab * 4, "arithmetic",
                          f"{role}: [{rows}, {shape.vocab}] fp32 output buffer", "run"))
    for role, shape in models.items():
        new, past = shape.largest_call(context, prefill)
        active = shape.activation_bytes(new, past)
        terms.append(Term("activations", "host", arena_bytes(active, calibration), "estimate x measured",
                          f"{role}: the session's arena for its largest call ({new} new after {past} cached: "
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
              device: Device | None = None, calibration: Calibration = CALIBRATION) -> MemoryPlan:
    """The plan for `models` at `context` tokens (default: max context), the longest prompt `prefill` tokens
    (default: the whole context)."""
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
            plans.append(_cpu_plan(models, context, prefill, tokenizer_bytes, calibration))
        elif backend == "tensorrt" and any(s.quantized and s.engine_file_bytes is None for s in models.values()):
            notes.append("tensorrt: not planned: weight-quantized (MatMulNBits) graphs are for ONNX Runtime only; "
                         "TensorRT engines are built from unquantized graphs (e.g. --precision fp16, no --quantize)")
        else:
            plans.append(_gpu_plan(backend, models, context, prefill, tokenizer_bytes, calibration))
    return MemoryPlan(name, source, context, prefill, models, tuple(plans), device, calibration, tuple(notes))


def plan_bundle(bundle: Path | str, *, context: int | None = None, prefill: int | None = None,
                backends: Iterable[str] = BACKENDS, device: Device | None = None, load_draft: bool = True,
                calibration: Calibration = CALIBRATION) -> MemoryPlan:
    """The plan of a built bundle (reads manifest.json only; no file is hashed or loaded)."""
    from .manifest import read_manifest

    manifest = read_manifest(bundle)
    entries = [manifest.target] + ([manifest.draft] if load_draft and manifest.draft is not None else [])
    models = {entry.role: shape_from_entry(manifest, entry) for entry in entries}
    tokenizer_bytes = manifest.files.get(manifest.tokenizer_file, {}).get("size", 0)
    if not all(shape.weight_file_bytes is not None for shape in models.values()):
        backends = [b for b in backends if b == "tensorrt"]  # no ONNX graph: only the engines run
    return make_plan(manifest.name, str(bundle), models, tokenizer_bytes=tokenizer_bytes, context=context,
                     prefill=prefill, backends=backends, device=device, calibration=calibration)


def plan_recipe(name: str, sources: dict[str, Path], *, widths: Iterable[int], max_context: int, precision: str,
                quantize: dict[str, str], draft_vocab: int = 0, context: int | None = None,
                prefill: int | None = None, backends: Iterable[str] = BACKENDS, device: Device | None = None,
                calibration: Calibration = CALIBRATION) -> MemoryPlan:
    """The plan of a bundle not built yet, from the source models' configs (`sources`: role -> path) and the build
    settings (the fields of compiler/config.py's BuildConfig of the same names)."""
    configs = {role: read_source_config(path) for role, path in sources.items()}
    models = shapes_from_configs(configs["target"], configs["draft"], widths=widths, max_context=max_context,
                                 precision=precision, quantize=quantize, draft_vocab=draft_vocab)
    tokenizer_bytes = configs["target"].tokenizer_bytes  # the build saves the target's tokenizer
    return make_plan(name, ", ".join(str(p) for p in sources.values()), models, tokenizer_bytes=tokenizer_bytes,
                     context=context, prefill=prefill, backends=backends, device=device, calibration=calibration)


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

