"""Greedy parity of a bundle's target with transformers on the same weights.

Decodes each prompt greedily with the bundle (plain decoding, and optionally every drafter) and with the
transformers model loaded from the same source (a GGUF file is dequantized to fp32 by transformers' loader), and
reports, per prompt, whether the token sequences are identical and where they first differ. For an fp32 bundle
(--quantize none) this is the check that the exported graph is the model; a quantized bundle is expected to drift.

    python scripts/transformers_parity.py BUNDLE SOURCE --new-tokens 32 --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics are",
    "import numpy as np\n\n# compute the mean of each row\n",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The following is a list of the planets of the solar system, in order from the Sun:",
    "In 1969, the Apollo 11 mission",
)
LONG_TEXT = ("The river rose slowly through the night, and by morning the lower fields were under water. The farmers "
             "moved their animals to the hill behind the church, where the ground stayed dry, and waited. ")


def long_prompt(generator, tokens: int) -> str:
    """A prompt of about `tokens` tokens (LONG_TEXT repeated, then a question): longer than a sliding window."""
    text = ""
    while len(generator.encode(text + LONG_TEXT, None)) < tokens:
        text += LONG_TEXT
    return text + "How many times did the river rise? Answer:"


def transformers_greedy(model, prompt_ids: list[int], new_tokens: int, eos_ids: set[int]) -> list[int]:
    """A plain argmax loop with transformers' own KV cache, stopping at an end-of-sequence id (kept)."""
    import inspect

    import torch

    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(new_tokens):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token in eos_ids:
                break
            cache = getattr(out, "cache", None) or out.past_key_values
            out = model(torch.tensor([[token]]), use_cache=True, **{cache_arg: cache})
    return tokens


def first_difference(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("source", help="the target's source: the .gguf file or Hugging Face folder it was built from")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--drafts", default="none", help="comma-separated drafters to run besides plain (none)")
    parser.add_argument("--widths", default="auto", help="comma-separated widths for each drafter")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--long-prompt-tokens", type=int, default=0,
                        help="also decode one prompt of about this many tokens (past a sliding window)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from spectrt.runtime.generator import Generator
    from spectrt.runtime.machine import machine_facts

    source = Path(args.source)
    kwargs = {"gguf_file": source.name} if source.is_file() else {}
    model = AutoModelForCausalLM.from_pretrained(source.parent if source.is_file() else source,
                                                 dtype=torch.float32, **kwargs).eval()
    generator = Generator(args.bundle, threads=args.threads)
    eos_ids = set(generator.eos_ids)
    drafts = [d for d in args.drafts.split(",") if d and d != "none"]
    widths = [w if w == "auto" else int(w) for w in args.widths.split(",")]
    results = []
    prompts = list(PROMPTS) + ([long_prompt(generator, args.long_prompt_tokens)] if args.long_prompt_tokens else [])
    for prompt in prompts:
        prompt_ids = generator.encode(prompt, None)
        start = time.perf_counter()
        reference = transformers_greedy(model, prompt_ids, args.new_tokens, eos_ids)
        plain = generator.generate(prompt_ids=prompt_ids, max_new_tokens=args.new_tokens, draft="none").token_ids
        row = {"prompt": prompt, "prompt_tokens": len(prompt_ids), "transformers": reference, "plain": plain,
               "plain_equals_transformers": plain == reference,
               "first_difference": first_difference(plain, reference), "speculative": {}}
        for draft in drafts:
            for width in widths:
                out = generator.generate(prompt_ids=prompt_ids, max_new_tokens=args.new_tokens, draft=draft,
                                         width=width)
                row["speculative"][f"{draft}@{width}"] = {"equals_plain": out.token_ids == plain,
                                                         "accepted": out.metrics.accepted_tokens,
                                                         "drafted": out.metrics.drafted_tokens}
        row["seconds"] = round(time.perf_counter() - start, 2)
        results.append(row)
        spec = row["speculative"].values()
        print(f"{len(reference):3d} tokens  transformers==plain: {row['plain_equals_transformers']!s:5}  "
              f"first diff: {row['first_difference']}  speculative==plain: "
              f"{sum(s['equals_plain'] for s in spec)}/{len(spec)}  {prompt[:40]!r}", flush=True)
    summary = {"prompts": len(results),
               "plain_equals_transformers": sum(r["plain_equals_transformers"] for r in results),
               "speculative_runs": sum(len(r["speculative"]) for r in results),
               "speculative_equals_plain": sum(s["equals_plain"] for r in results for s in r["speculative"].values())}
    print(json.dumps(summary))
    if args.out:
        record = {"bundle": Path(args.bundle).name, "source": source.name, "new_tokens": args.new_tokens,
                  "machine": machine_facts(), "python": platform.python_version(), "summary": summary,
                  "results": results}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0 if summary["plain_equals_transformers"] == summary["prompts"] and \
        summary["speculative_equals_plain"] == summary["speculative_runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
