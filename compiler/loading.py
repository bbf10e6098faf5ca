"""Load a model from a Hugging Face folder or a GGUF file through transformers.

GGUF weights are dequantized to fp32 by transformers' GGUF loader (needs the `gguf` package).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectrt.errors import ModelLoadError
from spectrt.runtime.manifest import sha256_file

from .arch import ModelArch, arch_from_config

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass
class LoadedModel:
    """A reference model in memory plus what the bundle records about where it came from."""

    source: Path
    arch: ModelArch
    model: Any  # transformers PreTrainedModel, fp32, eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    generation_config: Any
    source_files: dict[str, str]  # file name -> sha256

    @property
    def name(self) -> str:
        return self.source.stem if self.source.is_file() else self.source.name


def _check_source(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model path '{path}' does not exist. Pass a Hugging Face folder or a .gguf file.")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"'{path}' is a file but not a .gguf file. Pass a GGUF file or a Hugging Face folder.")
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"'{path}' is not a GGUF file (bad magic {magic!r}); the file is corrupt or truncated.")
        return
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"'{path}' has no config.json; a Hugging Face model folder needs config.json and weights.")
    if not any(p.suffix in (".safetensors", ".bin") for p in path.iterdir()):
        raise ModelLoadError(f"'{path}' has no *.safetensors or *.bin weights.")


def _hash_sources(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: sha256_file(path)}
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    return {p.name: sha256_file(p) for p in files}


def load_config(path: Path) -> Any:
    """Only the transformers config (cheap): used to refuse unsupported models before loading weights."""
    from transformers import AutoConfig

    path = Path(path)
    _check_source(path)
    try:
        if path.is_file():
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # third-party loaders raise anything on corrupt input
        raise ModelLoadError(f"could not read the model config of '{path}': {exc}") from exc


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        if path.is_file():
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # third-party loaders raise anything on corrupt input
        raise ModelLoadError(
            f"could not load the tokenizer of '{path}': {exc}. A Hugging Face folder needs tokenizer.json "
            f"(or tokenizer.model) and tokenizer_config.json."
        ) from exc


def load_model(path: Path, *, arch: ModelArch | None = None, tokenizer: Any = None) -> LoadedModel:
    """Load config, tokenizer and fp32 weights; refuse unsupported architectures before the weights.

    `arch` and `tokenizer` already read by the caller (the build's pair check) are reused, not read again:
    for a GGUF file each read parses the file's metadata."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if arch is None:
        arch = arch_from_config(load_config(path), source=str(path))
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    try:
        if path.is_file():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:  # third-party loaders raise anything on corrupt input
        raise ModelLoadError(f"could not load the weights of '{path}': {exc}") from exc
    model.eval()
    try:
        if path.is_file():
            generation_config = GenerationConfig.from_model_config(model.config)
        else:
            generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        generation_config = GenerationConfig.from_model_config(model.config)
    return LoadedModel(
        source=path,
        arch=arch,
        model=model,
        tokenizer=tokenizer,
        generation_config=generation_config,
        source_files=_hash_sources(path),
    )
