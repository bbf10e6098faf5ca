"""Structured output: JSON schema, regex, grammar and choice constraints as token masks (llguidance).

A request's constraint is compiled into an llguidance `LLMatcher` over the bundle's tokenizer. The
matcher answers, for the tokens committed so far, which next tokens keep the output inside the
language (a mask over the vocabulary), and which tokens the grammar forces outright (fast-forward
tokens). The runtime uses it in three places:

- the target: every verified position's logits are masked by the matcher state after the accepted
  prefix before the request's rule (argmax, race, rejection sampling) chooses a token, so constrained
  speculative output is constrained plain output (`picker.TokenPicker`);
- the drafters: proposals are masked too (a drafter walks a copy of the committed state, never the
  committed state itself), and with sampling the draft probabilities are taken under the same mask;
- grammar-forced drafts: where only one continuation is allowed, it is proposed without a model.

The committed matcher advances only by committed tokens; rejected proposals are walked on copies
(`RequestConstraint.fork`), so a rejection or rollback never touches it. End of sequence is allowed
only where the grammar accepts; once the grammar is complete (nothing but end of sequence is allowed)
generation ends with finish reason `eos`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from spectrt.runtime.errors import GenerationError

CONSTRAINT_KINDS = ("json_schema", "regex", "grammar", "choice")

# JSON is generated in one canonical layout unless the schema says otherwise ("x-guidance": {...}):
# `{"key": value, "other": value}` (the separators of Python's json.dumps, which is also how models
# usually write JSON inline). Fixed whitespace is what lets the grammar force keys, quotes and braces.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request asked for: `kind` (json_schema | regex | grammar | choice) and its text
    (the schema as JSON, the regular expression, the Lark grammar, or the choices as a JSON list)."""

    kind: str
    source: str

    def llguidance_grammar(self) -> str:
        """The llguidance grammar definition (raises ValueError / GenerationError on malformed input)."""
        import llguidance

        matcher = llguidance.LLMatcher
        if self.kind == "json_schema":
            return matcher.grammar_from_json_schema(self.source, defaults=dict(JSON_DEFAULTS))
        if self.kind == "regex":
            return matcher.grammar_from_regex(self.source)
        if self.kind == "grammar":
            return matcher.grammar_from_lark(self.source)
        if self.kind == "choice":
            return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(self.source)))
        raise AssertionError(self.kind)


def constraint_spec(json_schema: Any = None, regex: str | None = None, grammar: str | None = None,
                    choice: Iterable[str] | None = None) -> ConstraintSpec | None:
    """Validate the constraint options of a request (at most one) -> a spec, or None when unconstrained.
    Only the form is checked here; whether the schema or grammar compiles is checked by `compile`."""
    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                      ("choice", choice)) if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise GenerationError(f"pass at most one constraint (got {', '.join(given)}): json_schema, regex, grammar "
                              f"or choice.")
    if json_schema is not None:
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except json.JSONDecodeError as exc:
                raise GenerationError(f"json_schema is not valid JSON: {exc}.") from None
        if not isinstance(json_schema, (dict, bool)):
            raise GenerationError(f"json_schema must be a JSON schema object (a dict or its JSON text), got "
                                  f"{type(json_schema).__name__}.")
        return ConstraintSpec("json_schema", json.dumps(json_schema))
    if regex is not None:
        if not isinstance(regex, str):
            raise GenerationError(f"regex must be a string (got {type(regex).__name__}).")
        return ConstraintSpec("regex", regex)
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise GenerationError("grammar must be a non-empty Lark grammar (llguidance syntax) with a `start` rule.")
        return ConstraintSpec("grammar", grammar)
    if isinstance(choice, (str, bytes)) or not all(isinstance(c, str) for c in choice):
        raise GenerationError("choice must be a list of strings, e.g. choice=['positive', 'negative'].")
    choices = list(choice)
    if not choices:
        raise GenerationError("choice must list at least one string.")
    return ConstraintSpec("choice", json.dumps(choices))


@dataclass
class ConstraintMetrics:
    """What the constraint did in one request."""

    kind: str
    forced_tokens: int = 0  # tokens proposed by the grammar alone (no model, no n-gram lookup)
    forced_accepted: int = 0  # of them, accepted by the target (all, unless another tokenization of the forced
    #                           text was chosen)
    masks: int = 0  # token masks computed (target positions, draft positions, forced-run checks)
    mask_seconds: float = 0.0  # time computing those masks
    compile_seconds: float = 0.0  # building the matcher for this request (the tokenizer is cached per Generator)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "forced_tokens": self.forced_tokens, "forced_accepted": self.forced_accepted,
                "masks": self.masks, "mask_seconds": self.mask_seconds, "compile_seconds": self.compile_seconds}


class MatcherView:
    """Mask, forced tokens and consumption on one llguidance matcher (the committed one or a copy)."""

    def __init__(self, matcher, vocab: int, eos_ids: frozenset[int], other_eos: tuple[int, ...],
                 metrics: ConstraintMetrics):
        self.matcher = matcher
        self.vocab = vocab
        self.eos_ids = eos_ids  # the request's end-of-sequence tokens: allowed exactly where the grammar accepts
        self.other_eos = other_eos  # the tokenizer's other end tokens (not ending this request): never allowed
        self.metrics = metrics
        self.ended = False  # an end-of-sequence token was consumed: nothing follows

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GenerationError(f"the constraint engine failed: {_first_lines(self.matcher.get_error())}")

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens that keep the output in the language; end of sequence only where it accepts."""
        self._check()
        start = time.perf_counter()
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = bits[: self.vocab].view(bool)
        if len(allowed) < self.vocab:  # logits rows past the tokenizer's vocabulary: never allowed
            allowed = np.concatenate([allowed, np.zeros(self.vocab - len(allowed), bool)])
        accepting = self.matcher.is_accepting() and not self.ended
        allowed[list(self.other_eos)] = False
        allowed[[e for e in self.eos_ids if e < self.vocab]] = accepting
        if self.ended:
            allowed[:] = False
        self.metrics.masks += 1
        self.metrics.mask_seconds += time.perf_counter() - start
        if not allowed.any():
            raise GenerationError("the constraint cannot be completed from here: the grammar allows no next token and "
                                  "does not accept the output so far (a rule with no way to finish?).")
        return allowed

    def masked(self, logits: np.ndarray) -> np.ndarray:
        """logits [V'] -> a copy with -inf on every token the constraint forbids (V' may differ from the vocab)."""
        allowed = self.allowed()
        if len(logits) != len(allowed):
            allowed = np.concatenate([allowed, np.zeros(max(len(logits) - len(allowed), 0), bool)])[: len(logits)]
        return np.where(allowed, logits, -np.inf)

    def consume(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            if self.ended or int(token) in self.eos_ids:  # the end: the matcher is not told (the output is over)
                self.ended = True
                continue
            if not self.matcher.consume_token(int(token)):
                raise GenerationError(f"the constraint refused token {int(token)}: "
                                      f"{_first_lines(self.matcher.get_error())}")

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order, the constraint allows from here (nothing is consumed)."""
        self._check()
        tokens = [int(t) for t in tokens]
        # stop before an end of sequence: where the grammar accepts, the target chooses it itself
        tokens = tokens[: next((i for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))]
        return self.matcher.validate_tokens(tokens) if tokens else 0

    def forced(self, limit: int) -> list[int]:
        """Up to `limit` tokens the constraint forces from here (each the only allowed continuation, end of
        sequence excluded), consumed into this view."""
        run: list[int] = []
        while len(run) < limit and not self.finished:
            self._check()
            fast_forward = [int(t) for t in self.matcher.compute_ff_tokens()][: limit - len(run)]
            if not fast_forward:
                try:
                    only = np.flatnonzero(self.allowed())
                except GenerationError:  # a dead end of the grammar: not ours to report while drafting
                    break
                if len(only) != 1 or int(only[0]) in self.eos_ids:
                    break
                fast_forward = [int(only[0])]
            self.consume(fast_forward)
            run.extend(fast_forward)
        return run

    def fork(self) -> MatcherView:
        """A copy of this state to walk proposals on (drafting, rejection-sampling verification): consuming into
        it never changes this one."""
        view = MatcherView(self.matcher.deep_copy(), self.vocab, self.eos_ids, self.other_eos, self.metrics)
        view.ended = self.ended
        return view

    @property
    def finished(self) -> bool:
        """The grammar is complete (end of sequence is the only token it allows), or the output has ended."""
        return self.ended or self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()


class RequestConstraint(MatcherView):
    """One request's constraint: the committed matcher (advanced only by committed tokens) and its metrics."""

    def __init__(self, matcher, spec: ConstraintSpec, vocab: int, eos_ids: frozenset[int], other_eos: tuple[int, ...]):
        super().__init__(matcher, vocab, eos_ids, other_eos, ConstraintMetrics(spec.kind))
        self.spec = spec


class ConstraintCompiler:
    """Compiles request constraints against one bundle's tokenizer; the llguidance tokenizer (about a second to
    build for a 150k vocabulary) is built on first use and kept."""

    def __init__(self, tokenizer_file: Path, vocab: int, eos_ids: Iterable[int]):
        self.tokenizer_file = Path(tokenizer_file)
        self.vocab = vocab
        self.eos_ids = tuple(sorted(int(e) for e in eos_ids if 0 <= int(e) < vocab))
        self._tokenizer = None
        self._lock = threading.Lock()

    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                try:
                    import llguidance
                except ImportError:
                    raise GenerationError("constrained generation (json_schema, regex, grammar, choice) needs the "
                                          "llguidance package: pip install 'llguidance>=1.3'.") from None
                try:
                    self._tokenizer = llguidance.LLTokenizer(self.tokenizer_file.read_text(), n_vocab=self.vocab,
                                                             eos_token=list(self.eos_ids) or None)
                except Exception as exc:  # llguidance raises ValueError / RuntimeError for tokenizers it cannot map
                    raise GenerationError(f"this bundle's tokenizer cannot be used for constrained generation: "
                                          f"{exc}") from None
            return self._tokenizer

    def compile(self, spec: ConstraintSpec, eos_ids: Iterable[int] | None = None) -> RequestConstraint:
        """A fresh matcher for one request (`eos_ids`: the tokens that end it, default the bundle's); a constraint
        that does not compile, or that no token sequence of this vocabulary satisfies, is a GenerationError now,
        before any generation."""
        tokenizer = self.tokenizer()  # a GenerationError if llguidance is missing
        import llguidance

        start = time.perf_counter()
        label = spec.kind.replace("_", " ")
        try:
            grammar = spec.llguidance_grammar()
        except (ValueError, TypeError) as exc:
            raise GenerationError(f"the {label} constraint is invalid: {_first_lines(str(exc))}") from None
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GenerationError(f"the {label} constraint is invalid: {_first_lines(matcher.get_error())}")
        request_eos = frozenset(int(e) for e in (self.eos_ids if eos_ids is None else eos_ids))
        if not request_eos:
            raise GenerationError("constrained generation needs an end-of-sequence token to end on, and this bundle "
                                  "declares none (generation.eos_token_ids).")
        other_eos = tuple(e for e in self.eos_ids if e not in request_eos)
        constraint = RequestConstraint(matcher, spec, self.vocab, request_eos, other_eos)
        try:
            allowed = constraint.allowed()
        except GenerationError:
            allowed = None
        if allowed is None or (constraint.finished and not constraint.accepting):
            raise GenerationError(f"the {label} constraint admits no output this tokenizer can produce (an empty "
                                  f"language, or text the vocabulary cannot spell).")
        constraint.metrics.masks = 0
        constraint.metrics.mask_seconds = 0.0
        constraint.metrics.compile_seconds = time.perf_counter() - start
        return constraint


def _first_lines(message: str, limit: int = 400) -> str:
    """llguidance errors can carry a parser dump: keep their first lines."""
    text = " ".join(line.strip() for line in message.strip().splitlines()[:4] if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."
