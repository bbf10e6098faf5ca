"""Draft/target pairing: both models must speak exactly the same tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from spectrt.errors import PairMismatchError


@dataclass(frozen=True)
class TokenizerFacts:
    """The parts of a tokenizer that decide which ids mean which text."""

    vocab: dict[str, int]
    merges: tuple[str, ...]
    added_tokens: tuple[tuple[int, str, bool], ...]  # (id, content, special)
    eos_token_id: int | None
    bos_token_id: int | None
    size: int  # len(tokenizer): every id the tokenizer can produce

    @classmethod
    def of(cls, tokenizer: Any) -> "TokenizerFacts":
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        model = backend.get("model", {})
        merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model.get("merges", []) or [])
        vocab = model.get("vocab") or {}
        if isinstance(vocab, list):  # unigram: [[piece, score], ...]
            vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
        added = tuple(sorted((int(t["id"]), t["content"], bool(t.get("special"))) for t in backend.get("added_tokens", [])))
        return cls(vocab=dict(vocab), merges=merges, added_tokens=added, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id, size=len(tokenizer))


def _first_differences(a: dict[str, int], b: dict[str, int], limit: int = 3) -> list[str]:
    diffs = []
    for token in sorted(set(a) | set(b), key=lambda t: (a.get(t, b.get(t, 0)), t)):
        if a.get(token) != b.get(token):
            diffs.append(f"{token!r}: target {a.get(token)} vs draft {b.get(token)}")
            if len(diffs) == limit:
                break
    return diffs


def check_pair(target_tokenizer: Any, draft_tokenizer: Any) -> TokenizerFacts:
    """Refuse a pair whose tokenizers differ in vocab, merges, special tokens or eos/bos; returns the shared facts."""
    target, draft = TokenizerFacts.of(target_tokenizer), TokenizerFacts.of(draft_tokenizer)
    problems = []
    if target.vocab != draft.vocab:
        problems.append(f"vocabularies differ ({len(target.vocab)} vs {len(draft.vocab)} entries; first differences: "
                        + "; ".join(_first_differences(target.vocab, draft.vocab)) + ")")
    if target.merges != draft.merges:
        problems.append(f"BPE merges differ ({len(target.merges)} vs {len(draft.merges)} merges)")
    if target.added_tokens != draft.added_tokens:
        only_target = sorted(set(target.added_tokens) - set(draft.added_tokens))[:3]
        only_draft = sorted(set(draft.added_tokens) - set(target.added_tokens))[:3]
        problems.append(f"special/added tokens differ (target only: {only_target}, draft only: {only_draft})")
    if target.eos_token_id != draft.eos_token_id:
        problems.append(f"eos token id differs (target {target.eos_token_id}, draft {draft.eos_token_id})")
    if target.bos_token_id != draft.bos_token_id:
        problems.append(f"bos token id differs (target {target.bos_token_id}, draft {draft.bos_token_id})")
    if problems:
        raise PairMismatchError(
            "draft and target do not share a tokenizer, so the draft's token ids would mean different text "
            "to the target: " + "; ".join(problems) + ". Pick a draft from the same model family "
            "(same tokenizer), e.g. a smaller size of the target's series."
        )
    return target


def shared_logits_vocab(facts: TokenizerFacts, target_vocab_size: int, draft_vocab_size: int) -> int:
    """Logit rows both graphs emit: the tokenizer's ids. Extra padded rows of either model are cut
    off explicitly at export, so both graphs return logits of exactly this width."""
    for role, rows in (("target", target_vocab_size), ("draft", draft_vocab_size)):
        if rows < facts.size:
            raise PairMismatchError(
                f"the {role} model has {rows} embedding rows but the tokenizer produces ids up to {facts.size - 1}; "
                f"the model and tokenizer do not belong together."
            )
    return facts.size
