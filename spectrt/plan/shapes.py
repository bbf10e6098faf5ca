"""One model as the planner sees it: architecture numbers, how the build stores its weights, its calls."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from spectrt.runtime.backends.device_plan import DTYPE_BYTES, ModelGeometry, Profile, fixed_step_rows
from spectrt.runtime.errors import ConfigError
from spectrt.runtime.manifest import Manifest, ModelEntry

from .calibration import KiB


DATA_ALIGN = 4096  # compiler/onnx_graph.py starts every external tensor on a page boundary
GRAPH_BYTES_PER_LAYER = 7 * KiB  # .onnx protobuf per decoder layer (Qwen2.5 1.5B: 201875 B / 28 layers)

# quantize = "gguf": GGUF block type -> (MatMulNBits bits, block size, has a block minimum), as
# compiler/gguf_blocks.LAYOUTS holds them; a type with a minimum adds an fp32 correction per 32 inputs
GGUF_BLOCKS: dict[str, tuple[int, int, bool]] = {
    "Q4_0": (4, 32, False), "Q4_1": (4, 32, True), "Q5_0": (8, 32, False), "Q5_1": (8, 32, True),
    "Q8_0": (8, 32, False), "Q4_K": (4, 32, True), "Q5_K": (8, 32, True), "Q6_K": (8, 16, False),
}
GGUF_CORRECTION_BLOCK = 32

# how one projection is stored: (parts: (GGUF tensor name, rows) stacked along the rows, K) -> (kind, tensor bytes)
Projection = Callable[[list[tuple[str, int]], int], list[tuple[str, tuple[int, ...]]]]


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
    quantize: str  # none | int8 | int4 (MatMulNBits, int8 activations; the output layer int8) | gguf (as stored)
    block_size: int
    max_context: int
    logits_rows: int  # the graph returns logits for the last min(S, logits_rows) positions
    widths: tuple[int, ...]  # target: built speculation widths; draft: ()
    weight_file_bytes: int | None = None  # bundle mode: sizes of the ONNX graph + its external data
    engine_file_bytes: int | None = None  # bundle mode with TensorRT engines: the engine's size
    engine_profiles: tuple[Profile, ...] = ()
    gguf_types: tuple[tuple[str, str], ...] = ()  # quantize = "gguf": (GGUF tensor name, type) of the source file

    @property
    def quantized(self) -> bool:
        return self.quantize != "none"

    @property
    def label(self) -> str:
        return self.precision + (f"+{self.quantize}" if self.quantized else "")

    def geometry(self) -> ModelGeometry:
        """The device plan's view of this model (as runtime/backends/planned.py derives it from a manifest)."""
        max_fixed_step = fixed_step_rows(self.widths)
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
        if self.quantize == "gguf":
            tables, project = self._gguf_storage()
        else:
            tables, project = self._block_storage()
        return tables + self._decoder_weights(project)

    def _decoder_weights(self, project: "Projection") -> list[tuple[str, tuple[int, ...]]]:
        """Rope tables, every layer's norms, projections and bias, the final norm, in compiler/onnx_graph.py's order;
        `project(parts, k)` stores one projection: the weights `parts` ((GGUF tensor name, rows)) stacked, input K."""
        b = DTYPE_BYTES[self.precision]
        h, heads, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        weights = [("small", (self.max_context * self.head_dim * b,))] * 2  # rope cos, sin
        for i in range(self.num_layers):
            blk = f"blk.{i}"
            weights.append(("small", (h * b,)))  # input norm
            weights += project([(f"{blk}.attn_q.weight", heads), (f"{blk}.attn_k.weight", kv),
                                (f"{blk}.attn_v.weight", kv)], h)
            if self.attention_bias:
                weights.append(("small", ((heads + 2 * kv) * b,)))
            weights += project([(f"{blk}.attn_output.weight", h)], heads)
            weights.append(("small", (h * b,)))  # post-attention norm
            weights += project([(f"{blk}.ffn_gate.weight", self.intermediate_size),
                                (f"{blk}.ffn_up.weight", self.intermediate_size)], h)  # gate and up, one matrix
            weights += project([(f"{blk}.ffn_down.weight", h)], self.intermediate_size)
        weights.append(("small", (h * b,)))  # final norm
        return weights

    def _block_storage(self) -> tuple[list[tuple[str, tuple[int, ...]]], "Projection"]:
        """Float weights, or spectrt's int8/int4 blocks (the output layer, and the embeddings read from it, int8):
        the embedding/output tables and how one projection is stored."""
        b = DTYPE_BYTES[self.precision]

        def table_int8(kind: str, rows: int, k: int) -> tuple[str, tuple[int, ...]]:  # uint8 levels, scales
            return kind, (rows * k, rows * (k // self.block_size) * b)

        def project(parts: list[tuple[str, int]], k: int) -> list[tuple[str, tuple[int, ...]]]:
            n = sum(rows for _, rows in parts)  # y = x @ W^T, W [N, K]: the parts stacked into one matrix
            if not self.quantized:
                return [("float", (n * k * b,))]
            bits = 8 if self.quantize == "int8" else 4
            blocks = k // self.block_size
            tensors = (n * blocks * self.block_size * bits // 8, n * blocks * b)
            if bits == 4:
                tensors += (n * math.ceil(blocks / 2),)  # zero points, two per byte
            return [(f"int{bits}", tensors)]

        shared = self.tie_word_embeddings and self.output_rows == self.vocab  # one table: embeddings and output layer
        if self.quantized:
            tables = [table_int8("shared" if shared else "int8", self.output_rows, self.hidden_size)]
            if not shared:
                tables.append(table_int8("table", self.vocab, self.hidden_size))
        else:
            tables = [("shared" if shared else "table", (self.vocab * self.hidden_size * b,))]
            if not shared:
                tables.append(("float", (self.output_rows * self.hidden_size * b,)))
        return tables, project

    def _gguf_storage(self) -> tuple[list[tuple[str, tuple[int, ...]]], "Projection"]:
        """quantize = "gguf" (compiler/onnx_graph.py's gguf path, fp32 graphs): each GGUF tensor as stored (codes,
        fp32 scales, an fp32 correction where the type has a block minimum; 4-bit zero points folded into it, as
        the build does wherever that is exact), float tensors as fp32; the consecutive weights of one projection
        that share a form (bits, block, correction) stacked into one node, float ones into one MatMul."""
        if not self.gguf_types:
            raise ConfigError("a gguf-quantized model needs its GGUF tensor types to be planned (the source must be "
                              "a .gguf file; a bundle records them in its manifest).")
        types = dict(self.gguf_types)

        def form(name: str) -> tuple[int, int, bool] | None:  # None: a float tensor
            qtype = types.get(name)
            if qtype is None:
                raise ConfigError(f"the GGUF file has no tensor '{name}' this architecture needs.")
            return GGUF_BLOCKS.get(qtype)

        def tensors(shape: tuple[int, int, bool] | None, n: int, k: int) -> tuple[str, tuple[int, ...]]:
            if shape is None:
                return "float", (n * k * 4,)
            bits, block, minimum = shape
            parts = (n * k * bits // 8, n * (k // block) * 4)  # codes, scales
            return f"int{bits}", parts + ((n * (k // GGUF_CORRECTION_BLOCK) * 4,) if minimum else ())

        def project(parts: list[tuple[str, int]], k: int) -> list[tuple[str, tuple[int, ...]]]:
            runs: list[list] = []  # [form, rows]
            for name, rows in parts:
                shape = form(name)
                if runs and runs[-1][0] == shape:
                    runs[-1][1] += rows
                else:
                    runs.append([shape, rows])
            return [tensors(shape, rows, k) for shape, rows in runs]

        h = self.hidden_size
        shared = self.tie_word_embeddings and self.output_rows == self.vocab
        tables = [("shared" if shared else "table", tensors(form("token_embd.weight"), self.vocab, h)[1])]
        if not shared:
            tables.append(tensors(form("token_embd.weight" if self.tie_word_embeddings else "output.weight"),
                                  self.output_rows, h))
        return tables, project

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

    def largest_call(self, context: int, prefill: int, prefill_chunk: int | None = None) -> tuple[int, int]:
        """(new, past) of the call with the most activation memory among: the prompt's prefill (in one call, or its
        last `prefill_chunk`-token chunk), and the widest step this model takes at the end of `context` tokens."""
        step = min(fixed_step_rows(self.widths), context)
        prompt = min(prefill, context)
        first = (prompt, 0) if prefill_chunk is None or prompt <= prefill_chunk else (prefill_chunk, prompt - prefill_chunk)
        calls = [first, (step, context - step)]
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
        from spectrt.runtime.backends.planned import profiles_from_manifest

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
        engine_profiles=profiles, gguf_types=tuple(sorted((quantization.get("tensors") or {}).items())))
