"""The benchmark runner on a tiny bundle: structure of the results, plots, peer baseline, workloads."""

from __future__ import annotations

import json

import pytest

from spectrt.bench.report import write_report
from spectrt.bench.runner import BenchConfig, run_benchmark, run_specs
from spectrt.workloads import available_workloads, load_workload
from spectrt.errors import ConfigError


@pytest.fixture()
def workload_file(tmp_path):
    path = tmp_path / "mini.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "m-1", "prompt": "def add(a, b):\n    return a + b\n"},
        {"id": "m-2", "messages": [{"role": "user", "content": "for i in range(10): print(i)"}]},
    ]))
    return path


def test_shipped_workloads_have_enough_prompts():
    assert set(available_workloads()) >= {"code", "chat", "extraction"}
    for name in ("code", "chat", "extraction"):
        prompts = load_workload(name)
        assert len(prompts) >= 20
        assert len({p.id for p in prompts}) == len(prompts)
        assert all((p.prompt is None) != (p.messages is None) for p in prompts)


def test_benchmark_results_structure_and_plots(tiny_bundle, tiny_llama_pair, workload_file, tmp_path, monkeypatch):
    from spectrt.quality import reference as reference_module

    monkeypatch.setattr(reference_module, "cache_dir", lambda: tmp_path / "quality-cache")
    config = BenchConfig(bundle=str(tiny_bundle), workloads=(str(workload_file),), drafts=("model", "ngram"),
                         widths=("auto", 2), max_new_tokens=8, repeats=2, warmup=1, threads=1,
                         out=str(tmp_path / "out"), peer="transformers",
                         peer_target=str(tiny_llama_pair[0]), peer_draft=str(tiny_llama_pair[1]),
                         quality=True, quality_texts=("prose",), quality_tokens=96,
                         quality_source=str(tiny_llama_pair[0]))
    results = run_benchmark(config, say=lambda m: None)
    paths = write_report(results, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    summaries = data["workloads"][str(workload_file)]["summaries"]
    # plain-unshaped (plain decoding without the row-count shaping, for its cost) runs where this CPU needs shaping
    shaped = data["exactness"]["strategy"] == "pad"
    assert [s["config"] for s in summaries] == ["plain", *(["plain-unshaped"] if shaped else []), "model@auto",
                                                "model@2", "ngram@auto", "ngram@2"]
    assert data["exactness"]["exact"] and data["exactness"]["identical_to_plain"] == {"identical": 8, "runs": 8}
    assert data["machine"]["isa"] is not None and data["machine"]["cpu"]
    summaries = [s for s in summaries if s["config"] != "plain-unshaped"]
    plain = summaries[0]
    assert plain["speedup_vs_plain"] == pytest.approx(1.0) and plain["acceptance_rate"] is None
    for s in summaries:
        assert s["prompts"] == 2 and s["runs"] == 4
        assert s["exact_match_with_plain"] == 2, "greedy speculative output must equal plain output"
        assert s["tokens_per_second"] > 0 and s["time_to_first_token"] > 0
    model2 = summaries[2]
    assert model2["acceptance_rate"] is not None and model2["predicted"]["speedup"] > 0
    assert 0 <= model2["predicted"]["per_token_acceptance"] <= 1
    assert data["machine"]["cpus"] >= 1 and data["bundle"]["widths"] == [1, 2, 3, 5]
    peer = data["peers"]["transformers"]
    assert peer["tool"] == "transformers" and peer["plain_tokens_per_second"] > 0
    assert peer["assisted_exact_prompts"] == 2
    for key in ("speedup_plot", "latency_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 5000
    table = paths["markdown"].read_text()
    assert "| model@2 |" in table and "peer: transformers" in table
    costs = model2["costs"]  # the drafter's cost in target steps, measured for every drafter and width
    assert costs["target_step_seconds"] > 0 and costs["draft_cost_vs_target_step"] > 0
    assert summaries[1]["costs"]["verify_cost_vs_target_step"] > 0  # model@auto too
    assert "draft / target step" in table and "| model@auto |" in table.split("draft / target step")[1]
    # --quality: the fp32 target against its source on the held-out text and on the workload's prompts + outputs
    quality = data["quality"]
    assert quality["texts"]["prose"]["engines"]["spectrt"]["kl_mean"] < 1e-6
    workload = quality["workloads"][str(workload_file)]
    prompt_tokens = workload["prompt_tokens"]
    output_tokens = sum(r["tokens"] for r in data["workloads"][str(workload_file)]["per_prompt"]["plain"].values())
    assert workload["sequences"] == 2 and workload["output_tokens"] == output_tokens
    segments = workload["segments"]
    # every token but each sequence's first is predicted once: prompt rows and output rows
    assert segments["prompt"]["spectrt"]["positions"] == prompt_tokens - 2
    assert segments["output"]["spectrt"]["positions"] == output_tokens
    assert workload["engines"]["spectrt"]["positions"] == prompt_tokens - 2 + output_tokens
    for segment in segments.values():
        assert segment["spectrt"]["kl_mean"] < 1e-6 and segment["spectrt"]["top1_agreement_pct"] == 100.0
    # greedy output: the reference (same weights, fp32) ranks every output token first
    assert segments["output"]["reference"]["perplexity"] < segments["prompt"]["reference"]["perplexity"]
    assert "quality against the source weights" in table and "workload, output | spectrt |" in table


def test_bench_quality_refuses_a_missing_source_before_any_run(tiny_bundle, tmp_path):
    with pytest.raises(ConfigError, match="--quality: .*does not exist"):
        run_benchmark(BenchConfig(bundle=str(tiny_bundle), workloads=("code",), widths=(2,), peer="none",
                                  quality=True, quality_source=str(tmp_path / "gone")), say=lambda m: None)
    with pytest.raises(ConfigError, match="--quality: unknown text 'poetry'"):
        run_benchmark(BenchConfig(bundle=str(tiny_bundle), workloads=("code",), widths=(2,), peer="none",
                                  quality=True, quality_texts=("poetry",)), say=lambda m: None)


def test_bench_refuses_unbuilt_width_and_unknown_workload(tiny_bundle):
    with pytest.raises(ConfigError, match="width 4 was not built"):
        run_benchmark(BenchConfig(bundle=str(tiny_bundle), workloads=("code",), widths=(4,), peer="none"),
                      say=lambda m: None)
    with pytest.raises(ConfigError, match="unknown workload 'poetry'"):
        run_benchmark(BenchConfig(bundle=str(tiny_bundle), workloads=("poetry",), widths=(2,), peer="none"),
                      say=lambda m: None)


def test_a_workload_with_predictions_adds_prediction_configurations(tiny_bundle, tmp_path):
    """An edit-like workload (prompts with a predicted output): plain runs without it, prediction@W and
    prediction+ngram@W with it; every output equals plain decoding's, the usage counts add up."""
    from spectrt.runtime.generator import Generator

    generator = Generator(tiny_bundle, threads=1)
    records = []
    for index, prompt in enumerate(["hello world", "the cache"]):
        plain = generator.generate(prompt, max_new_tokens=16, draft="none").text
        records.append({"id": f"e-{index}", "prompt": prompt, "prediction": plain if index == 0 else "x " + plain})
    workload = tmp_path / "edits.jsonl"
    workload.write_text("\n".join(json.dumps(r) for r in records))
    results = run_benchmark(BenchConfig(bundle=str(tiny_bundle), workloads=(str(workload),), drafts=("ngram",),
                                        widths=("auto", 2), max_new_tokens=16, repeats=1, warmup=0, threads=1,
                                        peer="none"), say=lambda m: None)
    summaries = {s["config"]: s for s in results["workloads"][str(workload)]["summaries"]}
    assert {"plain", "ngram@auto", "ngram@2", "prediction@auto", "prediction@2", "prediction+ngram@auto",
            "prediction+ngram@2"} <= set(summaries)
    for label, summary in summaries.items():
        assert summary["exact_match_with_plain"] == 2, label
        if summary["prediction"]:
            assert summary["accepted_prediction_tokens"] + summary["rejected_prediction_tokens"] == \
                summary["prediction_tokens"] > 0
    assert "prediction_tokens" not in summaries["plain"]  # the baseline never sees the prediction
    assert summaries["prediction@auto"]["accepted_prediction_tokens"] > 0


def test_the_edit_workload_carries_predictions():
    prompts = load_workload("edit")
    assert len(prompts) >= 8 and all(p.messages and p.prediction for p in prompts)
    for prompt in prompts:  # the prediction is the file the request quotes, in its code block
        assert prompt.prediction.startswith("```") and prompt.prediction in prompt.messages[-1]["content"]


def test_the_suffix_cache_configurations_see_earlier_prompts_of_their_repeat_only(tiny_bundle, tmp_path):
    """--suffix-cache both: each n-gram configuration next to its -nocache twin; a prompt that repeats an earlier
    one of the workload is drafted from that one's output, and a repeat never sees its own earlier runs."""
    records = [{"id": "first", "prompt": "the server heard this before"},
               {"id": "again", "prompt": "the server heard this before"}]
    workload = tmp_path / "repeats.jsonl"
    workload.write_text("\n".join(json.dumps(r) for r in records))
    config = BenchConfig(bundle=str(tiny_bundle), workloads=(str(workload),), drafts=("ngram",), widths=(5,),
                         max_new_tokens=24, repeats=2, warmup=1, threads=1, peer="none", suffix_cache="both")
    assert [s.label for s in run_specs(config, (1, 2, 3, 5), has_draft=False)] == ["plain", "ngram@5",
                                                                                   "ngram-nocache@5"]
    results = run_benchmark(config, say=lambda m: None)
    per_prompt = results["workloads"][str(workload)]["per_prompt"]
    accepted = {label: {pid: [m["accepted_tokens"] for m in runs["metrics"]] for pid, runs in prompts.items()}
                for label, prompts in per_prompt.items()}
    summaries = {s["config"]: s for s in results["workloads"][str(workload)]["summaries"]}
    assert all(s["exact_match_with_plain"] == 2 for s in summaries.values())
    cached, alone = accepted["ngram@5"], accepted["ngram-nocache@5"]
    assert cached["first"] == alone["first"]  # nothing earlier in its repeat (the warm-up and repeat 0 unseen)
    assert cached["first"][0] == cached["first"][1]
    assert all(c >= 15 and c > a + 10 for c, a in zip(cached["again"], alone["again"]))  # from the first's output


def test_a_session_workload_is_measured_turn_by_turn(tiny_bundle, tmp_path):
    """Agent sessions: each turn resends the conversation with plain decoding's earlier answers and the scripted
    tool results; every turn is a measured prompt (exact against plain), and the turn table and plot come out."""
    records = [{"id": f"s{i}", "messages": [{"role": "system", "content": "get(x)"},
                                            {"role": "user", "content": f"task {i}"}],
                "tool_results": ["1", "2"]} for i in range(2)]  # short: the tiny bundle holds 127 tokens
    workload = tmp_path / "sessions.jsonl"
    workload.write_text("\n".join(json.dumps(r) for r in records))
    results = run_benchmark(BenchConfig(bundle=str(tiny_bundle), workloads=(str(workload),), drafts=("ngram",),
                                        widths=("auto",), max_new_tokens=6, repeats=1, warmup=0, threads=1,
                                        peer="none"), say=lambda m: None)
    data = results["workloads"][str(workload)]
    assert set(data["per_prompt"]["plain"]) == {f"s{i}/turn{n}" for i in range(2) for n in (1, 2, 3)}
    assert all(s["exact_match_with_plain"] == 6 for s in data["summaries"])
    assert set(data["turns"]["speedup_vs_plain"]["ngram@auto"]) == {"1", "2", "3"}
    assert data["turns"]["speedup_vs_plain"]["plain"] == {"1": 1.0, "2": 1.0, "3": 1.0}
    paths = write_report(results, tmp_path / "report")
    assert paths["turns_plot"].stat().st_size > 0 and "Turn by turn" in paths["markdown"].read_text()


def test_session_turns_carry_the_answers_and_tool_results():
    session = load_workload("agent")[0]
    assert len(load_workload("agent")) >= 8 and all(p.turns >= 6 for p in load_workload("agent"))
    third = session.turn(3, ["first answer", "second answer"])
    assert third.id == f"{session.id}/turn3"
    assert [m["role"] for m in third.messages[-4:]] == ["assistant", "tool", "assistant", "tool"]
    assert third.messages[-2]["content"] == "second answer"
    assert third.messages[-1]["content"] == session.tool_results[1]
    assert json.loads(session.tool_results[0])  # tool results are JSON, as a tool would return them
