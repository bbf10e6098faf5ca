"""The ONNX graph of a trained draft head (see compiler/head.py for what it is and how it is trained).

Graph contract (batch 1; S = rows this call, P = cached rows before it; H = the target's hidden size):

    inputs   input_ids      int64  [1, S]             token x_{t+1} of each row
             features       fp32   [1, S, H]          the target's final hidden state f_t (or the head's own guess)
             past_key_0     dtype  [1, P, kv_heads, head_dim]
             past_value_0   dtype  [1, P, kv_heads, head_dim]
    outputs  logits         fp32   [1, 1, Vo]          next-token logits of the last row over the head's Vo token ids
             next_features  fp32   [1, 1, H]           the head's guess of the target's feature f_{t+1} (last row)
             new_key_0      dtype  [1, S, kv_heads, head_dim]
             new_value_0    dtype  [1, S, kv_heads, head_dim]

Row s computes fc([f_t ; embed(x_{t+1})]) -> one llama/qwen decoder layer (attending to every cached row and the
rows <= s, rotary positions P + s) -> RMSNorm -> next_features; logits = next_features @ W_o^T, W_o = the target's
output-layer rows of the head's token ids (frozen in training). Built with the decoder graph's own layer functions;
linear layers are 8-bit MatMulNBits when the target is quantized (CPU path), plain MatMul otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from .arch import ModelArch
from .onnx_graph import (DTYPES, ExternalDataWriter, GraphBuilder, GraphSpec, _attention, _last_row, _mlp,
                         _rms_norm, _slot_rows, write_model)


@dataclass(frozen=True)
class HeadShape:
    """Sizes of a draft head (the attention geometry is the target's)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    output_vocab: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool = True

    def arch(self) -> ModelArch:
        """The head's layer as a one-layer ModelArch (what the decoder graph's layer functions read)."""
        return ModelArch(model_type="head", num_layers=1, hidden_size=self.hidden_size, num_heads=self.num_heads,
                         num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                         intermediate_size=self.intermediate_size, vocab_size=self.output_vocab,
                         rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_type="default",
                         rope_scaling=None, tie_word_embeddings=False, attention_bias=self.attention_bias,
                         max_position_embeddings=1 << 20, sliding_window=None)

    def to_json(self) -> dict:
        return {"hidden_size": self.hidden_size, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "intermediate_size": self.intermediate_size,
                "output_vocab": self.output_vocab, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
                "attention_bias": self.attention_bias}


def default_rope(theta: float, head_dim: int, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_context, head_dim] of plain rotary embeddings (the head's rows count from its own start: only
    distances between rows matter)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))  # [D/2]
    angles = np.arange(max_context, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [T, D]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build_head_onnx(shape: HeadShape, weights: dict[str, np.ndarray], embed: np.ndarray, *, precision: str,
                    max_context: int, quantize: str, onnx_path: Path) -> Path:
    """Write `onnx_path` (+ .data). `weights`: the head's parameters by HF-style name (fc.weight [H, 2H], fc.bias,
    model.layers.0.* of one decoder layer, norm.weight, lm_head.weight [Vo, H]); `embed`: the target's token
    embeddings [V, H] (fp32)."""
    np_dtype, onnx_dtype = DTYPES[precision]
    onnx_path = Path(onnx_path)
    arch = shape.arch()
    spec = GraphSpec(precision, max_context, shape.output_vocab, quantize=quantize,
                     accuracy_level=4 if quantize != "none" else 0, logits_rows=1)
    writer = ExternalDataWriter(onnx_path.with_name(onnx_path.name + ".data"))
    try:
        gb = GraphBuilder(writer, np_dtype, onnx_dtype)
        if spec.quantized:  # 8-bit blocks, gathered and scaled row by row (as the quantized target reads its own)
            table = gb.quantized_weight("embed_tokens.weight", embed, GraphSpec(precision, max_context, 1, "int8"))
            token_embeds = gb.embedding_from_int8(table, "input_ids", spec.block_size)  # [1, S, H]
        else:
            token_embeds = gb.op("Gather", [gb.weight("embed_tokens.weight", embed), "input_ids"], axis=0)
        features = "features" if onnx_dtype == TensorProto.FLOAT else gb.op("Cast", ["features"], to=onnx_dtype)
        joined = gb.op("Concat", [features, token_embeds], axis=-1)  # [1, S, 2H]
        hidden = gb.op("Add", [gb.linear(joined, "fc.weight", weights["fc.weight"], spec),
                               gb.weight("fc.bias", weights["fc.bias"])])  # [1, S, H]

        slots = _slot_rows(gb, 1, None, pad_attention_rows=True)  # one sequence: positions and causal mask
        positions = slots[0].positions
        cos_table, sin_table = default_rope(shape.rope_theta, shape.head_dim, max_context)
        cos = gb.op("Unsqueeze", [gb.op("Gather", [gb.weight("rope.cos", cos_table), positions], axis=0),
                                  gb.ints([0, 2])])  # [1, S, 1, D]
        sin = gb.op("Unsqueeze", [gb.op("Gather", [gb.weight("rope.sin", sin_table), positions], axis=0),
                                  gb.ints([0, 2])])
        prefix = "model.layers.0"
        ln1 = gb.weight("layers.0.input_norm.weight", weights[f"{prefix}.input_layernorm.weight"])
        attn_out, [(new_key, new_value)] = _attention(gb, arch, weights.__getitem__, 0,
                                                      _rms_norm(gb, hidden, ln1, arch.rms_norm_eps), cos, sin, slots,
                                                      "full", spec)
        hidden = gb.op("Add", [hidden, attn_out])
        ln2 = gb.weight("layers.0.post_attn_norm.weight", weights[f"{prefix}.post_attention_layernorm.weight"])
        hidden = gb.op("Add", [hidden, _mlp(gb, arch, weights.__getitem__, 0,
                                            _rms_norm(gb, hidden, ln2, arch.rms_norm_eps), spec)])
        last = _last_row(gb, hidden, axis=1)  # [1, 1, H]
        normed = _rms_norm(gb, last, gb.weight("norm.weight", weights["norm.weight"]), arch.rms_norm_eps)
        if onnx_dtype != TensorProto.FLOAT:
            normed = gb.op("Cast", [normed], to=TensorProto.FLOAT)
        gb.nodes.append(helper.make_node("Identity", [normed], ["next_features"]))
        head_weight = weights["lm_head.weight"]  # [Vo, H]
        if spec.quantized:
            logits = gb.linear("next_features", "lm_head.weight", head_weight, GraphSpec(
                precision, max_context, 1, "int8", accuracy_level=4))
        else:
            logits = gb.op("MatMul", ["next_features", gb.weight("lm_head.weight", head_weight.T.copy(), np.float32)])
        gb.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        gb.nodes.append(helper.make_node("Identity", [new_key], ["new_key_0"]))
        gb.nodes.append(helper.make_node("Identity", [new_value], ["new_value_0"]))
    finally:
        writer.close()

    kv_past = [1, "past_len", shape.num_kv_heads, shape.head_dim]
    kv_new = [1, "seq_len", shape.num_kv_heads, shape.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq_len"]),
              helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, "seq_len", shape.hidden_size]),
              helper.make_tensor_value_info("past_key_0", onnx_dtype, kv_past),
              helper.make_tensor_value_info("past_value_0", onnx_dtype, kv_past)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "logits_rows", shape.output_vocab]),
               helper.make_tensor_value_info("next_features", TensorProto.FLOAT, [1, "logits_rows", shape.hidden_size]),
               helper.make_tensor_value_info("new_key_0", onnx_dtype, kv_new),
               helper.make_tensor_value_info("new_value_0", onnx_dtype, kv_new)]
    graph = helper.make_graph(gb.nodes, "spectrt_draft_head", inputs, outputs, gb.initializers)
    return write_model(graph, onnx_path, quantized=spec.quantized)


def head_tensor_specs(shape: HeadShape, precision: str) -> dict[str, list[dict]]:
    """The manifest's graph I/O of a head (runtime.manifest.expected_head_io)."""
    kv_past = [1, "past_len", shape.num_kv_heads, shape.head_dim]
    kv_new = [1, "seq_len", shape.num_kv_heads, shape.head_dim]
    return {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, "seq_len"]},
                       {"name": "features", "dtype": "fp32", "shape": [1, "seq_len", shape.hidden_size]},
                       {"name": "past_key_0", "dtype": precision, "shape": kv_past},
                       {"name": "past_value_0", "dtype": precision, "shape": kv_past}],
            "outputs": [{"name": "logits", "dtype": "fp32", "shape": [1, "logits_rows", shape.output_vocab]},
                        {"name": "next_features", "dtype": "fp32", "shape": [1, "logits_rows", shape.hidden_size]},
                        {"name": "new_key_0", "dtype": precision, "shape": kv_new},
                        {"name": "new_value_0", "dtype": precision, "shape": kv_new}]}
