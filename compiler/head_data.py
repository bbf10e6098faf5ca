"""Training data for a draft head, from the bundle's own target graph (self-distillation: no outside data).

Sequences come from two sources, both read by the target exactly as the runtime runs it (the bundle's ONNX graph
with its `features` output on ONNX Runtime CPU):
- prompts (the bench workloads' training split, or the user's): the target's greedy continuation, so the head
  learns the target's own outputs in the format it will see them;
- text (the user's files, or the built-in default: the Python standard library's sources, present offline on every
  machine): read in windows, so the head learns what the target predicts after real text.
Each sequence keeps its tokens and the target's feature (final hidden state) at every position but the last.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto

from spectrt.errors import ConfigError

HOLDOUT = 8  # the first records of each shipped workload are the benchmark's (`spectrt bench --prompts 8`)


@dataclass
class Sequence:
    tokens: np.ndarray  # int32 [n]
    features: np.ndarray  # fp16 [n - 1, H]: the target's feature at positions 0..n-2
    source: str  # "prompt:<id>" | "text:<file>"


@dataclass
class HeadData:
    sequences: list[Sequence] = field(default_factory=list)
    prompt_ids: list[str] = field(default_factory=list)  # the prompts whose continuations were used
    sources_hash: str = ""  # sha256 over every sequence's tokens, in order

    @property
    def tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    def save(self, path: Path) -> None:
        arrays = {"lengths": np.array([len(s.tokens) for s in self.sequences], np.int64),
                  "tokens": np.concatenate([s.tokens for s in self.sequences]).astype(np.int32),
                  "features": np.concatenate([s.features for s in self.sequences]).astype(np.float16),
                  "sources": np.array([s.source for s in self.sequences]),
                  "prompt_ids": np.array(self.prompt_ids, dtype=str)}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "HeadData":
        with np.load(path, allow_pickle=False) as arrays:
            lengths, tokens, features = arrays["lengths"], arrays["tokens"], arrays["features"]
            sources, prompt_ids = arrays["sources"].tolist(), arrays["prompt_ids"].tolist()
        data, start, row = cls(prompt_ids=prompt_ids), 0, 0
        for length, source in zip(lengths.tolist(), sources):
            data.sequences.append(Sequence(tokens[start : start + length], features[row : row + length - 1], source))
            start, row = start + length, row + length - 1
        data.sources_hash = hash_sequences(data.sequences)
        return data


def hash_sequences(sequences: Iterable[Sequence]) -> str:
    digest = hashlib.sha256()
    for sequence in sequences:
        digest.update(np.asarray(sequence.tokens, np.int32).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


# -- the target's tables -------------------------------------------------------------------------------------------


def _external(onnx_path: Path, proto: TensorProto) -> np.ndarray:
    """A read-only map of an initializer stored in external data."""
    info = {entry.key: entry.value for entry in proto.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(proto.data_type)
    return np.memmap(onnx_path.parent / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(proto.dims))


class TargetTables:
    """The target graph's token embeddings, output layer and final norm, read from its ONNX initializers
    (dequantized when the graph stores them as 8-bit blocks)."""

    def __init__(self, onnx_path: Path):
        model = onnx.load(str(onnx_path), load_external_data=False)
        self.onnx_path = Path(onnx_path)
        self._init = {t.name: t for t in model.graph.initializer}
        self.block_size = next((a.i for n in model.graph.node if n.op_type == "MatMulNBits"
                                for a in n.attribute if a.name == "block_size"), 32)
        head = self._table("lm_head.weight", "embed_tokens.weight")  # a tied model's one table may carry either name
        self.quantized = head + ".q" in self._init
        self.vocab, self.hidden_size = self._shape(head + ".q" if self.quantized else head)
        self.final_norm = self._array("final_norm.weight").astype(np.float32)

    def _table(self, *names: str) -> str:
        """The first of `names` stored as a float table or as 8-bit blocks (`name`.q)."""
        for name in names:
            if name in self._init or name + ".q" in self._init:
                return name
        raise ValueError(f"{self.onnx_path.name}: none of the tables {', '.join(names)}; not a spectrt decoder graph")

    def _shape(self, name: str) -> tuple[int, int]:
        dims = tuple(self._init[name].dims)
        return (dims[0], dims[1] * dims[2]) if name.endswith(".q") else (dims[0], dims[1])

    def _array(self, name: str) -> np.ndarray:
        proto = self._init[name]
        if proto.data_location == TensorProto.EXTERNAL:
            return _external(self.onnx_path, proto)
        return onnx.numpy_helper.to_array(proto)

    def _rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of table `name` ([V, H] float, or 8-bit blocks `name`.q + .scales) as fp32 [n, H]."""
        if name + ".q" in self._init:
            unreadable = [part for part in (".zero_points", ".correction") if name + part in self._init]
            if unreadable:  # a GGUF block type with explicit zero points (Q6_K) or a block minimum (Q4_K, Q5_K)
                raise ValueError(f"{self.onnx_path.name}: the table {name} is stored as GGUF blocks this reader does "
                                 f"not dequantize ({', '.join(unreadable)}); a draft head "
                                 f"can be trained on a bundle whose output layer is 8-bit (int4/int8 recipes, or a "
                                 f"GGUF whose token embeddings are Q8_0)")
            packed = self._array(name + ".q")  # uint8 [V, blocks, bs]
            blocks = packed.shape[1]
            scales = self._array(name + ".scales").reshape(-1, blocks)  # [V, blocks]
            rows = (packed[ids].astype(np.float32) - 128.0) * scales[ids][..., None].astype(np.float32)
            return rows.reshape(len(ids), -1)
        return np.asarray(self._array(name)[ids], dtype=np.float32)

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        return self._rows(self._table("embed_tokens.weight", "lm_head.weight"), ids)

    def output_rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        return self._rows(self._table("lm_head.weight", "embed_tokens.weight"), ids)


# -- sources -------------------------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The built-in default text: this Python's standard library sources (every machine has them, offline)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise ConfigError(f"no Python sources under {root} for the default training text; pass --text FILE.")
    return files


def text_files(paths: Iterable[str]) -> list[Path]:
    """Files named, and every text-looking file under folders named (sorted)."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.stat().st_size < 4 << 20)
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"training text '{name}' does not exist; pass files or folders of text.")
    return found


def training_prompts(workloads: Iterable[str], holdout: int = HOLDOUT):
    """Records of the named workloads after the first `holdout` (those are the benchmark's): the training split.
    A .jsonl path (your own prompts) is used whole."""
    from spectrt.workloads import load_workload

    prompts = []
    for name in workloads:
        records = load_workload(name)
        prompts += records if Path(name).is_file() else records[holdout:]
    return prompts


# -- collection ----------------------------------------------------------------------------------------------------


def greedy_sequence(target, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> Sequence:
    """The target's greedy continuation of `prompt_ids` with the feature of every position (plain decoding)."""
    target.reset()
    logits = target.step(np.asarray(prompt_ids, np.int64))
    target.commit(len(prompt_ids))
    features = [target.last_features.astype(np.float16)]
    tokens = list(prompt_ids)
    for index in range(max_new_tokens):
        token = int(np.argmax(logits[-1]))
        tokens.append(token)
        if token in eos_ids or index == max_new_tokens - 1 or len(tokens) >= target.max_context:
            break
        logits = target.step(np.asarray([token], np.int64))
        target.commit(1)
        features.append(target.last_features.astype(np.float16))
    return Sequence(np.asarray(tokens, np.int32), np.concatenate(features), "")


def text_sequence(target, ids: list[int]) -> Sequence:
    """The target's features over a window of text (one prefill)."""
    target.reset()
    target.step(np.asarray(ids, np.int64))
    return Sequence(np.asarray(ids, np.int32), target.last_features[:-1].astype(np.float16), "")


def collect(target, tokenizer, eos_ids: set[int], *, prompts, files: list[Path], text_tokens: int, window: int,
            max_new_tokens: int, seed: int, say: Callable[[str], None] = lambda s: None,
            partial: HeadData | None = None, save: Callable[[HeadData], None] | None = None,
            save_every: float = 60.0) -> HeadData:
    """Continuations of `prompts`, then windows of `files` (shuffled with `seed`) until `text_tokens` are read.

    `save` is called with the data so far every `save_every` seconds; given that `partial` data back, a run goes on
    where it stopped and ends with the same sequences as an uninterrupted one."""
    data = partial or HeadData()
    started = last_save = time.perf_counter()
    window = min(window, target.max_context)

    def checkpoint(force: bool = False) -> None:
        nonlocal last_save
        if save is not None and (force or time.perf_counter() - last_save > save_every):
            save(data)
            last_save = time.perf_counter()

    done = set(data.prompt_ids)
    for number, prompt in enumerate(prompts, 1):
        if prompt.id in done:
            continue
        ids = tokenizer.encode(prompt.prompt) if prompt.prompt is not None else tokenizer.encode_chat(list(prompt.messages))
        sequence = greedy_sequence(target, ids[: target.max_context // 2], max_new_tokens, eos_ids)
        sequence.source = f"prompt:{prompt.id}"
        data.sequences.append(sequence)
        data.prompt_ids.append(prompt.id)
        say(f"    prompts {number}/{len(prompts)}: {data.tokens} tokens, {time.perf_counter() - started:.0f} s")
        checkpoint()
    checkpoint(force=bool(prompts))
    order = list(files)
    random.Random(seed).shuffle(order)
    already = sum(len(s.tokens) for s in data.sequences if s.source.startswith("text:"))  # read before a resume
    read = 0
    for path in order:
        if read >= text_tokens:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        ids = tokenizer.encode(text)
        for start in range(0, len(ids) - 16, window):  # whole windows, and a tail of at least 16 tokens
            if read >= text_tokens:
                break
            chunk = ids[start : start + min(window, text_tokens - read + 1)]
            if len(chunk) < 16:
                break
            if read >= already:
                sequence = text_sequence(target, chunk)
                sequence.source = f"text:{path.name}"
                data.sequences.append(sequence)
            read += len(chunk)
        if read > already:
            say(f"    text: {read}/{text_tokens} tokens, {time.perf_counter() - started:.0f} s")
            checkpoint()
    data.sources_hash = hash_sequences(data.sequences)
    return data
