"""Bad input to the build gets a clear error before any expensive work, and leaves nothing behind."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from spectrt.cli import main
from spectrt.compiler.build import build_bundle
from spectrt.compiler.config import BuildConfig, load_recipe
from spectrt.compiler.progress import Progress
from spectrt.errors import ConfigError, ModelLoadError, PairMismatchError
from tiny_models import CORPUS, make_model


def _build(target, draft, out, **options):
    return build_bundle(BuildConfig(target=str(target), draft=str(draft), out=str(out), **options),
                        progress=Progress(quiet=True))


def test_mismatched_tokenizers_are_refused_before_export(tiny_llama_pair, tmp_path):
    target, _ = tiny_llama_pair
    other = make_model(tmp_path / "other", "llama", layers=1, tokenizer_vocab=280,
                       tokenizer_corpus=[c.upper() for c in CORPUS])
    with pytest.raises(PairMismatchError, match="do not share a tokenizer.*vocabularies differ"):
        _build(target, other, tmp_path / "out", widths=(2,), max_context=32)
    assert not (tmp_path / "out").exists()


def test_different_eos_is_refused(tiny_llama_pair, tmp_path):
    target, _ = tiny_llama_pair
    draft = tmp_path / "draft"
    shutil.copytree(target, draft)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(draft)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.save_pretrained(draft)
    with pytest.raises(PairMismatchError, match="eos token id differs"):
        _build(target, draft, tmp_path / "out", widths=(2,), max_context=32)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="'gpt2' is not supported: spectrt does not build learned absolute "
                                             "positions.*closest supported family is llama.*mistral.*qwen3.*phi3"):
        _build(folder, folder, tmp_path / "out", widths=(2,), max_context=32)


@pytest.mark.parametrize("model_type,missing,closest", [
    ("qwen3_moe", "mixture of experts", "qwen3"),
    ("gemma2", "soft-capping", "gemma3_text"),
    ("mixtral", "mixture of experts", "mistral"),
])
def test_refusal_names_what_is_missing_and_the_closest_family(model_type, missing, closest):
    """From the config alone: what the architecture needs that spectrt lacks, and which family is nearest."""
    from transformers import AutoConfig

    from spectrt.compiler.arch import arch_from_config

    with pytest.raises(ModelLoadError, match=f"'{model_type}' is not supported: spectrt does not build .*{missing}.*"
                                             f"closest supported family is {closest}"):
        arch_from_config(AutoConfig.for_model(model_type), source="m")


def test_unknown_architecture_lists_the_supported_ones():
    from types import SimpleNamespace

    from spectrt.compiler.arch import arch_from_config

    with pytest.raises(ModelLoadError, match="'xyz' is not supported. spectrt builds .*gemma3_text"):
        arch_from_config(SimpleNamespace(model_type="xyz"), source="m")


def test_missing_model_path(tmp_path, tiny_llama_pair):
    with pytest.raises(Exception, match="does not exist|unknown model|no-such-model"):
        _build(tmp_path / "no-such-model", tiny_llama_pair[1], tmp_path / "out", widths=(2,), max_context=32)


def test_corrupt_gguf_and_missing_weights(tmp_path, tiny_llama_pair):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        _build(bad, tiny_llama_pair[1], tmp_path / "out", widths=(2,), max_context=32)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 20)
    with pytest.raises(ModelLoadError, match="could not read the model config"):
        _build(truncated, tiny_llama_pair[1], tmp_path / "out", widths=(2,), max_context=32)
    no_weights = tmp_path / "noweights"
    shutil.copytree(tiny_llama_pair[0], no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        _build(no_weights, tiny_llama_pair[1], tmp_path / "out", widths=(2,), max_context=32)


def test_corrupt_safetensors_weights(tmp_path, tiny_llama_pair):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_pair[0], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="could not load the weights"):
        _build(broken, tiny_llama_pair[1], tmp_path / "out", widths=(2,), max_context=32)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.building-*"))


@pytest.mark.parametrize("options,message", [
    ({"widths": (0, 2)}, "widths must be >= 1"),
    ({"widths": (8,), "max_context": 8}, "too small for width 8"),
    ({"widths": ()}, "no speculation width"),
    ({"precision": "int3"}, "precision 'int3' unknown"),
    ({"backend": "cuda"}, "backend 'cuda' unknown"),
])
def test_impossible_options(options, message):
    with pytest.raises(ConfigError, match=message):
        BuildConfig(target="t", draft="d", **options)


def test_max_context_beyond_trained_positions(tiny_llama_pair, tmp_path):
    with pytest.raises(ConfigError, match="exceeds the target's trained maximum"):
        _build(*tiny_llama_pair, tmp_path / "out", widths=(2,), max_context=4096)


def test_cli_reports_errors_without_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["build", "--target", "a", "--draft", "b", "--widths", "0"])
    assert result.exit_code == 2
    assert "error: speculation widths must be >= 1" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["build", "--draft", "b"])
    assert result.exit_code == 2 and "--target required" in result.output
    result = runner.invoke(main, ["build", "--target", "a", "--draft", "b", "--widths", "two"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_recipe_file_gives_same_options(tmp_path, tiny_llama_pair):
    target, draft = tiny_llama_pair
    recipe = tmp_path / "pair.toml"
    recipe.write_text(f'target = "{target}"\ndraft = "{draft}"\nwidths = [2, 4]\nmax_context = 64\nprecision = "fp16"\n')
    config = load_recipe(recipe, max_context=128)
    assert config.widths == (2, 4) and config.precision == "fp16" and config.max_context == 128
    bad = tmp_path / "bad.toml"
    bad.write_text('target = "x"\ndraft = "y"\nwidht = [2]\n')
    with pytest.raises(ConfigError, match="unknown keys \\['widht'\\]"):
        load_recipe(bad)


def test_tensorrt_backend_without_tensorrt_fails_fast(tiny_llama_pair, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name in ("tensorrt", "tensorrt_rtx"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    from spectrt.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="pip install spectrt\\[tensorrt-rtx\\]"):
        _build(*tiny_llama_pair, tmp_path / "out", widths=(2,), max_context=32, backend="tensorrt")
