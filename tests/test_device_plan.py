"""The device-memory planner: arena layout, alignment, staging, split calls, profile choice, context limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrt.errors import GenerationError
from spectrt.runtime.backends.device_plan import (ALIGNMENT, ModelGeometry, Profile, choose_profile, dynamic_profile,
                                                  plan_memory, plan_step)


def _geometry(role="target", *, layers=2, kv_heads=2, head_dim=64, dtype="fp16", vocab=1000, context=512,
              rows=5, fixed=5):
    return ModelGeometry(role, layers, kv_heads, head_dim, dtype, vocab, context, rows, fixed)


def _engine_profiles(context, lengths, prefill_activation=4096, fixed_activation=1024):
    """Profiles as `spectrt build --backend tensorrt` makes them: dynamic prefill, one fixed length each."""
    profiles = [Profile(0, "prefill", (1, context), (0, context - 1), prefill_activation)]
    for index, length in enumerate(lengths, start=1):
        profiles.append(Profile(index, f"s{length}", (length, length), (0, context - length), fixed_activation))
    return tuple(profiles)


def _regions(plan):
    for layout in plan.models.values():
        yield from (*layout.keys, *layout.values, *layout.staged_keys, *layout.staged_values, layout.logits,
                    layout.token_ids)
    yield plan.activation


def test_every_region_is_aligned_disjoint_and_inside_the_arena():
    target = _geometry(kv_heads=3)  # 384-byte rows: staging needed
    draft = _geometry("draft", layers=1, kv_heads=1, head_dim=32, rows=1, fixed=2)
    plan = plan_memory([(target, _engine_profiles(512, [2, 3, 5])), (draft, _engine_profiles(512, [1, 2], 8192))])
    regions = sorted(_regions(plan), key=lambda r: r.offset)
    for region in regions:
        assert region.offset % ALIGNMENT == 0
        assert region.offset + region.nbytes <= plan.nbytes
    for before, after in zip(regions, regions[1:]):
        assert before.offset + before.nbytes <= after.offset
    assert plan.activation.nbytes == 8192  # the largest profile of either model: one area shared by all contexts
    cache = plan.models["target"].keys[0]
    assert cache.nbytes == 512 * 3 * 64 * 2
    assert plan.breakdown()["kv_cache"] == 2 * 2 * 512 * 384 + 2 * 1 * 512 * 64


def test_aligned_rows_are_written_in_place():
    geometry = _geometry(kv_heads=2, head_dim=64)  # 256-byte rows
    assert geometry.align_period == 1 and geometry.staging_rows == 0
    layout = plan_memory([(geometry, (dynamic_profile(geometry),))]).models["target"]
    for past in (0, 1, 7, 200):
        [call] = plan_step(layout, past, 3)
        assert not call.copies
        assert call.addresses["new_key_1"] == layout.keys[1].offset + past * 256
        assert call.addresses["past_value_0"] == layout.values[0].offset  # never null, P = 0 included
        assert call.input_shapes["past_key_0"] == (1, past, 2, 64)
        assert call.output_shapes["new_value_1"] == (1, 3, 2, 64)


def test_unaligned_rows_go_through_staging_then_one_copy_per_tensor():
    geometry = _geometry(kv_heads=3, head_dim=64, fixed=5)  # 384-byte rows: every other row is aligned
    assert geometry.align_period == 2 and geometry.staging_rows == 7
    layout = plan_memory([(geometry, (dynamic_profile(geometry),))]).models["target"]
    [even] = plan_step(layout, 10, 5)
    assert not even.copies and even.addresses["new_key_0"] == layout.keys[0].offset + 10 * 384
    [odd] = plan_step(layout, 11, 5)
    assert odd.addresses["new_key_0"] == layout.staged_keys[0].offset
    assert len(odd.copies) == 2 * geometry.num_layers
    copy = next(c for c in odd.copies if c.source == layout.staged_values[1].offset)
    assert copy.destination == layout.values[1].offset + 11 * 384 and copy.nbytes == 5 * 384


def test_a_long_call_at_an_unaligned_row_is_split_at_the_next_aligned_row():
    geometry = _geometry(kv_heads=3, head_dim=64, rows=5, fixed=5)
    layout = plan_memory([(geometry, (dynamic_profile(geometry),))]).models["target"]
    first, rest = plan_step(layout, 11, 40)
    assert (first.past_length, first.count, first.first_token) == (11, 1, 0) and first.copies
    assert (rest.past_length, rest.count, rest.first_token) == (12, 39, 1) and not rest.copies
    assert rest.addresses["input_ids"] == layout.token_ids.offset  # its tokens are written there before it runs
    assert rest.logits_rows == 5  # the last 5 positions of the whole step come from the second call


def test_profile_choice_prefers_the_fixed_length_profile():
    geometry = _geometry(context=256)
    layout = plan_memory([(geometry, _engine_profiles(256, [2, 3, 5]))]).models["target"]
    assert choose_profile(layout, 40, 3).name == "s3"
    assert choose_profile(layout, 40, 4).name == "prefill"  # no fixed profile for 4: the dynamic one
    assert choose_profile(layout, 0, 200).name == "prefill"
    assert choose_profile(layout, 251, 5).name == "s5"  # the fixed profile's past range reaches 256 - 5
    fixed_only = plan_memory([(geometry, _engine_profiles(256, [2, 3, 5])[1:])]).models["target"]
    with pytest.raises(GenerationError, match="no optimization profile of the target engine takes 4 new token.*40 "
                                              "cached.*s2 seq 2-2 past 0-254"):
        choose_profile(fixed_only, 40, 4)


def test_context_limit_and_empty_steps_are_refused():
    geometry = _geometry(context=64)
    layout = plan_memory([(geometry, (dynamic_profile(geometry),))]).models["target"]
    with pytest.raises(GenerationError, match="context limit reached: 60 cached \\+ 5 new tokens exceed max context 64"):
        plan_step(layout, 60, 5)
    with pytest.raises(GenerationError, match="at least one token"):
        plan_step(layout, 3, 0)
    assert plan_step(layout, 59, 5)[0].count == 5  # exactly full


@settings(max_examples=300, deadline=None)
@given(kv_heads=st.integers(1, 8), head_dim=st.sampled_from([16, 24, 32, 48, 64, 80, 96, 128]),
       dtype=st.sampled_from(["fp16", "fp32"]), fixed=st.integers(1, 9), data=st.data())
def test_calls_cover_the_step_exactly_with_aligned_tensor_addresses(kv_heads, head_dim, dtype, fixed, data):
    geometry = _geometry(kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, context=600, rows=fixed, fixed=fixed)
    layout = plan_memory([(geometry, (dynamic_profile(geometry),))]).models["target"]
    past = data.draw(st.integers(0, 599))
    count = data.draw(st.integers(1, 600 - past))
    calls = plan_step(layout, past, count)
    position = past
    for call in calls:
        assert call.past_length == position and call.first_token == position - past
        for name, offset in call.addresses.items():
            assert offset % ALIGNMENT == 0, name  # what TensorRT demands of every tensor address
        if call.copies:
            assert call.count <= geometry.staging_rows
            assert {c.nbytes for c in call.copies} == {call.count * geometry.row_bytes}
            rows = {r.offset + position * geometry.row_bytes for r in (*layout.keys, *layout.values)}
            assert {c.destination for c in call.copies} == rows  # into the cache rows the step owns
            staged = {r.offset for r in (*layout.staged_keys, *layout.staged_values)}
            assert {c.source for c in call.copies} == staged
        else:
            assert call.addresses["new_key_0"] == layout.keys[0].offset + position * geometry.row_bytes
        position += call.count
    assert position == past + count
    assert calls[-1].logits_rows == min(count, geometry.logits_rows)  # the step's last rows, whatever the split
