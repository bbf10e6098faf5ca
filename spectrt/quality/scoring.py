"""Windows over a text, the reference's top-k summary, and the per-position metrics (numpy only).

Window scheme (the usual strided perplexity evaluation, every engine the same):

- the text's token ids (no special tokens) are cut into windows of `window` model positions; a window starts with
  the tokenizer's BOS when the bundle's tokenizer adds one (the model expects it), so it holds `window - 1` text
  tokens then, else `window`;
- consecutive windows start `stride` text tokens apart (default: half a window's text tokens);
- every text position is scored exactly once: the first window scores all of its positions (from the second text
  token, or the first after a BOS), every later window only its last `stride` positions, which were not scored
  before and have at least `window - stride` tokens of left context;
- an engine is teacher-forced: fed the window's tokens (all but the last), its logits at row r predict the
  window's token r + 1; only the scored rows' logits are read.

Log-probabilities are log-softmax in float64 of the fp32 logits.

KL(reference || engine) is computed from the reference's top-k log-probabilities, their ids, and the log of the
reference's remaining (tail) mass; the engine's full distribution is at hand. The k ids are scored exactly and
the tail is one bucket: KL_topk = sum_{i in topk} p_i log(p_i / q_i) + P_tail log(P_tail / Q_tail). Merging
outcomes never increases a KL divergence (log-sum inequality), so KL_topk <= KL exactly, short by
P_tail * KL(p restricted to the tail, renormalized || q likewise): it shrinks with the tail mass (measured on
SmolLM2-135M, int4 spectrt and llama.cpp vs fp32, mean KL 12% low at k=256 with 7.6% mean tail mass, 5% at
k=1024; docs/quality.md). The results report the reference's mean tail mass beside the KL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import QualityError

DEFAULT_TOP_K = 256  # SmolLM2-135M (a long-tailed small model): top-256 KL is ~12% below the exact KL
SCHEME_VERSION = 1  # bump when the windows, the stored summary or the log-prob arithmetic change


@dataclass(frozen=True)
class WindowScheme:
    """How a text is cut into model calls and which positions are scored (JSON: results and cache key)."""

    window: int  # model positions per window, BOS included
    stride: int  # text tokens between window starts
    bos: int | None  # token prepended to every window (None: the model uses none)
    top_k: int  # reference log-probs kept per position for KL
    version: int = SCHEME_VERSION

    def __post_init__(self) -> None:
        text = self.text_tokens
        if text < 2:
            raise QualityError(f"window {self.window} is too small: it must hold at least 2 text tokens.")
        if not 1 <= self.stride <= text:
            raise QualityError(f"stride {self.stride} must lie in 1..{text} (the text tokens of one window).")
        if self.top_k < 1:
            raise QualityError(f"top-k must be >= 1 (got {self.top_k}).")

    @property
    def text_tokens(self) -> int:
        """Text tokens per window (the window less its BOS)."""
        return self.window - (self.bos is not None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def default_scheme(max_context: int, bos: int | None, *, window: int = 0, top_k: int = DEFAULT_TOP_K) -> WindowScheme:
    """`window` positions (0: the engine's max context less 16 rows of headroom, in multiples of 64, at most 2048),
    stride half a window's text tokens."""
    if window <= 0:
        window = min(2048, max(64, (max_context - 16) // 64 * 64))
        window = min(window, max_context)
    if window > max_context:
        raise QualityError(f"window {window} exceeds the engine's usable context {max_context}; pass --window "
                           f"{max_context} or less.")
    text = window - (bos is not None)
    return WindowScheme(window=window, stride=max(1, text // 2), bos=bos, top_k=top_k)


@dataclass(frozen=True)
class Window:
    """One model call sequence: `tokens` are fed (all but the last); logits rows first_row..len-2 are scored and
    predict text positions start..end-1."""

    tokens: np.ndarray  # [L] int64: BOS (if any) + text[begin:end]
    first_row: int
    start: int  # first scored text position
    end: int  # one past the last scored text position

    @property
    def fed(self) -> np.ndarray:
        return self.tokens[:-1]

    @property
    def scored(self) -> int:
        return self.end - self.start


def make_windows(ids: np.ndarray, scheme: WindowScheme) -> list[Window]:
    ids = np.asarray(ids, dtype=np.int64)
    count = len(ids)
    offset = 1 if scheme.bos is not None else 0
    if count + offset < 2:
        raise QualityError("the text has too few tokens to score.")
    windows: list[Window] = []
    scored_to = 0 if offset else 1  # without a BOS the first token has no context and is never scored
    begin = 0
    while True:
        end = min(begin + scheme.text_tokens, count)
        if end > scored_to:
            tokens = ids[begin:end] if not offset else np.concatenate([[scheme.bos], ids[begin:end]]).astype(np.int64)
            # text position c sits at window index c - begin + offset; its logits row is one before
            windows.append(Window(tokens, scored_to - begin + offset - 1, scored_to, end))
            scored_to = end
        if end >= count:
            return windows
        begin += scheme.stride


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[R, V] fp32 logits -> float64 log-probabilities."""
    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    shifted = logits - peak
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _logsumexp(values: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of float64 [R, n]; -inf for a row of -inf."""
    peak = values.max(axis=-1)
    finite = np.isfinite(peak)
    safe = np.where(finite, peak, 0.0)
    with np.errstate(divide="ignore"):
        out = safe + np.log(np.exp(values - safe[:, None]).sum(axis=-1))
    return np.where(finite, out, -np.inf)


@dataclass
class TopK:
    """The reference at its scored positions: what KL, perplexity and top-1 need, without the full [T, V]."""

    ids: np.ndarray  # [P, k] int32, most likely first
    logp: np.ndarray  # [P, k] float64
    tail_logp: np.ndarray  # [P] float64: log of the probability mass outside the top k (-inf: none)
    true_logp: np.ndarray  # [P] float64: log-prob of the text's actual next token

    @property
    def argmax(self) -> np.ndarray:
        return self.ids[:, 0]

    def rows(self, start: int, stop: int) -> "TopK":
        return TopK(self.ids[start:stop], self.logp[start:stop], self.tail_logp[start:stop], self.true_logp[start:stop])

    @staticmethod
    def concat(parts: list["TopK"]) -> "TopK":
        return TopK(np.concatenate([p.ids for p in parts]), np.concatenate([p.logp for p in parts]),
                    np.concatenate([p.tail_logp for p in parts]), np.concatenate([p.true_logp for p in parts]))


def top_k_summary(logp: np.ndarray, true_ids: np.ndarray, k: int) -> TopK:
    """[R, V] float64 log-probs -> the top k (ids, log-probs, sorted descending), tail mass and true-token log-prob."""
    rows, vocab = logp.shape
    k = min(k, vocab)
    part = np.argpartition(-logp, k - 1, axis=1)[:, :k]
    part_logp = np.take_along_axis(logp, part, axis=1)
    order = np.argsort(-part_logp, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1)
    top = np.take_along_axis(part_logp, order, axis=1)
    rest = logp.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=1)
    true_logp = logp[np.arange(rows), np.asarray(true_ids)]
    return TopK(ids.astype(np.int32), top, _logsumexp(rest), true_logp)


def kl_top_k(ref: TopK, engine_logp: np.ndarray) -> np.ndarray:
    """Per row KL(reference || engine) over the reference's top k plus one tail bucket (a lower bound of the
    exact KL; see the module docstring). engine_logp: [R, V'] float64, the engine's full distribution."""
    if int(ref.ids.max(initial=0)) >= engine_logp.shape[1]:
        raise QualityError(f"the reference ranks token ids up to {int(ref.ids.max())} but the engine has only "
                           f"{engine_logp.shape[1]} outputs: they do not share a vocabulary.")
    engine_top = np.take_along_axis(engine_logp, ref.ids.astype(np.int64), axis=1)  # [R, k]
    ref_p = np.exp(ref.logp)
    head = (ref_p * (ref.logp - engine_top)).sum(axis=1)
    rest = engine_logp.copy()
    np.put_along_axis(rest, ref.ids.astype(np.int64), -np.inf, axis=1)
    engine_tail = _logsumexp(rest)
    tail_p = np.exp(ref.tail_logp)
    with np.errstate(invalid="ignore"):
        tail = np.where(tail_p > 0, tail_p * (ref.tail_logp - engine_tail), 0.0)
    return head + tail


def kl_exact(ref_logp: np.ndarray, engine_logp: np.ndarray) -> np.ndarray:
    """Per row KL(reference || engine) over the whole vocabulary (tests and the bound's measurement)."""
    ref_p = np.exp(ref_logp)
    with np.errstate(invalid="ignore"):
        terms = np.where(ref_p > 0, ref_p * (ref_logp - engine_logp), 0.0)
    return terms.sum(axis=1)


@dataclass
class PositionScores:
    """One engine's per-position results over a text's scored positions."""

    true_logp: np.ndarray  # [P] float64
    kl: np.ndarray | None  # [P] KL(reference || engine); None without a reference
    top1: np.ndarray | None  # [P] bool: engine argmax == reference argmax
    seconds: float

    def subset(self, mask: np.ndarray) -> "PositionScores":
        """The positions where `mask` ([P] bool) holds (seconds stay the whole pass's)."""
        pick = np.asarray(mask, dtype=bool)
        return PositionScores(self.true_logp[pick], None if self.kl is None else self.kl[pick],
                              None if self.top1 is None else self.top1[pick], self.seconds)

    def metrics(self, reference_true_logp: np.ndarray | None) -> dict[str, Any]:
        if not len(self.true_logp):
            raise QualityError("no scored positions: nothing to measure.")
        perplexity = float(np.exp(-self.true_logp.mean()))
        out: dict[str, Any] = {"positions": int(len(self.true_logp)), "perplexity": perplexity,
                               "perplexity_change_pct": None, "kl_mean": None, "kl_p99": None,
                               "top1_agreement_pct": None, "seconds": round(self.seconds, 3)}
        if reference_true_logp is not None:
            reference = float(np.exp(-reference_true_logp.mean()))
            out["perplexity_change_pct"] = 100.0 * (perplexity / reference - 1.0)
        if self.kl is not None:
            out["kl_mean"] = float(self.kl.mean())
            out["kl_p99"] = float(np.percentile(self.kl, 99))
            out["top1_agreement_pct"] = 100.0 * float(self.top1.mean())
        return out


class EngineAccumulator:
    """Collects an engine's logits rows window by window and compares them with the reference as they come."""

    def __init__(self, reference: TopK | None, true_ids: np.ndarray):
        self.reference = reference
        self.true_ids = np.asarray(true_ids, dtype=np.int64)  # [P] the text token each scored row predicts
        self.done = 0
        self.true_logp: list[np.ndarray] = []
        self.kl: list[np.ndarray] = []
        self.top1: list[np.ndarray] = []

    def add(self, logits: np.ndarray) -> None:
        """The next rows' fp32 logits [R, V], in scored-position order."""
        logp = log_softmax(logits)  # [R, V] float64
        rows = len(logp)
        stop = self.done + rows
        assert stop <= len(self.true_ids), "more logits rows than scored positions"
        self.true_logp.append(logp[np.arange(rows), self.true_ids[self.done:stop]])
        if self.reference is not None:
            ref = self.reference.rows(self.done, stop)
            self.kl.append(kl_top_k(ref, logp))
            self.top1.append(logp.argmax(axis=1) == ref.argmax)
        self.done = stop

    def result(self, seconds: float) -> PositionScores:
        assert self.done == len(self.true_ids), f"scored {self.done} of {len(self.true_ids)} positions"
        ref = self.reference is not None
        return PositionScores(np.concatenate(self.true_logp), np.concatenate(self.kl) if ref else None,
                              np.concatenate(self.top1) if ref else None, seconds)


def scored_true_ids(ids: np.ndarray, windows: list[Window]) -> np.ndarray:
    """The text token each scored row predicts, in order: [P]."""
    return np.concatenate([np.asarray(ids)[w.start:w.end] for w in windows]).astype(np.int64)

