"""Drafters propose the next k tokens cheaply. One protocol, several implementations.

A drafter sees the committed token sequence (prompt + output, last token included) and proposes
up to k tokens; after verification it is told how many of them the target accepted.

Under a structured-output constraint (`picker.constraint`) every drafter proposes only tokens the
constraint allows: it walks a copy of the committed matcher state along its proposal (the model
drafter masks its logits with it, so with sampling its probabilities are taken under the constraint;
n-gram proposals are cut where the constraint refuses them). Grammar-forced drafting (`grammar`,
`grammar+model`, `grammar+ngram`) proposes the tokens the constraint forces (the only continuation
it allows) at no model cost, and at branch points hands over to the model or the n-gram lookup (or,
alone, stops the proposal there).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from spectrt.runtime.errors import GenerationError

from .constraints import ConstraintMetrics, MatcherView
from .picker import TokenPicker
from .suffix_cache import CacheView

Reader = Callable[[int, int, list[int]], "int | None"]  # (start, offset, drafted) -> a candidate's next token

DRAFTERS = ("model", "head", "ngram", "ngram+model", "ngram+head", "none", "grammar", "grammar+model",
            "grammar+ngram")


class Drafter(Protocol):
    name: str
    uses_model: bool
    draft_steps: int  # draft model steps the latest proposal computed (grammar-forced tokens and model-free
    # lookups take none): what the width scheduler prices a model draft by

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        """A new request: `prompt_ids` is the prompt (already prefilled into the target); with reuse_prefix,
        cached state of a common prefix from an earlier request may be kept."""

    def catch_up(self, tokens: list[int]) -> None:
        """Absorb committed tokens this drafter has not seen (after plain rounds); timed apart from drafting."""

    def behind(self, tokens: list[int]) -> int:
        """Committed tokens a model would have to read before proposing (0 for a drafter that reads for free)."""

    def propose(self, tokens: list[int], k: int, picker: TokenPicker) -> tuple[np.ndarray, np.ndarray | None]:
        """Up to k proposed tokens [n<=k] for positions len(tokens).., and their draft probabilities
        [n, V] (None: the picker's rule does not need them, or the drafter is deterministic)."""

    def accepted(self, tokens: list[int], proposal_len: int, accepted: int) -> None:
        """The target accepted `accepted` of the last proposal; `tokens` is the new committed sequence."""


class NoDrafter:
    """Plain decoding of the target: the baseline every measurement compares against."""

    name = "none"
    uses_model = False
    draft_steps = 0

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        pass

    def catch_up(self, tokens: list[int]) -> None:
        pass

    def behind(self, tokens: list[int]) -> int:
        return 0

    def propose(self, tokens, k, picker):
        return np.zeros(0, np.int64), None

    def accepted(self, tokens, proposal_len, accepted) -> None:
        pass


class NgramDrafter:
    """Prompt lookup: continue the longest suffix of the sequence that occurred before with what followed it.
    Model-free; shines when the output copies from the input (extraction, editing, code, summarisation).

    - Index: every n-gram of the committed sequence (n = min_ngram..8) maps to the positions that followed its
      occurrences, updated as tokens are committed, so a lookup costs the same however long the sequence.
    - Candidates: the `max_candidates` latest occurrences of the longest matching suffix (8 tokens down to
      min_ngram; those of an 8-token match are compared further back, up to max_ngram tokens, and only the longest
      matches kept). Token by token they vote: the token most of them continue with is drafted (a tie: the one the
      latest of them continues with), and only those that agree go on. A continuation that reaches the end of the
      sequence reads on in the draft itself, so a repeating pattern keeps repeating.
    - Width: every drafted token gets a confidence, the hit rate of its kind of match (one candidate, several
      agreeing, contested; and match length, the suffix matched plus the tokens drafted after it) in this request
      so far, shrunk towards a prior; the draft stops where the chance that all its tokens are accepted (the
      product) falls below `min_confidence`. Rates are learned from the committed tokens, the first token after a
      draft included, so a kind of match the width left out is still judged.
    - Across requests (`cache`, a `suffix_cache.CacheView`): where earlier requests' prompts and outputs match the
      end of the sequence further back than the request itself does, their continuations vote instead (kinds of
      match `cache-...`, hit rates kept apart); a continuation stops at the end of the earlier sequence.
    Deterministic: a proposal depends on the committed tokens, the widths of earlier rounds and (with a cache) the
    requests the cache holds.
    """

    uses_model = False
    draft_steps = 0

    def __init__(self, max_ngram: int = 16, min_ngram: int = 1, grammar_forced: bool = False, max_candidates: int = 32,
                 min_confidence: float = 0.2, cache: CacheView | None = None):
        assert 1 <= min_ngram <= max_ngram and max_candidates >= 1 and 0.0 <= min_confidence <= 1.0
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.indexed_ngram = min(max_ngram, max(min_ngram, _INDEXED_NGRAM))  # longer: compared on the candidates
        self.max_candidates = max_candidates
        self.min_confidence = min_confidence
        self.forced = ForcedRuns() if grammar_forced else None
        self.name = "grammar+ngram" if grammar_forced else "ngram"
        self.cache = cache
        self._reset()

    def _reset(self) -> None:
        self._tokens: list[int] = []  # the indexed sequence: committed tokens (and, during a lookup, the proposal)
        self._index: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions that followed it, ascending
        self._rates: dict[tuple[str, int], list[int]] = {}  # kind of match -> [tokens accepted, tokens judged]
        self._round_start = 0  # len(tokens) when the latest proposal was made
        self._drafts: list[tuple[int, list[int], list[tuple[str, int]]]] = []  # its lookups: position, tokens, kinds

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        self._reset()
        self._append(prompt_ids)

    def catch_up(self, tokens: list[int]) -> None:
        self._sync(tokens)

    def behind(self, tokens: list[int]) -> int:
        return 0  # indexing is cheap: done with every lookup

    def propose(self, tokens, k, picker):
        self._sync(tokens)
        self._round_start, self._drafts = len(tokens), []
        if picker.constraint is None:
            return np.asarray(self._lookup(k, None), dtype=np.int64), None
        walk = picker.constraint.fork()
        proposal: list[int] = []
        if self.forced is not None:
            self.forced.start_round(picker.constraint.metrics)
        while len(proposal) < k:
            if self.forced is not None and self.forced.extend(proposal, walk, k):
                continue
            self._append(proposal)  # looked up as if committed, then taken out again
            try:
                follow = self._lookup(k - len(proposal), walk)
            finally:
                self._truncate(len(tokens))
            if not follow:
                break
            walk.consume(follow)
            proposal.extend(follow)
            if self.forced is None:  # plain n-gram drafting: one lookup per round, as without a constraint
                break
        return np.asarray(proposal, dtype=np.int64), None

    def accepted(self, tokens, proposal_len, accepted) -> None:
        if self.forced is not None:
            self.forced.accepted(accepted)
        self._sync(tokens)
        for position, drafted, kinds in self._drafts:
            if position - self._round_start > accepted:  # drafted after a rejected token: its context never was
                continue
            for offset, (token, kind) in enumerate(zip(drafted, kinds)):
                if position + offset >= len(tokens):
                    break
                rate = self._rates.setdefault(kind, [0, 0])
                hit = int(tokens[position + offset]) == token
                rate[0] += hit
                rate[1] += 1
                if not hit:
                    break
        self._drafts = []

    def sure_run(self, tokens: list[int], k: int, min_chance: float) -> int:
        """How many of the next (up to k) tokens the lookup would draft with a chance of at least `min_chance` that
        all are accepted (no bookkeeping: the round's proposal is made by `propose`)."""
        self._sync(tokens)
        drafted, kinds, _, _ = self._draft(k)
        return len(self._confident(drafted, kinds, min_chance))

    def continuation(self, tokens: list[int], proposal, count: int) -> list[int]:
        """Up to `count` tokens continuing the committed `tokens` and this round's `proposal`, by the latest matches,
        with no confidence cut and no bookkeeping: free guesses for rows a target call computes anyway."""
        self._sync(tokens)
        self._append(proposal)  # looked up as if committed, then taken out again
        try:
            return self._draft(count)[0]
        finally:
            self._truncate(len(tokens))

    # -- the index ------------------------------------------------------------------------------------------------

    def _sync(self, tokens: list[int]) -> None:
        """Index the committed tokens not indexed yet. Committed tokens never change; a sequence that does not extend
        the indexed one (another request's, without `start`) is indexed afresh."""
        seen = len(self._tokens)
        if seen and (len(tokens) < seen or int(tokens[0]) != self._tokens[0]
                     or int(tokens[seen - 1]) != self._tokens[-1]):
            self._reset()
            seen = 0
        if len(tokens) > seen:
            self._append(tokens[seen:])

    def _append(self, new_tokens) -> None:
        sequence, index = self._tokens, self._index
        for token in new_tokens:
            end = len(sequence)  # the new token's position: it follows the n-grams ending just before it
            window = sequence[max(0, end - self.indexed_ngram) : end]
            for n in range(self.min_ngram, len(window) + 1):
                positions = index.setdefault(tuple(window[len(window) - n :]), [])
                positions.append(end)
            sequence.append(int(token))

    def _truncate(self, length: int) -> None:
        """Take the tokens after `length` out of the index again (a proposal looked up under a constraint)."""
        sequence, index = self._tokens, self._index
        while len(sequence) > length:
            sequence.pop()
            end = len(sequence)
            window = sequence[max(0, end - self.indexed_ngram) : end]
            for n in range(self.min_ngram, len(window) + 1):
                key = tuple(window[len(window) - n :])
                positions = index[key]
                positions.pop()
                if not positions:
                    del index[key]

    # -- lookup -----------------------------------------------------------------------------------------------------

    def _lookup(self, k: int, walk: MatcherView | None) -> list[int]:
        """Up to k tokens continuing the indexed sequence, as confident as `min_confidence` asks; under a constraint,
        the prefix of them it allows, or if it allows none, the allowed prefix of the latest continuation that has
        one (as plain prompt lookup would)."""
        drafted, kinds, candidates, read = self._draft(k)
        if drafted:
            self._drafts.append((len(self._tokens), drafted, kinds))
        follow = self._confident(drafted, kinds)
        if walk is None or not follow:
            return follow
        allowed = walk.valid_prefix(follow)
        if allowed:
            return follow[:allowed]
        for start in reversed(candidates):
            other: list[int] = []
            for _ in follow:
                token = read(start, len(other), other)
                if token is None:
                    break
                other.append(token)
            allowed = walk.valid_prefix(other)
            if allowed:
                return other[:allowed]
        return []

    def _token_at(self, position: int, drafted: list[int]) -> int:
        """The token at `position` of the indexed sequence followed by `drafted`."""
        sequence = self._tokens
        return sequence[position] if position < len(sequence) else drafted[position - len(sequence)]

    def _draft(self, k: int) -> tuple[list[int], list[tuple[str, int]], list[int], Reader]:
        """Up to k tokens voted by the latest occurrences of the longest matching suffix (in the request, or in the
        cache where that matches further back), each with its kind of match; those occurrences (the positions that
        followed them) and how to read on from one."""
        sequence = self._tokens
        length = len(sequence)
        n, candidates = 0, []
        for size in range(min(self.indexed_ngram, length - 1), self.min_ngram - 1, -1):
            occurrences = self._index.get(tuple(sequence[length - size :]))
            if occurrences:
                n, candidates = size, occurrences[-self.max_candidates :]
                break
        if n == self.indexed_ngram < self.max_ngram:  # the longest indexed n-gram: keep those that match longest
            further = [_common_suffix(sequence, start - n, length - n, self.max_ngram - n) for start in candidates]
            longest = max(further)
            candidates = [start for start, extra in zip(candidates, further) if extra == longest]
            n += longest
        cached = self.cache.match(sequence) if self.cache is not None and length else None
        if cached is not None and cached.length > n:  # an earlier request matches further back
            store = self.cache
            drafted, kinds = self._vote(k, cached.positions, cached.length, store.read, "cache-")
            return drafted, kinds, cached.positions, store.read
        if not candidates:
            return [], [], [], self._read
        drafted, kinds = self._vote(k, candidates, n, self._read, "")
        return drafted, kinds, candidates, self._read

    def _read(self, start: int, offset: int, drafted: list[int]) -> int:
        """The token `offset` after position `start` of the request, reading on into `drafted` past its end."""
        return self._token_at(start + offset, drafted)

    def _vote(self, k: int, candidates: list[int], n: int, read: Reader, source: str):
        """Token by token, the continuation most candidates agree on (a tie: the latest's), and its kinds of match."""
        agreeing = candidates
        drafted: list[int] = []
        kinds: list[tuple[str, int]] = []
        while len(drafted) < k:
            votes: dict[int, list[int]] = {}
            for start in agreeing:
                token = read(start, len(drafted), drafted)
                if token is not None:  # None: an earlier request's sequence ended here
                    votes.setdefault(token, []).append(start)
            if not votes:
                break
            token, backers = max(votes.items(), key=lambda item: (len(item[1]), item[1][-1]))
            support = "single" if len(agreeing) == 1 else "agreed" if len(backers) == len(agreeing) else "contested"
            kinds.append((source + support, _match_bucket(n + len(drafted))))
            drafted.append(token)
            agreeing = backers
        return drafted, kinds

    def _confident(self, drafted: list[int], kinds: list[tuple[str, int]], min_chance: float | None = None) -> list[int]:
        """The longest prefix of `drafted` whose tokens are all accepted with a chance of at least min_chance
        (default: min_confidence)."""
        threshold = self.min_confidence if min_chance is None else min_chance
        chance = 1.0
        for i, kind in enumerate(kinds):
            accepted, judged = self._rates.get(kind, (0, 0))
            prior = _MATCH_PRIOR[(kind[0].removeprefix("cache-"), kind[1])]  # the same prior across requests
            chance *= (accepted + _PRIOR_WEIGHT * prior) / (judged + _PRIOR_WEIGHT)
            if chance < threshold:
                return drafted[:i]
        return drafted


def _common_suffix(sequence: list[int], a: int, b: int, limit: int) -> int:
    """How many tokens (at most `limit`) before positions a and b of `sequence` agree."""
    count = 0
    while count < limit and count < a and sequence[a - 1 - count] == sequence[b - 1 - count]:
        count += 1
    return count


def _match_bucket(length: int) -> int:
    """Match lengths 1, 2, 3-4, 5-7, 8+ -> 1, 2, 3, 5, 8."""
    return 8 if length >= 8 else 5 if length >= 5 else 3 if length >= 3 else length


# Prior acceptance of a drafted token (its predecessors accepted) by kind of match, worth _PRIOR_WEIGHT judged tokens.
# Deliberately above what plain text gives (there, about 0.25 for a 1-token match with one candidate, 0.15 when
# candidates disagree): a request starts close to plain prompt lookup, proposing whole continuations, and its own
# hit rates take over within a few rounds, short drafts where it does not copy, long ones where it does.
_MATCH_PRIOR = {
    **{("single", m): p for m, p in ((1, 0.7), (2, 0.8), (3, 0.85), (5, 0.9), (8, 0.95))},
    **{("agreed", m): p for m, p in ((1, 0.85), (2, 0.9), (3, 0.9), (5, 0.95), (8, 0.95))},
    **{("contested", m): 0.5 for m in (1, 2, 3, 5, 8)},
}
_PRIOR_WEIGHT = 2.0
_INDEXED_NGRAM = 8  # longest n-gram in the index (memory grows with it)


class ModelDrafter:
    """The bundle's draft model, decoding one token per step against its own KV cache."""

    uses_model = True

    def __init__(self, decoder, grammar_forced: bool = False):
        self.decoder = decoder  # a backends.base.Decoder
        self.forced = ForcedRuns() if grammar_forced else None
        self.name = "grammar+model" if grammar_forced else "model"
        self.draft_steps = 0

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        # keep the cached rows of a common prefix; the rest of the prompt is read by `catch_up` before the first
        # proposal, so a request that never speculates (auto found plain decoding faster) never pays for it
        context = prompt_ids[:-1]  # the last prompt token is fed with the first proposal
        self.decoder.reuse(context, len(context) if reuse_prefix else 0)

    def catch_up(self, tokens: list[int]) -> None:
        # normally 1 or 2 committed tokens are new to the draft (2 after a fully accepted round) and are
        # fed with its first proposal step; before its first proposal (the prompt) and after plain rounds
        # more are, and they go in as one prefill
        if len(tokens) - self.decoder.length > 2:
            self.decoder.step(np.asarray(tokens[self.decoder.length : -1], dtype=np.int64))
            self.decoder.commit(len(tokens) - 1 - self.decoder.length)

    def behind(self, tokens: list[int]) -> int:
        return len(tokens) - self.decoder.length

    def propose(self, tokens, k, picker):
        self.draft_steps = 0
        if k == 0:
            return np.zeros(0, np.int64), None
        if picker.constraint is not None:
            return self._propose_constrained(tokens, k, picker)
        pending = np.asarray(tokens[self.decoder.length :], dtype=np.int64)  # 1, or 2 after a full accept
        proposal = np.zeros(k, np.int64)
        draft_probs = []
        for i in range(k):
            logits = self.decoder.step(pending)[-1]  # [V]
            self.decoder.commit(len(pending))
            self.draft_steps += 1
            proposal[i], probs = picker.draft_token(logits, len(tokens) + i)
            draft_probs.append(probs)
            pending = proposal[i : i + 1]
        # the last proposed token was never fed: it stays pending like any committed token would
        return proposal, (None if draft_probs[0] is None else np.stack(draft_probs))  # [k], [k, V] | None

    def _propose_constrained(self, tokens, k, picker):
        """Draft logits masked by a copy of the constraint walking the proposal; with grammar forcing, forced runs
        are taken from the grammar and fed to the draft model with its next step (never stepped for alone)."""
        walk = picker.constraint.fork()
        pending = list(tokens[self.decoder.length :])  # committed (or forced) tokens the draft has not seen yet
        proposal: list[int] = []
        draft_probs: list[np.ndarray | None] = []  # None: a forced token (a point mass)
        if self.forced is not None:
            self.forced.start_round(picker.constraint.metrics)
        while len(proposal) < k and not walk.finished:
            if self.forced is not None:
                before = len(proposal)
                if self.forced.extend(proposal, walk, k):
                    pending.extend(proposal[before:])
                    draft_probs.extend([None] * (len(proposal) - before))
                    continue
            logits = self.decoder.step(np.asarray(pending, dtype=np.int64))[-1]  # [V]
            self.decoder.commit(len(pending))
            self.draft_steps += 1  # forced tokens in `pending` ride along: they cost no step of their own
            try:
                logits = walk.masked(logits)
            except GenerationError:  # a dead end of the grammar after our proposal: the target decides
                break
            token, probs = picker.draft_token(logits, len(tokens) + len(proposal))
            walk.consume([token])
            proposal.append(token)
            draft_probs.append(probs)
            pending = [token]
        # the tokens in `pending` were never fed: they stay pending like committed tokens would
        return np.asarray(proposal, dtype=np.int64), _stack_draft_probs(proposal, draft_probs, picker)

    def accepted(self, tokens, proposal_len, accepted) -> None:
        if self.forced is not None:
            self.forced.accepted(accepted)
        if proposal_len == 0:  # a plain target step: nothing of ours to drop
            return
        # rows for the rejected proposals (and the unfed last one) are dropped by moving the length
        keep = len(tokens) - 1 - (1 if accepted == proposal_len else 0)
        self.decoder.rollback(min(self.decoder.length, keep))


class LookupFirstDrafter:
    """N-gram lookup where it is confident, a model (the draft model or the draft head) elsewhere: `ngram+model`,
    `ngram+head`. Each round, the lookup (the request's tokens and, with a cache, earlier requests) drafts when the
    first `LOOKUP_MIN_RUN` tokens of its continuation are all accepted with a chance of at least
    `LOOKUP_MIN_CHANCE` (its per-request hit rates, as `NgramDrafter` keeps them): then no model step is paid, and
    the width scheduler is told how many tokens the lookup is that sure of. Elsewhere the model drafts (and first
    reads the tokens committed in lookup rounds). The lookup's hit rates are judged every round, whoever drafted.
    """

    def __init__(self, lookup: NgramDrafter, model, max_width: int):
        self.lookup = lookup
        self.model = model
        self.max_width = max_width
        self.name = f"ngram+{model.name}"
        self.draft_steps = 0
        self._decided_at: int | None = None  # len(tokens) the latest decision was made for
        self._sure_run = 0  # tokens the lookup is sure of this round (0: the model drafts)

    @property
    def uses_model(self) -> bool:
        return self._sure_run == 0

    @property
    def round_source(self) -> str:
        return "ngram" if self._sure_run else self.model.name

    def _decide(self, tokens: list[int]) -> None:
        if self._decided_at == len(tokens):
            return
        self._decided_at = len(tokens)
        run = self.lookup.sure_run(tokens, self.max_width, LOOKUP_MIN_CHANCE)
        self._sure_run = run if run >= LOOKUP_MIN_RUN else 0

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        self._decided_at, self._sure_run = None, 0
        self.lookup.start(prompt_ids, reuse_prefix)
        self.model.start(prompt_ids, reuse_prefix)

    def catch_up(self, tokens: list[int]) -> None:
        self._decide(tokens)
        self.lookup.catch_up(tokens)
        if not self._sure_run:
            self.model.catch_up(tokens)

    def behind(self, tokens: list[int]) -> int:
        self._decide(tokens)
        return 0 if self._sure_run else self.model.behind(tokens)

    def sure(self, tokens: list[int]) -> int:
        self._decide(tokens)
        return self._sure_run

    def propose(self, tokens, k, picker):
        self._decide(tokens)
        looked_up, _ = self.lookup.propose(tokens, k, picker)  # judged after the round whoever drafts
        if self._sure_run:
            self.draft_steps = 0
            return looked_up, None  # a point-mass draft
        proposal, draft_probs = self.model.propose(tokens, k, picker)
        self.draft_steps = self.model.draft_steps
        return proposal, draft_probs

    def accepted(self, tokens, proposal_len, accepted) -> None:
        self.lookup.accepted(tokens, proposal_len, accepted)
        if self._sure_run:
            self.model.accepted(tokens, 0, 0)  # it proposed nothing this round
        else:
            self.model.accepted(tokens, proposal_len, accepted)


LOOKUP_MIN_RUN = 3  # a lookup drafts instead of the model when it is sure of at least this many tokens
LOOKUP_MIN_CHANCE = 0.5  # that all of them are accepted


class ForcedRuns:
    """Grammar-forced drafting inside a drafter: appends the constraint's forced run to a proposal and counts
    forced tokens proposed and accepted (in the request's ConstraintMetrics)."""

    def __init__(self):
        self.positions: list[int] = []  # proposal offsets of this round's forced tokens
        self.metrics: ConstraintMetrics | None = None

    def start_round(self, metrics: ConstraintMetrics) -> None:
        self.positions = []
        self.metrics = metrics

    def extend(self, proposal: list[int], walk: MatcherView, k: int) -> bool:
        """Append up to k - len(proposal) forced tokens (consumed into `walk`); False when none is forced here."""
        run = walk.forced(k - len(proposal))
        self.positions.extend(range(len(proposal), len(proposal) + len(run)))
        proposal.extend(run)
        if self.metrics is not None:
            self.metrics.forced_tokens += len(run)
        return bool(run)

    def accepted(self, accepted: int) -> None:
        if self.metrics is not None:
            self.metrics.forced_accepted += sum(1 for p in self.positions if p < accepted)
        self.positions = []


class GrammarDrafter:
    """Grammar-forced drafts alone: the run of tokens the constraint forces, nothing at branch points
    (a draft miss there: the round is a plain target step). No model, no cost beyond the matcher."""

    name = "grammar"
    uses_model = False
    draft_steps = 0

    def __init__(self):
        self.forced = ForcedRuns()

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        pass

    def catch_up(self, tokens: list[int]) -> None:
        pass

    def behind(self, tokens: list[int]) -> int:
        return 0

    def propose(self, tokens, k, picker):
        proposal: list[int] = []
        if picker.constraint is not None and k:
            self.forced.start_round(picker.constraint.metrics)
            self.forced.extend(proposal, picker.constraint.fork(), k)
        return np.asarray(proposal, dtype=np.int64), None

    def accepted(self, tokens, proposal_len, accepted) -> None:
        self.forced.accepted(accepted)


def _stack_draft_probs(proposal: list[int], draft_probs: list[np.ndarray | None],
                       picker: TokenPicker) -> np.ndarray | None:
    """[n, V] draft probabilities for rejection sampling, forced tokens as point masses; None when the rule does
    not need them or every token was forced (None means point masses throughout)."""
    if not picker.wants_draft_probs or all(p is None for p in draft_probs):
        return None
    vocab = next(len(p) for p in draft_probs if p is not None)
    return np.stack([p if p is not None else _point_mass(vocab, token) for p, token in zip(draft_probs, proposal)])


def _point_mass(vocab: int, token: int) -> np.ndarray:
    row = np.zeros(vocab, np.float64)
    row[token] = 1.0
    return row


def make_drafter(kind: str, draft_decoder=None, constrained: bool = False, head=None, target=None,
                 cache: CacheView | None = None, max_width: int = 8) -> Drafter:
    """The drafter `kind` names; `cache`: earlier requests the n-gram drafters look up too; `max_width`: the
    widest verification built (how far a lookup-first drafter looks ahead)."""
    if kind.startswith("ngram+"):
        if constrained:
            raise GenerationError(f"draft '{kind}' does not take a constraint; under one use grammar+model or "
                                  f"grammar+ngram (or auto).")
        return LookupFirstDrafter(NgramDrafter(cache=cache), make_drafter(kind[len("ngram+"):], draft_decoder,
                                                                           head=head, target=target), max_width)
    if kind.startswith("grammar") and not constrained:
        raise GenerationError(f"draft '{kind}' proposes what a constraint forces; pass json_schema, regex, grammar "
                              f"or choice, or use draft model, ngram or none.")
    if kind == "none":
        return NoDrafter()
    if kind in ("ngram", "grammar+ngram"):
        return NgramDrafter(grammar_forced=kind == "grammar+ngram", cache=cache)
    if kind in ("model", "grammar+model"):
        if draft_decoder is None:
            raise GenerationError("this bundle has no draft model; use --draft ngram, grammar+ngram or none.")
        return ModelDrafter(draft_decoder, grammar_forced=kind == "grammar+model")
    if kind == "grammar":
        return GrammarDrafter()
    if kind == "head":
        if head is None:
            raise GenerationError("this bundle has no draft head; train one with `spectrt train-head BUNDLE`, or use "
                                  "--draft model, ngram or none.")
        from .head_drafter import HeadDrafter

        return HeadDrafter(head, target)
    raise GenerationError(f"unknown drafter '{kind}'; choose one of {', '.join(DRAFTERS)}.")
