"""The trained draft head: the target's feature output, training (self-distillation), and the head as a drafter.

A head is trained for a few seconds on the tiny random-weight llama target (its greedy continuations of the code
workload's training split and some of the standard library's text). What users rely on: greedy output equals plain
decoding at every width, sampling keeps the target's distribution, training reproduces with a seed, the trained
head beats guessing, and a bundle without a head (or a target without features) fails clearly.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spectrt.errors import BundleError, ConfigError, GenerationError

TRAIN = dict(workloads=("code",), text_tokens=1500, max_new_tokens=48, window=64, intermediate_size=64,
             output_vocab=128, steps=120, lr=3e-3, threads=2)


def _build(tiny_llama_pair, out: Path, max_context: int = 256) -> Path:
    from spectrt.compiler.build import build_bundle
    from spectrt.compiler.config import BuildConfig
    from spectrt.compiler.progress import Progress

    target, draft = tiny_llama_pair
    build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(1, 2, 3), max_context=max_context,
                             out=str(out)), progress=Progress(quiet=True))
    return out


def _train(bundle: Path, work: Path, **changes):
    from spectrt.compiler.head import HeadConfig, train_head
    from spectrt.compiler.progress import Progress

    return train_head(bundle, HeadConfig(**{**TRAIN, "work_dir": str(work), **changes}), progress=Progress(quiet=True))


@pytest.fixture(scope="module")
def head_bundle(tiny_llama_pair, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("head")
    bundle = _build(tiny_llama_pair, root / "bundle")
    _train(bundle, root / "work")
    return bundle


@pytest.fixture(scope="module")
def head_generator(head_bundle):
    from spectrt.runtime.generator import Generator

    generator = Generator(head_bundle, threads=1)
    generator.eos_ids = set()  # full-length outputs: more positions compared
    return generator


def held_out_prompts(generator) -> list[list[int]]:
    """The code workload's first 8 records: the benchmark's, never trained on."""
    from spectrt.workloads import load_workload

    return [generator.tokenizer.encode(p.prompt)[:96] for p in load_workload("code", 8)]


def test_features_output_keeps_logits_and_is_the_final_hidden_state(tiny_llama_pair, tmp_path):
    """Graph surgery adds `features` without changing a logit; it equals transformers' last hidden state."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from spectrt.compiler.onnx_graph import add_features_output

    bundle = _build(tiny_llama_pair, tmp_path / "bundle")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # no spinning thread pool left behind for the next tests
    plain = ort.InferenceSession(str(bundle / "target.onnx"), options, providers=["CPUExecutionProvider"])
    shutil.copy(bundle / "target.onnx", bundle / "with_features.onnx")
    assert add_features_output(bundle / "with_features.onnx", 64)
    assert not add_features_output(bundle / "with_features.onnx", 64)  # once only
    featured = ort.InferenceSession(str(bundle / "with_features.onnx"), options, providers=["CPUExecutionProvider"])
    ids = np.array([[5, 17, 42, 99, 7, 3]], np.int64)
    feeds = {"input_ids": ids}
    for i in range(3):
        feeds[f"past_key_{i}"] = feeds[f"past_value_{i}"] = np.zeros((1, 0, 2, 16), np.float32)
    logits = plain.run(["logits"], feeds)[0]
    logits_too, features = featured.run(["logits", "features"], feeds)
    assert np.array_equal(logits, logits_too)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_pair[0], dtype=torch.float32)
    with torch.no_grad():
        reference = model.model(torch.tensor(ids)).last_hidden_state.numpy()  # after the final norm
    np.testing.assert_allclose(features, reference, atol=1e-4)


def test_greedy_with_the_head_is_plain_greedy_at_every_width(head_generator):
    for prompt in held_out_prompts(head_generator)[:4]:
        plain = head_generator.generate(prompt_ids=prompt, max_new_tokens=40, draft="none").token_ids
        for width in (1, 2, 3, "auto"):
            result = head_generator.generate(prompt_ids=prompt, max_new_tokens=40, draft="head", width=width)
            assert result.token_ids == plain, (prompt, width)


def test_prefix_reuse_and_plain_rounds_keep_greedy_exact(head_generator):
    """A second request sharing a prefix reuses cached rows; the head starts its context where its features do."""
    prompts = held_out_prompts(head_generator)
    base = prompts[0]
    longer = base + prompts[1][:5]
    for prompt in (base, longer, base):
        plain = head_generator.generate(prompt_ids=prompt, max_new_tokens=30, draft="none", reuse_prefix=False)
        result = head_generator.generate(prompt_ids=prompt, max_new_tokens=30, draft="head", width=2)
        assert result.token_ids == plain.token_ids


def test_trained_head_beats_random_guessing(head_generator, head_bundle):
    """Acceptance on held-out prompts against a drafter that proposes uniformly random tokens (greedy acceptance
    1/V); training lowered the loss."""
    def acceptance(generator) -> float:
        drafted = accepted = 0
        for prompt in held_out_prompts(generator):
            metrics = generator.generate(prompt_ids=prompt, max_new_tokens=48, draft="head", width=1).metrics
            drafted, accepted = drafted + metrics.drafted_tokens, accepted + metrics.accepted_tokens
        assert drafted >= 200
        return accepted / drafted

    trained = acceptance(head_generator)  # measured 0.031 (a random-weight target's choices are hard to predict)
    random_guess = 1 / head_generator.manifest.target.logits_vocab  # 0.0033
    assert trained > 3 * random_guess
    training = json.loads((head_bundle / "manifest.json").read_text())["models"]["head"]["training"]
    assert training["validation"]["agreement_1"] > 3 * random_guess
    assert training["loss_curve"][-1]["loss"] < training["loss_curve"][0]["loss"]


def test_sampling_with_the_head_keeps_the_target_distribution(tiny_llama_pair, tmp_path_factory):
    """The exact distribution of five sampled tokens (top-k 2) vs 4000 speculative samples (rejection sampling with
    the head's probabilities; tokens outside its vocabulary have draft probability 0)."""
    import test_sampling_distribution as sd

    from spectrt.runtime.generator import Generator

    root = tmp_path_factory.mktemp("head-sampling")
    bundle = _build(tiny_llama_pair, root / "bundle", max_context=32)
    _train(bundle, root / "work", steps=30, max_new_tokens=12, output_vocab=64)
    generator = Generator(bundle, threads=1)
    generator.eos_ids = set()
    exact = sd.exact_distribution(generator)
    drafted_before = generator.aggregate.totals["drafted_tokens"]
    counts = sd.empirical(generator, "head", 3, "rejection")
    assert generator.aggregate.totals["drafted_tokens"] > drafted_before
    assert sd.total_variation(counts, exact) < sd.TV_BOUND


def test_training_reproduces_with_a_seed(tiny_llama_pair, tmp_path):
    bundle = _build(tiny_llama_pair, tmp_path / "bundle")
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        copy = tmp_path / f"bundle-{name}"
        shutil.copytree(bundle, copy)
        entry = _train(copy, tmp_path / f"work-{name}", steps=6, seed=seed, text_tokens=400, max_new_tokens=8)
        runs.append(((copy / "head.onnx.data").read_bytes(), entry["training"]["loss_curve"]))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


def test_rerun_resumes_from_the_work_dir(tiny_llama_pair, tmp_path, capsys):
    from spectrt.compiler.head import HeadConfig, train_head
    from spectrt.compiler.progress import Progress

    bundle = _build(tiny_llama_pair, tmp_path / "bundle")
    config = HeadConfig(**{**TRAIN, "steps": 4, "text_tokens": 300, "max_new_tokens": 4, "work_dir": str(tmp_path / "w")})
    first = train_head(bundle, config, progress=Progress())
    second = train_head(bundle, config, progress=Progress())
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "reusing collected data" in out and "resumed at step 4/4" in out
    assert first["training"]["loss_curve"] == second["training"]["loss_curve"]


def test_head_errors_are_clear(tiny_bundle, head_bundle, tmp_path):
    from spectrt.bench.runner import BenchConfig, run_benchmark
    from spectrt.runtime.generator import Generator
    from spectrt.runtime.manifest import read_manifest

    no_head = Generator(tiny_bundle, threads=1)
    with pytest.raises(GenerationError, match="no draft head; train one with `spectrt train-head"):
        no_head.generate("def f():", max_new_tokens=4, draft="head")
    with pytest.raises(ConfigError, match="no draft head"):
        run_benchmark(BenchConfig(bundle=str(tiny_bundle), workloads=("code",), drafts=("head",), widths=("auto",),
                                  prompts=1, repeats=1, warmup=0), say=lambda s: None)
    planned = Generator(head_bundle, threads=1, provider="cpu-planned")  # its executor keeps features to itself
    with pytest.raises(GenerationError, match="reads the target's features, which this backend does not return"):
        planned.generate("def f():", max_new_tokens=4, draft="head")
    assert planned.generate("def f():", max_new_tokens=4, draft="none").token_ids
    broken = tmp_path / "broken"
    shutil.copytree(head_bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["models"]["target"]["features"] = None
    manifest["models"]["target"]["graph"]["outputs"] = [o for o in manifest["models"]["target"]["graph"]["outputs"]
                                                        if o["name"] != "features"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="draft head reads features of size 64 but the target graph returns none"):
        read_manifest(broken)


def test_build_with_head_trains_one_within_its_budget(tiny_llama_pair, tmp_path):
    """`spectrt build --head`: the target graph is exported with its features output and a head is trained (time
    budget: the step count that fits is measured and recorded)."""
    from spectrt.compiler.build import build_bundle
    from spectrt.compiler.config import BuildConfig
    from spectrt.compiler.progress import Progress
    from spectrt.runtime.generator import Generator

    target, draft = tiny_llama_pair
    out = tmp_path / "bundle"
    result = build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(1, 2), max_context=96, out=str(out),
                                      head=True, head_minutes=0.5), progress=Progress(quiet=True))
    entry = result.manifest["models"]["head"]
    assert result.manifest["models"]["target"]["features"] == 64 and entry["training"]["steps"] >= 10
    generator = Generator(out, threads=1)
    plain = generator.generate("def add(a, b):", max_new_tokens=24, draft="none").token_ids
    assert generator.generate("def add(a, b):", max_new_tokens=24, draft="head", width=2).token_ids == plain


def test_interrupted_collection_resumes_to_the_same_data(head_bundle):
    """The collection saves as it goes; a run resumed from what was saved ends with the same sequences."""
    from spectrt.compiler.head_data import HeadData, collect, stdlib_files, training_prompts
    from spectrt.runtime.generator import Generator

    generator = Generator(head_bundle, threads=1)
    options = dict(prompts=training_prompts(["code"])[:3], files=stdlib_files()[:40], text_tokens=600, window=64,
                   max_new_tokens=8, seed=0)
    whole = collect(generator.target, generator.tokenizer, set(), **options)
    saved: list[HeadData] = []

    def save_then_stop(data: HeadData) -> None:
        saved.append(HeadData(list(data.sequences), list(data.prompt_ids)))
        if len(saved) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(generator.target, generator.tokenizer, set(), **options, save=save_then_stop, save_every=0.0)
    resumed = collect(generator.target, generator.tokenizer, set(), **options, partial=saved[-1])
    assert resumed.sources_hash == whole.sources_hash and len(resumed.sequences) == len(whole.sequences)
    for a, b in zip(resumed.sequences, whole.sequences):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.features, b.features)


def test_bench_reports_the_heads_training_and_any_trained_on_prompt(head_bundle, tmp_path):
    from spectrt.bench.report import write_report
    from spectrt.bench.runner import BenchConfig, run_benchmark
    from spectrt.workloads import load_workload

    trained = load_workload("code")[9]  # a training-split record (code-10)
    custom = tmp_path / "mixed.jsonl"
    custom.write_text(json.dumps({"id": trained.id, "kind": "completion", "prompt": trained.prompt[:60]}) + "\n")
    config = BenchConfig(bundle=str(head_bundle), workloads=("code", str(custom)), drafts=("head",), widths=(1,),
                         prompts=1, repeats=1, warmup=0, max_new_tokens=8, peer="none", out=str(tmp_path / "out"))
    results = run_benchmark(config, say=lambda s: None)
    head = results["draft_head"]
    assert head["measured_prompts_trained_on"] == [trained.id] and head["steps"] == TRAIN["steps"]
    summary = next(s for s in results["workloads"]["code"]["summaries"] if s["config"] == "head@1")
    assert summary["exact_match_with_plain"] == 1 and "1" in summary["acceptance_by_position"]
    write_report(results, tmp_path / "out")
    assert f"measured prompts it was trained on: {trained.id}" in (tmp_path / "out" / "results.md").read_text()


def test_training_interrupted_after_an_epoch_resumes_to_the_same_head(tiny_llama_pair, tmp_path, monkeypatch):
    """Checkpoint every step, stop after the window order was reshuffled (an epoch ended), resume: the head equals
    an uninterrupted run's, byte for byte."""
    import spectrt.compiler.head as head_module
    from spectrt.compiler.progress import Progress

    monkeypatch.setattr(head_module, "SAVE_EVERY", -1.0)
    bundle = _build(tiny_llama_pair, tmp_path / "bundle")
    options = dict(steps=30, seed=3, text_tokens=400, max_new_tokens=8, batch=8)
    copies = {}
    for name in ("whole", "resumed"):
        copies[name] = tmp_path / f"bundle-{name}"
        shutil.copytree(bundle, copies[name])

    class StopAtStep(Progress):
        def say(self, message: str) -> None:
            if "step 24/30" in message:
                raise KeyboardInterrupt
            super().say(message)

    _train(copies["whole"], tmp_path / "w-whole", **options)
    with pytest.raises(KeyboardInterrupt):
        head_module.train_head(copies["resumed"], head_module.HeadConfig(**{**TRAIN, **options,
                                                                           "work_dir": str(tmp_path / "w-res")}),
                               progress=StopAtStep(quiet=True))
    entry = _train(copies["resumed"], tmp_path / "w-res", **options)
    assert entry["training"]["steps"] == 30
    assert (copies["whole"] / "head.onnx.data").read_bytes() == (copies["resumed"] / "head.onnx.data").read_bytes()


class _Killed(BaseException):
    """A simulated crash: no `except Exception` catches it, and every later file operation fails too."""


def _kill_after(monkeypatch, operations: int) -> list[str]:
    """From the (operations + 1)-th rename, replace, link, unlink or rmdir on, each raises _Killed, as if the process
    had died there (the cleanup it would run cannot touch the disk either). Returns the operations done."""
    import os

    done: list[str] = []
    for name in ("replace", "rename", "link", "unlink", "rmdir"):
        def operation(*args, _real=getattr(os, name), _name=name, **kwargs):
            if len(done) >= operations:
                raise _Killed(f"{_name} {args}")
            done.append(f"{_name} {args}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, operation)
    return done


def test_train_head_killed_at_any_file_operation_leaves_a_bundle_that_verifies(tiny_llama_pair, tmp_path, monkeypatch):
    """A crash at each file operation of `train-head`, on a first training (the target graph gains its features
    output) and a retraining (the head's files are replaced): the bundle verifies with verify="full" and loads, as
    the old bundle, the new one, or (first training) the target with features and no head yet; a rerun completes
    it and leaves no staged file behind."""
    from spectrt.runtime.generator import Generator
    from spectrt.runtime.manifest import read_manifest

    options = dict(steps=2, text_tokens=300, max_new_tokens=4)
    plain = _build(tiny_llama_pair, tmp_path / "plain")
    trained = tmp_path / "trained"
    shutil.copytree(plain, trained)
    _train(trained, tmp_path / "work-a", **options)  # the old head of the retraining; fills work-a
    (tmp_path / "work-b").mkdir()
    shutil.copy(tmp_path / "work-a" / "data.npz", tmp_path / "work-b" / "data.npz")
    scenarios = {"first": (plain, tmp_path / "work-a", {}), "retrain": (trained, tmp_path / "work-b", {"lr": 2e-3})}
    for name, (start, work, changes) in scenarios.items():
        probe = tmp_path / f"{name}-probe"
        shutil.copytree(start, probe)
        _train(probe, work, **options, **changes)  # later runs reuse work's data and checkpoint: no training
        new_head = (probe / "head.onnx.data").read_bytes()
        if name == "retrain":
            assert new_head != (start / "head.onnx.data").read_bytes()  # else a mixed state could pass unnoticed
        for killed_at in itertools.count():
            copy = tmp_path / f"{name}-{killed_at}"
            shutil.copytree(start, copy)
            operations = _kill_after(monkeypatch, killed_at)
            try:
                _train(copy, work, **options, **changes)
            except _Killed:
                pass
            else:
                break  # a run with no more operations than that: every point was covered
            finally:
                monkeypatch.undo()
            manifest = read_manifest(copy)
            Generator(copy, verify="full", threads=1, invariance="off")  # hashes every listed file, loads every graph
            if manifest.head is None:
                assert name == "first"
            elif manifest.head.raw["training"]["config"]["lr"] != changes.get("lr", TRAIN["lr"]):
                assert name == "retrain"  # the old head, intact
            else:
                assert manifest.file(manifest.head.onnx_data).read_bytes() == new_head
            _train(copy, work, **options, **changes)
            assert (copy / "head.onnx.data").read_bytes() == new_head
            assert not [p.name for p in copy.iterdir() if ".staged-" in p.name or ".placing-" in p.name
                        or ".writing-" in p.name]
        assert killed_at >= 8, operations


def test_target_tables_read_a_tied_8bit_table_under_either_name(tmp_path):
    """A GGUF bundle of a tied model (Gemma 3: Q8_0 token_embd) holds its one table as `embed_tokens.weight.q`; the
    head's data reader finds it for the output layer too, and refuses block types it cannot dequantize."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from spectrt.compiler.head_data import TargetTables

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(6, 2, 32), dtype=np.uint8)  # [V, blocks, 32]
    scales = rng.random(12).astype(np.float32)  # [V * blocks]

    def write(path, extra=()):
        inits = [onnx.numpy_helper.from_array(codes, "embed_tokens.weight.q"),
                 onnx.numpy_helper.from_array(scales, "embed_tokens.weight.scales"),
                 onnx.numpy_helper.from_array(np.ones(64, np.float32), "final_norm.weight"), *extra]
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
        onnx.save(helper.make_model(graph), str(path))
        return path

    tables = TargetTables(write(tmp_path / "tied.onnx"))
    assert (tables.vocab, tables.hidden_size, tables.quantized) == (6, 64, True)
    expected = ((codes.astype(np.float32) - 128) * scales.reshape(6, 2, 1)).reshape(6, 64)
    assert np.array_equal(tables.output_rows(np.array([4, 1])), expected[[4, 1]])
    assert np.array_equal(tables.embeddings(np.array([2])), expected[[2]])
    minimum = onnx.numpy_helper.from_array(np.zeros((2, 6), np.float32), "embed_tokens.weight.correction")
    with pytest.raises(ValueError, match="GGUF blocks this reader does not dequantize"):
        TargetTables(write(tmp_path / "q4k.onnx", [minimum])).output_rows(np.array([0]))
