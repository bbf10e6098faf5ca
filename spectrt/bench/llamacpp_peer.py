"""The llama.cpp peer: llama-cpp-python on the GGUF files the bundle was built from.

Same prompt token ids as spectrt (the bundle's tokenizer; ids are fed to llama.cpp, never text), greedy
(temperature 0: llama.cpp's greedy sampler, no penalties), the same token budget, stopping at the
bundle's eos ids (eos excluded from the output, like spectrt). Every workload is measured, per prompt:

- decode tokens/s after the first token: (generated - 1) / (first token -> last token), spectrt's definition;
- TTFT: call -> first token, the prompt prefilled cold (the KV cache is cleared before every request);
- the generated token ids, checked across repeats and against llama.cpp plain decoding.

Modes: `plain`; `prompt_lookup` (llama-cpp-python's `LlamaPromptLookupDecoding` as `draft_model=`);
`draft_model` when a draft GGUF is known (the draft GGUF greedily proposing through llama-cpp-python's
`LlamaDraftModel` interface: llama-cpp-python ships no draft-model drafter, this adapter is spectrt's).
Speculative modes verify several tokens in one batch, and llama.cpp's CPU kernels compute a batch of two or
more tokens differently from a single token (on SmolLM2 Q4_1 logits differ by up to ~1.3, median ~0.6):
a speculative output can leave plain decoding's path wherever two candidates are close. Each mode's output
is compared with plain decoding (exact prompts, common prefix), never assumed equal.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'spectrt[llamacpp]'; it compiles llama.cpp from source, several minutes"
# llama-cpp-python's README: 10 predicted tokens suit a GPU, 2 do better on CPU-only machines
PROMPT_LOOKUP = {"max_ngram_size": 2, "num_pred_tokens": 2}
DRAFT_TOKENS = 4  # tokens the draft GGUF proposes per round in `draft_model` mode
GREEDY = {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0,
          "frequency_penalty": 0.0, "presence_penalty": 0.0}


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def resolve_llamacpp_models(config: Any, bundle: dict[str, Any]) -> tuple[str | None, str | None]:
    """(target, draft) GGUF paths: --peer-target/--peer-draft when they are GGUF files or known names, else the
    bundle's source files when they are known models (`spectrt models list`); None where none is a GGUF."""
    from .peer import resolve_model_file

    def gguf(given: str | None, source_name: str | None) -> str | None:
        if given and not given.endswith(".gguf") and Path(given).exists():
            given = None  # a transformers folder for the other peer: fall back to the bundle's source
        path = resolve_model_file(given, source_name)
        return path if path and Path(path).is_file() and path.endswith(".gguf") else None

    return gguf(config.peer_target, bundle.get("target")), gguf(config.peer_draft, bundle.get("draft"))


def _context_size(prompts: list[list[int]], max_new_tokens: int) -> int:
    """Room for the longest prompt, the budget and one round of proposals, in multiples of 256."""
    needed = max(len(p) for p in prompts) + max_new_tokens + max(PROMPT_LOOKUP["num_pred_tokens"], DRAFT_TOKENS) + 64
    return -(-needed // 256) * 256


class GgufDraft:
    """A draft GGUF proposing `tokens` greedy tokens per round (llama-cpp-python's LlamaDraftModel interface:
    called with every token so far, returns the proposals). Its KV cache keeps the longest common prefix
    between calls (llama-cpp-python's own prefix matching), so each round evaluates only the new tokens."""

    def __init__(self, llm: Any, tokens: int):
        self.llm, self.tokens = llm, tokens

    def __call__(self, input_ids, /, **kwargs: Any):
        import numpy as np

        proposals: list[int] = []
        generator = self.llm.generate([int(t) for t in input_ids], **GREEDY, reset=True)
        for token in generator:
            proposals.append(int(token))
            if len(proposals) == self.tokens:
                break
        generator.close()
        return np.array(proposals, dtype=np.intc)


def _load_models(target: str, draft: str | None, n_ctx: int, threads: int) -> dict[str, tuple[Any, Any]]:
    """mode -> (Llama, draft model or None). Speculative modes need their own Llama: llama-cpp-python keeps
    logits for every position (logits_all) when a draft_model is set, which plain decoding does not need."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    def llama(path: str, draft_model: Any = None) -> Any:
        return Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0,
                     n_gpu_layers=0, draft_model=draft_model, verbose=False)

    lookup = LlamaPromptLookupDecoding(**PROMPT_LOOKUP)
    models = {"plain": (llama(target), None), "prompt_lookup": (llama(target, lookup), lookup)}
    if draft:
        drafter = GgufDraft(llama(draft), DRAFT_TOKENS)
        models["draft_model"] = (llama(target, drafter), drafter)
    return models


def timed_generate(llm: Any, drafter: Any, prompt_ids: list[int], max_new_tokens: int,
                   eos: set[int]) -> dict[str, Any]:
    """One greedy request, prompt prefilled cold; times taken as each token comes out of the generator."""
    start = time.perf_counter()
    llm.reset()  # n_tokens = 0: no prefix reuse, eval() clears the KV cache from row 0
    if isinstance(drafter, GgufDraft):
        drafter.llm.reset()
    tokens: list[int] = []
    first = last = None
    finish_reason = "length"
    generator = llm.generate(prompt_ids, **GREEDY, reset=True)
    for token in generator:
        now = time.perf_counter()
        first = first if first is not None else now
        if int(token) in eos:
            finish_reason = "eos"
            break
        tokens.append(int(token))
        last = now
        if len(tokens) >= max_new_tokens:
            break
    generator.close()
    decode = (last - first) if last is not None and len(tokens) > 1 else None
    return {"token_ids": tokens, "finish_reason": finish_reason,
            "time_to_first_token": None if first is None else first - start,
            "tokens_per_second": (len(tokens) - 1) / decode if decode else None}


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _summaries(per_prompt: dict[str, dict[str, dict]], modes: list[str]) -> list[dict[str, Any]]:
    """Per mode over the prompts of one workload: medians, speed-up vs llama.cpp plain, exactness."""
    summaries = []
    for mode in modes:
        rows = {pid: modes_[mode] for pid, modes_ in per_prompt.items()}
        ratios = [r["tokens_per_second"] / per_prompt[pid]["plain"]["tokens_per_second"] for pid, r in rows.items()
                  if r["tokens_per_second"] and per_prompt[pid]["plain"]["tokens_per_second"]]
        summaries.append({
            "mode": mode, "prompts": len(rows),
            "tokens_per_second": _median([r["tokens_per_second"] for r in rows.values()]),
            "time_to_first_token": _median([r["time_to_first_token"] for r in rows.values()]),
            "speedup_vs_plain": _median(ratios),
            "exact_match_with_plain": sum(r["equals_plain"] for r in rows.values()),
            "common_prefix_with_plain": _median([r["common_prefix_with_plain"] for r in rows.values()]),
            "repeats_identical": sum(r["repeats_identical"] for r in rows.values()),
            "mismatched_prompts": [pid for pid, r in rows.items() if not r["equals_plain"]],
        })
    return summaries


def run_llamacpp_peer(target_gguf: str, draft_gguf: str | None, *, bundle_dir: str, requests: dict[str, list[dict]],
                      max_new_tokens: int, repeats: int, threads: int = 0, warmup: int = 1) -> dict[str, Any]:
    """Runs in its own process. Every workload, every mode, back to back per prompt and repeat (plain first)."""
    import llama_cpp

    from .peer import bundle_tokenizer, request_ids

    threads = threads or os.cpu_count() or 1
    tokenizer, eos_ids = bundle_tokenizer(bundle_dir)
    eos = set(eos_ids)
    prompts = {name: [(r["id"], request_ids(tokenizer, r)) for r in reqs] for name, reqs in requests.items()}
    n_ctx = _context_size([ids for reqs in prompts.values() for _, ids in reqs], max_new_tokens)
    models = _load_models(target_gguf, draft_gguf, n_ctx, threads)
    vocab = models["plain"][0].n_vocab()
    if any(t >= vocab for reqs in prompts.values() for _, ids in reqs for t in ids):
        raise ValueError(f"{target_gguf} has {vocab} tokens but the bundle's tokenizer produced larger ids: "
                         "pass the GGUF the bundle was built from (--peer-target).")
    workloads: dict[str, Any] = {}
    failed: dict[str, str] = {}  # mode -> error: a speculative mode that raises is dropped, plain is not optional

    def attempt(mode: str, ids: list[int]) -> dict[str, Any] | None:
        llm, drafter = models[mode]
        try:
            return timed_generate(llm, drafter, ids, max_new_tokens, eos)
        except Exception as exc:  # llama-cpp-python's speculative paths have their own bugs; keep the others
            if mode == "plain":
                raise
            failed[mode] = f"{type(exc).__name__}: {exc}"
            del models[mode]
            return None

    for name, reqs in prompts.items():
        for _ in range(warmup):
            for mode in list(models):
                attempt(mode, reqs[0][1])
        runs: dict[str, dict[str, list[dict]]] = {pid: {mode: [] for mode in models} for pid, _ in reqs}
        for _ in range(repeats):
            for pid, ids in reqs:
                for mode in list(models):
                    result = attempt(mode, ids)
                    if result is not None:
                        runs[pid][mode].append(result)
        runs = {pid: {mode: results for mode, results in modes_.items() if mode in models}
                for pid, modes_ in runs.items()}
        per_prompt = {pid: {mode: _prompt_row(results, modes_["plain"][0]["token_ids"])
                            for mode, results in modes_.items()} for pid, modes_ in runs.items()}
        workloads[name] = {"summaries": _summaries(per_prompt, list(models)), "per_prompt": per_prompt}
    return {
        "tool": "llama.cpp",
        "package": "llama-cpp-python",
        "version": llama_cpp.__version__,
        "target": Path(target_gguf).name,  # file names: results are shared, machine paths are not
        "draft": Path(draft_gguf).name if draft_gguf else None,
        "precision": "GGUF as stored (llama.cpp's quantized kernels)",
        "threads": threads,
        "n_ctx": n_ctx,
        "modes": {"plain": {}, "prompt_lookup": dict(PROMPT_LOOKUP),
                  **({"draft_model": {"num_pred_tokens": DRAFT_TOKENS}} if draft_gguf else {})},
        "metric": "decode tokens/s after the first token (median over repeats, then over prompts); "
                  "TTFT: call -> first token, prompt prefilled cold",
        "workloads": workloads,
        "failed_modes": failed,
    }


def _prompt_row(results: list[dict[str, Any]], plain_ids: list[int]) -> dict[str, Any]:
    """One prompt, one mode: medians over repeats, first repeat's tokens, exactness."""
    ids = results[0]["token_ids"]
    return {"tokens_per_second": _median([r["tokens_per_second"] for r in results]),
            "time_to_first_token": _median([r["time_to_first_token"] for r in results]),
            "tokens": len(ids), "token_ids": ids, "finish_reason": results[0]["finish_reason"],
            "repeats_identical": all(r["token_ids"] == ids for r in results),
            "equals_plain": ids == plain_ids, "common_prefix_with_plain": _common_prefix(ids, plain_ids)}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
