"""`spectrt plan`, the memory planner (offline: it never runs in the lean runtime): how much memory a bundle (or a recipe, before building it) needs, per backend, and whether it
fits a device.

Two inputs, one model of memory:
- bundle mode (`plan_bundle`): the manifest's architecture numbers, and the sizes of the files the runtime loads;
- recipe mode (`plan_recipe`): the two models' configs (a Hugging Face folder's config.json and tokenizer.json,
  or a GGUF file's metadata, read with the `gguf` package: imported only here) and the build settings; the
  weights are then the initializer bytes the graph builder (compiler/onnx_graph.py) would write.

Per backend (`BACKENDS`), a list of `Term`s, each with where it lives (host or device), its bytes and what the
number rests on (`basis`): "arithmetic" (exact from shapes), "file size", "measured" (a constant measured on the
machine named in CALIBRATION) or "estimate" (an argument, stated in the term's note, not a measurement).

- onnxruntime-cpu: every term in host memory: weights as ONNX Runtime holds them (measured factor x initializer
  bytes), both KV caches (runtime/kv_cache.py: rows in use only, numpy's zeroed pages are resident once written),
  the decoders' logits buffers, each session's activation arena for its largest call, and the process baseline
  (Python, numpy, onnxruntime, tokenizers; the tokenizer; each session's fixed cost).
- onnxruntime-cuda and tensorrt: the device arena of runtime/backends/device_plan.py (KV caches at max context,
  staging rows, logits rows, token slots, the shared activation area), the weights on the device, the CUDA
  runtime's own memory (an estimate: no GPU was measured), plus the host side of the process.

On Jetson, memory is unified: device and host share the RAM, so a plan fits when device + host bytes fit into
what the OS leaves (see `DEVICES`).

Modules: `calibration` (measured constants), `devices` (Jetson modules, budgets), `shapes` (one model's graph),
`sources` (recipe mode: config.json / GGUF metadata), `memory` (the plan and its text form).
"""

from __future__ import annotations

from typing import Any

from .devices import DEVICES, Device, device_named

BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")

_FROM_MEMORY = ("BackendPlan", "MemoryPlan", "Term", "arena_bytes", "format_plan", "make_plan", "plan_bundle",
                "plan_recipe", "tensorrt_activation_estimate")

__all__ = ["BACKENDS", "DEVICES", "Device", "device_named", *_FROM_MEMORY]


def __getattr__(name: str) -> Any:
    # the plan itself loads lazily: the CLI reads BACKENDS and DEVICES for its options at start-up
    if name in _FROM_MEMORY:
        from . import memory

        return getattr(memory, name)
    raise AttributeError(f"module 'spectrt.plan' has no attribute {name!r}")
