"""The trained draft head as a drafter (`--draft head`): see compiler/head.py for what the head is.

The head reads the target's final hidden state (the target graph's `features` output) instead of tokens alone:
row r of its KV cache holds the pair (f_p, x_{p+1}) for position p = base + r, where f_p is the target's feature
at p. After a verification the target has computed features for the last committed token and the accepted
proposals; those pairs go into the head with the next proposal (one call), whose last row's output is the first
drafted token and the head's guess of the next feature. Each further drafted token feeds that guess back in
(one row per token). The guessed rows are dropped after the round: only pairs with the target's own features
stay cached, so a rejected draft costs nothing to undo and the head never needs a prompt read of its own beyond
one call over the prompt's features (the target computed them in its prefill).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spectrt.runtime.errors import BundleError, GenerationError

from .kv_cache import KVCache
from .manifest import HeadEntry
from .picker import TokenPicker


class OrtHead:
    """The head graph on ONNX Runtime (CPU) with its one-layer KV cache."""

    def __init__(self, onnx_path: Path, vocab_ids: np.ndarray, entry: HeadEntry, options, providers: list[str]):
        from .backends.onnxruntime_backend import _create_session, _import_ort, check_graph_io, session_options

        ort = _import_ort()
        self.session = _create_session(ort, onnx_path, session_options(ort, options), providers, "head")
        check_graph_io(self.session, entry.inputs, entry.outputs, role="head", onnx_path=onnx_path)
        if vocab_ids.shape != (entry.output_vocab,) or vocab_ids.min() < 0 or vocab_ids.max() >= entry.logits_vocab:
            raise BundleError(f"{entry.vocab_ids} does not hold {entry.output_vocab} token ids below "
                              f"{entry.logits_vocab}; the bundle is corrupt: retrain the head (`spectrt train-head`).")
        self.vocab_ids = vocab_ids  # [Vo] full-vocabulary id of each output row
        self.hidden_size = entry.hidden_size
        self.max_context = entry.max_context
        self.cache = KVCache(1, entry.max_context, entry.num_kv_heads, entry.head_dim, entry.precision)
        self._logits = np.zeros((1, 1, entry.output_vocab), np.float32)
        self._next = np.zeros((1, 1, entry.hidden_size), np.float32)

    @property
    def length(self) -> int:
        return self.cache.length

    def run(self, token_ids: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows (f_p, x_{p+1}) at head rows length..: token_ids [S], features [S, H] -> the last row's logits [Vo]
        and guessed next feature [H] (views into reused buffers). Rows are written, not committed."""
        count = len(token_ids)
        if self.cache.length + count > self.max_context:
            raise GenerationError(f"the draft head's context ({self.max_context}) is full.")
        binding = self.session.io_binding()
        ids = np.ascontiguousarray(token_ids, dtype=np.int64).reshape(1, -1)  # [1, S]
        feats = np.ascontiguousarray(features, dtype=np.float32).reshape(1, count, -1)  # [1, S, H]
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("features", feats)
        past_key, past_value = self.cache.past(0)
        new_key, new_value = self.cache.new_rows(0, count)
        dtype = self.cache.dtype
        for name, array in (("past_key_0", past_key), ("past_value_0", past_value)):
            binding.bind_input(name, "cpu", 0, dtype, array.shape, array.ctypes.data)
        for name, array in (("new_key_0", new_key), ("new_value_0", new_value)):
            binding.bind_output(name, "cpu", 0, dtype, array.shape, array.ctypes.data)
        binding.bind_output("logits", "cpu", 0, np.float32, self._logits.shape, self._logits.ctypes.data)
        binding.bind_output("next_features", "cpu", 0, np.float32, self._next.shape, self._next.ctypes.data)
        self.session.run_with_iobinding(binding)
        return self._logits[0, 0], self._next[0, 0]

    def commit(self, count: int) -> None:
        self.cache.commit(count)

    def rollback(self, length: int) -> None:
        self.cache.rollback(length)


class HeadDrafter:
    """Proposes with the trained head from the target's features (the target decoder must return them: the
    Generator loads a head only next to such a target)."""

    name = "head"
    uses_model = True

    def __init__(self, head: OrtHead, target):
        self.head = head
        self.target = target
        self.features = np.zeros((target.max_context, head.hidden_size), np.float32)  # [C, H] by position
        self.known = 0  # the target's features are known for positions base..known-1
        self.base = 0  # position of head row 0
        self.sequence: list[int] = []  # the tokens those features belong to (for prefix reuse)
        self.guessed_rows = 0  # head rows of the last proposal fed with the head's own guesses
        self.draft_steps = 0  # head calls of the last proposal
        self._full_logits = np.full(target.vocab, -np.inf, np.float32)  # [V]; ids outside the head's stay -inf

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        rows = self.target.last_features  # [S, H]: the prefill's positions L-S..L-1 (a reused prefix is not in it)
        length = len(prompt_ids)
        first = length - len(rows)
        common = 0
        if reuse_prefix:
            for cached, wanted in zip(self.sequence[: self.known], prompt_ids):
                if cached != wanted:
                    break
                common += 1
        if first > common or self.base > 0:  # features of positions before `first` are not known: start there
            self.base = first
            self.head.rollback(0)
        else:  # keep the head rows of pairs whose next token still matches
            self.head.rollback(min(self.head.length, max(0, common - 1 - self.base)))
        self.features[first:length] = rows
        self.known = length
        self.sequence = list(prompt_ids)
        self.guessed_rows = 0

    def behind(self, tokens: list[int]) -> int:
        return self.known - self.base - self.head.length

    def catch_up(self, tokens: list[int]) -> None:
        # a pending pair or two go in with the next proposal; many (the prompt, after plain rounds) go in here
        if self.behind(tokens) > 2:
            start, end = self.base + self.head.length, self.known - 1
            self.head.run(np.asarray(tokens[start + 1 : end + 1]), self.features[start:end])
            self.head.commit(end - start)

    def propose(self, tokens, k, picker: TokenPicker):
        self.draft_steps = 0
        if k == 0:
            return np.zeros(0, np.int64), None
        start = self.base + self.head.length  # the pending pairs: positions start..known-1
        logits, guess = self.head.run(np.asarray(tokens[start + 1 : self.known + 1]), self.features[start : self.known])
        self.head.commit(self.known - start)
        walk = picker.constraint.fork() if picker.constraint is not None else None
        proposal: list[int] = []
        draft_probs: list[np.ndarray | None] = []
        self.guessed_rows = 0
        while True:
            picked = self._pick(logits, walk, picker, len(tokens) + len(proposal))
            if picked is None:
                break
            proposal.append(picked[0])
            draft_probs.append(picked[1])
            if len(proposal) == k or len(tokens) + len(proposal) >= self.head.max_context \
                    or self.head.length + 1 > self.head.max_context:
                break
            logits, guess = self.head.run(np.asarray(proposal[-1:]), guess[None, :].copy())  # its own guess back in
            self.head.commit(1)
            self.guessed_rows += 1
        self.draft_steps = 1 + self.guessed_rows  # the call over the pending pairs, then one per guess fed back
        probs_out = None if not draft_probs or draft_probs[0] is None else np.stack(draft_probs)  # [n, V]
        return np.asarray(proposal, dtype=np.int64), probs_out

    def _pick(self, logits: np.ndarray, walk, picker: TokenPicker, position: int
              ) -> tuple[int, np.ndarray | None] | None:
        """The drafted token at `position` from the head's logits [Vo] (and its probabilities [V] when the rule
        needs them); None where a constraint allows nothing after the proposal so far."""
        if walk is None and picker.params.greedy:  # the argmax over the head's ids is the argmax over all ids
            return int(self.head.vocab_ids[int(np.argmax(logits))]), None
        full = self._full_logits  # [V], -inf outside the head's ids
        full[self.head.vocab_ids] = logits
        if walk is not None:
            try:
                full = walk.masked(full)
            except GenerationError:  # a dead end of the grammar after our proposal: the target decides
                return None
        token, probs = picker.draft_token(full, position)
        if walk is not None:
            walk.consume([token])
        return token, probs

    def accepted(self, tokens, proposal_len, accepted) -> None:
        # the target's features of the last committed token before the round and the accepted proposals
        rows = self.target.last_features[: accepted + 1]  # [a+1, H]
        first = len(tokens) - accepted - 2
        self.features[first : first + len(rows)] = rows
        self.known = first + len(rows)
        self.sequence = tokens  # the request's committed tokens (the loop only appends to them)
        self.head.rollback(self.head.length - self.guessed_rows)
        self.guessed_rows = 0


def load_head(manifest, options, providers: list[str]) -> OrtHead:
    entry: HeadEntry = manifest.head
    if entry.onnx_path is None:
        raise BundleError("the bundle's draft head has no ONNX graph; retrain it (`spectrt train-head`).")
    onnx_path = manifest.file(entry.onnx_path)
    if entry.onnx_data is not None:
        manifest.file(entry.onnx_data)
    try:
        vocab_ids = np.load(manifest.file(entry.vocab_ids), allow_pickle=False).astype(np.int64)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{entry.vocab_ids} cannot be read ({exc}); retrain the head (`spectrt train-head`).") from exc
    return OrtHead(onnx_path, vocab_ids, entry, options, providers)
