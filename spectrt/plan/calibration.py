"""The measured constants of the planner's ONNX Runtime CPU model, and the CUDA runtime's estimated share."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .shapes import ModelShape


KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


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
