"""Recipe mode: the architecture numbers of source models (HF config.json, GGUF metadata) without torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from spectrt.runtime.errors import ConfigError, ModelLoadError

from .shapes import ModelShape


# -- recipe mode: model configs without torch ----------------------------------------------------------------------


@dataclass(frozen=True)
class SourceConfig:
    """The architecture numbers of a source model (HF folder or GGUF file) the planner needs."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tokenizer_size: int  # ids the tokenizer produces (the logits width of a bundle)
    added_token_ids: tuple[int, ...]  # added/special tokens (a reduced draft vocabulary keeps them)
    tie_word_embeddings: bool
    attention_bias: bool
    tokenizer_bytes: int  # size of the tokenizer.json a build writes (measured or estimated)
    tensor_types: tuple[tuple[str, str], ...] = ()  # GGUF files: (tensor name, type) of every tensor


def read_source_config(path: Path) -> SourceConfig:
    """Read a Hugging Face folder's config.json (+ tokenizer.json) or a GGUF file's metadata; never loads weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_config(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_config(path)
    raise ModelLoadError(f"'{path}' is neither a .gguf file nor a Hugging Face folder with config.json; pass one "
                         f"(or a known model name that `spectrt models fetch` has fetched).")


def _hf_config(folder: Path) -> SourceConfig:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read {folder / 'config.json'}: {exc}") from exc
    config = config.get("text_config", config)
    try:
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        hidden = int(config["hidden_size"])
        vocab_rows = int(config["vocab_size"])
        model_type = str(config.get("model_type"))
        size, added, tokenizer_bytes = vocab_rows, (), 0
        tokenizer_file = folder / "tokenizer.json"
        if tokenizer_file.is_file():
            size, added = _tokenizer_json_facts(tokenizer_file)
            tokenizer_bytes = tokenizer_file.stat().st_size
        return SourceConfig(
            model_type=model_type, num_layers=int(config["num_hidden_layers"]), hidden_size=hidden, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]), tokenizer_size=size, added_token_ids=added,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            tokenizer_bytes=tokenizer_bytes)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'} lacks an architecture number the planner needs ({exc}).") from exc


def _tokenizer_json_facts(path: Path) -> tuple[int, tuple[int, ...]]:
    """(len(tokenizer), added token ids) of a tokenizer.json, as transformers' len(tokenizer) counts them."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read {path}: {exc}") from exc
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
    added = tuple(sorted(int(t["id"]) for t in data.get("added_tokens", [])))
    ids |= set(added)
    return len(ids), added


GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # gguf TokenType values of special and added tokens
# tokenizer.json bytes per byte of a GGUF file's token and merge strings (JSON quoting, ids, the merges as pairs):
# 3.95 for Qwen2.5 (11.4 MB), 4.48 for SmolLM2 (3.5 MB)
TOKENIZER_JSON_PER_GGUF_STRING_BYTE = 4.2


def _gguf_config(path: Path) -> SourceConfig:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError("planning from a .gguf file reads its metadata with the `gguf` package: "
                          "pip install 'spectrt[build]' (or pip install gguf).") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors on a corrupt file
        raise ModelLoadError(f"could not read the GGUF metadata of '{path}': {exc}") from exc

    def value(key: str, default: Any = None) -> Any:
        found = reader.fields.get(key)
        if found is None:
            if default is None:
                raise ModelLoadError(f"GGUF file '{path}' has no '{key}' metadata; it is not a llama-family model "
                                     f"spectrt can build.")
            return default
        return found.contents()

    arch = value("general.architecture")
    heads = int(value(f"{arch}.attention.head_count"))
    hidden = int(value(f"{arch}.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    types = value("tokenizer.ggml.token_type", [])
    tensor_names = {tensor.name for tensor in reader.tensors}
    strings = 0
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        found = reader.fields.get(key)
        if found is not None:
            strings += sum(len(found.parts[i]) for i in found.data)
    return SourceConfig(
        model_type=str(arch), num_layers=int(value(f"{arch}.block_count")), hidden_size=hidden, num_heads=heads,
        num_kv_heads=int(value(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(value(f"{arch}.attention.key_length", hidden // heads)),
        intermediate_size=int(value(f"{arch}.feed_forward_length")),
        tokenizer_size=len(tokens.data) if tokens is not None else int(value(f"{arch}.vocab_size")),
        added_token_ids=tuple(i for i, t in enumerate(types) if t in (GGUF_CONTROL, GGUF_USER_DEFINED)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        tokenizer_bytes=int(strings * TOKENIZER_JSON_PER_GGUF_STRING_BYTE),
        tensor_types=tuple(sorted((t.name, t.tensor_type.name) for t in reader.tensors)))


def shapes_from_configs(target: SourceConfig, draft: SourceConfig, *, widths: Iterable[int], max_context: int,
                        precision: str, quantize: dict[str, str], draft_vocab: int = 0,
                        block_size: int = 32) -> dict[str, ModelShape]:
    """The bundle's two models as a build with these settings would write them (compiler/build.py)."""
    widths = tuple(sorted(set(int(w) for w in widths)))
    vocab = target.tokenizer_size
    shapes = {}
    for role, source in (("target", target), ("draft", draft)):
        output_rows = vocab
        if role == "draft" and draft_vocab and draft_vocab < vocab:
            output_rows = len(set(range(draft_vocab)) | {i for i in source.added_token_ids if i < vocab})
        if quantize[role] == "gguf" and not source.tensor_types:
            raise ConfigError(f"quantize = \"gguf\" for the {role} needs a .gguf source (it keeps the file's blocks); "
                              f"use int4 or int8 for a Hugging Face folder.")
        shapes[role] = ModelShape(
            role=role, num_layers=source.num_layers, hidden_size=source.hidden_size, num_heads=source.num_heads,
            num_kv_heads=source.num_kv_heads, head_dim=source.head_dim, intermediate_size=source.intermediate_size,
            vocab=vocab, output_rows=output_rows, tie_word_embeddings=source.tie_word_embeddings,
            attention_bias=source.attention_bias, precision=precision, quantize=quantize[role], block_size=block_size,
            max_context=max_context, logits_rows=max(widths) + 1 if role == "target" else 1,
            widths=widths if role == "target" else (),
            gguf_types=source.tensor_types if quantize[role] == "gguf" else ())
    return shapes
