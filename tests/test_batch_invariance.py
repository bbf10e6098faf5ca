"""Batch invariance: a position gets bit-identical logits whether the target computes it alone or inside a
K+1-row verification call. This is what makes greedy speculative output equal plain decoding with int8
activations (and what keeps fp32 graphs bit-exact too). Which row counts agree is a property of the machine
(its CPU's kernels, the onnxruntime version, the thread count), so the runtime measures it on the bundle's own
graph and shapes every target call to the counts that agree (runtime/invariance.py). Checked on tiny models of
both architectures and every weight scheme, and on real weights (SmolLM2, int4) end to end, on whatever CPU runs
the tests; tests/test_invariance_standin.py covers kernel behaviours this CPU may not have."""

from __future__ import annotations

import numpy as np
import pytest

from spectrt.compiler.build import build_bundle
from spectrt.compiler.config import BuildConfig
from spectrt.compiler.progress import Progress
from spectrt.runtime.backends.onnxruntime_backend import OrtDecoder, OrtOptions
from spectrt.runtime.generator import Generator
from spectrt.runtime.invariance import ShapedDecoder, measure_row_invariance, report_for

ROW_COUNTS = (1, 2, 3, 5, 9)


def _export(source, out, *, quantize: str, pad: bool = True, logits_rows: int | None = 9, max_context: int = 256):
    """One decoder graph (no validation) and a decoder running it on 2 threads."""
    from spectrt.compiler.export import export_onnx
    from spectrt.compiler.loading import load_model
    from spectrt.compiler.onnx_graph import GraphSpec

    loaded = load_model(source)
    arch = loaded.arch
    spec = GraphSpec("fp32", max_context, arch.vocab_size, quantize=quantize, accuracy_level=4,
                     logits_rows=logits_rows, pad_attention_rows=pad)
    export_onnx(loaded, spec, out)
    return OrtDecoder(out, num_layers=arch.num_layers, kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                      precision="fp32", max_context=max_context, vocab=arch.vocab_size, options=OrtOptions(threads=2),
                      logits_rows=logits_rows)


def _logits_in_chunks(decoder, prompt: np.ndarray, tokens: np.ndarray, rows: int) -> np.ndarray:
    """Prefill `prompt`, then feed `tokens` `rows` at a time -> logits [len(tokens), V] of every fed token."""
    decoder.reset()
    decoder.step(prompt)
    decoder.commit(len(prompt))
    chunks = []
    for start in range(0, len(tokens), rows):
        part = tokens[start : start + rows]
        chunks.append(decoder.step(part).copy())
        decoder.commit(len(part))
    return np.concatenate(chunks)


def _differences(decoder, prompt, tokens) -> dict[int, float]:
    """max |logits(rows per call) - logits(1 row per call)| for each row count."""
    alone = _logits_in_chunks(decoder, prompt, tokens, 1)
    return {rows: float(np.abs(_logits_in_chunks(decoder, prompt, tokens, rows) - alone).max()) for rows in ROW_COUNTS}


def _shaped(decoder, max_rows: int = 9):
    """The decoder behind the call shaping the runtime would use on this machine (measured now)."""
    shape, facts = measure_row_invariance(decoder, max_rows=max_rows)
    assert shape is not None, f"no two row counts agree on this machine: {facts['classes']}"
    return ShapedDecoder(decoder, shape, report_for(shape, facts, enabled=True, machine={})), shape


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_tiny_graphs_give_identical_logits_at_every_row_count(tiny_llama_pair, tiny_qwen_pair, tmp_path, arch,
                                                             quantize):
    """Through the measured call shaping, every row count gives every position the logits of one-token steps
    (prefills of several lengths included: the prompt's rows feed every later position)."""
    source = (tiny_llama_pair if arch == "llama" else tiny_qwen_pair)[0]
    decoder, _ = _shaped(_export(source, tmp_path / "g.onnx", quantize=quantize))
    rng = np.random.default_rng(0)
    for prompt_len in (1, 7, 40, 150):  # several cache lengths P (150: a prefill in chunks)
        prompt, tokens = rng.integers(3, 290, prompt_len), rng.integers(3, 290, 9)
        assert _differences(decoder, prompt, tokens) == {rows: 0.0 for rows in ROW_COUNTS}


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_the_measured_agreeing_counts_agree_on_other_tokens_and_cache_lengths(tiny_llama_pair, tmp_path, quantize):
    """The check runs on a few arbitrary tokens; what it finds holds for other tokens and cache lengths: raw calls
    of any two agreeing counts give the positions they share the same logits."""
    decoder = _export(tiny_llama_pair[0], tmp_path / "g.onnx", quantize=quantize)
    _, shape = _shaped(decoder)
    small = [rows for rows in shape.rows if rows <= 9]
    rng = np.random.default_rng(7)
    for prompt_len in (2, 11, 60):
        prompt, tokens = rng.integers(3, 290, prompt_len), rng.integers(3, 290, max(small))
        decoder.reset()
        decoder.step(prompt)
        decoder.commit(prompt_len)
        by_count = {}
        for rows in small:
            decoder.rollback(prompt_len)
            by_count[rows] = decoder.step(tokens[:rows]).copy()
        for rows in small:
            assert np.array_equal(by_count[rows], by_count[max(small)][:rows]), (prompt_len, rows)


@pytest.fixture(scope="module")
def smollm2_int4_bundle(smollm2_gguf, smollm2_layer_skip_draft, tmp_path_factory):
    """SmolLM2-135M target and its 27-layer draft, both int4 (int8 activations), widths 1..8."""
    out = tmp_path_factory.mktemp("bundles") / "smollm2-int4"
    build_bundle(BuildConfig(target=str(smollm2_gguf), draft=str(smollm2_layer_skip_draft), widths=(1, 2, 3, 4, 6, 8),
                             max_context=512, quantize="int4", out=str(out)), progress=Progress(quiet=True))
    return out


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_int4_bundle):
    generator = Generator(smollm2_int4_bundle, threads=2)
    generator.eos_ids = set()  # compare full-length runs
    return generator


PROMPTS = [
    "def fibonacci(n):",
    "Here is a list of three fruits:\n1.",
    'Extract the name and city as JSON. Text: "Maria Lopez moved from Lisbon to Oslo in 2019."\nJSON:',
]


def test_smollm2_int4_one_token_and_k_plus_one_token_calls_give_identical_logits(smollm2_int4):
    """Real weights, int8 activations: for every built width K, verifying K+1 tokens in one call gives each
    position exactly the logits of one-token steps, at a real continuation."""
    target = smollm2_int4.target
    prompt = np.asarray(smollm2_int4.encode(PROMPTS[0], None), dtype=np.int64)
    continuation = np.asarray(smollm2_int4.generate(prompt_ids=prompt.tolist(), max_new_tokens=18,
                                                    draft="none").token_ids, dtype=np.int64)
    alone = _logits_in_chunks(target, prompt, continuation, 1)
    for width in smollm2_int4.built_widths:
        assert np.array_equal(_logits_in_chunks(target, prompt, continuation, width + 1), alone), width


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_smollm2_int4_speculative_equals_plain_at_every_width(smollm2_int4, draft):
    for prompt in PROMPTS:
        plain = smollm2_int4.generate(prompt, max_new_tokens=40, draft="none").token_ids
        for width in (*smollm2_int4.built_widths, "auto"):
            result = smollm2_int4.generate(prompt, max_new_tokens=40, draft=draft, width=width)
            assert result.token_ids == plain, (prompt, width)


def test_smollm2_int4_bundle_shares_the_vocabulary_table_and_returns_last_rows(smollm2_int4_bundle, smollm2_int4):
    """The tied output layer and the embeddings are one int8 table; a prefill returns only its last row."""
    import onnx

    manifest = smollm2_int4.manifest
    assert manifest.target.logits_rows == 9 and manifest.draft.logits_rows == 1
    graph = onnx.load(str(smollm2_int4_bundle / manifest.target.onnx_path), load_external_data=False).graph
    names = {init.name for init in graph.initializer}
    assert "lm_head.weight.q" in names and not any(n.startswith("embed_tokens") for n in names)
    target = smollm2_int4.target
    target.reset()
    assert target.step(np.arange(3, 40, dtype=np.int64)).shape == (9, manifest.target.logits_vocab)
    assert target.step(np.array([5], dtype=np.int64)).shape == (1, manifest.target.logits_vocab)


def test_without_padded_attention_rows_the_int8_graph_is_not_batch_invariant(smollm2_gguf, tmp_path):
    """Control: onnxruntime's batched MatMul takes another path for a single query row, so the same graph
    without the extra attention row gives a lone token different logits (here by whole units, since int8
    activation quantization magnifies the difference). If this ever passes with equal logits, onnxruntime
    changed its kernels: the padding may then be unnecessary, but the invariance test above still decides."""
    decoder = _export(smollm2_gguf, tmp_path / "nopad.onnx", quantize="int4", pad=False, max_context=128)
    rng = np.random.default_rng(1)
    differences = _differences(decoder, rng.integers(100, 5000, 37), rng.integers(100, 5000, 9))
    assert differences[1] == 0.0 and all(differences[rows] > 1e-3 for rows in ROW_COUNTS[1:])
