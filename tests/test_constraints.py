"""Structured output under speculation (tiny random models): JSON schema, regex, grammar and choice constraints.

Greedy and coupled-sampling speculative output equals constrained plain output token for token with every
drafter (grammar-forced ones included); every output stays in the language; the committed matcher advances
only by committed tokens; bad constraints are refused before any work."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from fake_timing import fake_timed_generator
from spectrt.cli import main
from spectrt.errors import GenerationError
from spectrt.runtime.constraints import constraint_spec
from spectrt.runtime.drafters import NgramDrafter
from spectrt.runtime.picker import TokenPicker
from spectrt.runtime.sampling import SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind", "tags"],
          "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 120},
                         "kind": {"enum": ["cat", "dog"]},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "bc"]}}}}
CONSTRAINTS = {
    "json_schema": dict(json_schema=SCHEMA),
    "regex": dict(regex=r"[0-9]{3}-[a-z]{2,4}"),
    "choice": dict(choice=["positive", "negative", "neutral"]),
    "grammar": dict(grammar='start: "x=" NUM ";"\nNUM: /[0-9]{1,6}/'),
}
DRAFTS = [("none", 0), ("model", 1), ("model", 3), ("model", 5), ("ngram", 3), ("grammar", 5), ("grammar+model", 2),
          ("grammar+model", 5), ("grammar+ngram", 3), ("auto", "auto")]
PROMPTS = ["The quick brown fox", "def add(a, b):", "Paris is the capital of"]
NEW_TOKENS = 80


def satisfies(kind: str, options: dict, text: str) -> bool:
    if kind == "json_schema":
        try:
            jsonschema.validate(json.loads(text), options["json_schema"])
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if kind == "regex":
        return re.fullmatch(options["regex"], text) is not None
    if kind == "choice":
        return text in options["choice"]
    return re.fullmatch(r"x=[0-9]{1,6};", text) is not None


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_greedy_constrained_speculation_equals_constrained_plain(tiny_generator, kind):
    options = CONSTRAINTS[kind]
    for prompt in PROMPTS:
        plain = tiny_generator.generate(prompt, max_new_tokens=NEW_TOKENS, draft="none", **options)
        unconstrained = tiny_generator.generate(prompt, max_new_tokens=NEW_TOKENS, draft="none")
        assert plain.token_ids != unconstrained.token_ids  # the constraint really changed the output
        if plain.finish_reason == "eos":
            assert satisfies(kind, options, plain.text), plain.text
        else:  # the tiny random model may run out of budget in a JSON string: a prefix of the language
            assert plain.finish_reason == "length" and kind == "json_schema"
        for draft, width in DRAFTS[1:]:
            result = tiny_generator.generate(prompt, max_new_tokens=NEW_TOKENS, draft=draft, width=width, **options)
            assert result.token_ids == plain.token_ids, (prompt, draft, width)
            assert result.finish_reason == plain.finish_reason


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_coupled_sampling_equals_constrained_plain_sampling(tiny_generator, kind):
    options = CONSTRAINTS[kind]
    for seed in range(8):
        sampling = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.95, seed=seed, **options)
        plain = tiny_generator.generate(PROMPTS[0], draft="none", **sampling)
        if plain.finish_reason == "eos":
            assert satisfies(kind, options, plain.text), plain.text
        for draft, width in (("model", 3), ("ngram", 3), ("grammar", 5), ("grammar+model", 5), ("grammar+ngram", 2),
                             ("auto", "auto")):
            result = tiny_generator.generate(PROMPTS[0], draft=draft, width=width, **sampling)
            assert result.token_ids == plain.token_ids, (seed, draft, width)


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_rejection_sampling_stays_in_the_language(tiny_generator, kind):
    options = CONSTRAINTS[kind]
    finished = 0
    for seed in range(12):
        for draft in ("model", "grammar+model", "grammar+ngram"):
            result = tiny_generator.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, temperature=1.0, seed=seed,
                                             accept="rejection", draft=draft, width=3, **options)
            if result.finish_reason == "eos":
                finished += 1
                assert satisfies(kind, options, result.text), (seed, draft, result.text)
    assert finished >= 12


def test_end_of_sequence_only_where_the_grammar_accepts(tiny_generator):
    """A random model ends early often; under `[0-9]{3}` it cannot: every sample is exactly three digits."""
    for seed in range(30):
        result = tiny_generator.generate(PROMPTS[0], max_new_tokens=20, temperature=1.5, seed=seed, regex="[0-9]{3}",
                                         draft="model", width=2, accept="rejection" if seed % 2 else "coupled")
        assert result.finish_reason == "eos" and re.fullmatch("[0-9]{3}", result.text), (seed, result.text)


def test_finish_reasons_when_the_budget_ends_before_the_grammar(tiny_generator):
    """`eos` when the grammar is complete (also exactly at the budget), `length` when max_new_tokens runs out
    first: the output is then an unfinished prefix that does not parse."""
    options = dict(json_schema={"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                                "required": ["kind"], "additionalProperties": False})
    full = tiny_generator.generate(PROMPTS[0], max_new_tokens=64, draft="none", **options)
    assert full.finish_reason == "eos" and json.loads(full.text)["kind"] in ("cat", "dog")
    n = len(full.token_ids)
    for draft in ("none", "grammar", "grammar+model"):
        exact = tiny_generator.generate(PROMPTS[0], max_new_tokens=n, draft=draft, **options)
        assert exact.finish_reason == "eos" and exact.token_ids == full.token_ids
        short = tiny_generator.generate(PROMPTS[0], max_new_tokens=n - 1, draft=draft, **options)
        assert short.finish_reason == "length" and short.token_ids == full.token_ids[:-1]
        with pytest.raises(ValueError):
            json.loads(short.text)


def test_grammar_forced_drafts_are_counted_and_cost_no_model(tiny_generator):
    fake_timed_generator(tiny_generator)  # `auto` (below) chooses alike on every machine
    options = dict(json_schema=SCHEMA, max_new_tokens=NEW_TOKENS)
    alone = tiny_generator.generate(PROMPTS[0], draft="grammar", width=5, **options)
    c = alone.constraint
    assert c.kind == "json_schema" and c.forced_tokens > 5 and c.masks > 0
    assert alone.metrics.drafted_tokens == c.forced_tokens  # the grammar drafter proposes nothing else
    assert c.forced_accepted == c.forced_tokens  # JSON structure: the only token the target may choose
    assert alone.metrics.draft_misses > 0  # branch points: nothing to propose, a plain target step
    combined = tiny_generator.generate(PROMPTS[0], draft="grammar+model", width=5, **options)
    assert combined.metrics.drafted_tokens > combined.constraint.forced_tokens > 0
    model = tiny_generator.generate(PROMPTS[0], draft="model", width=5, **options)
    assert model.constraint.forced_tokens == 0 and model.metrics.drafted_tokens > 0
    # each is its own drafter for the width scheduler (costs and acceptance), priced apart from unconstrained use
    assert {("grammar", True), ("grammar+model", True), ("model", True)} <= set(tiny_generator._costs)
    grammar_costs = tiny_generator._costs[("grammar", True)]
    assert grammar_costs.draft_cost is None and grammar_costs.lookup_cost is not None  # priced per lookup, no step
    assert tiny_generator.resolve_drafter("auto", constrained=True) == "grammar+model"
    auto = tiny_generator.generate(PROMPTS[0], **options)
    assert auto.constraint.forced_tokens > 0 and auto.token_ids == alone.token_ids


def test_stream_carries_constraint_metrics(tiny_generator):
    chunks = list(tiny_generator.stream(PROMPTS[0], max_new_tokens=16, choice=["yes", "no"]))
    assert chunks[-1].finish_reason == "eos" and chunks[-1].constraint.kind == "choice"
    assert "".join(c.text for c in chunks) in ("yes", "no")
    assert all(c.constraint is None for c in chunks[:-1])


# -- the picker and drafters with hand-made logits ------------------------------------------------------------

def _digits_constraint(generator, regex="[0-9]+"):
    return generator.constraints.compile(constraint_spec(regex=regex))


def _token(generator, text: str) -> int:
    ids = generator.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


def _logits(vocab: int, favour: dict[int, float]) -> np.ndarray:
    row = np.zeros(vocab, np.float32)
    for token, value in favour.items():
        row[token] = value
    return row


def test_target_rows_are_masked_and_forbidden_proposals_rejected(tiny_generator):
    vocab = tiny_generator.manifest.target.logits_vocab
    a, one, two, three = (_token(tiny_generator, t) for t in ("a", "1", "2", "3"))
    constraint = _digits_constraint(tiny_generator)
    picker = TokenPicker(SamplingParams(), seed=None, vocab=vocab, constraint=constraint)
    # 'a' has the top logit everywhere, but the grammar forbids it: the target's token is the best digit
    first = picker.next_token(_logits(vocab, {a: 9.0, two: 5.0}), 3)
    assert first == two
    # proposal [1, a, 3]: '1' is the masked target's choice, 'a' is forbidden (rejected even though it is the
    # unmasked argmax), and the row after it is never used
    target = np.stack([_logits(vocab, {a: 9.0, one: 4.0}), _logits(vocab, {a: 9.0, three: 4.0}),
                       _logits(vocab, {a: 9.0, two: 4.0}), _logits(vocab, {a: 9.0})])
    accepted, token = picker.verify(np.array([one, a, three]), None, target, 4)
    assert (accepted, token) == (1, three)
    # the committed matcher consumed exactly the committed tokens: '2', '1', '3'
    fresh = _digits_constraint(tiny_generator)
    fresh.consume([two, one, three])
    assert np.array_equal(constraint.allowed(), fresh.allowed())
    assert constraint.matcher.deep_copy().consume_tokens([one]) and constraint.accepting


@pytest.mark.parametrize("rule", ["coupled", "rejection"])
def test_sampled_verification_commits_only_committed_tokens(tiny_generator, rule):
    vocab = tiny_generator.manifest.target.logits_vocab
    a, one, two = (_token(tiny_generator, t) for t in ("a", "1", "2"))
    for seed in range(20):
        constraint = _digits_constraint(tiny_generator, "[0-9]{4}")
        picker = TokenPicker(SamplingParams(temperature=1.0), seed=seed, vocab=vocab, rule=rule, constraint=constraint)
        target = np.stack([_logits(vocab, {a: 12.0, one: 3.0, two: 3.0})] * 4)
        proposal = np.array([one, two, a])
        draft_probs = None
        if rule == "rejection":  # draft probabilities under the same constraint: digits only
            draft_probs = np.zeros((3, vocab))
            draft_probs[:, [one, two]] = 0.5
            draft_probs[2] = 0.0
            draft_probs[2, a] = 1.0  # a broken drafter proposing a forbidden token: rejected for sure
        accepted, token = picker.verify(proposal, draft_probs, target, 10)
        assert accepted <= 2 and token != a
        committed = [*proposal[:accepted].tolist(), token]
        fresh = _digits_constraint(tiny_generator, "[0-9]{4}")
        fresh.consume(committed)
        assert np.array_equal(constraint.allowed(), fresh.allowed()), (seed, committed)


@pytest.mark.parametrize("rule", ["greedy", "coupled", "rejection"])
def test_an_accepted_end_of_sequence_proposal_ends_the_round(tiny_generator, rule):
    """Where the grammar accepts, a drafter may propose end of sequence; nothing after it is masked or consumed."""
    vocab = tiny_generator.manifest.target.logits_vocab
    one, two = (_token(tiny_generator, t) for t in ("1", "2"))
    eos = min(tiny_generator.eos_ids)
    params = SamplingParams() if rule == "greedy" else SamplingParams(temperature=0.05)
    constraint = _digits_constraint(tiny_generator)
    picker = TokenPicker(params, seed=None if rule == "greedy" else 1, vocab=vocab,
                         rule="rejection" if rule == "rejection" else "coupled", constraint=constraint)
    target = np.stack([_logits(vocab, {one: 9.0}), _logits(vocab, {eos: 9.0}), _logits(vocab, {two: 9.0})])
    draft_probs = None
    if rule == "rejection":
        draft_probs = np.zeros((2, vocab))
        draft_probs[0, one] = draft_probs[1, eos] = 1.0
    accepted, _ = picker.verify(np.array([one, eos]), draft_probs, target, 5)
    assert accepted == 2 and constraint.finished


def test_ngram_proposals_are_cut_where_the_constraint_refuses_them(tiny_generator):
    vocab = tiny_generator.manifest.target.logits_vocab
    one, two, a = (_token(tiny_generator, t) for t in ("1", "2", "a"))
    constraint = _digits_constraint(tiny_generator)
    constraint.consume([one])
    picker = TokenPicker(SamplingParams(), seed=None, vocab=vocab, constraint=constraint)
    tokens = [5, one, two, a, 7, one]  # the earlier '1' was followed by '2', 'a', ...
    plain, _ = NgramDrafter().propose(tokens, 4, TokenPicker(SamplingParams(), seed=None, vocab=vocab))
    assert plain.tolist() == [two, a, 7, one]
    cut, _ = NgramDrafter().propose(tokens, 4, picker)
    assert cut.tolist() == [two]
    assert np.array_equal(constraint.allowed(), _committed_after(tiny_generator, [one]))  # drafting never commits


def _committed_after(generator, tokens):
    fresh = _digits_constraint(generator)
    fresh.consume(tokens)
    return fresh.allowed()


# -- bad input: refused when the request is made, before any work ----------------------------------------------

@pytest.mark.parametrize("options,message", [
    (dict(json_schema={"type": "foo"}), "json schema constraint is invalid.*foo"),
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(json_schema=[1, 2]), "json_schema must be a JSON schema object"),
    (dict(json_schema={"$ref": "#/definitions/missing"}), "json schema constraint is invalid"),
    (dict(json_schema={"type": "string", "minLength": 5, "maxLength": 2}), "invalid.*[Uu]nsatisfiable"),
    (dict(regex="a[^\\s\\S]"), "admits no output"),
    (dict(regex="(unclosed"), "regex constraint is invalid"),
    (dict(grammar="start: <|no_such_token|>"), "grammar constraint is invalid.*special token"),
    (dict(grammar="start: missing_rule"), "grammar constraint is invalid"),
    (dict(grammar="   "), "grammar must be a non-empty Lark grammar"),
    (dict(choice="yes"), "choice must be a list of strings"),
    (dict(choice=[]), "at least one string"),
    (dict(regex="[0-9]", choice=["a"]), "at most one constraint"),
    (dict(draft="grammar"), "draft 'grammar' proposes what a constraint forces"),
    (dict(draft="grammar+model"), "draft 'grammar\\+model' proposes"),
])
def test_bad_constraints_are_refused_before_generation(tiny_generator, options, message):
    rounds_before = tiny_generator.aggregate.totals["rounds"]
    with pytest.raises(GenerationError, match=message):
        tiny_generator.stream(PROMPTS[0], max_new_tokens=8, **options)  # raises here: nothing runs, no lock held
    with pytest.raises(GenerationError, match=message):
        tiny_generator.generate(PROMPTS[0], max_new_tokens=8, **options)
    assert tiny_generator.aggregate.totals["rounds"] == rounds_before
    assert tiny_generator.generate(PROMPTS[0], max_new_tokens=4).finish_reason  # the generator still works


def test_grammar_dead_end_is_an_error(tiny_generator):
    """A grammar whose language is empty past its first token (a rule that never finishes) passes the start
    check but cannot be completed: the request fails with a GenerationError naming the problem."""
    with pytest.raises(GenerationError, match="cannot be completed"):
        tiny_generator.generate(PROMPTS[0], max_new_tokens=8, grammar='start: "a" x\nx: x "b"')
    assert tiny_generator.generate(PROMPTS[0], max_new_tokens=4, regex="[0-9]{2}").finish_reason == "eos"


def test_config_keeps_the_schema_as_json_text():
    from spectrt.runtime.generator import GenerateConfig

    config = GenerateConfig(json_schema=SCHEMA)
    assert isinstance(config.json_schema, str) and json.loads(config.json_schema) == SCHEMA
    assert config.constraint.kind == "json_schema"
    assert GenerateConfig(choice=["a", "b"]).choice == ("a", "b")
    assert GenerateConfig().constraint is None


def test_cli_generate_with_constraints(tiny_bundle, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    runner = CliRunner()
    result = runner.invoke(main, ["generate", str(tiny_bundle), "Hello", "--json-schema", f"@{schema_file}",
                                  "--max-new-tokens", "64", "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["draft"] == "grammar+model" and data["constraint"]["kind"] == "json_schema"
    if data["finish_reason"] == "eos":
        jsonschema.validate(json.loads(data["text"]), SCHEMA)
    result = runner.invoke(main, ["generate", str(tiny_bundle), "Hello", "--choice", "yes", "--choice", "no",
                                  "--draft", "grammar", "--threads", "1"])
    assert result.exit_code == 0 and result.stdout.strip() in ("yes", "no")
    result = runner.invoke(main, ["generate", str(tiny_bundle), "Hello", "--regex", "(", "--threads", "1"])
    assert result.exit_code == 2 and "regex constraint is invalid" in result.output
    result = runner.invoke(main, ["generate", str(tiny_bundle), "Hello", "--json-schema", "@/no/such/file"])
    assert result.exit_code == 2 and "cannot read" in result.output


def test_openai_response_format_maps_onto_the_constraint():
    pytest.importorskip("pydantic")
    from pydantic import ValidationError

    from spectrt.serve.protocol import ChatCompletionRequest, CompletionRequest

    messages = [{"role": "user", "content": "hi"}]
    body = ChatCompletionRequest(model="m", messages=messages, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
    assert body.generate_options(16)["json_schema"] == SCHEMA
    body = ChatCompletionRequest(model="m", messages=messages, response_format={"type": "json_object"})
    assert body.generate_options(16)["json_schema"] == {"type": "object"}
    body = ChatCompletionRequest(model="m", messages=messages, response_format={"type": "text"})
    assert "json_schema" not in body.generate_options(16)
    body = CompletionRequest(model="m", prompt="x", regex="[0-9]+", draft="grammar+ngram")
    assert body.generate_options(16)["regex"] == "[0-9]+" and body.generate_options(16)["draft"] == "grammar+ngram"
    assert CompletionRequest(model="m", prompt="x", choice=["a", "b"]).generate_options(16)["choice"] == ["a", "b"]
    for bad in (dict(regex="[0-9]", grammar="start: \"a\""), dict(response_format={"type": "json_object"}, choice=["a"]),
                dict(response_format={"type": "xml"}), dict(choice=[])):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt="x", **bad)


def test_server_structured_output(tiny_bundle):
    """OpenAI `response_format` and spectrt's `choice` through the HTTP app; a bad schema is a 400."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from spectrt.runtime.generator import Generator
    from spectrt.serve.app import ServeConfig, create_app

    generator = Generator(tiny_bundle, threads=1)
    with TestClient(create_app(generator, ServeConfig(model_name="tiny"))) as client:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 80, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}
        reply = client.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["text"]), SCHEMA)
        reply = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                          "choice": ["yes", "no"], "max_tokens": 8})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] in ("yes", "no")
        bad = dict(body, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}})
        reply = client.post("/v1/completions", json=bad)
        assert reply.status_code == 400 and "json schema constraint is invalid" in reply.json()["error"]["message"]
        reply = client.post("/v1/completions", json=dict(body, regex="[0-9]"))
        assert reply.status_code == 400 and "at most one constraint" in reply.json()["error"]["message"]
