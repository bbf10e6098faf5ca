"""Train a small draft head for a bundle's target, offline, from the target itself (`spectrt train-head`).

The head is feature-level (EAGLE, Li et al. 2024): from the target's final hidden state f_t at position t and the
embedding of the token x_{t+1} it guesses f_{t+1} and so the token x_{t+2}; fed its own guess it drafts on. It is
one decoder layer of the target's attention geometry (a narrower MLP), an input layer fc: [f; e] (2H) -> H, an
RMSNorm, and the target's own output-layer rows for a reduced vocabulary (the most frequent tokens of the
training sequences, as FR-Spec / EAGLE-3 do), frozen.

Training is self-distillation (head_data.py): the target's features and its greedy continuations; the loss is
the cross-entropy against the target's next-token distribution over the reduced vocabulary plus 0.1 x a
smooth-L1 regression of f_{t+1} (EAGLE weighs them the other way round; on this little data the token loss gave
the better acceptance), optionally on two unrolled steps (`unroll=2`): the second feeds the head's first guess
back in (attending to the true-feature rows before it, as at run time). Deterministic for a seed (fixed step count; torch on the CPU), checkpointed, resumable.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from spectrt.errors import ConfigError
from spectrt.runtime.manifest import MANIFEST_NAME, read_manifest, verify_files

from .bundle_io import (STAGE_MARK, discard_staged, finish_interrupted_install, fsync_file, install_staged,
                        staged_name)
from .head_data import HOLDOUT, HeadData, TargetTables, collect, stdlib_files, text_files, training_prompts
from .head_graph import HeadShape, build_head_onnx, head_tensor_specs
from .onnx_graph import add_features_output
from .progress import Progress


@dataclass(frozen=True)
class HeadConfig:
    """What `spectrt train-head` does. Defaults were chosen by measurement on a 2-core CPU (docs/benchmarks/)."""

    workloads: tuple[str, ...] = ("code", "chat", "extraction")  # their training split (records after the first 8)
    text: tuple[str, ...] = ()  # files / folders of text; () = the Python standard library's sources
    text_tokens: int = 60000  # tokens of text read by the target
    max_new_tokens: int = 128  # greedy continuation of each training prompt
    window: int = 256  # text window / training sequence length
    intermediate_size: int = 2048  # the head's MLP width
    output_vocab: int = 8192  # token ids the head can propose
    steps: int | None = None  # optimizer steps; None = as many as `minutes` allows (measured), then recorded
    minutes: float = 45.0  # the whole run's budget (data + training) when steps is None
    batch: int = 8  # sequences per step
    lr: float = 1e-3
    seed: int = 0
    unroll: int = 1  # 1 = teacher forcing only; 2 = also train on the head's own first guess (half the steps)
    regression_weight: float = 0.1  # smooth-L1 of the guessed feature
    classification_weight: float = 1.0  # cross-entropy against the target's next-token distribution
    threads: int = 0
    work_dir: str | None = None  # checkpoints and collected data (default ~/.cache/spectrt/head/<bundle>-<hash>)

    def data_key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("workloads", "text", "text_tokens", "max_new_tokens", "window", "seed")}

    def train_key(self) -> dict[str, Any]:
        return {**self.data_key(), **{k: getattr(self, k) for k in ("intermediate_size", "output_vocab", "batch", "lr",
                                                                    "unroll", "regression_weight",
                                                                    "classification_weight")}}


# -- the model -----------------------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def make_head_model(shape: HeadShape, lm_head_rows: np.ndarray, final_norm: np.ndarray, max_len: int, seed: int):
    """The torch module (built here so the runtime never imports torch)."""
    torch = _torch()
    from torch import nn

    from .head_graph import default_rope

    class RMSNorm(nn.Module):
        def __init__(self, size: int, eps: float, init: np.ndarray | None = None):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(size) if init is None else torch.tensor(np.asarray(init, np.float32)))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class DraftHead(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            H, heads, kv, D, inter = (shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                      shape.intermediate_size)
            self.fc = nn.Linear(2 * H, H, bias=True)
            self.input_norm = RMSNorm(H, shape.rms_norm_eps)
            self.q_proj = nn.Linear(H, heads * D, bias=shape.attention_bias)
            self.k_proj = nn.Linear(H, kv * D, bias=shape.attention_bias)
            self.v_proj = nn.Linear(H, kv * D, bias=shape.attention_bias)
            self.o_proj = nn.Linear(heads * D, H, bias=False)
            self.post_norm = RMSNorm(H, shape.rms_norm_eps)
            self.gate_proj = nn.Linear(H, inter, bias=False)
            self.up_proj = nn.Linear(H, inter, bias=False)
            self.down_proj = nn.Linear(inter, H, bias=False)
            self.norm = RMSNorm(H, shape.rms_norm_eps, final_norm)
            self.register_buffer("lm_head", torch.tensor(np.asarray(lm_head_rows, np.float32)), persistent=False)
            cos, sin = default_rope(shape.rope_theta, D, max_len)
            self.register_buffer("cos", torch.tensor(cos), persistent=False)  # [T, D]
            self.register_buffer("sin", torch.tensor(sin), persistent=False)

        def _rope(self, x, positions):  # x [B, h, S, D]
            cos, sin = self.cos[positions], self.sin[positions]  # [S, D]
            half = x.shape[-1] // 2
            rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
            return x * cos + rotated * sin

        def _qkv(self, x, positions):
            B, S, _ = x.shape
            h = self.input_norm(x)
            q = self.q_proj(h).view(B, S, shape.num_heads, shape.head_dim).transpose(1, 2)
            k = self.k_proj(h).view(B, S, shape.num_kv_heads, shape.head_dim).transpose(1, 2)
            v = self.v_proj(h).view(B, S, shape.num_kv_heads, shape.head_dim).transpose(1, 2)
            groups = shape.num_heads // shape.num_kv_heads
            k = self._rope(k, positions).repeat_interleave(groups, dim=1)  # [B, heads, S, D]
            v = v.repeat_interleave(groups, dim=1)
            return self._rope(q, positions) * shape.head_dim ** -0.5, k, v

        def _finish(self, x, context):
            B, _, S, _ = context.shape
            x = x + self.o_proj(context.transpose(1, 2).reshape(B, S, -1))
            h = self.post_norm(x)
            x = x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
            return self.norm(x)  # the guess of the next feature [B, S, H]

        def forward(self, features, embeds):
            """Teacher-forced pass: row t reads (f_t, e_{t+1}). Returns guesses [B, S, H] and the keys/values."""
            S = features.shape[1]
            positions = torch.arange(S)
            x = self.fc(torch.cat([features, embeds], dim=-1))
            q, k, v = self._qkv(x, positions)
            scores = q @ k.transpose(-1, -2)  # [B, heads, S, S]
            causal = torch.ones(S, S, dtype=torch.bool).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            return self._finish(x, probs @ v), (k, v)

        def second_step(self, guesses, embeds, kv):
            """Row u reads (guess of f_u from row u-1, e_{u+1}) and attends to the teacher-forced rows < u and
            itself: what the head's second drafted token sees at run time. Row 0 has no guess before it: it reads
            zeros and is ignored by the loss."""
            k1, v1 = kv
            S = guesses.shape[1]
            shifted = torch.cat([torch.zeros_like(guesses[:, :1]), guesses[:, :-1]], dim=1)
            x = self.fc(torch.cat([shifted, embeds], dim=-1))
            q, k2, v2 = self._qkv(x, torch.arange(S))
            earlier = (q @ k1.transpose(-1, -2)).masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(-1),
                                                             float("-inf"))  # [B, h, S, S]
            own = (q * k2).sum(-1, keepdim=True)  # [B, h, S, 1]
            probs = torch.cat([earlier, own], dim=-1).softmax(-1)
            context = probs[..., :S] @ v1 + probs[..., S:] * v2
            return self._finish(x, context)

        def logits(self, guesses):
            return guesses @ self.lm_head.T  # [.., Vo]

    return DraftHead()


def head_weights(model) -> dict[str, np.ndarray]:
    """The head's parameters under the names head_graph.build_head_onnx reads."""
    def get(module):
        return module.detach().float().numpy().copy()

    prefix = "model.layers.0"
    weights = {"fc.weight": get(model.fc.weight), "fc.bias": get(model.fc.bias), "norm.weight": get(model.norm.weight),
               "lm_head.weight": get(model.lm_head),
               f"{prefix}.input_layernorm.weight": get(model.input_norm.weight),
               f"{prefix}.post_attention_layernorm.weight": get(model.post_norm.weight),
               f"{prefix}.self_attn.o_proj.weight": get(model.o_proj.weight)}
    for name in ("q", "k", "v"):
        proj = getattr(model, f"{name}_proj")
        weights[f"{prefix}.self_attn.{name}_proj.weight"] = get(proj.weight)
        if proj.bias is not None:
            weights[f"{prefix}.self_attn.{name}_proj.bias"] = get(proj.bias)
    for name in ("gate", "up", "down"):
        weights[f"{prefix}.mlp.{name}_proj.weight"] = get(getattr(model, f"{name}_proj").weight)
    return weights


# -- batches -------------------------------------------------------------------------------------------------------


@dataclass
class Batches:
    """Training windows cut from the sequences: tokens [N, W+1] (padded), features [N, W, H] fp16, valid rows [N]."""

    tokens: np.ndarray
    features: np.ndarray
    lengths: np.ndarray  # positions with a feature in each window (<= W)


def make_windows(data: HeadData, window: int, indices: list[int]) -> Batches:
    cut: list[tuple[np.ndarray, np.ndarray]] = []
    for i in indices:
        sequence = data.sequences[i]
        for start in range(0, len(sequence.features), window):
            features = sequence.features[start : start + window]
            if len(features) >= 3:
                cut.append((sequence.tokens[start : start + len(features) + 1], features))
    hidden = data.sequences[0].features.shape[1]
    tokens = np.zeros((len(cut), window + 1), np.int64)
    features = np.zeros((len(cut), window, hidden), np.float16)
    lengths = np.zeros(len(cut), np.int64)
    for row, (t, f) in enumerate(cut):
        tokens[row, : len(t)] = t
        features[row, : len(f)] = f
        lengths[row] = len(f)
    return Batches(tokens, features, lengths)


def choose_vocab(data: HeadData, size: int, eos_ids: set[int], vocab: int) -> np.ndarray:
    """The `size` most frequent tokens of the training sequences (ties: lower id), eos tokens always in; sorted."""
    counts = np.bincount(np.concatenate([s.tokens for s in data.sequences]).astype(np.int64), minlength=vocab)[:vocab]
    for token in eos_ids:
        counts[token] = counts.max() + 1
    order = np.lexsort((np.arange(vocab), -counts))
    return np.sort(order[: min(size, vocab)]).astype(np.int64)


# -- training ------------------------------------------------------------------------------------------------------


def _losses(model, tables_embed, batch_tokens, batch_features, lengths, unroll: int):
    """Mean losses and per-step top-1 agreement with the target over the valid rows of a batch."""
    torch = _torch()
    features = torch.tensor(batch_features.astype(np.float32))  # [B, W, H]
    embeds = torch.tensor(tables_embed(batch_tokens[:, 1 : features.shape[1] + 1]))  # [B, W, H]: e_{t+1}
    W = features.shape[1]
    valid = torch.arange(W)[None, :] < torch.tensor(lengths)[:, None] - 1  # rows t with a label f_{t+1}
    labels = torch.cat([features[:, 1:], torch.zeros_like(features[:, :1])], dim=1)  # f_{t+1}
    with torch.no_grad():
        target_logits = model.logits(labels)
        target_probs = target_logits.softmax(-1)
        target_top = target_logits.argmax(-1)
    guesses, kv = model(features, embeds)
    results = []
    steps = [guesses]
    if unroll >= 2:
        steps.append(model.second_step(guesses, embeds, kv))
    for step, guess in enumerate(steps):
        rows = valid.clone()
        if step:
            rows[:, 0] = False
        regression = torch.nn.functional.smooth_l1_loss(guess[rows], labels[rows])
        logits = model.logits(guess)
        classification = -(target_probs[rows] * logits[rows].log_softmax(-1)).sum(-1).mean()
        agree = (logits.argmax(-1) == target_top)[rows].float().mean()
        results.append((regression, classification, agree))
    return results


def _embed_fn(tables: TargetTables, data: HeadData):
    """tokens [B, W] -> the target's embeddings [B, W, H] fp32, for every token of the training sequences."""
    known = np.unique(np.concatenate([s.tokens for s in data.sequences]).astype(np.int64))  # sorted ids
    rows = tables.embeddings(known)  # [n, H]

    def embed(tokens: np.ndarray) -> np.ndarray:
        index = np.clip(np.searchsorted(known, tokens), 0, len(known) - 1)  # padding (id 0) reads some row: masked
        return rows[index]

    return embed


def evaluate(model, embed, batches: Batches, unroll: int, batch: int = 8) -> dict[str, float]:
    torch = _torch()
    sums = np.zeros((max(unroll, 1), 3))
    count = 0
    with torch.no_grad():
        for start in range(0, len(batches.lengths), batch):
            part = slice(start, start + batch)
            results = _losses(model, embed, batches.tokens[part], batches.features[part], batches.lengths[part], unroll)
            for step, (reg, cls, agree) in enumerate(results):
                sums[step] += [float(reg), float(cls), float(agree)]
            count += 1
    means = sums / max(count, 1)
    report = {"regression": float(means[0, 0]), "cross_entropy": float(means[0, 1]),
              "agreement_1": float(means[0, 2])}
    if unroll >= 2:
        report["agreement_2"] = float(means[1, 2])
    # a draft of K tokens is accepted token by token: the chance that the first k all hold, estimated from the
    # per-step agreements (step 2's given step 1's is about its own)
    return report


def train(model, embed, train_batches: Batches, val_batches: Batches, config: HeadConfig, steps: int,
          checkpoint: Path, progress: Progress, curve: list[dict[str, float]]) -> int:
    """Run the optimizer to `steps`, resuming from `checkpoint` when it holds an earlier state; returns steps done."""
    torch = _torch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  betas=(0.9, 0.95), weight_decay=0.0)
    done = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["key"] == config.train_key() and state["steps"] == steps:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            done = state["done"]
            curve[:] = state["curve"]
            progress.say(f"    resumed at step {done}/{steps}")
    warmup = max(1, min(20, steps // 10))
    started, last_save = time.perf_counter(), time.perf_counter()
    windows = len(train_batches.lengths)
    order = _window_order(config, windows, done)
    for step in range(done, steps):
        lr = config.lr * (step + 1) / warmup if step < warmup else \
            config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        first = (step * config.batch) % windows
        picked = order[np.arange(first, first + config.batch) % windows]
        if first + config.batch > windows:  # a new epoch: a new order, fixed by the seed and the epoch
            order = np.random.default_rng(config.seed + 1 + (step * config.batch) // windows).permutation(windows)
        results = _losses(model, embed, train_batches.tokens[picked], train_batches.features[picked],
                          train_batches.lengths[picked], config.unroll)
        loss = sum(config.regression_weight * reg + config.classification_weight * cls for reg, cls, _ in results)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        point = {"step": done, "loss": loss.item(), "agreement_1": results[0][2].item(), "lr": lr}
        if done % max(1, steps // 10) == 0 or done == steps:
            point.update({f"val_{k}": v for k, v in evaluate(model, embed, val_batches, config.unroll).items()})
            curve.append(point)
            elapsed = time.perf_counter() - started
            progress.say(f"    step {done}/{steps}  loss {point['loss']:.3f}  val agreement "
                         f"{point['val_agreement_1']:.3f}" + (f" / {point['val_agreement_2']:.3f}" if
                                                               'val_agreement_2' in point else "")
                         + f"  {elapsed:.0f} s")
        if time.perf_counter() - last_save > SAVE_EVERY or done == steps:
            _save_checkpoint(checkpoint, model, optimizer, config, steps, done, curve)
            last_save = time.perf_counter()
    return done


SAVE_EVERY = 120.0  # seconds between checkpoints


def _window_order(config: HeadConfig, windows: int, step: int):
    """The window order in effect at `step`: the seed's, reshuffled after each batch that crosses the end of an
    epoch (replayed from step 0, so a resumed run draws what an uninterrupted one would)."""
    order = np.random.default_rng(config.seed).permutation(windows)
    for earlier in range(step):
        if (earlier * config.batch) % windows + config.batch > windows:
            order = np.random.default_rng(config.seed + 1 + (earlier * config.batch) // windows).permutation(windows)
    return order


def _save_checkpoint(path: Path, model, optimizer, config: HeadConfig, steps: int, done: int, curve) -> None:
    torch = _torch()
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": config.train_key(), "steps": steps, "done": done, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "curve": curve}, tmp)
    os.replace(tmp, path)


# -- the bundle ----------------------------------------------------------------------------------------------------


def _work_dir(bundle: Path, config: HeadConfig) -> Path:
    if config.work_dir:
        return Path(config.work_dir)
    key = hashlib.sha256(json.dumps([str(bundle.resolve()), config.data_key()], sort_keys=True).encode()).hexdigest()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spectrt" / "head" / f"{bundle.name}-{key[:12]}"


def ensure_features(bundle: Path, progress: Progress) -> None:
    """Give the bundle's target graph the `features` output if it lacks it (graph surgery on target.onnx; logits
    and exactness unchanged), and record it in the manifest. The new graph is written under a staged name and
    installed with the manifest by install_staged: the bundle verifies at every moment."""
    manifest_path = bundle / MANIFEST_NAME
    original = manifest_path.read_bytes()
    data = json.loads(original)
    target = data["models"]["target"]
    if target.get("features"):
        return
    onnx_name = target["backends"]["onnx"]["path"]
    hidden = target["arch"]["hidden_size"]
    verify_files(read_manifest(bundle), only={onnx_name})  # derive the new graph from the one the manifest vouches for
    staged = staged_name(onnx_name)  # beside it: its data location stays valid
    with progress.step("add the features output to the target graph"):
        if target["backends"].get("tensorrt"):
            progress.say("    the target's TensorRT engines predate the features output: run `spectrt compile` again")
        try:
            shutil.copyfile(bundle / onnx_name, bundle / staged)
            add_features_output(bundle / staged, hidden)
            fsync_file(bundle / staged)
            install_staged(bundle, {onnx_name: staged}, lambda where: _with_features(data, hidden, where(onnx_name)),
                           original)
        except BaseException:
            discard_staged(bundle, [bundle / staged, bundle / f"{staged}.tmp"])  # .tmp: add_features_output's
            raise


def _with_features(data: dict[str, Any], hidden: int, onnx_path: str) -> dict[str, Any]:
    """The manifest `data` with the target graph at `onnx_path` returning `features` (its engines dropped)."""
    data = copy.deepcopy(data)
    target = data["models"]["target"]
    outputs = target["graph"]["outputs"]
    if not any(o["name"] == "features" for o in outputs):
        outputs.insert(1, {"name": "features", "dtype": "fp32", "shape": [1, "seq_len", hidden]})
    target["features"] = hidden
    target["backends"].pop("tensorrt", None)
    target["backends"]["onnx"]["path"] = onnx_path
    return data


HEAD_FILES = ("head.onnx", "head.onnx.data", "head.vocab.npy")


def _with_head(data: dict[str, Any], entry: dict[str, Any], where: Callable[[str], str]) -> dict[str, Any]:
    """The manifest `data` with `entry` as models.head, its files named where(final name)."""
    data = copy.deepcopy(data)
    onnx = {**entry["backends"]["onnx"], "path": where("head.onnx"), "data": where("head.onnx.data")}
    data["models"]["head"] = {**entry, "vocab_ids": where("head.vocab.npy"), "backends": {"onnx": onnx}}
    return data


def measure_step_seconds(model, embed, batches: Batches, config: HeadConfig) -> float:
    """Seconds per optimizer step (two steps timed after one warm-up; weights restored afterwards)."""
    torch = _torch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    times = []
    for index in range(3):
        part = slice(index * config.batch, (index + 1) * config.batch)
        started = time.perf_counter()
        results = _losses(model, embed, batches.tokens[part], batches.features[part], batches.lengths[part], config.unroll)
        loss = sum(config.regression_weight * reg + config.classification_weight * cls for reg, cls, _ in results)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    model.load_state_dict(state)
    return float(np.median(times[1:]))


def train_head(bundle: Path | str, config: HeadConfig = HeadConfig(), progress: Progress | None = None) -> dict:
    """Train a draft head for the bundle's target and add it to the bundle (models.head); returns its manifest entry."""
    torch = _torch()
    progress = progress or Progress()
    bundle = Path(bundle)
    started = time.perf_counter()
    manifest = read_manifest(bundle)
    target_entry = manifest.target
    if target_entry.onnx_path is None:
        raise ConfigError("training a draft head needs the target's ONNX graph; this bundle has none.")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    if finish_interrupted_install(bundle):
        progress.say("    finished installing what an interrupted train-head had left under temporary names")
    ensure_features(bundle, progress)
    manifest = read_manifest(bundle)
    target_entry = manifest.target
    work = _work_dir(bundle, config)
    work.mkdir(parents=True, exist_ok=True)
    eos_ids = {int(i) for i in manifest.generation["eos_token_ids"]}

    data_path = work / "data.npz"
    if data_path.is_file():
        data = HeadData.load(data_path)
        progress.say(f"    reusing collected data: {len(data.sequences)} sequences, {data.tokens} tokens ({work})")
    else:
        from spectrt.runtime.backends.onnxruntime_backend import OrtDecoder, OrtOptions
        from spectrt.runtime.text import BundleTokenizer

        target = OrtDecoder(manifest.file(target_entry.onnx_path), num_layers=target_entry.num_layers,
                            kv_heads=target_entry.num_kv_heads, head_dim=target_entry.head_dim,
                            precision=target_entry.precision, max_context=target_entry.max_context,
                            vocab=target_entry.logits_vocab, options=OrtOptions(threads=config.threads, provider="cpu"),
                            role="target", io=(target_entry.inputs, target_entry.outputs),
                            logits_rows=target_entry.logits_rows)
        tokenizer = BundleTokenizer(manifest.file(manifest.tokenizer_file), manifest.generation)
        prompts = training_prompts(config.workloads)
        files = text_files(config.text) if config.text else stdlib_files()
        partial_path = work / "data.partial.npz"
        partial = HeadData.load(partial_path) if partial_path.is_file() else None
        if partial is not None:
            progress.say(f"    resuming the collection: {len(partial.sequences)} sequences, {partial.tokens} tokens")
        with progress.step(f"collect: target continuations of {len(prompts)} prompts, {config.text_tokens} tokens "
                           f"of text"):
            data = collect(target, tokenizer, eos_ids, prompts=prompts, files=files, text_tokens=config.text_tokens,
                           window=config.window, max_new_tokens=config.max_new_tokens, seed=config.seed,
                           say=progress.say, partial=partial, save=lambda d: d.save(partial_path))
        del target
        gc.collect()
        data.save(data_path)
        partial_path.unlink(missing_ok=True)
    collect_seconds = time.perf_counter() - started

    tables = TargetTables(manifest.file(target_entry.onnx_path))
    vocab_ids = choose_vocab(data, config.output_vocab, eos_ids, target_entry.logits_vocab)
    arch = target_entry.raw["arch"]
    shape = HeadShape(hidden_size=tables.hidden_size, num_heads=arch["num_heads"], num_kv_heads=arch["num_kv_heads"],
                      head_dim=arch["head_dim"], intermediate_size=config.intermediate_size,
                      output_vocab=len(vocab_ids), rms_norm_eps=arch["rms_norm_eps"], rope_theta=arch["rope_theta"],
                      attention_bias=bool(arch.get("attention_bias", True)))
    model = make_head_model(shape, tables.output_rows(vocab_ids), tables.final_norm, config.window + 1, config.seed)
    embed = _embed_fn(tables, data)
    held_out = [i for i in range(len(data.sequences)) if i % 10 == 9] or [len(data.sequences) - 1]  # validation
    trained_on = [i for i in range(len(data.sequences)) if i not in held_out] or held_out
    train_batches = make_windows(data, config.window, trained_on)
    val_batches = make_windows(data, config.window, held_out)
    coverage = float(np.isin(np.concatenate([data.sequences[i].tokens for i in held_out]), vocab_ids).mean())

    steps = config.steps
    if steps is None:
        step_seconds = measure_step_seconds(model, embed, train_batches, config)
        left = config.minutes * 60 - (time.perf_counter() - started) - 60  # a minute for export and checks
        steps = max(10, int(left / (step_seconds * 1.1)))  # evaluation takes ~10% on top
        progress.say(f"    {step_seconds:.2f} s per step: {steps} steps fit the {config.minutes:g}-minute budget")
    curve: list[dict[str, float]] = []
    with progress.step(f"train the head ({len(train_batches.lengths)} windows, {steps} steps of {config.batch})"):
        train(model, embed, train_batches, val_batches, config, steps, work / "checkpoint.pt", progress, curve)
    validation = evaluate(model, embed, val_batches, config.unroll)

    quantize = "int8" if target_entry.raw.get("quantization") else "none"
    staging = bundle / f".head{STAGE_MARK}{secrets.token_hex(4)}"  # the head's files, together: its data location
    try:
        with progress.step("export the head ONNX" + (" (8-bit weights)" if quantize != "none" else "")):
            staging.mkdir()
            weights = head_weights(model)
            embed_table = tables.embeddings(np.arange(target_entry.logits_vocab))
            build_head_onnx(shape, weights, embed_table, precision=target_entry.precision,
                            max_context=target_entry.max_context, quantize=quantize, onnx_path=staging / "head.onnx")
            del embed_table
            np.save(staging / "head.vocab.npy", vocab_ids)
            for name in HEAD_FILES:
                fsync_file(staging / name)
        entry = {
            "role": "head",
            "arch": shape.to_json(),
            "precision": target_entry.precision,
            "max_context": target_entry.max_context,
            "logits_vocab": target_entry.logits_vocab,
            "vocab_ids": "head.vocab.npy",
            "graph": head_tensor_specs(shape, target_entry.precision),
            "quantization": ({"scheme": "int8", "block_size": 32, "accuracy_level": 4} if quantize != "none" else None),
            "backends": {"onnx": {"path": "head.onnx", "data": "head.onnx.data", "opset": 17,
                                  "contrib_ops": ["com.microsoft.MatMulNBits"] if quantize != "none" else []}},
            "training": {
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()
                           if k not in ("work_dir", "threads")},
                "steps": steps,
                "prompts": data.prompt_ids,
                "held_out_records": f"the first {HOLDOUT} of each shipped workload (the benchmark's)",
                "sequences": len(data.sequences),
                "tokens": data.tokens,
                "data_sha256": data.sources_hash,
                "validation": {**validation, "vocab_coverage": coverage},
                "loss_curve": curve,
                "collect_seconds": round(collect_seconds, 1),
                "seconds": round(time.perf_counter() - started, 1),
                "torch": torch.__version__,
            },
        }
        original = (bundle / MANIFEST_NAME).read_bytes()
        install_staged(bundle, {name: f"{staging.name}/{name}" for name in HEAD_FILES},
                       lambda where: _with_head(json.loads(original), entry, where), original)
    except BaseException:
        discard_staged(bundle, [staging])
        raise
    read_manifest(bundle)  # the result must load
    progress.say(f"    head: step-1 agreement {validation['agreement_1']:.3f}"
                 + (f", step-2 {validation['agreement_2']:.3f}" if "agreement_2" in validation else "")
                 + f" on held-out sequences; {entry['training']['seconds']:.0f} s in all")
    return entry
