"""Build the decoder ONNX graph of a llama-family model by hand, with an explicit KV cache.

Graph contract (batch is fixed to 1; S = new tokens this call, P = cached tokens before it):

    inputs   input_ids           int64  [1, S]
             past_key_{i}        dtype  [1, P, kv_heads, head_dim]    (sequence-major)
             past_value_{i}      dtype  [1, P, kv_heads, head_dim]
    outputs  logits              fp32   [1, R, vocab]                 (the last R = min(S, logits_rows) positions;
                                                                       vocab = shared tokenizer size)
             new_key_{i}         dtype  [1, S, kv_heads, head_dim]    (only the S new rows)
             new_value_{i}       dtype  [1, S, kv_heads, head_dim]

A prefill needs only its last position's logits and a verification its K+1 rows, so the graph computes
the output layer for the last `logits_rows` positions only (max width + 1 for a target, 1 for a draft).

Token s sits at position P + s and attends to every cached token and to new tokens <= s, so one
call verifies K+1 tokens. The graph returns only the new cache rows: the runtime writes them
into a preallocated cache at row P and passes the prefix [:P] back next call (a contiguous view
because the layout is sequence-major), so rolling back is moving P and no step copies the cache.

Only plain ONNX ops (opset 17) are used so TensorRT 10.3+ parses the graph; the one exception is the
optional weight-only quantized CPU variant (quantize=int8/int4/gguf), whose linear layers use
onnxruntime's MatMulNBits and which is for ONNX Runtime only. quantize=gguf takes every linear weight (and the
token embeddings) from a GGUF file's own blocks (compiler/gguf_blocks.py), exactly as stored. In fp16 graphs the
norms, softmax and logits are computed in fp32. Weights go to one external-data file written
tensor by tensor, so the graph never holds all weights in memory twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from spectrt.runtime.manifest import expected_graph_io, slot_suffix

from .arch import ModelArch
from .gguf_blocks import CORRECTION_BLOCK, BlockWeight, concat_rows, form, take_rows

OPSET = 17
MASK_VALUE = -1e9  # added to fp32 scores of masked positions
DTYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
ALIGN = 4096  # external tensors start on page boundaries so onnxruntime can mmap them


class ExternalDataWriter:
    """Appends tensors to one .data file and returns TensorProtos that point into it."""

    def __init__(self, data_path: Path):
        self.data_path = data_path
        self.handle = open(data_path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        pad = (-self.offset) % ALIGN
        if pad:
            self.handle.write(b"\0" * pad)
            self.offset += pad
        proto = TensorProto()
        proto.name = name
        proto.dims.extend(array.shape)
        proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.handle.write(array.tobytes())
        self.offset += array.nbytes
        return proto

    def close(self) -> None:
        self.handle.close()


class GraphBuilder:
    """Collects nodes and initializers; small tensors are inlined, weights go to external data."""

    def __init__(self, writer: ExternalDataWriter, np_dtype: type, onnx_dtype: int):
        self.writer = writer
        self.np_dtype = np_dtype
        self.onnx_dtype = onnx_dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def op(self, op_type: str, inputs: list[str], prefix: str | None = None, n_out: int = 1, **attrs) -> str | list[str]:
        base = self._name(prefix or op_type.lower())
        outputs = [base] if n_out == 1 else [f"{base}_{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=base, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def branch(self, build: Callable[[], list[str]], output_types: list[tuple[int, list]], name: str
               ) -> onnx.GraphProto:
        """A subgraph (an If branch) of the nodes `build()` adds, returning its outputs (ONNX element type, shape
        per output); it reads the enclosing graph's values and initializers by name."""
        outer, self.nodes = self.nodes, []
        try:
            results = build()
            outputs = []
            for result, (elem, shape) in zip(results, output_types):
                exposed = self._name(f"{name}_out")
                self.nodes.append(helper.make_node("Identity", [result], [exposed]))
                outputs.append(helper.make_tensor_value_info(exposed, elem, shape))
            return helper.make_graph(self.nodes, self._name(name), [], outputs)
        finally:
            self.nodes = outer

    def const(self, array: np.ndarray, prefix: str = "const") -> str:
        name = self._name(prefix)
        self.initializers.append(helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape,
                                                    array.tobytes(), raw=True))
        return name

    def weight(self, name: str, array: np.ndarray, dtype: type | None = None) -> str:
        self.initializers.append(self.writer.tensor(name, array.astype(dtype or self.np_dtype, copy=False)))
        return name

    def linear(self, x: str, name: str, weight_nk: np.ndarray, spec: "GraphSpec",
               quantized: "QuantizedWeight | None" = None) -> str:
        """x @ W^T for a PyTorch-layout weight [N, K]: MatMul, or MatMulNBits when quantizing (`quantized`: weights
        already stored by `quantized_weight`)."""
        if not spec.quantized:
            return self.op("MatMul", [x, self.weight(name, np.ascontiguousarray(weight_nk.T))])
        n, k = weight_nk.shape
        stored = quantized or self.quantized_weight(name, weight_nk, spec)
        inputs = [x, stored.packed, stored.scales] + ([stored.zeros] if stored.zeros else [])  # scales: activation type
        return self.op("MatMulNBits", inputs, prefix="matmul_nbits", domain="com.microsoft",
                       K=k, N=n, bits=stored.bits, block_size=spec.block_size, accuracy_level=spec.accuracy_level)

    def quantized_weight(self, name: str, weight_nk: np.ndarray, spec: "GraphSpec") -> "QuantizedWeight":
        """Store W [N, K] in MatMulNBits' blockwise layout (int4 affine or int8 symmetric, per spec.quantize)."""
        bits = 8 if spec.quantize == "int8" else 4
        n, k = weight_nk.shape
        if k % spec.block_size:
            raise ValueError(f"{name}: input size {k} is not a multiple of the quantization block {spec.block_size}")
        packed, scales, zeros = quantize_blockwise(weight_nk, bits, spec.block_size)
        return QuantizedWeight(bits, self.weight(name + ".q", packed, np.uint8), self.weight(name + ".scales", scales),
                               None if zeros is None else self.weight(name + ".zero_points", zeros, np.uint8), n, k)

    def embedding_from_int8(self, table: "QuantizedWeight", ids: str, block_size: int) -> str:
        """Rows of an int8 blockwise table (e.g. the quantized output layer's weights) for token ids [1, S] ->
        [1, S, K] in the graph dtype: (q - 128) * scale, elementwise, so each row is exact whatever S is."""
        assert table.bits == 8 and table.zeros is None
        blocks = table.k // block_size
        rows = self.op("Gather", [table.packed, ids], axis=0)  # [1, S, blocks, bs] uint8
        scales = self.op("Reshape", [table.scales, self.ints([table.n, blocks, 1])])  # [V, blocks, 1]
        row_scales = self.op("Gather", [scales, ids], axis=0)  # [1, S, blocks, 1]
        centred = self.op("Sub", [self.op("Cast", [rows], to=self.onnx_dtype), self.scalar(128.0, self.np_dtype)])
        values = self.op("Mul", [centred, row_scales])  # [1, S, blocks, bs]
        return self.op("Reshape", [values, self.ints([1, -1, table.k])], prefix="embed")  # [1, S, K]

    def store_blocks(self, name: str, weight: BlockWeight) -> "StoredBlocks":
        """Write a GGUF block representation's tensors (MatMulNBits inputs; the correction transposed to
        [K/32, N] for its MatMul) as they are."""
        zeros = None if weight.zero_points is None else self.weight(name + ".zero_points", weight.zero_points, np.uint8)
        correction = (None if weight.correction is None else
                      self.weight(name + ".correction", np.ascontiguousarray(weight.correction.T), np.float32))
        return StoredBlocks(weight, self.weight(name + ".q", weight.packed, np.uint8),
                            self.weight(name + ".scales", weight.scales.reshape(-1), np.float32), zeros, correction)

    def block_linear(self, x: str, stored: "StoredBlocks", accuracy_level: int, rank: int) -> str:
        """x [.., K] (rank `rank`) @ W^T with W held as stored: MatMulNBits, + blocksum32(x) @ correction^T where the
        type has a minimum (see gguf_blocks)."""
        w = stored.weight
        inputs = [x, stored.packed, stored.scales] + ([stored.zeros] if stored.zeros else [])
        main = self.op("MatMulNBits", inputs, prefix="matmul_nbits", domain="com.microsoft", K=w.k, N=w.n,
                       bits=w.bits, block_size=w.block_size, accuracy_level=accuracy_level)
        if stored.correction is None:
            return main
        blocks = self.op("Reshape", [x, self.ints([0] * (rank - 1) + [w.k // CORRECTION_BLOCK, CORRECTION_BLOCK])])
        block_sums = self.op("ReduceSum", [blocks, self.ints([-1])], keepdims=0)  # [.., K/32]
        return self.op("Add", [main, self.op("MatMul", [block_sums, stored.correction])], prefix="block_min")

    def embedding_from_blocks(self, table: "StoredBlocks", ids: str) -> str:
        """Rows of a block table for token ids [1, S] -> [1, S, K] fp32, computed as gguf_blocks.
        dequantize_representation computes them (code - zero, times the scale, plus the correction: the same
        fp32 operations in the same order), so each row is the file's row bit for bit whatever S is. 4-bit codes
        are unpacked in the graph (opset 17 has no bitwise ops: high = floor(byte / 16), low = byte - 16 high,
        both exact in fp32)."""
        w = table.weight
        blocks = w.k // w.block_size
        rows = self.op("Cast", [self.op("Gather", [table.packed, ids], axis=0)], to=TensorProto.FLOAT)  # [1, S, blocks, b]
        if w.bits == 4:
            high = self.op("Floor", [self.op("Mul", [rows, self.scalar(1 / 16, np.float32)])])
            low = self.op("Sub", [rows, self.op("Mul", [high, self.scalar(16.0, np.float32)])])
            pairs = self.op("Concat", [self.op("Unsqueeze", [low, self.ints([-1])]),
                                       self.op("Unsqueeze", [high, self.ints([-1])])], axis=-1)  # [1, S, blocks, B/2, 2]
            rows = self.op("Reshape", [pairs, self.ints([0, 0, blocks, w.block_size])])  # element 2i = low nibble of i
        if w.zero_points is None:
            rows = self.op("Sub", [rows, self.scalar(float(w.default_zero), np.float32)])
        elif w.zero_points.any():  # block_weight only makes zero points 0 (a minimum's types); anything else: a bug
            raise ValueError(f"{table.packed}: nonzero explicit zero points are not supported in an embedding table")
        scales = self.op("Reshape", [table.scales, self.ints([w.n, blocks, 1])])  # [V, blocks, 1]
        values = self.op("Mul", [rows, self.op("Gather", [scales, ids], axis=0)])  # [1, S, blocks, B]
        if table.correction is not None:
            values = self.op("Reshape", [values, self.ints([0, 0, w.k // CORRECTION_BLOCK, CORRECTION_BLOCK])])
            corr = self.op("Gather", [table.correction, ids], axis=1)  # [K/32, 1, S]
            corr = self.op("Unsqueeze", [self.op("Transpose", [corr], perm=[1, 2, 0]), self.ints([-1])])  # [1, S, K/32, 1]
            values = self.op("Add", [values, corr])
        return self.op("Reshape", [values, self.ints([1, -1, w.k])], prefix="embed")  # [1, S, K]

    def ints(self, values: list[int]) -> str:
        return self.const(np.array(values, dtype=np.int64), "shape")

    def scalar(self, value: float, dtype: type) -> str:
        return self.const(np.array(value, dtype=dtype), "scalar")


@dataclass(frozen=True)
class QuantizedWeight:
    """Initializer names of a weight [N, K] stored for MatMulNBits."""

    bits: int
    packed: str  # uint8 [N, K/bs, bs*bits/8]
    scales: str  # [N * K/bs]
    zeros: str | None  # int4 only: uint8 [N * ceil(K/bs / 2)] zero points, two per byte
    n: int
    k: int


@dataclass(frozen=True)
class StoredBlocks:
    """A GGUF block weight (gguf_blocks.BlockWeight) and the initializer names it was stored under."""

    weight: BlockWeight
    packed: str
    scales: str  # fp32 [N * K/B]
    zeros: str | None
    correction: str | None  # fp32 [K/32, N]


WeightFn = Callable[[str], np.ndarray]  # HF state-dict name -> fp32 numpy array
BlockFn = Callable[[str], "BlockWeight | None"]  # HF state-dict name -> the GGUF tensor's blocks in transformers'
# row order, or None where the file stores it as a float (F32/F16/BF16) tensor (compiler/loading.GgufBlocks)


@dataclass(frozen=True)
class GraphSpec:
    """What to build: precision, maximum context, the shared logits width and weight quantization."""

    precision: str  # fp32 | fp16
    max_context: int
    logits_vocab: int  # rows of the embedding / lm_head kept (the tokenizer's size)
    quantize: str = "none"  # none | int8 | int4: weight-only, onnxruntime MatMulNBits (CPU path); the lm_head
    # is int8 at accuracy level 4 and stays fp32 at level 0 (onnxruntime's fp32-compute int8 kernel is very slow).
    # gguf: the source file's own blocks for every linear layer, the output layer and the embeddings (fp32 only)
    block_size: int = 32  # quantization block along the input dimension
    accuracy_level: int = 0  # MatMulNBits compute: 0 = in the activation type, 4 = int8 activations (fast on CPU)
    logits_rows: int | None = None  # logits for the last R positions of a call only (None: every position)
    output_ids: tuple[int, ...] | None = None  # the output layer covers only these token ids; the others get
    # logits -inf (a draft that never proposes them). None: the whole vocabulary
    pad_attention_rows: bool = True  # attention always sees >= 2 query rows (see _attention): batch invariance
    features: bool = False  # also return the final hidden state (after the last norm) of every position, fp32:
    # the input of a trained draft head (compiler/head.py)
    batch_slots: int = 1  # sequences one call holds (each its own rows, positions and cache); 1: the classic graph

    @property
    def quantized(self) -> bool:
        return self.quantize != "none"


def quantize_blockwise(weight_nk: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blockwise weight quantization in onnxruntime's MatMulNBits layout.

    weight_nk [N, K] (out, in) -> packed uint8 [N, blocks, block_size * bits / 8], fp32 scales [N * blocks]
    and zero points (int4: uint8 [N * ceil(blocks / 2)], two per byte, low nibble first; int8: None).
    int4 is affine with an integer zero point per block, w ~= (q - zero) * scale, q in 0..15: the form
    MatMulNBits' int8-activation kernel runs at full speed (a float offset would need an extra fp32 MatMul
    per layer, and float zero points fall back to a slow path). Per block, a few scales around
    (max - min) / 15 are tried, each refined by least squares for its levels, and the one with the smallest
    squared error is kept. A weight already on such a grid (both ends used) is reproduced to float rounding.
    int8 is symmetric: w ~= (q - 128) * scale.
    """
    n, k = weight_nk.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :k] = weight_nk
    grouped = padded.reshape(n, blocks, block_size)  # [N, blocks, bs]
    if bits == 8:
        scales = np.abs(grouped).max(axis=-1) / 127
        scales[scales == 0] = 1.0
        q = np.clip(np.rint(grouped / scales[..., None]) + 128, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(q), scales.astype(np.float32).reshape(-1), None
    q, scales, zeros = _fit_int4_blocks(grouped)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # two values per byte, low nibble first
    if blocks % 2:  # zero points are packed per row, padded to whole bytes
        zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
    packed_zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)  # [N, ceil(blocks / 2)]
    return np.ascontiguousarray(packed), scales.reshape(-1), np.ascontiguousarray(packed_zeros.reshape(-1))


def _fit_int4_blocks(grouped: np.ndarray, shrink: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """grouped [N, B, bs] -> levels uint8 [N, B, bs], scales fp32 [N, B], zero points uint8 [N, B] minimising
    the squared error of (q - zero) * scale over a few candidate scales (each refined by least squares)."""
    # the grid (0 - zero) .. (15 - zero) always holds 0, so the range is widened to include it
    low, high = np.minimum(grouped.min(axis=-1), 0), np.maximum(grouped.max(axis=-1), 0)  # [N, B]
    span = np.maximum(high - low, np.float32(1e-30)) / 15
    best_error = np.full(low.shape, np.inf, np.float32)
    best_q = np.zeros(grouped.shape, np.uint8)
    best_scale = np.ones(low.shape, np.float32)
    best_zero = np.zeros(low.shape, np.uint8)
    for factor in shrink:
        scale = (span * factor).astype(np.float32)
        zero = np.clip(np.rint(-low / scale), 0, 15)  # [N, B]
        q = np.clip(np.rint(grouped / scale[..., None]) + zero[..., None], 0, 15)  # [N, B, bs]
        centred = q - zero[..., None]
        norm = (centred * centred).sum(axis=-1)
        refined = np.where(norm > 0, (grouped * centred).sum(axis=-1) / np.maximum(norm, 1), scale)
        refined = np.where(refined > 0, refined, scale).astype(np.float32)
        error = ((centred * refined[..., None] - grouped) ** 2).sum(axis=-1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_q = np.where(better[..., None], q.astype(np.uint8), best_q)
        best_scale = np.where(better, refined, best_scale)
        best_zero = np.where(better, zero.astype(np.uint8), best_zero)
    return best_q, best_scale.astype(np.float32), best_zero


def dequantize_blockwise(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int,
                         block_size: int, k: int) -> np.ndarray:
    """Inverse of quantize_blockwise -> [N, K] fp32 (used by tests)."""
    n, blocks = packed.shape[0], packed.shape[1]
    if bits == 4:
        q = np.empty((n, blocks, block_size), np.uint8)
        q[..., 0::2], q[..., 1::2] = packed & 0x0F, packed >> 4
        zero_bytes = zeros.reshape(n, -1)
        unpacked = np.empty((n, zero_bytes.shape[1] * 2), np.uint8)
        unpacked[:, 0::2], unpacked[:, 1::2] = zero_bytes & 0x0F, zero_bytes >> 4
        zero = unpacked[:, :blocks].astype(np.float32)[..., None]  # [N, B, 1]
    else:
        q, zero = packed, np.float32(128)
    values = (q.astype(np.float32) - zero) * scales.reshape(n, blocks, 1)
    return values.reshape(n, blocks * block_size)[:, :k]


def _rms_norm(gb: GraphBuilder, x: str, weight: str, eps: float) -> str:
    """RMSNorm computed in fp32 whatever the graph precision; output in graph precision."""
    x32 = gb.op("Cast", [x], to=TensorProto.FLOAT) if gb.onnx_dtype != TensorProto.FLOAT else x
    variance = gb.op("ReduceMean", [gb.op("Mul", [x32, x32])], axes=[-1], keepdims=1)
    inv_rms = gb.op("Reciprocal", [gb.op("Sqrt", [gb.op("Add", [variance, gb.scalar(eps, np.float32)])])])
    normed = gb.op("Mul", [x32, inv_rms])
    if gb.onnx_dtype != TensorProto.FLOAT:
        normed = gb.op("Cast", [normed], to=gb.onnx_dtype)
    return gb.op("Mul", [normed, weight], prefix="rmsnorm")


def _last_row(gb: GraphBuilder, x: str, axis: int) -> str:
    """x[..., -1:, ...] along `axis` (a Slice with constant bounds)."""
    return gb.op("Slice", [x, gb.ints([-1]), gb.ints([2 ** 62]), gb.ints([axis])])


def _rotate(gb: GraphBuilder, x: str, cos: str, sin: str, head_dim: int, rotary_dim: int | None = None) -> str:
    """x * cos + rotate_half(x) * sin, x: [1, S, heads, D], cos/sin: [1, S, 1, R]; with partial rotary (R < D) only
    the first R dims of each head rotate and the rest pass through."""
    if rotary_dim is not None and rotary_dim != head_dim:
        x_rot, x_pass = gb.op("Split", [x, gb.ints([rotary_dim, head_dim - rotary_dim])], n_out=2, axis=-1)
        return gb.op("Concat", [_rotate(gb, x_rot, cos, sin, rotary_dim), x_pass], axis=-1, prefix="rope_partial")
    half = gb.ints([head_dim // 2, head_dim // 2])
    x1, x2 = gb.op("Split", [x, half], n_out=2, axis=-1)
    rotated = gb.op("Concat", [gb.op("Neg", [x2]), x1], axis=-1)
    return gb.op("Add", [gb.op("Mul", [x, cos]), gb.op("Mul", [rotated, sin])], prefix="rope")


def _norm_weight(gb: GraphBuilder, arch: ModelArch, name: str, array: np.ndarray) -> str:
    """An RMSNorm weight as the graph multiplies by it: (offset + w) in fp32 (Gemma's 1 + w, computed as
    transformers computes it), then stored in the graph dtype."""
    if arch.norm_weight_offset:
        array = np.float32(arch.norm_weight_offset) + array.astype(np.float32)
    return gb.weight(name, array)


def _attention(gb: GraphBuilder, arch: ModelArch, weights: WeightFn, layer: int, h: str,
               cos: str, sin: str, slots: list["SlotRows"], kind: str, spec: GraphSpec,
               blocks: BlockFn | None = None) -> tuple[str, list[tuple[str, str]]]:
    """Grouped-query attention of every slot's new rows over that slot's past + new rows. Returns (attn_out
    [1, N, H], per slot its (new_key, new_value) [1, S_b, kv, D]). The projections run on all N rows at once; each
    slot's attention is the very subgraph (ops and shapes) a one-sequence graph runs for a call of its S_b rows."""
    prefix = f"model.layers.{layer}.self_attn"
    heads, kv_heads, head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
    qkv_names = ([f"{prefix}.qkv_proj.weight"] if arch.fused_projections
                 else [f"{prefix}.{p}_proj.weight" for p in "qkv"])
    qkv = _project(gb, h, f"layers.{layer}.attn.qkv.weight", qkv_names, weights, spec, blocks)  # [1, N, (h+2kv)*D]
    if arch.attention_bias:
        qkv_bias = np.concatenate([weights(f"{prefix}.{p}_proj.bias") for p in "qkv"])
        qkv = gb.op("Add", [qkv, gb.weight(f"layers.{layer}.attn.qkv.bias", qkv_bias)])
    sizes = gb.ints([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    q, k, v = gb.op("Split", [qkv, sizes], n_out=3, axis=-1)
    q = gb.op("Reshape", [q, gb.ints([1, -1, heads, head_dim])])  # [1, N, h, D]
    k = gb.op("Reshape", [k, gb.ints([1, -1, kv_heads, head_dim])])  # [1, N, kv, D]
    values = gb.op("Reshape", [v, gb.ints([1, -1, kv_heads, head_dim])])
    if arch.qk_norm:  # RMSNorm over each head's dims, before rope
        q = _rms_norm(gb, q, _norm_weight(gb, arch, f"layers.{layer}.attn.q_norm.weight",
                                          weights(f"{prefix}.q_norm.weight")), arch.rms_norm_eps)
        k = _rms_norm(gb, k, _norm_weight(gb, arch, f"layers.{layer}.attn.k_norm.weight",
                                          weights(f"{prefix}.k_norm.weight")), arch.rms_norm_eps)
    q = _rotate(gb, q, cos, sin, head_dim, arch.rotary_dim)
    keys = _rotate(gb, k, cos, sin, head_dim, arch.rotary_dim)
    if len(slots) == 1:  # the classic one-sequence graph
        context = _attend(gb, arch, layer, q, keys, values, slots[0].masks[kind], slots[0].suffix, spec)
        new_rows = [(keys, values)]
    else:
        context, new_rows = _slots_attention(gb, arch, layer, q, keys, values, slots, kind, spec)
    out = _project(gb, context, f"layers.{layer}.attn.o.weight", [f"{prefix}.o_proj.weight"], weights, spec,
                   blocks)  # [1, N, H]
    return out, new_rows


def _slots_attention(gb: GraphBuilder, arch: ModelArch, layer: int, q: str, keys: str, values: str,
                     slots: list["SlotRows"], kind: str, spec: GraphSpec) -> tuple[str, list[tuple[str, str]]]:
    """The attention of slots[0] (which always has rows: the runtime fills slots from the first) and, when slots[1]
    has rows, of the slots after it, nested the same way: (context [1, rows of these slots, h*D], per slot its
    (new_key, new_value) [1, S_b, kv, D]). Unused slots cost one If node per layer in all (measured on the int4 Qwen
    1.5B graph with 4 slots: three unused slots' ops added 16 ms to a 71 ms one-sequence step; an If per slot still
    ~3 ms)."""
    first = slots[0]
    q_s, key_s, value_s = (gb.op("Slice", [x, *first.bounds, gb.ints([1])], prefix=f"slot{first.index}_rows")
                           for x in (q, keys, values))
    context = _attend(gb, arch, layer, q_s, key_s, value_s, first.masks[kind], first.suffix, spec)
    if len(slots) == 1:
        return context, [(key_s, value_s)]
    rest = slots[1:]

    def used() -> list[str]:
        rest_context, rest_rows = _slots_attention(gb, arch, layer, q, keys, values, rest, kind, spec)
        return [rest_context, *(name for pair in rest_rows for name in pair)]

    def unused() -> list[str]:
        no_context = gb.const(np.zeros((1, 0, arch.num_heads * arch.head_dim), gb.np_dtype), "no_rows")
        no_rows = gb.const(np.zeros((1, 0, arch.num_kv_heads, arch.head_dim), gb.np_dtype), "no_rows")
        return [no_context, *[no_rows] * (2 * len(rest))]

    types = [(gb.onnx_dtype, [1, None, arch.num_heads * arch.head_dim]),
             *[(gb.onnx_dtype, [1, None, arch.num_kv_heads, arch.head_dim])] * (2 * len(rest))]
    outputs = gb.op("If", [rest[0].active], n_out=len(types), prefix=f"slots{rest[0].index}_attention",
                    then_branch=gb.branch(used, types, f"slots{rest[0].index}_used"),
                    else_branch=gb.branch(unused, types, f"slots{rest[0].index}_unused"))
    context = gb.op("Concat", [context, outputs[0]], axis=1)
    return context, [(key_s, value_s)] + [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(len(rest))]


def _attend(gb: GraphBuilder, arch: ModelArch, layer: int, q: str, new_key: str, new_value: str, mask: str,
            suffix: str, spec: GraphSpec) -> str:
    """One sequence's attention: q [1, S, h, D] (rotated) over past_{key,value}_{layer}{suffix} [1, P, kv, D] and its
    own new rows [1, S, kv, D], with `mask` [S(+1), P+S]; returns the context [1, S, h*D]."""
    heads, kv_heads, head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
    all_keys = gb.op("Concat", [f"past_key_{layer}{suffix}", new_key], axis=1)  # [1, T, kv, D]
    all_values = gb.op("Concat", [f"past_value_{layer}{suffix}", new_value], axis=1)
    keys_t = gb.op("Transpose", [all_keys], perm=[2, 0, 3, 1])  # [kv, 1, D, T]
    values_t = gb.op("Transpose", [all_values], perm=[2, 0, 1, 3])  # [kv, 1, T, D]
    q = gb.op("Reshape", [q, gb.ints([-1, kv_heads, arch.kv_groups, head_dim])])  # [S, kv, g, D]
    q = gb.op("Transpose", [q], perm=[1, 2, 0, 3])  # [kv, g, S, D]
    scale = head_dim ** -0.5 if arch.attention_scale is None else arch.attention_scale
    q = gb.op("Mul", [q, gb.scalar(scale, gb.np_dtype)])
    if spec.pad_attention_rows:
        # One extra query row (a copy of the last) so the batched MatMuls never see a single row: onnxruntime's
        # CPU MatMul takes another kernel path for 1-row products (Q.K^T differs by ~1e-5), while every row of
        # a >= 2-row product is computed the same way whatever the row count. The extra row is dropped below.
        q = gb.op("Concat", [q, _last_row(gb, q, axis=2)], axis=2)  # [kv, g, S+1, D]
    scores = _scores(gb, q, keys_t, head_dim)  # [kv, g, S(+1), T]
    if gb.onnx_dtype != TensorProto.FLOAT:
        scores = gb.op("Cast", [scores], to=TensorProto.FLOAT)
    probs = gb.op("Softmax", [gb.op("Add", [scores, mask])], axis=-1)  # fp32
    if gb.onnx_dtype != TensorProto.FLOAT:
        probs = gb.op("Cast", [probs], to=gb.onnx_dtype)
    context = gb.op("MatMul", [probs, values_t])  # [kv, g, S(+1), D]
    if spec.pad_attention_rows:
        context = gb.op("Slice", [context, gb.ints([0]), gb.ints([-1]), gb.ints([2])])  # [kv, g, S, D]
    context = gb.op("Transpose", [context], perm=[2, 0, 1, 3])  # [S, kv, g, D]
    return gb.op("Reshape", [context, gb.ints([1, -1, heads * head_dim])])  # [1, S, h*D]


SCORE_CHUNK = 128  # widest head-dim slice one score MatMul sums over (see _scores)


def _scores(gb: GraphBuilder, q: str, keys_t: str, head_dim: int) -> str:
    """q [kv, g, S, D] @ keys_t [kv, 1, D, T] -> [kv, g, S, T]. Heads wider than SCORE_CHUNK (Gemma 3: 256) are
    summed as MatMuls over 128-dim slices plus an Add: measured on onnxruntime's CPU MatMul (AVX2, 2 threads), a
    256-deep product gives a row other bits at some row counts and cache lengths (5 of 72 combinations; never at
    depth 128 or less), which broke greedy exactness of the Gemma 3 270M bundle at width 8; the sliced sum gave
    identical rows in all 72."""
    if head_dim <= SCORE_CHUNK:
        return gb.op("MatMul", [q, keys_t])
    sizes = [SCORE_CHUNK] * (head_dim // SCORE_CHUNK) + ([head_dim % SCORE_CHUNK] if head_dim % SCORE_CHUNK else [])
    q_parts = gb.op("Split", [q, gb.ints(sizes)], n_out=len(sizes), axis=-1)
    key_parts = gb.op("Split", [keys_t, gb.ints(sizes)], n_out=len(sizes), axis=2)
    scores = gb.op("MatMul", [q_parts[0], key_parts[0]])
    for q_part, key_part in zip(q_parts[1:], key_parts[1:]):
        scores = gb.op("Add", [scores, gb.op("MatMul", [q_part, key_part])], prefix="scores")
    return scores


def _mlp(gb: GraphBuilder, arch: ModelArch, weights: WeightFn, layer: int, h: str, spec: GraphSpec,
         blocks: BlockFn | None = None) -> str:
    prefix = f"model.layers.{layer}.mlp"
    gate_up_names = ([f"{prefix}.gate_up_proj.weight"] if arch.fused_projections
                     else [f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"])
    gate_up = _project(gb, h, f"layers.{layer}.mlp.gate_up.weight", gate_up_names, weights, spec, blocks)  # [1, S, 2I]
    gate, up = gb.op("Split", [gate_up, gb.ints([arch.intermediate_size] * 2)], n_out=2, axis=-1)
    activated = gb.op("Mul", [_activation(gb, gate, arch.hidden_act), up])  # act(gate) * up
    return _project(gb, activated, f"layers.{layer}.mlp.down.weight", [f"{prefix}.down_proj.weight"], weights, spec,
                    blocks)


def _activation(gb: GraphBuilder, x: str, kind: str) -> str:
    """silu(x) = x * sigmoid(x), or gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), from plain ops
    (opset 17 has no Gelu)."""
    if kind == "silu":
        return gb.op("Mul", [x, gb.op("Sigmoid", [x])])
    assert kind == "gelu_tanh", kind
    cube = gb.op("Mul", [gb.op("Mul", [x, x]), x])
    inner = gb.op("Mul", [gb.op("Add", [x, gb.op("Mul", [cube, gb.scalar(0.044715, gb.np_dtype)])]),
                          gb.scalar(float(np.sqrt(2.0 / np.pi)), gb.np_dtype)])
    one_plus = gb.op("Add", [gb.op("Tanh", [inner]), gb.scalar(1.0, gb.np_dtype)])
    return gb.op("Mul", [gb.op("Mul", [x, gb.scalar(0.5, gb.np_dtype)]), one_plus], prefix="gelu")


def _project(gb: GraphBuilder, x: str, name: str, hf_names: list[str], weights: WeightFn, spec: GraphSpec,
             blocks: BlockFn | None) -> str:
    """x [1, S, K] @ [W_1; W_2; ..]^T: the weights `hf_names` stacked along their rows (q, k, v -> one output).

    quantize=gguf: each weight as its file stores it; consecutive weights of one form (gguf_blocks.form) share a
    MatMulNBits node, float ones a MatMul, and the outputs of several nodes are concatenated (Q4_K_M files store
    attn_v and ffn_down partly as Q6_K beside Q4_K attn_q/attn_k: 8-bit blocks of 16 cannot share their node)."""
    if spec.quantize != "gguf":
        weight = weights(hf_names[0]) if len(hf_names) == 1 else np.concatenate([weights(n) for n in hf_names], axis=0)
        return gb.linear(x, name, weight, spec)
    assert blocks is not None
    groups: list[tuple[object, list[tuple[str, BlockWeight | None]]]] = []  # (form or "float", members)
    for hf_name in hf_names:
        held = blocks(hf_name)
        key = "float" if held is None else form(held)
        if groups and groups[-1][0] == key:
            groups[-1][1].append((hf_name, held))
        else:
            groups.append((key, [(hf_name, held)]))
    outputs = []
    for index, (key, members) in enumerate(groups):
        part = name if len(groups) == 1 else f"{name}.{index}"
        if key == "float":
            weight = np.concatenate([weights(n) for n, _ in members], axis=0)  # [N, K]
            outputs.append(gb.op("MatMul", [x, gb.weight(part, np.ascontiguousarray(weight.T))]))
        else:
            stored = gb.store_blocks(part, concat_rows([held for _, held in members]))
            outputs.append(gb.block_linear(x, stored, spec.accuracy_level, rank=3))
    return outputs[0] if len(outputs) == 1 else gb.op("Concat", outputs, axis=-1)


def _gguf_embedding_and_head(gb: GraphBuilder, arch: ModelArch, weights: WeightFn, blocks: BlockFn, vocab: int,
                             subset: np.ndarray | None) -> tuple[str, StoredBlocks | str]:
    """quantize=gguf: token embeddings [1, S, H] read from the file's token_embd rows as stored, and the output
    layer (the file's output tensor, or token_embd when the model ties them) as blocks, or a float table where
    the file stores it as a float. One table serves both when they are tied and the output covers every id."""
    def first_rows(weight: BlockWeight) -> BlockWeight:
        return weight if weight.n == vocab else take_rows(weight, slice(0, vocab))

    tied = arch.tie_word_embeddings
    embed_blocks = blocks("model.embed_tokens.weight")
    head_hf = "model.embed_tokens.weight" if tied else "lm_head.weight"
    head_blocks = embed_blocks if tied else blocks(head_hf)
    shared = tied and subset is None
    if embed_blocks is None:
        embed_table = gb.weight("embed_tokens.weight", weights("model.embed_tokens.weight")[:vocab])
        hidden = gb.op("Gather", [embed_table, "input_ids"], axis=0, prefix="embed")  # [1, S, H]
    else:
        embed_table = gb.store_blocks("embed_tokens.weight", first_rows(embed_blocks))
        hidden = gb.embedding_from_blocks(embed_table, "input_ids")  # [1, S, H]
    if shared:
        return hidden, embed_table
    if head_blocks is None:
        head_weight = weights(head_hf)[:vocab]
        return hidden, gb.weight("lm_head.weight", head_weight if subset is None else head_weight[subset])
    return hidden, gb.store_blocks("lm_head.weight", first_rows(head_blocks) if subset is None
                                   else take_rows(head_blocks, subset))


def _scatter_to_vocab(gb: GraphBuilder, logits: str, ids: np.ndarray, vocab: int) -> str:
    """logits [R, Vo] over token ids `ids` -> [R, V] with -inf at every other id."""
    rows_and_subset = gb.op("Shape", [logits])  # [R, Vo]
    full_shape = gb.op("Concat", [gb.op("Slice", [rows_and_subset, gb.ints([0]), gb.ints([1])]), gb.ints([vocab])], axis=0)
    filler = helper.make_tensor("minus_inf", TensorProto.FLOAT, [1], [-np.inf])
    empty = gb.op("ConstantOfShape", [full_shape], value=filler)  # [R, V]
    if gb.onnx_dtype != TensorProto.FLOAT:
        logits = gb.op("Cast", [logits], to=TensorProto.FLOAT)
    columns = gb.op("Expand", [gb.const(ids[None, :]), rows_and_subset])  # [R, Vo]
    return gb.op("ScatterElements", [empty, columns, logits], axis=1, prefix="logits_subset")


def _positions_and_mask(gb: GraphBuilder, window: int | None = None, past: str = "past_key_0",
                        seq_len: str | None = None) -> tuple[str, str, str | None]:
    """positions [S] = P..P+S-1, the fp32 additive causal mask [S, T] shared by all full-attention layers and, with a
    `window`, the sliding layers' mask: query q sees key k only if q - window < k (transformers'
    sliding_window_overlay), else None. P is the length of `past`; S = `seq_len` (a scalar; default: the call's
    input_ids length)."""
    if seq_len is None:
        seq_len = gb.op("Gather", [gb.op("Shape", ["input_ids"]), gb.const(np.array(1, np.int64))], axis=0)
    past_len = gb.op("Gather", [gb.op("Shape", [past]), gb.const(np.array(1, np.int64))], axis=0)
    total_len = gb.op("Add", [past_len, seq_len])
    one = gb.const(np.array(1, np.int64))
    positions = gb.op("Range", [past_len, total_len, one], prefix="positions")  # [S]
    key_positions = gb.op("Range", [gb.const(np.array(0, np.int64)), total_len, one])  # [T]
    query_positions = gb.op("Unsqueeze", [positions, gb.ints([1])])  # [S, 1]
    allowed = gb.op("LessOrEqual", [key_positions, query_positions])  # [S, T]
    masked = gb.scalar(MASK_VALUE, np.float32)
    mask = gb.op("Where", [allowed, gb.scalar(0.0, np.float32), masked], prefix="mask")
    if window is None:
        return positions, mask, None
    oldest = gb.op("Sub", [query_positions, gb.const(np.array(window, np.int64))])  # [S, 1]
    inside = gb.op("Greater", [key_positions, oldest])  # [S, T]
    return positions, mask, gb.op("Where", [inside, mask, masked], prefix="sliding_mask")


@dataclass(frozen=True)
class SlotRows:
    """One sequence slot of a graph: its cache tensors' name suffix, its rows of the call ([start], [end] 1-D
    tensors; None: all of them), its positions [S_b] and its attention masks per layer kind [S_b(+1), T_b]."""

    index: int
    suffix: str
    bounds: tuple[str, str] | None
    positions: str
    masks: dict[str, str]
    active: str | None = None  # bool scalar: the slot has rows this call (batched graphs only)


def _slot_rows(gb: GraphBuilder, slots: int, window: int | None, pad_attention_rows: bool) -> list[SlotRows]:
    """Per slot: where its rows lie in the call (the `seq_lens` input, in slot order), their positions after its own
    cache and its masks. One slot: the whole call, as a one-sequence graph has always computed it."""
    bounds = None
    if slots > 1:
        ends = gb.op("CumSum", ["seq_lens", gb.const(np.array(0, np.int64))])  # [B]
        bounds = gb.op("Concat", [gb.ints([0]), ends], axis=0)  # [B+1]: slot b's rows are bounds[b]..bounds[b+1]
    result = []
    for slot in range(slots):
        suffix = slot_suffix(slots, slot)
        seq_len, rows, active = None, None, None
        if bounds is not None:
            seq_len = gb.op("Gather", ["seq_lens", gb.const(np.array(slot, np.int64))], axis=0)
            rows = (gb.op("Slice", [bounds, gb.ints([slot]), gb.ints([slot + 1])]),
                    gb.op("Slice", [bounds, gb.ints([slot + 1]), gb.ints([slot + 2])]))
            active = gb.op("Greater", [seq_len, gb.const(np.array(0, np.int64))])
        positions, mask, sliding = _positions_and_mask(gb, window, f"past_key_0{suffix}", seq_len)
        masks = {"full": mask} if sliding is None else {"full": mask, "sliding": sliding}
        if pad_attention_rows:  # the mask row of the extra query row _attend adds
            masks = {kind: gb.op("Concat", [m, _last_row(gb, m, axis=0)], axis=0)  # [S+1, T]
                     for kind, m in masks.items()}
        result.append(SlotRows(slot, suffix, rows, positions, masks, active))
    return result


def _logits_rows(gb: GraphBuilder, hidden_2d: str, slots: list[SlotRows], logits_rows: int | None) -> str:
    """The rows of hidden_2d [N, H] whose logits the call returns: each slot's last min(S_b, logits_rows), in slot
    order (all rows when logits_rows is None)."""
    if logits_rows is None:
        return hidden_2d
    if len(slots) == 1:  # Slice clamps the start: min(S, R) rows
        return gb.op("Slice", [hidden_2d, gb.ints([-logits_rows]), gb.ints([2 ** 62]), gb.ints([0])])
    picks = []
    for slot in slots:
        start, end = slot.bounds
        first = gb.op("Max", [start, gb.op("Sub", [end, gb.ints([logits_rows])])])  # [1]
        picks.append(gb.op("Range", [gb.op("Squeeze", [first]), gb.op("Squeeze", [end]),
                                     gb.const(np.array(1, np.int64))]))  # [R_b]
    rows = gb.op("Concat", picks, axis=0)  # [sum R_b]
    return gb.op("Gather", [hidden_2d, rows], axis=0, prefix="logits_rows")  # [sum R_b, H]


FEATURES = "features"  # the optional output: final hidden state [1, S, H] fp32


def _features_output(gb: GraphBuilder, normed_hidden: str) -> None:
    """Expose the final-norm output [1, S, H] as the fp32 graph output `features` (logits are untouched)."""
    source = normed_hidden if gb.onnx_dtype == TensorProto.FLOAT else gb.op("Cast", [normed_hidden], to=TensorProto.FLOAT)
    gb.nodes.append(helper.make_node("Identity", [source], [FEATURES]))


def add_features_output(onnx_path: Path, hidden_size: int) -> bool:
    """Give an existing spectrt decoder graph the `features` output (graph surgery on the .onnx only; the external
    data file is untouched). The final norm is the Mul by `final_norm.weight`. False if it already has one."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    if any(output.name == FEATURES for output in graph.output):
        return False
    norms = [node for node in graph.node if "final_norm.weight" in node.input]
    if len(norms) != 1:
        raise ValueError(f"{onnx_path}: no single final-norm node (Mul by final_norm.weight); not a spectrt decoder graph")
    dtype = next(i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past_key_"))
    source = norms[0].output[0]
    if dtype != TensorProto.FLOAT:
        graph.node.append(helper.make_node("Cast", [source], ["features_fp32"], to=TensorProto.FLOAT))
        source = "features_fp32"
    graph.node.append(helper.make_node("Identity", [source], [FEATURES]))
    graph.output.insert(1, helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, [1, "seq_len", hidden_size]))
    tmp_path = onnx_path.with_name(onnx_path.name + ".tmp")
    onnx.save(model, str(tmp_path))
    os.replace(tmp_path, onnx_path)
    return True


def build_decoder_onnx(arch: ModelArch, weights: WeightFn, rope: dict[str, tuple[np.ndarray, np.ndarray]],
                       spec: GraphSpec, onnx_path: Path, blocks: BlockFn | None = None) -> Path:
    """Write `onnx_path` (+ `onnx_path`.data) for the model; returns the graph path.

    rope: per rope kind (arch.rope_kinds: "full", and "sliding" where sliding layers have their own base) the cos /
    sin tables [max_context, rotary dims] (scaling already applied), as transformers computes them for positions
    0..max_context-1. `blocks`: the source file's block weights (quantize=gguf only).
    """
    if (spec.quantize == "gguf") != (blocks is not None):
        raise ValueError("quantize=gguf and a GGUF file's blocks go together")
    if spec.quantize == "gguf" and spec.precision != "fp32":
        raise ValueError("quantize=gguf graphs compute in fp32 (the blocks' scales are fp32)")
    np_dtype, onnx_dtype = DTYPES[spec.precision]
    onnx_path = Path(onnx_path)
    data_path = onnx_path.with_name(onnx_path.name + ".data")
    writer = ExternalDataWriter(data_path)
    try:
        gb = GraphBuilder(writer, np_dtype, onnx_dtype)
        vocab = spec.logits_vocab
        gguf = spec.quantize == "gguf"
        embed = None if gguf else weights("model.embed_tokens.weight")[:vocab]  # [V, H]
        lm_head_weight = None if gguf else embed if arch.tie_word_embeddings else weights("lm_head.weight")[:vocab]
        # A quantized graph computing with int8 activations also keeps its output layer in int8 (the most
        # sensitive layer stays 8-bit in the int4 scheme) and reads token embeddings from int8 blocks too: from
        # the output layer's own table when the model ties them, so the vocabulary is stored once.
        quantize_head = spec.quantized and spec.accuracy_level != 0
        head_spec = replace(spec, quantize="int8")
        subset = None if spec.output_ids is None else np.asarray(spec.output_ids, dtype=np.int64)  # [Vo]
        head_weight = lm_head_weight if subset is None or gguf else lm_head_weight[subset]  # [V or Vo, H]
        shared = arch.tie_word_embeddings and subset is None  # one table serves the embeddings and the output layer
        if spec.quantize == "gguf":
            quantize_head = False
            hidden, gguf_head = _gguf_embedding_and_head(gb, arch, weights, blocks, vocab, subset)
        elif quantize_head:
            head_table = gb.quantized_weight("lm_head.weight", head_weight, head_spec)
            embed_table = head_table if shared else gb.quantized_weight("embed_tokens.weight", embed, head_spec)
            hidden = gb.embedding_from_int8(embed_table, "input_ids", spec.block_size)  # [1, S, H]
        else:
            embed_name = gb.weight("embed_tokens.weight", embed)
            hidden = gb.op("Gather", [embed_name, "input_ids"], axis=0, prefix="embed")  # [1, S, H]
            head_name = embed_name if shared else gb.weight("lm_head.weight", head_weight)
        if arch.embed_scale is not None:  # Gemma: embeddings times sqrt(hidden), in the embeddings' dtype
            hidden = gb.op("Mul", [hidden, gb.scalar(arch.embed_scale, gb.np_dtype)], prefix="embed_scale")

        windowed = "sliding" in (arch.layer_types or ())
        slots = _slot_rows(gb, spec.batch_slots, arch.sliding_window if windowed else None, spec.pad_attention_rows)
        positions = (slots[0].positions if len(slots) == 1 else
                     gb.op("Concat", [slot.positions for slot in slots], axis=0, prefix="positions"))  # [N]
        rotations = {}
        for kind, (rope_cos, rope_sin) in rope.items():
            cos_table = gb.weight(f"rope.{kind}.cos" if len(rope) > 1 else "rope.cos",
                                  rope_cos[: spec.max_context])  # [max_ctx, R]
            sin_table = gb.weight(f"rope.{kind}.sin" if len(rope) > 1 else "rope.sin", rope_sin[: spec.max_context])
            rotations[kind] = (gb.op("Unsqueeze", [gb.op("Gather", [cos_table, positions], axis=0),
                                                   gb.ints([0, 2])]),  # [1, S, 1, R]
                               gb.op("Unsqueeze", [gb.op("Gather", [sin_table, positions], axis=0), gb.ints([0, 2])]))

        for layer in range(arch.num_layers):
            prefix = f"model.layers.{layer}"
            kind = arch.layer_type(layer)
            cos, sin = rotations[kind if kind in rotations else "full"]

            def norm(x: str, hf_name: str, name: str) -> str:
                return _rms_norm(gb, x, _norm_weight(gb, arch, f"layers.{layer}.{name}.weight",
                                                     weights(f"{prefix}.{hf_name}.weight")), arch.rms_norm_eps)

            attn_out, new_rows = _attention(gb, arch, weights, layer, norm(hidden, "input_layernorm", "input_norm"),
                                            cos, sin, slots, kind, spec, blocks)
            if arch.sandwich_norms:  # Gemma 3: the output is normed before the residual add, the MLP's input by its own norm
                attn_out = norm(attn_out, "post_attention_layernorm", "post_attn_norm")
                hidden = gb.op("Add", [hidden, attn_out], prefix="residual")
                mlp_out = _mlp(gb, arch, weights, layer, norm(hidden, "pre_feedforward_layernorm", "pre_mlp_norm"),
                               spec, blocks)
                mlp_out = norm(mlp_out, "post_feedforward_layernorm", "post_mlp_norm")
            else:
                hidden = gb.op("Add", [hidden, attn_out], prefix="residual")
                mlp_out = _mlp(gb, arch, weights, layer, norm(hidden, "post_attention_layernorm", "post_attn_norm"),
                               spec, blocks)
            hidden = gb.op("Add", [hidden, mlp_out], prefix="residual")
            for slot, (new_key, new_value) in zip(slots, new_rows):
                gb.nodes.append(helper.make_node("Identity", [new_key], [f"new_key_{layer}{slot.suffix}"]))
                gb.nodes.append(helper.make_node("Identity", [new_value], [f"new_value_{layer}{slot.suffix}"]))

        final_norm = _norm_weight(gb, arch, "final_norm.weight", weights("model.norm.weight"))
        hidden = _rms_norm(gb, hidden, final_norm, arch.rms_norm_eps)
        if spec.features:
            _features_output(gb, hidden)
        hidden_2d = gb.op("Reshape", [hidden, gb.ints([-1, arch.hidden_size])])  # [N, H]
        hidden_2d = _logits_rows(gb, hidden_2d, slots, spec.logits_rows)  # [R, H]
        if gguf and isinstance(gguf_head, StoredBlocks):
            logits = gb.block_linear(hidden_2d, gguf_head, spec.accuracy_level, rank=2)  # [R, V|Vo]
        elif gguf:
            logits = gb.op("Gemm", [hidden_2d, gguf_head], transB=1)  # [R, V|Vo]
        elif quantize_head:
            logits = gb.linear(hidden_2d, "lm_head.weight", head_weight, head_spec, quantized=head_table)  # [R, V|Vo]
        else:
            logits = gb.op("Gemm", [hidden_2d, head_name], transB=1)  # [R, V|Vo]
        if subset is not None:
            logits = _scatter_to_vocab(gb, logits, subset, vocab)  # [R, V], -inf outside the subset
        if onnx_dtype != TensorProto.FLOAT and subset is None:
            logits = gb.op("Cast", [logits], to=TensorProto.FLOAT)
        gb.nodes.append(helper.make_node("Unsqueeze", [logits, gb.ints([0])], ["logits"]))
    finally:
        writer.close()

    elem_types = {"int64": TensorProto.INT64, "fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
    io = expected_graph_io(arch.num_layers, arch.num_kv_heads, arch.head_dim, spec.precision, vocab, spec.logits_rows,
                           arch.hidden_size if spec.features else None, spec.batch_slots)  # the runtime's contract
    graph_inputs, graph_outputs = ([helper.make_tensor_value_info(t.name, elem_types[t.dtype], list(t.shape))
                                    for t in specs] for specs in io)
    graph = helper.make_graph(gb.nodes, "spectrt_decoder", graph_inputs, graph_outputs, gb.initializers)
    return write_model(graph, onnx_path, quantized=spec.quantized)


def write_model(graph: onnx.GraphProto, onnx_path: Path, *, quantized: bool) -> Path:
    """Wrap `graph` in a model (opset 17, plus com.microsoft for MatMulNBits when `quantized`), write it
    atomically and check it."""
    opsets = [helper.make_opsetid("", OPSET)]
    if quantized:
        opsets.append(helper.make_opsetid("com.microsoft", 1))  # MatMulNBits: onnxruntime only
    model = helper.make_model(graph, opset_imports=opsets, producer_name="spectrt")
    model.ir_version = 8  # readable by onnx >= 1.10 / TensorRT 10.3's parser
    tmp_path = onnx_path.with_name(onnx_path.name + ".tmp")
    with open(tmp_path, "wb") as handle:
        handle.write(model.SerializeToString())
    os.replace(tmp_path, onnx_path)
    onnx.checker.check_model(str(onnx_path))
    return onnx_path
