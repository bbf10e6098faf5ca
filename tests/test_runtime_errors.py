"""Bad runtime input gets a clear error (and leaves the bundle untouched)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from spectrt.cli import main
from spectrt.errors import BundleError, GenerationError
from spectrt.runtime.generator import Generator


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_unknown_bundle_path(tmp_path):
    with pytest.raises(BundleError, match="does not exist.*spectrt build"):
        Generator(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        Generator(tmp_path)


def test_other_schema_version(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 99.*reads version 1.*Rebuild"):
        Generator(bundle_copy)


def test_corrupt_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Generator(bundle_copy)
    (bundle_copy / "manifest.json").write_text(json.dumps({"schema_version": 1, "models": {}}))
    with pytest.raises(BundleError, match="missing 'models.target'"):
        Generator(bundle_copy)


def test_sha256_mismatch_same_size(bundle_copy):
    data = bundle_copy / "target.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[5000] ^= 0xFF  # same size, different bytes
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="'target.onnx.data' does not match its sha256"):
        Generator(bundle_copy, verify="full")
    with pytest.raises(BundleError, match="does not match its sha256"):
        Generator(bundle_copy)  # the default (cached) check hashes a file it has not seen


def test_truncated_and_missing_files(bundle_copy):
    tokenizer = (bundle_copy / "tokenizer.json").read_bytes()
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="'tokenizer.json' is missing"):
        Generator(bundle_copy, verify="full")
    (bundle_copy / "tokenizer.json").write_bytes(tokenizer)
    (bundle_copy / "draft.onnx.data").write_bytes(b"short")
    with pytest.raises(BundleError, match="'draft.onnx.data' has 5 bytes"):
        Generator(bundle_copy)


def test_verified_cache_is_used_and_invalidated(bundle_copy, monkeypatch):
    import spectrt.runtime.manifest as manifest_module

    # files changed within SETTLE_NS of a check are hashed, not recorded: the copy was just made, so look from later
    monkeypatch.setattr(manifest_module, "clock_ns", lambda: 2**62)
    Generator(bundle_copy)  # hashes and records
    calls = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p: calls.append(p) or real(p))
    Generator(bundle_copy)
    assert calls == []
    (bundle_copy / "tokenizer.json").touch()  # new mtime: must be hashed again
    Generator(bundle_copy)
    assert [p.name for p in calls] == ["tokenizer.json"]


def test_width_not_built(tiny_generator):
    with pytest.raises(GenerationError, match="width 4 was not built.*1, 2, 3, 5"):
        tiny_generator.generate(prompt_ids=[1, 2, 3], width=4)


def test_prompt_longer_than_max_context(tiny_generator):
    # 128, less the rows kept free for calls padded to an agreeing row count on this CPU (runtime/invariance.py)
    max_pad = tiny_generator.target.shape.max_pad if hasattr(tiny_generator.target, "shape") else 0
    assert tiny_generator.max_context == 128 - max_pad
    with pytest.raises(GenerationError, match=f"prompt has 200 tokens.*max context is {tiny_generator.max_context}"):
        tiny_generator.generate(prompt_ids=list(range(1, 201)))


@pytest.mark.parametrize("kwargs,message", [
    ({"prompt": ""}, "prompt is empty"),
    ({}, "exactly one of prompt"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of prompt"),
    ({"messages": []}, "non-empty list"),
    ({"prompt_ids": [1, 99999]}, "prompt_ids must lie in"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"prompt": "hi", "draft": "magic"}, "unknown drafter 'magic'"),
    ({"prompt": "hi", "width": "wide"}, "width must be 'auto' or an integer"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature must be >= 0"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p must lie in"),
    ({"prompt": "hi", "temperature": 1.0, "accept": "magic"}, "accept must be one of coupled, rejection"),
    ({"prompt": "hi", "temperature": 1.0, "seed": -3}, "seed must be an integer"),
])
def test_bad_requests(tiny_generator, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        tiny_generator.generate(**kwargs)


def test_generator_survives_bad_requests(tiny_generator):
    """Requests refused while the generator holds another request's state (prefill and rounds done, a stream
    open in another thread) lose nothing: that stream and the next requests still match plain decoding."""
    import threading

    tiny_generator.eos_ids = set()
    request = dict(prompt_ids=[5, 6, 7], max_new_tokens=12)
    before = tiny_generator.generate(**request, draft="none").token_ids
    stream = tiny_generator.stream(**request, draft="model", width=3)
    first = [next(stream).token_id for _ in range(4)]  # state exists: caches hold this request
    refused = []

    def bad_requests() -> None:
        for bad in (dict(prompt_ids=list(range(1, 300))), dict(prompt_ids=[1], width=4), dict(prompt="")):
            try:
                tiny_generator.generate(**bad)
            except GenerationError as exc:
                refused.append(exc)

    thread = threading.Thread(target=bad_requests)
    thread.start()
    thread.join(timeout=60)
    assert len(refused) == 3  # refused up front, without waiting for the open stream
    rest = [chunk.token_id for chunk in stream][:-1]
    assert first + rest == before
    assert tiny_generator.generate(**request, draft="model", width=3).token_ids == before


def test_cli_generate_errors_and_json(tiny_bundle, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["generate", str(tmp_path / "missing"), "hello"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(main, ["generate", str(tiny_bundle), "def add", "--width", "7"])
    assert result.exit_code == 2 and "width 7 was not built" in result.output
    result = runner.invoke(main, ["generate", str(tiny_bundle), "def add", "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    metrics = data["metrics"]
    assert data["draft"] == "model" and len(data["token_ids"]) <= 6
    assert metrics["generated_tokens"] == len(data["token_ids"])
    assert metrics["rounds"] == metrics["fallback_rounds"] + metrics["draft_misses"] + metrics["speculative_rounds"]
    assert metrics["rejected_tokens"] == metrics["drafted_tokens"] - metrics["accepted_tokens"]
    assert metrics["rejected_tokens"] == sum(length for _, length in metrics["rejected_spans"])
    if metrics["drafted_tokens"]:
        assert metrics["acceptance_rate"] == metrics["accepted_tokens"] / metrics["drafted_tokens"]
    assert sum(metrics["width_histogram"].values()) == metrics["rounds"]
    assert metrics["deliveries"] == metrics["rounds"] + 1 or data["finish_reason"] != "length"
    assert 0 < metrics["time_to_first_token"] <= metrics["total_seconds"]
    assert metrics["time_to_first_token"] + metrics["decode_seconds"] == pytest.approx(metrics["total_seconds"], abs=1e-3)
    assert metrics["tokens_per_second"] == pytest.approx(1 / metrics["time_per_output_token"])
    assert metrics["seed"] is None  # greedy
