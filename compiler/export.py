"""Export a loaded transformers model to the spectrt decoder ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .loading import LoadedModel
from .onnx_graph import GraphSpec, build_decoder_onnx


def rope_tables(loaded: LoadedModel, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_context, head_dim] exactly as the model's rotary module computes them."""
    import torch

    rotary = loaded.model.model.rotary_emb
    positions = torch.arange(max_context, dtype=torch.long)[None, :]  # [1, T]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)  # [1, T, D] each, attention scaling applied
    return cos[0].float().numpy(), sin[0].float().numpy()


def state_dict_weights(loaded: LoadedModel):
    """name -> fp32 numpy view of the reference model's parameter (no copy)."""
    state = loaded.model.state_dict()

    def weights(name: str) -> np.ndarray:
        if name not in state:
            raise KeyError(f"weight '{name}' missing from {loaded.source}")
        return state[name].detach().float().numpy()

    return weights


def export_onnx(loaded: LoadedModel, spec: GraphSpec, onnx_path: Path) -> Path:
    cos, sin = rope_tables(loaded, spec.max_context)
    return build_decoder_onnx(loaded.arch, state_dict_weights(loaded), cos, sin, spec, onnx_path)
