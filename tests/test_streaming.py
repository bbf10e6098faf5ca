"""Streaming: tokens arrive one by one, text deltas add up to the final text, stop strings and eos end it."""

from __future__ import annotations

import pytest

from spectrt.runtime.text import IncrementalDecoder, StopMatcher


def test_stream_equals_generate_token_for_token(tiny_generator):
    tiny_generator.eos_ids = set()
    prompt = [100, 101, 102, 103, 104]
    result = tiny_generator.generate(prompt_ids=prompt, max_new_tokens=30, draft="model", width=3)
    chunks = list(tiny_generator.stream(prompt_ids=prompt, max_new_tokens=30, draft="model", width=3))
    assert [c.token_id for c in chunks[:-1]] == result.token_ids
    assert chunks[-1].token_id is None and chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == result.text
    assert result.text == tiny_generator.tokenizer.decode(result.token_ids)


def test_incremental_decoder_handles_multibyte_characters(tiny_generator):
    tokenizer = tiny_generator.tokenizer
    text = "héllo wörld — 🙂 日本語 ∑x² def f(): return 'ß'"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # a tiny BPE splits multi-byte characters across tokens
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) + decoder.flush() == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas), "incomplete UTF-8 must be held back, not emitted"
    assert "" in deltas  # some token ended mid-character and emitted nothing yet


@pytest.mark.parametrize("stops,pieces,expected,stopped", [
    (("STOP",), ["abc ST", "O", "P tail"], "abc ", True),
    (("STOP",), ["abc ST", "OX"], "abc STOX", False),
    (("\n\n", "###"), ["one\n", "\ntwo"], "one", True),
    ((), ["a", "b"], "ab", False),
])
def test_stop_matcher(stops, pieces, expected, stopped):
    matcher = StopMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert out == expected and hit == stopped


def test_stop_string_ends_generation(tiny_generator):
    tiny_generator.eos_ids = set()
    prompt = [100, 101, 102, 103, 104]
    full = tiny_generator.generate(prompt_ids=prompt, max_new_tokens=30, draft="model", width=3)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop and stop in full.text
    cut = tiny_generator.generate(prompt_ids=prompt, max_new_tokens=30, draft="model", width=3, stop=(stop,))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(c.text for c in tiny_generator.stream(prompt_ids=prompt, max_new_tokens=30, draft="model",
                                                             width=3, stop=(stop,)))
    assert streamed == cut.text


def test_chat_messages_use_the_bundle_template(tiny_generator):
    messages = [{"role": "user", "content": "hi"}]
    rendered = tiny_generator.tokenizer.render_chat(messages)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    result = tiny_generator.generate(messages=messages, max_new_tokens=5)
    assert result.prompt_token_ids == tiny_generator.tokenizer.tokenizer.encode(rendered, add_special_tokens=False).ids


def test_streaming_keeps_the_leading_space_of_sentencepiece_tokens(tmp_path):
    """Metaspace ('▁word') tokenizers drop the space of a sequence's first word when decoding; the stream starts
    with the prompt as context, so the first generated word keeps the space it adds after the prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from spectrt.runtime.text import BundleTokenizer

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    bundle_tokenizer = BundleTokenizer(tmp_path / "tokenizer.json", {})
    prompt = bundle_tokenizer.encode("Hello")
    assert prompt == [1]
    with_context = IncrementalDecoder(bundle_tokenizer, prompt)
    assert [with_context.push(2), with_context.push(3)] == [" world", "!"]
    assert "Hello" + " world!" == bundle_tokenizer.decode(prompt + [2, 3])
    without_context = IncrementalDecoder(bundle_tokenizer)
    assert without_context.push(2) == "world"  # what a context-free stream loses


def test_stop_string_completed_by_the_final_flush_reports_stop(tiny_generator):
    """The tiny byte-level BPE can end a run inside a UTF-8 character: its text is held back and only released
    by the final flush. A stop string found in that tail must end with finish_reason 'stop' too."""
    tiny_generator.eos_ids = set()
    prompt = [100, 101, 102, 103, 104]
    full = tiny_generator.generate(prompt_ids=prompt, max_new_tokens=40, draft="model", width=3)
    for n in range(1, 41):  # a length at which the last token leaves text held back
        decoder = IncrementalDecoder(tiny_generator.tokenizer, prompt)
        deltas = [decoder.push(t) for t in full.token_ids[:n]]
        tail = decoder.flush()
        if deltas[-1] == "" and tail:
            break
    else:
        raise AssertionError("no run length ends inside a character: pick another prompt for this test")
    text = "".join(deltas)
    stop = tail[-1]
    cut = tiny_generator.generate(prompt_ids=prompt, max_new_tokens=n, draft="model", width=3, stop=(stop,))
    assert cut.finish_reason == "stop"
    assert cut.text == (text + tail)[: (text + tail).index(stop)]
