"""The llama.cpp peer of `spectrt bench`: llama-cpp-python on SmolLM2's real GGUF, same prompt token ids.

Tests that run llama.cpp skip when llama-cpp-python is not installed (pip install 'spectrt[llamacpp]');
the skip line and the refusal of an explicit --peer llamacpp are tested without it."""

from __future__ import annotations

import json
import sys

import pytest

from spectrt.bench.report import write_report
from spectrt.bench.runner import BenchConfig, check_peers_installed, run_benchmark, run_peers
from spectrt.workloads import Prompt
from spectrt.errors import ConfigError

REQUESTS = {"mini": [
    {"id": "code-1", "prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
    {"id": "chat-1", "messages": [{"role": "user", "content": "List three colours of the rainbow."}]},
]}


@pytest.fixture()
def workload_file(tmp_path):
    path = tmp_path / "mini.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in REQUESTS["mini"]))
    return path


@pytest.fixture()
def no_llama_cpp(monkeypatch):
    """llama_cpp not importable: find_spec answers None, import raises ImportError."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


def test_auto_prints_one_skip_line_per_missing_peer(no_llama_cpp, monkeypatch):
    import spectrt.bench.peer as peer_module

    monkeypatch.setattr(peer_module, "peer_available", lambda: False)
    lines = []
    peers = run_peers(BenchConfig(bundle="unused", peer="auto"), {"code": [Prompt("c-1", "def f():")]},
                      {"target": "model.gguf", "draft": None}, lines.append)
    assert peers == {}
    assert lines == [
        "transformers peer skipped: torch and transformers are not installed (pip install 'spectrt[build]')",
        "llama.cpp peer skipped: llama-cpp-python is not installed (pip install 'spectrt[llamacpp]'; it compiles "
        "llama.cpp from source, several minutes)",
    ]


def test_a_crashing_peer_is_reported_and_the_others_kept(monkeypatch):
    """A peer that raises (e.g. inside llama-cpp-python) must not lose the run: one line, the other peers kept."""
    import spectrt.bench.runner as runner

    def crash(*args, **kwargs):
        raise ValueError("could not broadcast")

    monkeypatch.setattr(runner, "run_llamacpp", crash)
    monkeypatch.setattr(runner, "run_transformers", lambda *args, **kwargs: {"tool": "transformers"})
    lines = []
    peers = run_peers(BenchConfig(bundle="unused", peer="all"), {"code": [Prompt("c-1", "def f():")]},
                      {"target": "model.gguf", "draft": None}, lines.append)
    assert peers == {"transformers": {"tool": "transformers"}}
    assert lines == ["llamacpp peer failed: ValueError: could not broadcast"]


def test_explicit_llamacpp_peer_is_refused_before_any_work_when_missing(no_llama_cpp):
    for peer in ("llamacpp", "all"):
        with pytest.raises(ConfigError, match=r"needs llama-cpp-python \(pip install 'spectrt\[llamacpp\]'"):
            check_peers_installed(BenchConfig(bundle="unused", peer=peer))
    check_peers_installed(BenchConfig(bundle="unused", peer="auto"))  # auto never refuses
    with pytest.raises(ConfigError, match="peer must be one of auto, transformers, llamacpp, all, none"):
        BenchConfig(bundle="unused", peer="vllm")


def test_llamacpp_skips_a_bundle_without_known_gguf(monkeypatch):
    import llama_cpp  # noqa: F401  (installed by scripts/setup.sh: the test suite measures against it)
    from spectrt.bench.runner import run_llamacpp

    lines = []
    assert run_llamacpp(BenchConfig(bundle="unused", peer="llamacpp"), {}, {"target": "my-folder", "draft": None},
                        lines.append) is None
    assert lines == ["llama.cpp peer skipped: the bundle's target `my-folder` is not a known GGUF model "
                     "(pass --peer-target FILE.gguf)"]


def test_llamacpp_peer_greedy_output_is_deterministic(smollm2_gguf, smollm2_bundle):
    import llama_cpp  # noqa: F401  (installed by scripts/setup.sh: the test suite measures against it)
    from spectrt.bench.llamacpp_peer import run_llamacpp_peer
    from spectrt.bench.peer import bundle_tokenizer, request_ids

    # one thread: llama.cpp's spinning thread pool slows down badly on a busy 2-core test machine
    result = run_llamacpp_peer(str(smollm2_gguf), None, bundle_dir=str(smollm2_bundle), requests=REQUESTS,
                               max_new_tokens=24, repeats=2, threads=1, warmup=1)
    assert result["tool"] == "llama.cpp" and result["threads"] == 1
    assert set(result["modes"]) == {"plain", "prompt_lookup"}
    tokenizer, eos = bundle_tokenizer(str(smollm2_bundle))
    assert result["n_ctx"] >= max(len(request_ids(tokenizer, r)) for r in REQUESTS["mini"]) + 24
    data = result["workloads"]["mini"]
    for pid, modes in data["per_prompt"].items():
        plain = modes["plain"]
        assert 1 < plain["tokens"] <= 24 and not set(plain["token_ids"]) & set(eos)
        assert plain["tokens"] == 24 or plain["finish_reason"] == "eos"
        assert plain["tokens_per_second"] > 0 and plain["time_to_first_token"] > 0
        for mode, row in modes.items():
            assert row["repeats_identical"], f"{pid} {mode}: greedy llama.cpp output changed between repeats"
            # prompt lookup verifies proposals in batches, which llama.cpp computes differently from single
            # tokens: its output may leave plain decoding's path, so equality is measured, not asserted
            assert row["equals_plain"] == (row["token_ids"] == plain["token_ids"])
            assert row["common_prefix_with_plain"] == (row["tokens"] if row["equals_plain"] else next(
                i for i, (a, b) in enumerate(zip(row["token_ids"], plain["token_ids"])) if a != b))
    plain_summary, lookup = data["summaries"]
    assert plain_summary["mode"] == "plain" and plain_summary["exact_match_with_plain"] == 2
    assert lookup["mode"] == "prompt_lookup" and lookup["speedup_vs_plain"] > 0
    assert lookup["exact_match_with_plain"] == 2 - len(lookup["mismatched_prompts"])
    # a fresh load decodes the same plain tokens; the draft-model mode runs with any GGUF as draft (here the
    # target itself)
    again = run_llamacpp_peer(str(smollm2_gguf), str(smollm2_gguf), bundle_dir=str(smollm2_bundle), requests=REQUESTS,
                              max_new_tokens=24, repeats=1, threads=1, warmup=0)
    assert list(again["modes"]) == ["plain", "prompt_lookup", "draft_model"]
    per_prompt = again["workloads"]["mini"]["per_prompt"]
    assert {pid: m["plain"]["token_ids"] for pid, m in per_prompt.items()} == {
        pid: m["plain"]["token_ids"] for pid, m in data["per_prompt"].items()}
    assert all(m["draft_model"]["tokens"] > 1 and m["draft_model"]["tokens_per_second"] > 0
               for m in per_prompt.values())


def test_bench_reports_ratios_to_llamacpp_plain(smollm2_bundle, workload_file, tmp_path):
    import llama_cpp  # noqa: F401  (installed by scripts/setup.sh: the test suite measures against it)
    config = BenchConfig(bundle=str(smollm2_bundle), workloads=(str(workload_file),), drafts=("ngram",),
                         widths=(2,), max_new_tokens=16, repeats=1, warmup=1, threads=1,
                         out=str(tmp_path / "out"), peer="llamacpp")
    lines = []
    results = run_benchmark(config, say=lines.append)
    assert any(line.startswith("llama.cpp peer: llama-cpp-python on ") for line in lines)
    paths = write_report(results, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert set(data["peers"]) == {"llamacpp"}
    assert data["peers"]["llamacpp"]["target"].endswith(".gguf") and "/" not in data["peers"]["llamacpp"]["target"]
    peer = data["peers"]["llamacpp"]["workloads"][str(workload_file)]
    for s in data["workloads"][str(workload_file)]["summaries"]:
        assert s["decode_vs_llamacpp_plain"] > 0 and s["ttft_vs_llamacpp_plain"] > 0
    for s in peer["summaries"]:
        assert s["decode_vs_spectrt_plain"] > 0 and 0 <= s["equals_spectrt_plain"] <= 2
    table = paths["markdown"].read_text()
    assert "| vs llama.cpp plain | TTFT vs llama.cpp |" in table
    assert "## peer: llama.cpp (llama-cpp-python" in table and "| prompt_lookup |" in table
    assert paths["speedup_plot"].stat().st_size > 5000
