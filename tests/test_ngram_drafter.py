"""The n-gram (prompt lookup) drafter: its lookups on hand-made sequences, its width, and its incremental index
against a brute-force reference over long runs of rounds."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrt.runtime.constraints import ConstraintMetrics
from spectrt.runtime.drafters import NgramDrafter, make_drafter
from spectrt.runtime.picker import TokenPicker
from spectrt.runtime.sampling import SamplingParams

PLAIN = TokenPicker(SamplingParams(), seed=None, vocab=64)


def propose(drafter: NgramDrafter, tokens: list[int], k: int, picker: TokenPicker = PLAIN) -> list[int]:
    proposal, probs = drafter.propose(tokens, k, picker)
    assert probs is None and proposal.dtype == np.int64 and len(proposal) <= k
    return proposal.tolist()


def full_width(**options) -> NgramDrafter:
    """A drafter that proposes every token it drafts (no width choice): its lookups alone."""
    return NgramDrafter(min_confidence=0.0, **options)


def reference_draft(sequence: list[int], k: int, max_ngram: int = 16, indexed: int = 8, min_ngram: int = 1,
                    max_candidates: int = 32) -> list[int]:
    """What the drafter drafts, found by scanning the whole sequence (no index): the latest max_candidates
    earlier occurrences of the longest suffix (indexed tokens at most, then those of an `indexed`-token match
    compared further back, up to max_ngram), voting token by token (most votes, a tie to the latest)."""
    length = len(sequence)
    for n in range(min(indexed, length - 1), min_ngram - 1, -1):
        suffix = sequence[length - n :]
        starts = [i + n for i in range(length - n) if sequence[i : i + n] == suffix]  # continuation positions
        if starts:
            break
    else:
        return []
    candidates = starts[-max_candidates:]
    if n == indexed < max_ngram:
        def further(start: int) -> int:
            count = 0
            while (count < max_ngram - n and start - n - 1 - count >= 0
                   and sequence[start - n - 1 - count] == sequence[length - n - 1 - count]):
                count += 1
            return count
        longest = max(further(start) for start in candidates)
        candidates = [start for start in candidates if further(start) == longest]
    extended = list(sequence)  # the draft reads on in itself
    drafted = []
    while len(drafted) < k:
        votes: dict[int, list[int]] = {}
        for start in candidates:
            votes.setdefault(extended[start + len(drafted)], []).append(start)
        token = max(votes, key=lambda t: (len(votes[t]), votes[t][-1]))
        drafted.append(token)
        extended.append(token)
        candidates = votes[token]
    return drafted


# -- lookups on hand-made sequences ---------------------------------------------------------------------------------

def test_no_earlier_occurrence_proposes_nothing():
    assert propose(full_width(), [1, 2, 3, 4, 5], 4) == []
    assert propose(full_width(), [7], 4) == []
    assert propose(full_width(), [], 4) == []


def test_longest_match_wins_over_a_later_shorter_one():
    # [1, 2, 3] occurred once (followed by 4, 5); the later [.., 3] only matches one token (followed by 9, 9)
    tokens = [1, 2, 3, 4, 5, 0, 3, 9, 9, 0, 1, 2, 3]
    assert propose(full_width(), tokens, 2) == [4, 5]
    assert reference_draft(tokens, 2) == [4, 5]


def test_matches_longer_than_the_index_are_compared_further_back():
    prefix_a, prefix_b = [10, 11], [20, 21]
    common = list(range(30, 38))  # 8 tokens: the longest indexed n-gram
    tokens = [*prefix_a, *common, 1, 1, 50, *prefix_b, *common, 2, 2, 50, *prefix_a, *common]
    # both earlier occurrences match the last 8 tokens; the first also matches the 2 before them: it wins
    assert propose(full_width(), tokens, 2) == [1, 1]
    assert propose(full_width(max_ngram=8), tokens, 2) == [2, 2]  # only 8 compared: the latest wins


def test_several_occurrences_vote_and_a_tie_goes_to_the_latest():
    # [4, 5] is followed by 6, 6 and 8: 6 has most votes although 8 is latest
    tokens = [4, 5, 6, 0, 4, 5, 6, 1, 4, 5, 8, 2, 4, 5]
    assert propose(full_width(), tokens, 1) == [6]
    # one vote each: the latest occurrence's continuation
    tokens = [4, 5, 6, 0, 4, 5, 8, 2, 4, 5]
    assert propose(full_width(), tokens, 2) == [8, 2]


def test_the_vote_narrows_to_the_agreeing_occurrences():
    # [7] is followed by [1, 2], [1, 3], [1, 3]: first 1 (all agree), then 3 (two of three)
    tokens = [7, 1, 2, 0, 7, 1, 3, 0, 7, 1, 3, 5, 7]
    assert propose(full_width(), tokens, 2) == [1, 3]


def test_a_repeating_pattern_continues_past_the_end_of_the_sequence():
    assert propose(full_width(), [1, 2, 1, 2, 1], 5) == [2, 1, 2, 1, 2]
    assert propose(full_width(), [9, 9, 9], 4) == [9, 9, 9, 9]


@given(st.lists(st.integers(0, 3), max_size=40), st.integers(0, 12))
@settings(max_examples=200, deadline=None)
def test_never_more_than_k_and_always_a_continuation_seen_before(tokens, k):
    proposal = propose(full_width(), tokens, k)
    assert len(proposal) <= k
    assert proposal == reference_draft(tokens, k)
    assert proposal == propose(full_width(), list(tokens), k)  # deterministic


# -- width ------------------------------------------------------------------------------------------------------------

def test_width_follows_the_requests_hit_rates():
    drafter = NgramDrafter()
    tokens, widths = [0], []
    for i in range(8):
        tokens += [100 + i, 200 + i, 300 + i, 100 + i]  # committed; a 1-token match with one candidate
        proposal = propose(drafter, tokens, 4)
        assert proposal == [200 + i, 300 + i, 100 + i, 200 + i][: len(proposal)]
        widths.append(len(proposal))
        tokens.append(7)  # the target disagrees with the first token, round after round
        drafter.accepted(tokens, len(proposal), 0)
    assert widths[0] == 4  # no history: the prior lets a whole continuation through
    assert widths == sorted(widths, reverse=True) and widths[-1] == 0  # then the misses shorten it to nothing
    assert drafter._rates == {("single", 1): [0, 8]}


def test_a_long_match_proposes_the_full_width():
    text = list(range(100, 130))
    tokens = [*text, 0, *text[:10]]  # a 10-token match: copying
    assert propose(NgramDrafter(), tokens, 8) == text[10:18]


def test_a_token_left_out_of_the_draft_is_still_judged():
    drafter = NgramDrafter(min_confidence=0.99)  # proposes nothing: nothing is certain enough
    tokens = [3, 4, 5, 6, 3]
    assert propose(drafter, tokens, 3) == []
    drafter.accepted([*tokens, 4], 0, 0)  # the target's token is what the draft would have said
    assert drafter._rates == {("single", 1): [1, 1]}


def test_min_confidence_zero_proposes_the_whole_draft_and_one_never_proposes():
    tokens = [1, 2, 3, 9, 1, 2]
    assert propose(NgramDrafter(min_confidence=0.0), tokens, 3) == [3, 9, 1]
    assert propose(NgramDrafter(min_confidence=1.0), tokens, 3) == []


# -- the index over rounds --------------------------------------------------------------------------------------------

def brute_index(tokens: list[int], low: int, high: int) -> dict[tuple[int, ...], list[int]]:
    index: dict[tuple[int, ...], list[int]] = {}
    for end in range(len(tokens)):
        for n in range(low, min(high, end) + 1):
            index.setdefault(tuple(tokens[end - n : end]), []).append(end)
    return index


@given(seed=st.integers(0, 2**32 - 1), alphabet=st.integers(2, 12), k=st.integers(1, 9),
       max_ngram=st.sampled_from([1, 3, 8, 16]), max_candidates=st.sampled_from([1, 4, 32]))
@settings(max_examples=40, deadline=None)
def test_index_matches_a_brute_force_scan_over_many_rounds(seed, alphabet, k, max_ngram, max_candidates):
    """A scripted loop (start, catch_up, propose, accepted) with random acceptance and plain rounds: every
    proposal equals the brute-force draft of the committed sequence, and the index holds exactly its n-grams."""
    rng = random.Random(seed)
    text = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 40))]
    while len(text) < 500:  # copies of earlier stretches and fresh tokens: long and short matches both
        if rng.random() < 0.5 and len(text) > 4:
            start = rng.randrange(len(text) - 3)
            text.extend(text[start : start + rng.randrange(2, 30)])
        else:
            text.extend(rng.randrange(alphabet) for _ in range(rng.randrange(1, 6)))
    prompt_length = rng.randrange(1, 60)
    drafter = full_width(max_ngram=max_ngram, max_candidates=max_candidates)
    drafter.start(text[:prompt_length])
    tokens = text[: prompt_length + 1]
    while len(tokens) < len(text):
        width = min(k, len(text) - len(tokens) - 1) if rng.random() < 0.8 else 0  # 0: a plain round
        if width:
            drafter.catch_up(tokens)
        proposal = propose(drafter, tokens, width)
        assert proposal == reference_draft(tokens, width, max_ngram, min(8, max_ngram), 1, max_candidates)
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == text[len(tokens) + accepted]:
            accepted += 1
        tokens = text[: len(tokens) + accepted + 1]
        drafter.accepted(tokens, len(proposal), accepted)
    assert drafter._tokens == tokens
    assert drafter._index == brute_index(tokens, 1, min(8, max_ngram))


def test_a_sequence_that_does_not_extend_the_indexed_one_is_indexed_afresh():
    drafter = full_width()
    drafter.start([1, 2, 3, 1])
    assert propose(drafter, [1, 2, 3, 1], 2) == [2, 3]
    other = [7, 8, 9, 7]  # another request's tokens without start
    assert propose(drafter, other, 2) == [8, 9]
    assert drafter._index == brute_index(other, 1, 8)


def test_lookups_in_a_long_sequence_match_the_reference():
    rng = random.Random(0)
    text = [rng.randrange(30) for _ in range(5000)]
    text += text[1000:1040]  # a long copy at the end
    drafter = full_width()
    drafter.start(text[:4000])
    for end in (4001, 4500, 5001, 5020, len(text)):
        assert propose(drafter, text[:end], 8) == reference_draft(text[:end], 8)


# -- under a constraint -----------------------------------------------------------------------------------------------

class FakeView:
    """A constraint that allows any token but those in `refused`, and forces the runs in `forced_after`
    (keyed by the token before them)."""

    def __init__(self, refused=(), forced_after=None, last=None, metrics=None):
        self.refused, self.forced_after, self.last = set(refused), dict(forced_after or {}), last
        self.metrics = metrics or ConstraintMetrics("fake")

    def fork(self):
        return FakeView(self.refused, self.forced_after, self.last, self.metrics)

    def valid_prefix(self, tokens):
        return next((i for i, t in enumerate(tokens) if t in self.refused), len(tokens))

    def consume(self, tokens):
        for token in tokens:
            assert token not in self.refused
            self.last = token

    def forced(self, limit):
        run = list(self.forced_after.pop(self.last, []))[:limit]
        self.consume(run)
        return run


def constrained(view: FakeView) -> TokenPicker:
    return TokenPicker(SamplingParams(), seed=None, vocab=64, constraint=view)


def test_constrained_proposals_are_cut_where_refused_and_fall_back_to_an_allowed_continuation():
    tokens = [4, 5, 6, 0, 4, 5, 6, 1, 4, 5, 8, 2, 4, 5]  # votes: 6 (twice) over 8, then 1 (a tie: the latest)
    assert propose(full_width(), tokens, 2, constrained(FakeView())) == [6, 1]
    assert propose(full_width(), tokens, 2, constrained(FakeView(refused={1}))) == [6]
    # 6 refused: the latest occurrence whose continuation the constraint allows
    assert propose(full_width(), tokens, 2, constrained(FakeView(refused={6}))) == [8, 2]
    assert propose(full_width(), tokens, 2, constrained(FakeView(refused={6, 8}))) == []


def test_grammar_forced_runs_then_lookups_that_read_the_forced_tokens_and_leave_the_index_as_it_was():
    drafter = make_drafter("grammar+ngram", constrained=True)
    drafter.min_confidence = 0.0
    tokens = [1, 2, 3, 4, 9, 1]
    view = FakeView(forced_after={1: [2]}, last=1)  # after the last token the grammar forces 2; then 3, 4, 9 by lookup
    proposal = propose(drafter, tokens, 4, constrained(view))
    assert proposal == [2, 3, 4, 9]
    assert view.metrics.forced_tokens == 1
    assert drafter._tokens == tokens and drafter._index == brute_index(tokens, 1, 8)
    drafter.accepted([*tokens, 2, 3, 7], 4, 2)
    assert view.metrics.forced_accepted == 1


def test_make_drafter_builds_the_ngram_drafters():
    assert make_drafter("ngram").name == "ngram" and make_drafter("ngram").forced is None
    forced = make_drafter("grammar+ngram", constrained=True)
    assert forced.name == "grammar+ngram" and forced.forced is not None and not forced.uses_model
