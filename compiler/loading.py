"""Load a model from a Hugging Face folder or a GGUF file through transformers.

GGUF weights are dequantized to fp32 by transformers' GGUF loader (needs the `gguf` package).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


class GgufBlocks:
    """A GGUF file's linear-layer tensors as held by MatMulNBits (compiler/gguf_blocks.py), looked up by the
    Hugging Face state-dict names the graph builder asks for (onnx_graph.BlockFn).

    Names: gguf's own tensor-name map for the file's architecture (``gguf.get_tensor_name_map``, what
    transformers' GGUF loader uses to go the other way). Rows: llama-arch files store attn_q / attn_k with
    ggml's rope row order; transformers un-permutes them when it loads (its LlamaTensorProcessor, applied to
    files whose ``general.architecture`` is "llama"), and so does this, on whole rows of the blocks. Qwen2
    files are stored in transformers' order (no processor). ``verify`` checks a representation bit for bit
    against transformers' loaded fp32 weight, so a name or row mistake cannot reach a bundle.

    A call returns None for a tensor stored as F32/F16/BF16 (it stays a float MatMul) and raises
    ModelLoadError naming the tensor and type for a block type MatMulNBits cannot hold exactly."""

    def __init__(self, path: Path, arch: ModelArch, state_names: list[str]):
        import gguf

        self.path = Path(path)
        self.arch = arch
        self.reader = gguf.GGUFReader(self.path)
        field = self.reader.fields["general.architecture"]
        self.file_arch = bytes(field.parts[field.data[0]]).decode()
        model_arch = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == self.file_arch), None)
        if model_arch is None:
            raise ModelLoadError(f"'{self.path}': GGUF architecture '{self.file_arch}' is unknown to the gguf package")
        name_map = gguf.get_tensor_name_map(model_arch, arch.num_layers)
        tensors = {t.name: t for t in self.reader.tensors}
        self.tensors: dict[str, Any] = {}  # HF name -> GGUF tensor
        for hf_name in state_names:
            base, _, suffix = hf_name.rpartition(".")
            gguf_name = name_map.get_name(base)
            if gguf_name is not None and f"{gguf_name}.{suffix}" in tensors:
                self.tensors[hf_name] = tensors[f"{gguf_name}.{suffix}"]
        self.held: dict[str, str] = {}  # GGUF tensor name -> type, of every tensor handed out (float or blocks)
        self.folded = 0  # 4-bit tensors with a minimum whose zero point was folded into the correction

    def gguf_name(self, hf_name: str) -> str:
        if hf_name not in self.tensors:
            raise ModelLoadError(f"'{self.path}': no GGUF tensor for the weight '{hf_name}'")
        return self.tensors[hf_name].name

    def __call__(self, hf_name: str) -> Any:
        """HF name -> gguf_blocks.BlockWeight in transformers' row order, or None (a float tensor)."""
        from .gguf_blocks import FLOAT_TYPES, block_weight, rope_unpermute_rows

        tensor = self.tensors.get(hf_name)
        if tensor is None:
            raise ModelLoadError(f"'{self.path}': no GGUF tensor for the weight '{hf_name}'")
        qtype = tensor.tensor_type.name
        self.held[tensor.name] = qtype
        if qtype in FLOAT_TYPES:
            return None
        try:  # the kernel's default zero point where folding is exact (faster int8-activation path), else 0
            weight = block_weight(tensor, fold_offset=True)
            self.folded += weight.bits == 4 and weight.correction is not None
        except ModelLoadError as exc:
            if "folding" not in str(exc):
                raise
            weight = block_weight(tensor)
        if self.file_arch == "llama" and ".attn_q." in tensor.name:
            weight = rope_unpermute_rows(weight, self.arch.num_heads)
        elif self.file_arch == "llama" and ".attn_k." in tensor.name:
            weight = rope_unpermute_rows(weight, self.arch.num_kv_heads)
        return weight

    def record(self) -> dict[str, Any]:
        """What was held, for the manifest's quantization record."""
        from collections import Counter

        return {"block_types": dict(sorted(Counter(self.held.values()).items())),
                "tensors": dict(sorted(self.held.items())), "zero_point_folded": int(self.folded),
                "rope_rows_unpermuted": self.file_arch == "llama"}


def verify_blocks(weight: Any, reference: np.ndarray, name: str, rows_per_chunk: int = 4096) -> None:
    """Refuse unless the representation dequantizes to `reference` [N, K] (transformers' fp32 weight) bit for
    bit; in row chunks, so a 150k-row embedding never needs a second full fp32 copy."""
    from .gguf_blocks import dequantize_representation, take_rows

    if (weight.n, weight.k) != tuple(reference.shape):
        raise ModelLoadError(f"GGUF weight for '{name}' is [{weight.n}, {weight.k}], transformers' is "
                             f"{list(reference.shape)}")
    for start in range(0, weight.n, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, weight.n))
        got = dequantize_representation(take_rows(weight, rows))
        want = np.ascontiguousarray(reference[rows], dtype=np.float32)
        differ = got.view(np.uint32) != want.view(np.uint32)
        if differ.any():
            row, col = (int(i) for i in np.argwhere(differ)[0])
            raise ModelLoadError(
                f"GGUF weight for '{name}' ({weight.qtype}) held as blocks differs from transformers' loaded weight "
                f"in {int(differ.sum())} values of rows {rows.start}..{rows.stop - 1} (first [{start + row}, {col}]: "
                f"{got[row, col]!r} vs {want[row, col]!r}): a spectrt bug in the name map or row order")
