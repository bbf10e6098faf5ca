"""One device-memory plan, several executors.

A planned decoder keeps every buffer of both models in one arena: per layer K/V caches
`[max_context, kv_heads, head_dim]`, the logits rows, the token slots, staging rows for new K/V rows
that cannot be written in place, and one activation area shared by all execution contexts of both
models (draft and target never run at the same time). The planner is pure arithmetic: the layout of
that arena, and for each call which optimization profile, every input shape and every tensor address
(as an offset into the arena). Executors (TensorRT, ONNX Runtime CUDA, ONNX Runtime on host memory)
only carry a plan out, so the arithmetic is exercised end to end on a CPU by the host executor.

New K/V rows go straight into the cache at row P when `P * row_bytes` is a multiple of the address
alignment (TensorRT requires 256 bytes); otherwise into the staging rows, followed by one copy per
tensor. A call longer than the staging rows at an unaligned P is split: the rows up to the next
aligned position are staged, the rest written in place. Such a split reaches the executor as calls of other
row counts than the runtime's call shaping chose (runtime/invariance.py): the row-count check at load runs
through the same plan, but only at its own cache lengths, so a split of a long prefill at another unaligned P
is not covered by it (the GPU check compares every speculative output with plain decoding on the device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from spectrt.runtime.errors import GenerationError

ALIGNMENT = 256  # bytes; TensorRT's requirement for every tensor address (setTensorAddress)
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int64": 8, "int32": 4}


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    return -(-value // alignment) * alignment


@dataclass(frozen=True)
class ModelGeometry:
    """What the plan needs to know about one model's graph."""

    role: str  # target | draft
    num_layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: str  # fp32 | fp16
    vocab: int
    max_context: int
    logits_rows: int  # the graph returns logits for the last min(S, logits_rows) positions
    max_fixed_step: int  # longest call outside prefill (target: max width + 1; draft: 2)

    @property
    def row_bytes(self) -> int:
        """Bytes of one cache row of one layer's K (or V): kv_heads * head_dim elements."""
        return self.kv_heads * self.head_dim * DTYPE_BYTES[self.kv_dtype]

    @property
    def align_period(self) -> int:
        """Rows between positions whose row address is aligned (1: every row is)."""
        return ALIGNMENT // math.gcd(self.row_bytes, ALIGNMENT)

    @property
    def staging_rows(self) -> int:
        """Rows of the staging buffers: any non-prefill call, plus the rows up to the next aligned position."""
        return 0 if self.align_period == 1 else self.max_fixed_step + self.align_period


def fixed_step_rows(widths) -> int:
    """The longest call a model makes outside prefill: a target verifies K drafted tokens plus one (max width +
    1); a draft (no widths) feeds at most 2 tokens, the last accepted draft token and the target's bonus token."""
    return max(widths) + 1 if widths else 2


@dataclass(frozen=True)
class Profile:
    """One optimization profile of an engine (ONNX Runtime graphs have one: everything dynamic)."""

    index: int
    name: str
    seq: tuple[int, int]  # min, max new tokens per call
    past: tuple[int, int]  # min, max cached rows
    activation_bytes: int = 0  # device memory a context of this profile needs (0: the executor's own)

    @property
    def fixed(self) -> bool:
        return self.seq[0] == self.seq[1]


@dataclass(frozen=True)
class Region:
    offset: int  # bytes from the arena base; a multiple of ALIGNMENT
    nbytes: int


@dataclass(frozen=True)
class ModelLayout:
    """Where one model's buffers live in the arena."""

    geometry: ModelGeometry
    profiles: tuple[Profile, ...]
    keys: tuple[Region, ...]  # per layer [max_context, kv_heads, head_dim]
    values: tuple[Region, ...]
    staged_keys: tuple[Region, ...]  # per layer [staging_rows, kv_heads, head_dim]; empty when every row is aligned
    staged_values: tuple[Region, ...]
    logits: Region  # [logits_rows, vocab] fp32
    token_ids: Region  # [max_context] int64

    @property
    def cache_bytes(self) -> int:
        return sum(r.nbytes for r in self.keys) + sum(r.nbytes for r in self.values)


@dataclass(frozen=True)
class DevicePlan:
    """The whole arena: both models' buffers and the shared activation area."""

    models: dict[str, ModelLayout]
    activation: Region  # shared by every context of every model (they never run at once)
    nbytes: int

    def breakdown(self) -> dict[str, int]:
        """Bytes per kind of buffer (for the memory planner)."""
        out = {"kv_cache": 0, "staging": 0, "logits": 0, "token_ids": 0, "activations": self.activation.nbytes}
        for layout in self.models.values():
            out["kv_cache"] += layout.cache_bytes
            out["staging"] += sum(r.nbytes for r in (*layout.staged_keys, *layout.staged_values))
            out["logits"] += layout.logits.nbytes
            out["token_ids"] += layout.token_ids.nbytes
        return out


class _Arena:
    def __init__(self):
        self.size = 0

    def take(self, nbytes: int) -> Region:
        region = Region(self.size, nbytes)
        self.size = align_up(self.size + max(nbytes, 1))
        return region


def plan_memory(models: list[tuple[ModelGeometry, tuple[Profile, ...]]]) -> DevicePlan:
    """Lay out every buffer of `models` (geometry, profiles) in one arena, each region 256-byte aligned."""
    arena = _Arena()
    layouts = {}
    for geometry, profiles in models:
        cache_bytes = geometry.max_context * geometry.row_bytes
        staged_bytes = geometry.staging_rows * geometry.row_bytes
        keys, values, staged_keys, staged_values = [], [], [], []
        for _ in range(geometry.num_layers):
            keys.append(arena.take(cache_bytes))
            values.append(arena.take(cache_bytes))
            if staged_bytes:
                staged_keys.append(arena.take(staged_bytes))
                staged_values.append(arena.take(staged_bytes))
        logits = arena.take(geometry.logits_rows * geometry.vocab * DTYPE_BYTES["fp32"])
        token_ids = arena.take(geometry.max_context * DTYPE_BYTES["int64"])
        layouts[geometry.role] = ModelLayout(geometry, tuple(profiles), tuple(keys), tuple(values), tuple(staged_keys),
                                             tuple(staged_values), logits, token_ids)
    activation_bytes = max((p.activation_bytes for _, profiles in models for p in profiles), default=0)
    activation = arena.take(activation_bytes)
    return DevicePlan(layouts, activation, arena.size)


@dataclass(frozen=True)
class Copy:
    """Device-to-device copy after a call: staged rows into the cache."""

    source: int  # arena offsets
    destination: int
    nbytes: int


@dataclass(frozen=True)
class CallPlan:
    """One engine call: profile, shapes and addresses (arena offsets) of every tensor, copies after it."""

    role: str
    profile: Profile
    past_length: int  # P
    count: int  # S new tokens: the step's tokens first_token..first_token+S, written to the token slots
    first_token: int  # before this call (every address stays aligned)
    input_shapes: dict[str, tuple[int, ...]]
    addresses: dict[str, int]
    output_shapes: dict[str, tuple[int, ...]]
    copies: tuple[Copy, ...] = field(default=())
    logits_rows: int = 0  # rows of logits this call writes (the last min(S, logits_rows) positions)

    @property
    def staged(self) -> bool:
        return bool(self.copies)


def choose_profile(layout: ModelLayout, past_length: int, count: int) -> Profile:
    """The profile for a call of `count` tokens after `past_length` cached rows: a fixed-length one if there is
    one for this count (its kernels were tuned for it), else a dynamic one that takes the shapes."""
    fitting = [p for p in layout.profiles
               if p.seq[0] <= count <= p.seq[1] and p.past[0] <= past_length <= p.past[1]]
    if not fitting:
        raise GenerationError(
            f"no optimization profile of the {layout.geometry.role} engine takes {count} new token(s) after "
            f"{past_length} cached ones (profiles: "
            + ", ".join(f"{p.name} seq {p.seq[0]}-{p.seq[1]} past {p.past[0]}-{p.past[1]}" for p in layout.profiles)
            + "); rebuild the engines with a larger --max-context, or shorten the prompt.")
    return min(fitting, key=lambda p: (not p.fixed, p.seq[1] - p.seq[0], p.index))


def plan_step(layout: ModelLayout, past_length: int, count: int) -> list[CallPlan]:
    """The calls that compute `count` new tokens after `past_length` cached rows (one, or two when a long call
    starts at an unaligned row)."""
    geometry = layout.geometry
    if count <= 0:
        raise GenerationError("a decoder step needs at least one token.")
    if past_length + count > geometry.max_context:
        raise GenerationError(f"context limit reached: {past_length} cached + {count} new tokens exceed max context "
                              f"{geometry.max_context} of this bundle (rebuild with a larger --max-context).")
    if _aligned(geometry, past_length) or count <= geometry.staging_rows:
        return [_call(layout, past_length, count, 0)]
    first = -past_length % geometry.align_period  # rows to the next aligned position (>= 1 here)
    return [_call(layout, past_length, first, 0), _call(layout, past_length + first, count - first, first)]


def _aligned(geometry: ModelGeometry, row: int) -> bool:
    return (row * geometry.row_bytes) % ALIGNMENT == 0


def _call(layout: ModelLayout, past_length: int, count: int, first_token: int) -> CallPlan:
    geometry = layout.geometry
    profile = choose_profile(layout, past_length, count)
    kv_shape = (geometry.kv_heads, geometry.head_dim)
    in_place = _aligned(geometry, past_length)
    assert in_place or count <= geometry.staging_rows, "split before planning an oversized staged call"
    rows = min(count, geometry.logits_rows)
    input_shapes = {"input_ids": (1, count)}
    output_shapes = {"logits": (1, rows, geometry.vocab)}
    addresses = {"input_ids": layout.token_ids.offset, "logits": layout.logits.offset}  # each call's tokens first
    copies = []
    row_offset = past_length * geometry.row_bytes
    new_bytes = count * geometry.row_bytes
    for layer in range(geometry.num_layers):
        for kind, cache, staged in (("key", layout.keys, layout.staged_keys),
                                    ("value", layout.values, layout.staged_values)):
            input_shapes[f"past_{kind}_{layer}"] = (1, past_length, *kv_shape)
            output_shapes[f"new_{kind}_{layer}"] = (1, count, *kv_shape)
            addresses[f"past_{kind}_{layer}"] = cache[layer].offset  # P = 0 too: never a null address
            if in_place:
                addresses[f"new_{kind}_{layer}"] = cache[layer].offset + row_offset
            else:
                addresses[f"new_{kind}_{layer}"] = staged[layer].offset
                copies.append(Copy(staged[layer].offset, cache[layer].offset + row_offset, new_bytes))
    return CallPlan(geometry.role, profile, past_length, count, first_token, input_shapes, addresses, output_shapes,
                    tuple(copies), rows)


def dynamic_profile(geometry: ModelGeometry) -> Profile:
    """The single profile of a graph without engine profiles (ONNX Runtime): any length that fits."""
    return Profile(0, "dynamic", (1, geometry.max_context), (0, geometry.max_context - 1))
