"""SmolLM2-135M (real weights): bundle end to end, and greedy decoding through the exported target
graph (ONNX Runtime, KV cache in and out, several tokens verified per call) reproduces transformers."""

from __future__ import annotations

import numpy as np
import pytest

from spectrt.runtime.backends.onnxruntime_backend import OrtDecoder
from spectrt.runtime.manifest import read_manifest, verify_files

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "Here is a list of three fruits:\n1.",
]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    model.eval()
    results = []
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(prompt_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.eos_token_id)
        results.append((prompt_ids[0].numpy(), out[0, prompt_ids.shape[1]:].numpy()))
    return results


def _target_decoder(bundle):
    manifest = read_manifest(bundle)
    entry = manifest.target
    return OrtDecoder(bundle / entry.onnx_path, num_layers=entry.num_layers, kv_heads=entry.num_kv_heads,
                      head_dim=entry.head_dim, precision=entry.precision, max_context=entry.max_context,
                      vocab=entry.logits_vocab, logits_rows=entry.logits_rows)


def test_bundle_is_complete_and_validated(smollm2_bundle):
    manifest = read_manifest(smollm2_bundle)
    verify_files(manifest)
    assert manifest.target.num_layers == 30 and manifest.draft.num_layers == 27
    assert manifest.target.widths == (1, 2, 4)
    assert manifest.target.logits_vocab == 49152
    for role in ("target", "draft"):
        validation = manifest.raw["models"][role]["validation"]
        assert validation["passed"] and validation["argmax_agreement"] == 1.0
        assert validation["max_abs_logit_diff"] < 1e-3
    assert manifest.generation["chat_template"] and manifest.generation["eos_token_ids"]


def test_plain_greedy_through_graph_matches_transformers(smollm2_bundle, reference):
    decoder = _target_decoder(smollm2_bundle)
    for prompt_ids, expected in reference:
        decoder.reset()
        logits = decoder.step(prompt_ids)
        decoder.commit(len(prompt_ids))
        generated = [int(logits[-1].argmax())]
        while len(generated) < NEW_TOKENS:
            logits = decoder.step(np.array(generated[-1:]))
            decoder.commit(1)
            generated.append(int(logits[-1].argmax()))
        assert generated == expected.tolist()


@pytest.mark.parametrize("width", [2, 4])
def test_verifying_k_plus_one_tokens_per_call_matches_transformers(smollm2_bundle, reference, width):
    """Feed the reference continuation K+1 tokens at a time (as a draft that is always right would) and check
    the graph's argmax at every verified position, with the cache committed and rolled back like the runtime."""
    decoder = _target_decoder(smollm2_bundle)
    for prompt_ids, expected in reference:
        decoder.reset()
        decoder.step(prompt_ids[:-1])
        decoder.commit(len(prompt_ids) - 1)
        sequence = np.concatenate([prompt_ids[-1:], expected])
        position = 0
        while position + width + 1 <= len(sequence):
            chunk = sequence[position : position + width + 1]  # [last, proposal_1..K]
            argmax = decoder.step(chunk).argmax(-1)
            assert argmax[:-1].tolist() == chunk[1:].tolist()
            if position + width + 1 < len(sequence):
                assert argmax[-1] == sequence[position + width + 1]
            # reject the last proposal on purpose: roll back one row, then continue from there
            decoder.commit(width + 1)
            decoder.rollback(decoder.length - 1)
            position += width
