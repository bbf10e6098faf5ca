"""Call shaping proven against a target whose kernel path depends on the row count (tests/row_path_standin.py):
1-row calls and the trailing single row of 4n+1-row calls compute differently, as int4 MatMulNBits does on an
AVX2-only AMD EPYC. Whatever CPU runs these tests, the runtime must find the agreeing counts, keep greedy and
seeded speculative output equal to plain decoding at every width and with every drafter, and say `exact: false`
when shaping is switched off."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import spectrt.runtime.generator as generator_module
from row_path_standin import RowPathStandIn, odd_path_rows
from spectrt.compiler.build import build_bundle
from spectrt.compiler.config import BuildConfig
from spectrt.compiler.progress import Progress
from spectrt.runtime.generator import Generator
from spectrt.runtime.invariance import CallShape

WIDTHS = (1, 2, 3, 4, 8)
PROMPTS = ["the cat sat on", "1 2 3 4 5 6", "abc abc abc abc"]


@pytest.fixture(scope="module")
def bundle(tiny_llama_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("standin") / "b"
    target, draft = tiny_llama_pair
    build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=WIDTHS, max_context=256, out=str(out),
                             validate=False), progress=Progress(quiet=True))
    return out


@pytest.fixture()
def standin(monkeypatch):
    """Generators built in the test get the stand-in as their target's backend."""
    made = []
    real = generator_module._make_decoders

    def make(*args, **kwargs):
        decoders = real(*args, **kwargs)
        decoders["target"] = RowPathStandIn(decoders["target"])
        made.append(decoders["target"])
        return decoders

    monkeypatch.setattr(generator_module, "_make_decoders", make)
    return made


def _generator(bundle, invariance="measure") -> Generator:
    generator = Generator(bundle, threads=1, invariance=invariance)
    generator.eos_ids = set()  # full-length runs
    return generator


def test_the_check_finds_the_counts_that_agree(bundle, standin):
    generator = _generator(bundle)
    report = generator.invariance
    odd = {c for c in range(1, max(WIDTHS) + 2) if odd_path_rows(c)}  # 1, 5, 9
    assert odd == {1, 5, 9}
    assert report.exact and report.strategy == "pad" and not report.cached
    assert set(report.rows) & odd == set() and {2, 3, 4, 6, 7, 8} <= set(report.rows)
    assert report.classes[0] == (2, 3, 4, 6, 7, 8, 10)  # 5 and 9 differ in their last row, 1 in its only row
    assert 10 not in report.rows  # 10 rows: only a witness for the last row of a 9-row call
    assert report.plain_step_rows == 2 and report.chunk_rows is not None
    again = _generator(bundle)  # a second load reads the cached result
    assert again.invariance.cached and again.invariance.rows == report.rows


def test_every_target_call_has_an_agreeing_row_count(bundle, standin):
    generator = _generator(bundle)
    calls = standin[-1].calls
    del calls[:]
    for draft in ("none", "model", "ngram"):
        for width in (*WIDTHS, "auto"):
            generator.generate(PROMPTS[0] * 12, max_new_tokens=20, draft=draft, width=width)  # a chunked prefill too
    assert calls and not any(odd_path_rows(count) for count in calls), sorted(set(calls))
    assert max(calls) > 9  # the long prompt went in chunks of a verified size


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_greedy_speculative_output_equals_plain_at_every_width(bundle, standin, draft):
    generator = _generator(bundle)
    for prompt in PROMPTS:
        plain = generator.generate(prompt, max_new_tokens=40, draft="none")
        assert plain.metrics.exact and plain.metrics.pad_rows > 0
        for width in (*WIDTHS, "auto"):
            result = generator.generate(prompt, max_new_tokens=40, draft=draft, width=width)
            assert result.token_ids == plain.token_ids, (prompt, width)
            assert result.metrics.exact


def test_seeded_sampling_and_prefix_reuse_stay_equal_to_plain(bundle, standin):
    generator = _generator(bundle)
    prompt = PROMPTS[1]
    plain = generator.generate(prompt, max_new_tokens=30, draft="none", temperature=0.8, seed=3, reuse_prefix=False)
    for draft, width in (("model", 3), ("ngram", 8), ("model", "auto")):
        result = generator.generate(prompt, max_new_tokens=30, draft=draft, width=width, temperature=0.8, seed=3)
        assert result.token_ids == plain.token_ids, (draft, width)
    # a prompt whose prefix is cached (rows computed by an earlier request's calls) gives a cold prefill's tokens
    ids = plain.prompt_token_ids + plain.token_ids[:11]
    cold = generator.generate(prompt_ids=ids, max_new_tokens=20, draft="none", reuse_prefix=False)
    generator.generate(prompt_ids=ids[:-7], max_new_tokens=5, draft="none")  # leaves a shorter prefix cached
    warm = generator.generate(prompt_ids=ids, max_new_tokens=20, draft="ngram", width=4)
    assert warm.metrics.reused_prompt_tokens > 0 and warm.token_ids == cold.token_ids


def test_with_shaping_off_the_stand_in_breaks_exactness_and_says_so(bundle, standin):
    """The control: without shaping the stand-in makes speculative output differ from plain (so the tests above
    can fail), and the report and every request's metrics say exact: false."""
    generator = _generator(bundle, invariance="off")
    report = generator.invariance
    assert not report.exact and report.strategy == "off" and "may differ" in report.reason
    differing = 0
    for prompt in PROMPTS:
        plain = generator.generate(prompt, max_new_tokens=40, draft="none")
        assert plain.metrics.exact is False and plain.metrics.pad_rows == 0
        for width in (2, 4, 8):
            differing += generator.generate(prompt, max_new_tokens=40, draft="ngram", width=width).token_ids \
                != plain.token_ids
    assert differing > 0


def test_unshaped_measurement_block_reports_inexact(bundle, standin):
    generator = _generator(bundle)
    with generator.unshaped():
        result = generator.generate(PROMPTS[0], max_new_tokens=8, draft="none")
    assert result.metrics.exact is False and result.metrics.pad_rows == 0
    assert generator.generate(PROMPTS[0], max_new_tokens=8, draft="none").metrics.exact


def test_inspect_exactness_shows_the_strategy_and_the_bad_case(bundle, standin):
    from spectrt.cli import main

    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", str(bundle), "--exactness", "--threads", "1"])
    assert shown.exit_code == 0, shown.output
    assert "exact: true" in shown.output and "(pad:" in shown.output and "2-4, 6-8, 10 | " in shown.output
    assert "row counts checked" in shown.output
    off = runner.invoke(main, ["inspect", str(bundle), "--exactness", "--threads", "1", "--invariance", "off",
                               "--json"])
    assert off.exit_code == 0, off.output
    exactness = json.loads(off.output)["exactness"]
    assert exactness["exact"] is False and exactness["strategy"] == "off"
    assert exactness["machine"]["isa"] is not None and exactness["checked"][:3] == [1, 2, 3]


def test_bench_results_say_exact_false_without_shaping(bundle, standin, tmp_path):
    from spectrt.bench.runner import BenchConfig, run_benchmark

    config = BenchConfig(bundle=str(bundle), workloads=("code",), drafts=("ngram",), widths=(4,), max_new_tokens=24,
                         repeats=1, warmup=0, prompts=2, threads=1, peer="none", out=str(tmp_path),
                         invariance="off")
    results = run_benchmark(config, say=lambda message: None)
    assert results["exactness"]["exact"] is False
    assert "isa" in results["machine"] and "cpu" in results["machine"]
    shaped = run_benchmark(BenchConfig(**{**config.__dict__, "invariance": "measure"}), say=lambda message: None)
    assert shaped["exactness"]["exact"] is True
    summaries = {s["config"]: s for s in shaped["workloads"]["code"]["summaries"]}
    assert summaries["ngram@4"]["exact_match_with_plain"] == summaries["ngram@4"]["prompts"] == 2
    assert shaped["exactness"]["identical_to_plain"] == {"identical": 2, "runs": 2}
    assert summaries["plain"]["exact"] and not summaries["plain-unshaped"]["exact"]
    assert "plain-unshaped" in summaries  # the strategy's cost, measured in the same run


def test_call_shape_plans_keep_the_last_row_visible_and_cost_least():
    shape = CallShape(rows=(2, 3, 4, 6, 7, 8, 64), seconds=(1.0, 1.1, 1.2, 1.4, 1.5, 1.6, 6.0), visible=9)
    assert shape.plan(4) == ((4, 4),)
    assert shape.plan(1) == ((1, 2),) and shape.plan(5) == ((5, 6),)  # short calls: padded to the next agreeing count
    assert len(shape.plan(9)) == 2 and shape.plan(100)[0] == (64, 64)  # longer ones: split, big chunks first
    for count in range(1, 300):
        plan = shape.plan(count)
        assert sum(real for real, _ in plan) == count
        assert all(rows in shape.rows and real <= rows for real, rows in plan)
        assert all(real == rows for real, rows in plan[:-1])  # only the last call pads
        assert plan[-1][0] == plan[-1][1] or plan[-1][1] <= 9  # a padded call returns all its rows' logits
    noisy = CallShape(rows=(2, 3, 4), seconds=(0.05, 0.03, 0.04), visible=5)  # a call of more rows is never cheaper
    assert noisy.plan(2) == ((2, 2),)
    assert np.isfinite(noisy._costs()[4])


def test_bad_invariance_mode_is_refused(bundle):
    from spectrt.errors import GenerationError

    with pytest.raises(GenerationError, match="invariance must be one of measure, off"):
        Generator(bundle, invariance="assume")


def test_another_cpu_library_or_thread_count_checks_again(bundle, monkeypatch):
    """The cached result is keyed by what decides kernel paths: CPU model, ISA features, onnxruntime version,
    threads, backend and the bundle's files; change any and the next load measures afresh."""
    import spectrt.runtime.invariance as invariance
    from spectrt.runtime.manifest import read_manifest

    manifest = read_manifest(bundle)
    decoder = object()
    key, machine = invariance.cache_key(manifest, backend="onnxruntime", threads=2, decoder=decoder)
    assert machine["isa"] is not None and machine["onnxruntime"]
    assert invariance.cache_key(manifest, backend="onnxruntime", threads=1, decoder=decoder)[0] != key
    assert invariance.cache_key(manifest, backend="tensorrt", threads=2, decoder=decoder)[0] != key
    facts = dict(invariance.machine_facts())
    for change in ({"onnxruntime": "9.99"}, {"isa": ["avx2", "avx512f", "avx512_vnni"]}, {"cpu": "Other CPU"}):
        monkeypatch.setattr(invariance, "machine_facts", lambda change=change: {**facts, **change})
        assert invariance.cache_key(manifest, backend="onnxruntime", threads=2, decoder=decoder)[0] != key, change


def test_pad_rows_never_run_past_the_cache(bundle, standin):
    """The last position of the context: a plain step there would need a pad row past the cache, so the usable
    context is the bundle's less the most pad rows a call gets; generation ends with 'context' and stays exact."""
    generator = _generator(bundle)
    target = generator.target
    assert target.shape.max_pad == 1 and generator.max_context == 255
    prompt = list(range(3, 3 + 240))
    plain = generator.generate(prompt_ids=prompt, max_new_tokens=64, draft="none")
    spec = generator.generate(prompt_ids=prompt, max_new_tokens=64, draft="ngram", width=8)
    assert plain.finish_reason == spec.finish_reason == "context"
    assert spec.token_ids == plain.token_ids and len(plain.token_ids) == 255 - 240 + 1  # the last needs no row
    assert not any(odd_path_rows(count) for count in standin[-1].calls)
