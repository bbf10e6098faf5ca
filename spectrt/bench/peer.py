"""The peer baseline: Hugging Face transformers `generate`, plain and with `assistant_model`
(its speculative decoding), on the same pair, prompts (same token ids) and token budget."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any


def peer_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def resolve_model_file(given: str | None, source_name: str | None) -> str | None:
    """A model path: `given` (a path, else a known name, fetched), else the bundle's source file name when it is a
    known model (`spectrt models list`), fetched into the cache; None when neither applies."""
    from spectrt.compiler.fetch import KNOWN_MODELS, fetch_model

    if given:
        return str(Path(given)) if Path(given).exists() else str(fetch_model(given))
    for name, source in KNOWN_MODELS.items():
        if source.filename == source_name:
            return str(fetch_model(name))
    return None


def resolve_peer_models(config: Any, bundle: dict[str, Any]) -> tuple[str, str] | None:
    """(target, draft) paths for transformers: from --peer-target/--peer-draft, else the bundle's sources
    when they are known model files (`spectrt models list`)."""
    target = resolve_model_file(config.peer_target, bundle.get("target"))
    draft = resolve_model_file(config.peer_draft, bundle.get("draft"))
    return (target, draft) if target and draft else None


def bundle_tokenizer(bundle_dir: str) -> tuple[Any, list[int]]:
    """The bundle's tokenizer and eos ids: every peer encodes prompts exactly as spectrt does."""
    from spectrt.runtime.manifest import read_manifest
    from spectrt.runtime.text import BundleTokenizer

    manifest = read_manifest(bundle_dir)
    tokenizer = BundleTokenizer(manifest.file(manifest.tokenizer_file), manifest.generation)
    return tokenizer, [int(i) for i in manifest.generation["eos_token_ids"]]


def request_ids(tokenizer: Any, request: dict[str, Any]) -> list[int]:
    """Prompt token ids of one workload request (raw prompt or chat messages), as the Generator encodes them."""
    return tokenizer.encode(request["prompt"]) if "prompt" in request else tokenizer.encode_chat(request["messages"])


def _load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    path_ = Path(path)
    if path_.is_file():
        model = AutoModelForCausalLM.from_pretrained(path_.parent, gguf_file=path_.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path_, dtype=torch.float32)
    return model.eval()


def run_transformers_peer(target_path: str, draft_path: str, *, bundle_dir: str, requests: dict[str, list[dict]],
                          max_new_tokens: int, repeats: int, threads: int = 0) -> dict[str, Any]:
    """Runs in its own process. Only the `code` workload (or the first one) is measured: the peer is slow."""
    import statistics

    import torch

    if threads:
        torch.set_num_threads(threads)
    tokenizer, eos = bundle_tokenizer(bundle_dir)
    target, draft = _load(target_path), _load(draft_path)
    workload = "code" if "code" in requests else next(iter(requests))
    per_prompt = []
    for request in requests[workload]:
        ids = request_ids(tokenizer, request)
        input_ids = torch.tensor([ids])
        row: dict[str, Any] = {"id": request["id"]}
        for label, extra in (("plain", {}), ("assisted", {"assistant_model": draft})):
            speeds, tokens = [], None
            for _ in range(repeats):
                start = time.perf_counter()
                with torch.no_grad():
                    out = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                          max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos[0], **extra)
                elapsed = time.perf_counter() - start
                tokens = out[0, len(ids):].tolist()
                speeds.append(len(tokens) / elapsed)
            row[label] = {"tokens_per_second": statistics.median(speeds), "tokens": len(tokens), "token_ids": tokens}
        row["assisted_equals_plain"] = row["assisted"]["token_ids"] == row["plain"]["token_ids"]
        per_prompt.append(row)
    plain = statistics.median(r["plain"]["tokens_per_second"] for r in per_prompt)
    assisted = statistics.median(r["assisted"]["tokens_per_second"] for r in per_prompt)
    return {
        "tool": "transformers",
        "version": __import__("transformers").__version__,
        "torch": torch.__version__,
        "workload": workload,
        "precision": "fp32 (GGUF dequantized)",
        "metric": "end-to-end tokens/s (prefill included)",
        "plain_tokens_per_second": plain,
        "assisted_tokens_per_second": assisted,
        "assisted_speedup": statistics.median(r["assisted"]["tokens_per_second"] / r["plain"]["tokens_per_second"]
                                              for r in per_prompt),
        "assisted_exact_prompts": sum(r["assisted_equals_plain"] for r in per_prompt),
        "per_prompt": [{k: v for k, v in r.items() if k not in ("plain", "assisted")}
                       | {"plain_tps": r["plain"]["tokens_per_second"], "assisted_tps": r["assisted"]["tokens_per_second"]}
                       for r in per_prompt],
    }
