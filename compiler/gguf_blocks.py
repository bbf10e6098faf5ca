"""GGUF quantized blocks held as they are stored, in onnxruntime ``MatMulNBits`` form (issue 19, step 1).

Today the build dequantizes a GGUF to fp32 and re-quantizes it (``onnx_graph.quantize_blockwise``): the
weights the engine runs are not the file's. Here each GGUF block type is mapped, without re-quantizing,
onto what MatMulNBits' fast CPU kernels run: integer codes, one fp32 scale per block, integer zero points
(or the kernel's default 2^(bits-1)), and for the types that store a per-block minimum an exact "block-
minimum correction" computed beside the kernel::

    W[n, k] = scale[n, k // B] * (code[n, k] - zero[n, k // B]) + correction[n, k // 32]
    y = x @ W^T = MatMulNBits(x) + blocksum32(x) @ correction^T      # blocksum32(x): [.., K/32]

=========  =====  ==  ==========================  =======================  ===========================
GGUF type  bits   B   code                        scale                    zero / correction
=========  =====  ==  ==========================  =======================  ===========================
Q4_0       4      32  q (0..15)                   d                        default 8
Q4_1       4      32  q (0..15)                   d                        zero 0, correction m
Q4_K       4      32  q (0..15)                   d * sc (6-bit)           zero 0, correction -dmin*mn
Q5_0       8      32  q + 112 (q 0..31)           d                        default 128 (= q - 16)
Q5_1       8      32  q + 128                     d                        default 128, correction m
Q5_K       8      32  q + 128                     d * sc                   default 128, corr. -dmin*mn
Q6_K       8      16  q + 96 (q 0..63)            d * sc (int8)            default 128 (= q - 32)
Q8_0       8      32  q + 128 (q int8)            d                        default 128
=========  =====  ==  ==========================  =======================  ===========================

Every product above is exact in fp32 (an fp16 d has 11 significant bits; d*sc <= 18, times a code of
<= 6 bits <= 24), and the types with a minimum round once, at the same addition as ggml's own
dequantization. So :func:`dequantize_representation` reproduces ``gguf.quants.dequantize`` bit for bit
(tests/test_gguf_blocks.py). 8-bit codes never need a zero-point input: every offset above fits under
the kernel's default 128. The 4-bit types with a minimum need an explicit zero point 0, which costs speed
in the int8-activation kernel; ``fold_offset=True`` instead keeps the default zero point 8 and moves
``8 * scale`` into the correction (``correction' = correction + 8 * scale``), which is exact only where
that fp32 sum is; it is checked, and refused with an error naming the tensor where it is not.

Orientation: GGUF stores a linear weight with ``shape = [K, N]`` (ne0 = K, the fastest axis) and
``data`` as ``[N, bytes per row]``: rows are output features, i.e. transformers' ``[N, K]``. (llama-arch
files permute the rows of attn_q / attn_k for ggml's rope; that is the loader's business, not this one.)

Types not listed (IQ*, Q2_K, Q3_K, TQ*, MXFP4...) cannot be held by MatMulNBits without re-quantizing:
:func:`block_weight` raises :class:`~spectrt.errors.ModelLoadError` naming them. Pure numpy, vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from spectrt.errors import ModelLoadError

QK_K = 256  # K-quant super-block
CORRECTION_BLOCK = 32  # the correction's block along K (every type with a minimum has 32-element blocks)

# GGUF type name -> (MatMulNBits bits, block size, bytes per GGUF block, elements per GGUF block)
LAYOUTS: dict[str, tuple[int, int, int, int]] = {
    "Q4_0": (4, 32, 18, 32),
    "Q4_1": (4, 32, 20, 32),
    "Q5_0": (8, 32, 22, 32),
    "Q5_1": (8, 32, 24, 32),
    "Q8_0": (8, 32, 34, 32),
    "Q4_K": (4, 32, 144, QK_K),
    "Q5_K": (8, 32, 176, QK_K),
    "Q6_K": (8, 16, 210, QK_K),
}
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class BlockWeight:
    """One weight [N, K] as MatMulNBits inputs (+ an optional correction over 32-element block sums)."""

    qtype: str  # GGUF type name it came from
    n: int
    k: int
    bits: int  # 4 | 8
    block_size: int  # B
    packed: np.ndarray  # uint8 [N, K/B, B*bits/8]; 4-bit: element 2i in the low nibble of byte i
    scales: np.ndarray  # fp32 [N, K/B]
    zero_points: np.ndarray | None  # uint8, MatMulNBits layout (4-bit: [N * ceil(K/B / 2)], low nibble
    # first, padded per row); None: the kernel's default 2^(bits-1)
    correction: np.ndarray | None  # fp32 [N, K/32]: added W[n, k] += correction[n, k // 32]; None: none

    @property
    def default_zero(self) -> int:
        return 1 << (self.bits - 1)


def block_weight(tensor: Any, *, fold_offset: bool = False) -> BlockWeight:
    """A raw GGUF tensor (``gguf.GGUFReader(path).tensors[i]``: ``.data``, ``.tensor_type``, ``.shape``,
    ``.name``) -> its exact MatMulNBits representation. See the module docstring for ``fold_offset``."""
    qtype = getattr(tensor.tensor_type, "name", str(tensor.tensor_type))
    name = getattr(tensor, "name", "?")
    shape = [int(s) for s in tensor.shape]
    if len(shape) != 2:
        raise ModelLoadError(f"GGUF tensor {name!r} has shape {shape}: only 2-D weights [K, N] map to MatMulNBits")
    k, n = shape
    return block_weight_from_raw(np.asarray(tensor.data), qtype, n, k, fold_offset=fold_offset, name=name)


def block_weight_from_raw(raw: np.ndarray, qtype: str, n: int, k: int, *, fold_offset: bool = False,
                          name: str = "?") -> BlockWeight:
    """Raw GGUF bytes of a weight with N rows of K elements (K fastest) -> BlockWeight."""
    if qtype in FLOAT_TYPES:
        raise ModelLoadError(f"GGUF tensor {name!r} is {qtype}, not a block type: use its float values as they are")
    if qtype not in LAYOUTS:
        raise ModelLoadError(
            f"GGUF tensor {name!r} is {qtype}: MatMulNBits cannot hold that block type without re-quantizing "
            f"(held exactly: {', '.join(LAYOUTS)}). Use a GGUF quantized with one of those types, or the "
            "re-quantizing int4 recipe.")
    bits, block, type_size, per_block = LAYOUTS[qtype]
    if k % per_block:
        raise ModelLoadError(f"GGUF tensor {name!r} ({qtype}): row length {k} is not a multiple of {per_block}")
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(n * (k // per_block), type_size)
    codes, scales, correction = _UNPACK[qtype](blocks)  # uint8 [nb, per_block], fp32 [nb, per_block/B], fp32|None
    codes = codes.reshape(n, k // block, block)
    scales = np.ascontiguousarray(scales.reshape(n, k // block), dtype=np.float32)
    if correction is not None:
        correction = np.ascontiguousarray(correction.reshape(n, k // CORRECTION_BLOCK), dtype=np.float32)
    zero_points = None
    if bits == 4:
        packed = codes[..., 0::2] | (codes[..., 1::2] << np.uint8(4))  # [N, K/B, B/2]
        if correction is not None:
            if fold_offset:
                correction = _fold_offset(correction, scales, block, name, qtype)
            else:
                zero_points = np.zeros(n * -(-(k // block) // 2), np.uint8)  # zero point 0 everywhere
    else:
        packed = codes
    return BlockWeight(qtype, n, k, bits, block, np.ascontiguousarray(packed), scales, zero_points, correction)


def dequantize_representation(weight: BlockWeight) -> np.ndarray:
    """W [N, K] fp32 rebuilt from a BlockWeight, as MatMulNBits (+ correction) defines it."""
    n, k, block = weight.n, weight.k, weight.block_size
    if weight.bits == 4:
        codes = np.empty((n, k // block, block), np.uint8)
        codes[..., 0::2], codes[..., 1::2] = weight.packed & np.uint8(0x0F), weight.packed >> np.uint8(4)
    else:
        codes = weight.packed
    if weight.zero_points is None:
        zero = np.float32(weight.default_zero)
    else:
        zero = _unpack_zero_points(weight.zero_points, weight.bits, n, k // block)[..., None].astype(np.float32)
    values = (codes.astype(np.float32) - zero) * weight.scales[..., None]  # [N, K/B, B]
    if weight.correction is not None:
        values = values.reshape(n, k // CORRECTION_BLOCK, CORRECTION_BLOCK) + weight.correction[..., None]
    return values.reshape(n, k)


def onnx_linear(weight: BlockWeight, x: str, y: str, prefix: str, *, accuracy_level: int, rank: int = 2,
                correction_dtype: Any = np.float32) -> tuple[list, list]:
    """ONNX nodes and initializers computing y = x @ W^T for x [.., K] fp32 of the given rank:
    MatMulNBits, plus (when the weight has a correction) ReduceSum over 32-element blocks of x and a plain
    MatMul with correction^T [K/32, N]. correction_dtype float16 stores it in fp16 (not exact: dmin*mn
    needs up to 17 significant bits; onnxruntime's CPU EP fuses it back to an fp32 MatMul)."""
    from onnx import TensorProto, helper, numpy_helper

    inputs = [x, f"{prefix}.q", f"{prefix}.scales"]
    inits = [numpy_helper.from_array(weight.packed, inputs[1]),
             numpy_helper.from_array(weight.scales.reshape(-1), inputs[2])]
    if weight.zero_points is not None:
        inputs.append(f"{prefix}.zero_points")
        inits.append(numpy_helper.from_array(weight.zero_points, inputs[3]))
    main = y if weight.correction is None else f"{prefix}.main"
    nodes = [helper.make_node("MatMulNBits", inputs, [main], domain="com.microsoft", name=f"{prefix}.mnb",
                              K=weight.k, N=weight.n, bits=weight.bits, block_size=weight.block_size,
                              accuracy_level=accuracy_level)]
    if weight.correction is None:
        return nodes, inits
    blocks = weight.k // CORRECTION_BLOCK
    shape = np.array([0] * (rank - 1) + [blocks, CORRECTION_BLOCK], np.int64)  # 0: copy the leading dims
    corr_t = np.ascontiguousarray(weight.correction.T.astype(correction_dtype))  # [K/32, N]
    inits += [numpy_helper.from_array(shape, f"{prefix}.block_shape"),
              numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}.last_axis"),
              numpy_helper.from_array(corr_t, f"{prefix}.correction")]
    nodes += [helper.make_node("Reshape", [x, f"{prefix}.block_shape"], [f"{prefix}.xb"]),  # [.., K/32, 32]
              helper.make_node("ReduceSum", [f"{prefix}.xb", f"{prefix}.last_axis"], [f"{prefix}.bsum"], keepdims=0)]
    bsum = f"{prefix}.bsum"  # [.., K/32]
    if np.dtype(correction_dtype) == np.float16:
        nodes.append(helper.make_node("Cast", [bsum], [f"{prefix}.bsum16"], to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("MatMul", [f"{prefix}.bsum16", f"{prefix}.correction"], [f"{prefix}.corr16"]))
        nodes.append(helper.make_node("Cast", [f"{prefix}.corr16"], [f"{prefix}.corr"], to=TensorProto.FLOAT))
    else:
        nodes.append(helper.make_node("MatMul", [bsum, f"{prefix}.correction"], [f"{prefix}.corr"]))  # [.., N]
    nodes.append(helper.make_node("Add", [main, f"{prefix}.corr"], [y]))
    return nodes, inits


# ------------------------------------------------------------------------------------------------
# per-type unpacking: raw blocks [nb, type_size] -> codes uint8 [nb, elems], scales fp32 [nb, elems/B],
# correction fp32 [nb, elems/32] | None. Bit layouts as in gguf.quants (ggml-quants.c).
# ------------------------------------------------------------------------------------------------


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per row -> fp32 [nb, 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[nb, 16] bytes -> [nb, 32] codes: elements 0..15 are low nibbles, 16..31 high nibbles."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """[nb, 4] bytes (a little-endian uint32) -> [nb, 32] bits, bit j for element j."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _q4_0(b):
    return _nibbles_32(b[:, 2:]), _f16(b[:, :2]), None


def _q4_1(b):
    return _nibbles_32(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b):
    q = _nibbles_32(b[:, 6:]) | (_high_bits_32(b[:, 2:6]) << np.uint8(4))
    return q + np.uint8(112), _f16(b[:, :2]), None  # (q + 112) - 128 = q - 16


def _q5_1(b):
    q = _nibbles_32(b[:, 8:]) | (_high_bits_32(b[:, 4:8]) << np.uint8(4))
    return q + np.uint8(128), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q8_0(b):
    return b[:, 2:] ^ np.uint8(0x80), _f16(b[:, :2]), None  # int8 q -> uint8 q + 128


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes -> 8 six-bit sub-scales and 8 six-bit sub-mins (Q4_K / Q5_K)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """[nb, 128] bytes -> [nb, 256]: sub-block 2j = low nibbles of bytes 32j..32j+31, 2j+1 = high nibbles."""
    nb = qs.shape[0]
    q = qs.reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(nb, QK_K)


def _k_scale_min(d, dmin, scales):
    sc, mn = _k_scales(scales)
    return _f16(d) * sc.astype(np.float32), -(_f16(dmin) * mn.astype(np.float32))  # [nb, 8] each, exact


def _q4_k(b):
    scale, correction = _k_scale_min(b[:, 0:2], b[:, 2:4], b[:, 4:16])
    return _k_low_nibbles(b[:, 16:]), scale, correction


def _q5_k(b):
    nb = b.shape[0]
    scale, correction = _k_scale_min(b[:, 0:2], b[:, 2:4], b[:, 4:16])
    qh = b[:, 16:48].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = _k_low_nibbles(b[:, 48:]) | ((qh & np.uint8(1)).reshape(nb, QK_K) << np.uint8(4))
    return q + np.uint8(128), scale, correction


def _q6_k(b):
    nb = b.shape[0]
    ql = b[:, 0:128].reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(nb, 8, 32)
    qh = b[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(0x03)).reshape(nb, 8, 32)
    q = (ql | (qh << np.uint8(4))).reshape(nb, QK_K)  # 0..63
    sc = b[:, 192:208].view(np.int8).astype(np.float32)  # [nb, 16]
    return q + np.uint8(96), _f16(b[:, 208:210]) * sc, None  # (q + 96) - 128 = q - 32


_UNPACK = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
           "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def _fold_offset(correction: np.ndarray, scales: np.ndarray, block: int, name: str, qtype: str) -> np.ndarray:
    """correction + 8 * scale (so the 4-bit codes run with the kernel's default zero point 8), refused
    unless that fp32 sum is exact for every block."""
    assert block == CORRECTION_BLOCK
    folded = correction + np.float32(8) * scales
    exact = folded.astype(np.float64) == correction.astype(np.float64) + 8.0 * scales.astype(np.float64)
    if not exact.all():
        raise ModelLoadError(
            f"GGUF tensor {name!r} ({qtype}): folding the zero point into the correction is inexact in "
            f"{int((~exact).sum())} of {exact.size} blocks; build it with fold_offset=False (zero point 0)")
    return folded


def _unpack_zero_points(zero_points: np.ndarray, bits: int, n: int, blocks: int) -> np.ndarray:
    """MatMulNBits zero points -> uint8 [N, blocks]."""
    if bits == 8:
        return zero_points.reshape(n, blocks)
    per_row = zero_points.reshape(n, -1)
    out = np.empty((n, per_row.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = per_row & np.uint8(0x0F), per_row >> np.uint8(4)
    return out[:, :blocks]


# ------------------------------------------------------------------------------------------------
# row operations (rows = output features): what the build needs to place a file's tensor in the graph
# ------------------------------------------------------------------------------------------------


def take_rows(weight: BlockWeight, rows: np.ndarray | slice) -> BlockWeight:
    """The weight's rows `rows` (an index array or a slice), every part of the representation together:
    codes, scales, zero points and correction. Exact (a selection, no arithmetic)."""
    index = np.arange(weight.n)[rows]
    zero_points = None
    if weight.zero_points is not None:
        zero_points = np.ascontiguousarray(weight.zero_points.reshape(weight.n, -1)[index].reshape(-1))
    correction = None if weight.correction is None else np.ascontiguousarray(weight.correction[index])
    return BlockWeight(weight.qtype, len(index), weight.k, weight.bits, weight.block_size,
                       np.ascontiguousarray(weight.packed[index]), np.ascontiguousarray(weight.scales[index]),
                       zero_points, correction)


def rope_unpermute_rows(weight: BlockWeight, heads: int) -> BlockWeight:
    """Undo the row permutation llama.cpp's converter applies to a llama-arch file's attn_q / attn_k (ggml's
    rope pairs adjacent features, transformers' rotate_half pairs the two halves of a head): the same
    permutation as transformers' LlamaTensorProcessor._reverse_permute_weights, applied to whole rows.
    `heads`: query heads for attn_q, key/value heads for attn_k."""
    half = weight.n // heads // 2
    if heads * half * 2 != weight.n:
        raise ModelLoadError(f"GGUF tensor of {weight.n} rows does not split into {heads} heads of pairs")
    order = np.arange(weight.n).reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)  # new row r = old row order[r]
    return take_rows(weight, order)


def form(weight: BlockWeight) -> tuple[int, int, bool, bool]:
    """What one MatMulNBits node needs all its rows to share: bits, block size, zero points given, correction."""
    return weight.bits, weight.block_size, weight.zero_points is not None, weight.correction is not None


def concat_rows(weights: list[BlockWeight]) -> BlockWeight:
    """Stack weights of the same form and K along the rows (q, k, v -> qkv). Exact."""
    first = weights[0]
    if len(weights) == 1:
        return first
    if any(form(w) != form(first) or w.k != first.k for w in weights):
        raise ValueError("only weights of one form and input size stack into one MatMulNBits")
    qtypes = sorted({w.qtype for w in weights})
    return BlockWeight("+".join(qtypes), sum(w.n for w in weights), first.k, first.bits, first.block_size,
                       np.concatenate([w.packed for w in weights]), np.concatenate([w.scales for w in weights]),
                       None if first.zero_points is None else np.concatenate([w.zero_points for w in weights]),
                       None if first.correction is None else np.concatenate([w.correction for w in weights]))
