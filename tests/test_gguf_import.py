"""quantize = "gguf": a bundle whose weights are the GGUF file's own blocks (issue 19, step 2).

Graph pieces on small hand-made tensors (fast), then one real build of SmolLM2-135M Q4_1 (llama arch, so
attn_q / attn_k rows are un-permuted; Q4_1 linear layers with their block-minimum correction, a tied Q8_0
token_embd serving embeddings and output layer), with the same file as its own draft over the 2048 lowest ids
(an output layer of selected rows, rejections when the target picks another id). Reference: transformers'
model loaded from the same file (its weights are gguf's dequantization, rows un-permuted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from conftest import transformers_greedy  # noqa: E402
from test_gguf_blocks import assert_bits_equal, hand_made, random_weights  # noqa: E402

from spectrt.compiler.build import build_bundle  # noqa: E402
from spectrt.compiler.config import BuildConfig  # noqa: E402
from spectrt.compiler.gguf_blocks import (  # noqa: E402
    BlockWeight, block_weight_from_raw, dequantize_representation, rope_unpermute_rows)
from spectrt.compiler.progress import Progress  # noqa: E402
from spectrt.errors import ConfigError  # noqa: E402

T = gguf.GGMLQuantizationType


def quantized(qtype: str, n: int, k: int, seed: int = 0, **kwargs) -> BlockWeight:
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        raw = hand_made(qtype, n, k, seed=seed)
    else:
        raw = gguf.quants.quantize(random_weights(np.random.default_rng(seed), n, k), T[qtype])
    return block_weight_from_raw(raw, qtype, n, k, **kwargs)


# --- options ----------------------------------------------------------------------------------------------------


def test_gguf_needs_fp32_and_onnx_runtime():
    with pytest.raises(ConfigError, match="--precision fp32"):
        BuildConfig(target="t.gguf", draft="d.gguf", quantize="gguf", precision="fp16")
    with pytest.raises(ConfigError, match="TensorRT cannot parse"):
        BuildConfig(target="t.gguf", draft="d.gguf", quantize="gguf", backend="tensorrt")
    with pytest.raises(ConfigError, match="TensorRT cannot parse"):
        BuildConfig(target="t.gguf", draft="d.gguf", draft_quantize="gguf", backend="all")


def test_gguf_refused_for_a_source_that_is_not_a_gguf_file(tiny_llama_pair, tmp_path):
    target, draft = tiny_llama_pair
    with pytest.raises(ConfigError, match="target .* is not a .gguf file"):
        build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(2,), max_context=32,
                                 out=str(tmp_path / "b"), quantize="gguf"), progress=Progress(quiet=True))
    config = BuildConfig(target="x.gguf", draft=str(draft), quantize="gguf", draft_quantize="gguf")
    with pytest.raises(ConfigError, match="--draft-quantize gguf .* draft"):
        config.check_sources({"draft": Path(draft)})


# --- graph pieces -------------------------------------------------------------------------------------------------


def test_rope_rows_unpermuted_as_transformers_does():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    heads, kv_heads, head_dim, hidden = 4, 2, 8, 64
    for name, rows, n_head in (("blk.0.attn_q.weight", heads * head_dim, heads),
                               ("blk.0.attn_k.weight", kv_heads * head_dim, kv_heads)):
        weight = quantized("Q4_1", rows, hidden, seed=rows)
        processor = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
        want = processor.process(weights=dequantize_representation(weight), name=name).weights
        assert_bits_equal(dequantize_representation(rope_unpermute_rows(weight, n_head)), np.ascontiguousarray(want))


def run_graph(build, feeds: dict[str, np.ndarray], tmp_path: Path, rank: int = 3) -> np.ndarray:
    """build(gb) -> output name; runs the one-output graph (output of rank `rank`) on onnxruntime CPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from spectrt.compiler.onnx_graph import ExternalDataWriter, GraphBuilder, write_model

    writer = ExternalDataWriter(tmp_path / "g.onnx.data")
    gb = GraphBuilder(writer, np.float32, TensorProto.FLOAT)
    output = build(gb)
    writer.close()
    gb.nodes.append(helper.make_node("Identity", [output], ["y"]))
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
              for name, value in feeds.items()]
    graph = helper.make_graph(gb.nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(rank)])],
                              gb.initializers)
    path = write_model(graph, tmp_path / "g.onnx", quantized=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


EMBED_CASES = [("Q8_0", {}), ("Q5_0", {}), ("Q5_1", {}), ("Q4_0", {}), ("Q4_1", {}), ("Q4_1", {"fold_offset": True}),
               ("Q4_K", {}), ("Q5_K", {}), ("Q6_K", {})]


@pytest.mark.parametrize("qtype,kwargs", EMBED_CASES, ids=[q + ("-fold" if kw else "") for q, kw in EMBED_CASES])
def test_embedding_rows_are_the_files_rows_bit_for_bit(qtype, kwargs, tmp_path):
    """Gathered rows (4-bit codes unpacked in the graph, zero points, corrections) equal gguf's dequantized rows."""
    n, k = 40, 512
    weight = quantized(qtype, n, k, seed=7, **kwargs)
    ids = np.array([[3, 0, 39, 3, 17]], np.int64)
    got = run_graph(lambda gb: gb.embedding_from_blocks(gb.store_blocks("embed", weight), "input_ids"),
                    {"input_ids": ids}, tmp_path)
    assert_bits_equal(got, dequantize_representation(weight)[ids])


def test_mixed_forms_in_one_projection(tmp_path):
    """Q4_K_M's layout: q, k Q4_K (4-bit + correction), v Q6_K (8-bit, blocks of 16), plus a float part: one
    MatMulNBits per run of one form, outputs concatenated in order. Level 0 (fp32 activations), so the graph
    computes x @ W^T to fp32 rounding."""
    from spectrt.compiler.onnx_graph import GraphSpec, _project

    k = 256
    parts = {"q": quantized("Q4_K", 64, k, seed=1), "k": quantized("Q4_K", 32, k, seed=2),
             "v": quantized("Q6_K", 32, k, seed=3), "f": None}
    floats = {"f": np.random.default_rng(5).standard_normal((16, k)).astype(np.float32)}
    spec = GraphSpec("fp32", 8, 8, quantize="gguf", accuracy_level=0)
    x = np.random.default_rng(6).standard_normal((1, 3, k)).astype(np.float32)
    got = run_graph(lambda gb: _project(gb, "x", "qkv", list(parts), floats.__getitem__, spec, parts.__getitem__),
                    {"x": x}, tmp_path)
    w = np.concatenate([floats["f"] if b is None else dequantize_representation(b) for b in parts.values()])
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = (k + 64) * 2.0 ** -24 * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64))
    assert got.shape == (1, 3, 144) and (np.abs(got - want) <= bound).all()


# --- the real file ------------------------------------------------------------------------------------------------

DRAFT_VOCAB = 2048
PROMPTS = ["The capital of France is", "def quicksort(items):\n", "Once upon a time, in a small village,"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def gguf_bundle(smollm2_gguf, tmp_path_factory):
    """SmolLM2 Q4_1 as target and as draft (the draft over the 2048 lowest ids), both quantize = "gguf"."""
    out = tmp_path_factory.mktemp("bundles") / "smollm2-gguf"
    config = BuildConfig(target=str(smollm2_gguf), draft=str(smollm2_gguf), widths=(1, 2, 4), max_context=256,
                         out=str(out), quantize="gguf", draft_vocab=DRAFT_VOCAB)
    return build_bundle(config, progress=Progress(quiet=True))


@pytest.fixture(scope="module")
def reference_model(smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


def test_manifest_records_what_was_held(gguf_bundle):
    for role in ("target", "draft"):
        entry = gguf_bundle.manifest["models"][role]
        record = entry["quantization"]
        assert record["scheme"] == "gguf" and record["accuracy_level"] == 4
        assert record["block_types"] == {"Q4_1": 210, "Q8_0": 1}  # 30 layers x 7 linear weights; tied token_embd
        assert record["tensors"]["token_embd.weight"] == "Q8_0" and record["rope_rows_unpermuted"]
        validation = entry["validation"]
        # the file's own weights: gguf's limits are four times tighter than int4's (int4 re-fit on this file: max
        # 14.4, 81%), and it measures well inside them (1.46 / 97.6% for the target when written)
        assert validation["passed"] and validation["thresholds"] == {"max_abs_logit_diff": 6.0,
                                                                     "min_argmax_agreement": 0.85}
        assert validation["max_abs_logit_diff"] < 3.0 and validation["argmax_agreement"] >= 0.9


def test_plan_counts_the_files_blocks_to_the_byte(gguf_bundle, smollm2_gguf):
    """`spectrt plan` before the build (GGUF tensor types from the file) and after it (from the manifest): the
    external-data file's size to the byte, for the full-vocabulary target (tied Q8_0 table shared with the output
    layer) and the draft (an output layer of 2048 selected rows beside the embedding table)."""
    from dataclasses import replace

    from spectrt.plan import memory as memory_plan

    bundle = memory_plan.plan_bundle(gguf_bundle.bundle_dir)
    recipe = memory_plan.plan_recipe("smollm2-gguf", {"target": smollm2_gguf, "draft": smollm2_gguf},
                                     widths=(1, 2, 4), max_context=256, precision="fp32",
                                     quantize={"target": "gguf", "draft": "gguf"}, draft_vocab=DRAFT_VOCAB)
    for role in ("target", "draft"):
        from_files, from_file_types = bundle.models[role], recipe.models[role]
        assert set(from_files.gguf_types) <= set(from_file_types.gguf_types)  # the manifest: the tensors held
        assert (replace(from_file_types, weight_file_bytes=None, gguf_types=()) ==
                replace(from_files, weight_file_bytes=None, gguf_types=())), role
        data = (gguf_bundle.bundle_dir / f"{role}.onnx.data").stat().st_size
        assert from_files.data_file_bytes() == from_file_types.data_file_bytes() == data, role
        assert from_files.label == "fp32+gguf"
    kinds = recipe.models["draft"].weight_kinds()
    assert kinds["table"] > 0 and kinds["int8"] > 0 and kinds["int4"] > 0  # Q8_0 table and head, Q4_1 layers


def hf_names(initializer: str) -> list[str]:
    """The transformers weights one block initializer stacks (onnx_graph._project's names)."""
    parts = initializer.split(".")
    if parts[0] == "layers":
        layer, kind = int(parts[1]), ".".join(parts[2:4])
        base = f"model.layers.{layer}"
        return {"attn.qkv": [f"{base}.self_attn.{p}_proj.weight" for p in "qkv"],
                "attn.o": [f"{base}.self_attn.o_proj.weight"],
                "mlp.gate_up": [f"{base}.mlp.gate_proj.weight", f"{base}.mlp.up_proj.weight"],
                "mlp.down": [f"{base}.mlp.down_proj.weight"]}[kind]
    return ["model.embed_tokens.weight"]  # embed_tokens / lm_head: the tied token_embd


def test_every_block_initializer_is_transformers_weight_bit_for_bit(gguf_bundle, reference_model):
    """Dequantize each MatMulNBits (and embedding) table from the ONNX file and compare it with the weights
    transformers loaded from the GGUF: q/k rows un-permuted, corrections included, the draft's output rows."""
    import onnx
    from onnx import numpy_helper

    state = {name: value.detach().numpy() for name, value in reference_model.state_dict().items()}
    manifest = gguf_bundle.manifest
    for role in ("target", "draft"):
        model = onnx.load(str(gguf_bundle.bundle_dir / f"{role}.onnx"))
        inits = {i.name: i for i in model.graph.initializer}
        nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nodes) == 30 * 4 + 1  # qkv, o, gate_up, down per layer (one form each in Q4_1) + output layer
        tables = {n.input[1][: -len(".q")]: n for n in nodes} | {"embed_tokens.weight": None}
        for base, node in tables.items():
            packed = numpy_helper.to_array(inits[base + ".q"])  # [N, K/B, B*bits/8]
            attrs = {a.name: a.i for a in node.attribute} if node else {"bits": 8, "block_size": 32}  # Q8_0 table
            n_rows, bits, block = packed.shape[0], attrs["bits"], attrs["block_size"]
            k = packed.shape[1] * block
            assert node is None or (attrs["K"], attrs["N"]) == (k, n_rows)

            def get(suffix):
                return numpy_helper.to_array(inits[base + suffix]) if base + suffix in inits else None

            correction = get(".correction")  # [K/32, N]
            weight = BlockWeight("?", n_rows, k, bits, block, packed, get(".scales").reshape(n_rows, -1),
                                 get(".zero_points"), None if correction is None else np.ascontiguousarray(correction.T))
            want = np.concatenate([state[name] for name in hf_names(base)])
            if base == "lm_head.weight":  # only the draft has its own output table: the rows of its ids
                assert role == "draft"
                want = want[_draft_ids(manifest)]
            assert_bits_equal(dequantize_representation(weight), np.ascontiguousarray(want))
        assert "embed_tokens.weight.q" in inits and ("lm_head.weight.q" in inits) == (role == "draft")


def _draft_ids(manifest) -> np.ndarray:
    vocab = manifest["models"]["draft"]["output_vocab"]
    return np.array(sorted(set(range(vocab["lowest_ids"])) | set(vocab["special_ids"])), np.int64)


@pytest.fixture(scope="module")
def generator(gguf_bundle):
    from spectrt.runtime.generator import Generator

    generator = Generator(gguf_bundle.bundle_dir, threads=2)
    generator.eos_ids = set()
    return generator


def test_greedy_speculation_equals_plain_decoding(generator):
    drafted = rejected = 0
    for prompt in PROMPTS:
        plain = generator.generate(prompt, max_new_tokens=NEW_TOKENS, draft="none").token_ids
        for width in (1, 4, "auto"):
            result = generator.generate(prompt, max_new_tokens=NEW_TOKENS, draft="model", width=width)
            assert result.token_ids == plain, (prompt, width)
            drafted += result.metrics.drafted_tokens
            rejected += len(result.metrics.rejected_spans)
    assert drafted > 0 and rejected > 0  # the draft's 2048-id output layer misses some of the target's tokens


def test_plain_greedy_follows_transformers_where_the_margin_is_clear(generator, reference_model):
    """spectrt computes with int8 activations, transformers in fp32 on the same weights: their greedy tokens
    agree at least until transformers' top-1 / top-2 logit margin first drops below 2.0 (twice the largest
    logit difference the build's validation measured on this file, 1.46 -> rounded up)."""
    import torch

    for prompt in PROMPTS:
        ours = generator.generate(prompt, max_new_tokens=NEW_TOKENS, draft="none")
        prompt_ids = list(ours.prompt_token_ids)
        reference = transformers_greedy(reference_model, prompt_ids, NEW_TOKENS)
        with torch.no_grad():
            logits = reference_model(torch.tensor([prompt_ids + reference])).logits[0, len(prompt_ids) - 1:-1]
        top2 = torch.topk(logits, 2).values
        margins = (top2[:, 0] - top2[:, 1]).numpy()  # [NEW_TOKENS]
        clear = int(np.argmax(margins < 2.0)) if (margins < 2.0).any() else NEW_TOKENS
        assert ours.token_ids[:clear] == reference[:clear], (prompt, clear)
