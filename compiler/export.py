"""Export a loaded transformers model to the spectrt decoder ONNX graph."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from .loading import LoadedModel
from .onnx_graph import GraphSpec, build_decoder_onnx


RopeTables = dict[str, tuple[np.ndarray, np.ndarray]]  # rope kind ("full" / "sliding") -> cos, sin [T, rotary dims]


def rope_tables(loaded: LoadedModel, max_context: int) -> RopeTables:
    """cos/sin tables [max_context, rotary dims] exactly as the model's rotary module computes them, one pair per
    rope kind of the architecture (Gemma 3's sliding layers have their own base)."""
    import torch

    rotary = loaded.model.model.rotary_emb
    positions = torch.arange(max_context, dtype=torch.long)[None, :]  # [1, T]
    probe = torch.zeros(1, dtype=torch.float32)
    per_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters  # Gemma 3's rotary module
    tables = {}
    for kind in loaded.arch.rope_kinds:
        extra = (f"{kind}_attention",) if per_layer_type else ()
        with torch.no_grad():
            cos, sin = rotary(probe, positions, *extra)  # [1, T, D] each, attention scaling applied
        tables[kind] = (cos[0].float().numpy(), sin[0].float().numpy())
    return tables


def state_dict_weights(loaded: LoadedModel):
    """name -> fp32 numpy view of the reference model's parameter (no copy)."""
    state = loaded.model.state_dict()

    def weights(name: str) -> np.ndarray:
        if name not in state:
            raise KeyError(f"weight '{name}' missing from {loaded.source}")
        return state[name].detach().float().numpy()

    return weights


def export_onnx(loaded: LoadedModel, spec: GraphSpec, onnx_path: Path) -> Path:
    return build_decoder_onnx(loaded.arch, state_dict_weights(loaded), rope_tables(loaded, spec.max_context), spec,
                              onnx_path)
