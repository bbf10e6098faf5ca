"""Predicted outputs (issue 21, part 1): the drafter follows the prediction, re-aligns after an edit, hands over to
its fallback where the output leaves the prediction; output equals plain decoding's whatever the prediction says
(greedy and coupled sampling), and the OpenAI usage fields count the prediction's tokens."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from spectrt.runtime.drafters import NgramDrafter, NoDrafter
from spectrt.runtime.errors import GenerationError
from spectrt.runtime.generator import GenerateConfig, Generator
from spectrt.runtime.prediction import PredictionDrafter

PICKER = SimpleNamespace(constraint=None)
PROMPT = [900, 901, 902]


def drafted(drafter, tokens, k=8):
    return drafter.propose(tokens, k, PICKER)[0].tolist()


def commit(drafter, tokens, proposal, accepted, bonus):
    tokens = [*tokens, *proposal[:accepted], bonus]
    drafter.accepted(tokens, len(proposal), accepted)
    return tokens


# -- the drafter on hand-made sequences ---------------------------------------------------------------------------


def test_follows_the_prediction_and_counts_what_was_accepted():
    prediction = list(range(10, 30))
    drafter = PredictionDrafter(prediction, NoDrafter())
    drafter.start(PROMPT)
    tokens = [*PROMPT, 10]  # the first output token agrees with the prediction
    assert drafter.sure(tokens) == 19
    proposal = drafted(drafter, tokens, k=4)
    assert proposal == [11, 12, 13, 14]
    tokens = commit(drafter, tokens, proposal, 4, 15)
    assert drafted(drafter, tokens, k=8) == list(range(16, 24))
    # the output followed 10..15: six prediction tokens appeared in it (the target's own 10 and 15 included)
    assert drafter.accepted_tokens == 6 and drafter.rejected_tokens == len(prediction) - 6


def test_realigns_after_a_substitution_an_insertion_and_a_deletion():
    prediction = list(range(100, 160))
    drafter = PredictionDrafter(prediction, NoDrafter())
    drafter.start(PROMPT)
    # substitution: 100..104, then 7 instead of 105; the output rejoins with 106 107
    tokens = [*PROMPT, 100, 101, 102, 103, 104, 7]
    assert drafted(drafter, tokens) == []  # not aligned: the fallback (none) proposes nothing
    tokens += [106, 107]
    assert drafted(drafter, tokens, k=3) == [108, 109, 110]
    assert drafter.sure(tokens) == 0  # a 2-token anchor is not trusted with the widest width yet
    tokens += [108, 109]
    assert drafter.sure(tokens) > 0  # confirmed by the tokens that followed
    # insertion of new tokens, then the original continues
    tokens += [1, 2, 3, 110, 111]
    assert drafted(drafter, tokens, k=2) == [112, 113]
    # deletion: 112..119 skipped
    tokens += [120, 121, 122, 123]
    assert drafted(drafter, tokens, k=3) == [124, 125, 126]


def test_one_token_realigns_just_ahead_but_not_far_away():
    prediction = list(range(200, 260))
    drafter = PredictionDrafter(prediction, NoDrafter())
    drafter.start(PROMPT)
    tokens = [*PROMPT, 200, 201, 202, 7]  # a renamed token instead of 203
    assert drafted(drafter, tokens) == []
    tokens += [204]  # the original goes on right after the edit: one token re-aligns there
    assert drafted(drafter, tokens, k=3) == [205, 206, 207]
    assert drafter.sure(tokens) == 0  # a one-token anchor is not trusted with the widest width
    tokens += [8, 250]  # another edit, then a token of the prediction far ahead: no re-alignment on one token
    assert drafted(drafter, tokens) == []


def test_realignment_prefers_the_nearest_occurrence_ahead():
    line = [5, 6, 7]  # a line that occurs three times in the file
    prediction = [*line, 50, *line, 60, *line, 70]
    drafter = PredictionDrafter(prediction, NoDrafter())
    drafter.start(PROMPT)
    tokens = [*PROMPT, 5, 6, 7, 50, 9, 9]  # aligned through the first line, then an edit
    tokens += line
    assert drafted(drafter, tokens, k=1) == [60]  # the occurrence after the last aligned position, not the first
    tokens += [60, 8, 8, *line]
    assert drafted(drafter, tokens, k=1) == [70]


def test_the_fallback_drafts_where_the_output_leaves_the_prediction():
    drafter = PredictionDrafter([40, 41, 42, 43], NgramDrafter())
    assert drafter.name == "prediction+ngram"
    drafter.start([1, 2, 3, 4, 1, 2])
    tokens = [1, 2, 3, 4, 1, 2, 3]  # the output is 3: not the prediction; the prompt repeats 1 2 3 4
    proposal = drafted(drafter, tokens, k=2)
    assert proposal and proposal[0] == 4  # n-gram lookup over the prompt
    assert drafter.from_prediction == 0
    commit(drafter, tokens, proposal, len(proposal), 40)


# -- the runtime on a tiny bundle ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(tiny_bundle):
    return Generator(tiny_bundle, threads=1)


def test_greedy_output_equals_plain_whatever_the_prediction(generator):
    prompt = "hello world, this is"
    plain = generator.generate(prompt, max_new_tokens=40, draft="none")
    ids = plain.token_ids  # a random-weights model's output is not valid UTF-8: its text does not re-encode to it
    third = len(ids) // 3
    cases = {  # token ids, and text
        "exact": ids,
        "edited": ids[:third] + [5, 6, 7, 8] + ids[third + 3:],  # a substitution and an insertion
        "deleted": ids[:third] + ids[2 * third:],
        "prefix": ids[: len(ids) // 2],
        "wrong text": "completely unrelated predicted text " * 3,
        "output text": plain.text,
    }
    for name, prediction in cases.items():
        for draft in ("none", "ngram", "model"):
            result = generator.generate(prompt, max_new_tokens=40, draft=draft, prediction=prediction)
            assert result.token_ids == plain.token_ids, (name, draft)
            metrics = result.metrics
            predicted = (len(prediction) if not isinstance(prediction, str) else
                         len(generator.tokenizer.tokenizer.encode(prediction, add_special_tokens=False).ids))
            assert metrics.prediction_tokens == predicted
            assert metrics.accepted_prediction_tokens + metrics.rejected_prediction_tokens == predicted
    exact = generator.generate(prompt, max_new_tokens=40, draft="none", prediction=ids).metrics
    # the prediction is the output: every predicted token accepted, at the widest built width (no cost measured
    # at widths > 1 before), in a few target calls
    assert exact.accepted_prediction_tokens == len(ids) and exact.rejected_prediction_tokens == 0
    assert max(exact.width_histogram) == max(generator.built_widths) and exact.rounds <= len(ids) // 3
    edited = generator.generate(prompt, max_new_tokens=40, draft="none", prediction=cases["edited"]).metrics
    assert edited.accepted_prediction_tokens >= len(ids) - 12  # re-aligned after the edit


def test_sampled_output_with_a_prediction_equals_seeded_plain_sampling(generator):
    prompt = "the cache"
    options = dict(max_new_tokens=30, temperature=0.9, top_p=0.95, seed=7)
    plain = generator.generate(prompt, draft="none", **options)
    for prediction in (plain.text, plain.text[:20] + " other words " + plain.text[30:], "nothing alike"):
        result = generator.generate(prompt, draft="ngram", prediction=prediction, **options)
        assert result.token_ids == plain.token_ids, prediction  # coupled acceptance: plain sampling's tokens


def test_bad_prediction_is_a_clear_error(generator):
    for bad in ("", [], ["a"], 3):
        with pytest.raises(GenerationError, match="prediction must be a non-empty string"):
            GenerateConfig(prediction=bad)
    with pytest.raises(GenerationError, match="prediction token ids must lie in"):
        generator.generate("hello", max_new_tokens=4, prediction=[1, 10**6])
    assert GenerateConfig(prediction=[1, 2]).prediction == (1, 2)


def test_server_takes_openai_prediction_and_reports_its_usage(tiny_bundle):
    from test_serve import Server

    generator = Generator(tiny_bundle, threads=1)
    expected = generator.generate("hello world", max_new_tokens=24, draft="none")
    # the counts depend on the output and the prediction only (not on the widths a run chose)
    own = generator.generate("hello world", max_new_tokens=24, draft="none", prediction=expected.text).metrics
    server = Server(tiny_bundle)
    try:
        body = {"model": "tiny", "prompt": "hello world", "max_tokens": 24, "temperature": 0, "draft": "none",
                "prediction": {"type": "content", "content": [{"type": "text", "text": expected.text}]}}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["choices"][0]["text"] == expected.text
        details = data["usage"]["completion_tokens_details"]
        assert details == {"accepted_prediction_tokens": own.accepted_prediction_tokens,
                           "rejected_prediction_tokens": own.rejected_prediction_tokens}
        assert own.accepted_prediction_tokens > 0
        bad = httpx.post(f"{server.url}/v1/completions", json=body | {"prediction": {"type": "content", "content": ""}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prediction.content"
        assert "prediction content is empty" in bad.json()["error"]["message"]
        plain = httpx.post(f"{server.url}/v1/completions", json={k: v for k, v in body.items() if k != "prediction"})
        assert plain.json()["usage"]["completion_tokens_details"] == {"accepted_prediction_tokens": 0,
                                                                      "rejected_prediction_tokens": 0}
    finally:
        server.stop()
