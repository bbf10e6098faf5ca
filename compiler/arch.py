"""Architecture numbers of a llama-family decoder, read from a transformers config.

Supported: Llama (incl. SmolLM2), Mistral, Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm), Phi-3 / Phi-4-mini
(fused qkv and gate/up weights, partial rotary, LongRoPE within its original context) and Gemma 3 text models
((1 + w) norms, scaled embeddings, GELU-tanh, q/k norm, norms around attention and MLP, interleaved sliding-window
layers with their own rope base). Everything else is refused with a message naming what is missing and the
closest supported family.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from spectrt.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = {
    "llama": "Llama / SmolLM2",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "phi3": "Phi-3 / Phi-4-mini",
    "gemma3_text": "Gemma 3 (text)",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")

# Architectures people bring that spectrt does not build: what is missing, and the closest supported family.
KNOWN_UNSUPPORTED = {
    "qwen2_moe": ("mixture of experts", "qwen2"),
    "qwen3_moe": ("mixture of experts", "qwen3"),
    "mixtral": ("mixture of experts", "mistral"),
    "deepseek_v2": ("mixture of experts and multi-head latent attention", "llama"),
    "deepseek_v3": ("mixture of experts and multi-head latent attention", "llama"),
    "phimoe": ("mixture of experts", "phi3"),
    "gpt_oss": ("mixture of experts and attention sinks with sliding windows", "qwen3"),
    "gemma": ("Gemma 1's GELU MLP without q/k norm", "gemma3_text"),
    "gemma2": ("attention-logit and final-logit soft-capping", "gemma3_text"),
    "gemma3": ("the vision tower of a multimodal Gemma 3 (4B and larger)", "gemma3_text"),
    "gemma3n": ("per-layer embeddings, AltUp and LAuReL blocks", "gemma3_text"),
    "phi": ("parallel attention/MLP blocks with LayerNorm and GELU (Phi-1/Phi-2)", "phi3"),
    "phi4_multimodal": ("audio and vision encoders", "phi3"),
    "qwen2_vl": ("a vision encoder and multimodal rotary embeddings", "qwen2"),
    "qwen2_5_vl": ("a vision encoder and multimodal rotary embeddings", "qwen2"),
    "llama4": ("mixture of experts, chunked attention and a vision encoder", "llama"),
    "mamba": ("state-space layers instead of attention", "llama"),
    "falcon_h1": ("hybrid attention / state-space layers", "llama"),
    "gpt2": ("learned absolute positions and LayerNorm", "llama"),
    "olmo2": ("norms after attention and MLP without the pre-norms", "qwen3"),
}
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


@dataclass(frozen=True)
class ModelArch:
    """The numbers a graph builder and the runtime need about one decoder model."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # rows of the embedding matrix (may be padded beyond the tokenizer)
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    max_position_embeddings: int
    sliding_window: int | None  # the window of every "sliding" layer (a key at distance >= window is masked)
    # The options of the families after Llama; the defaults are Llama's.
    qk_norm: bool = False  # RMSNorm over each head's q and k before rope (Qwen3, Gemma 3)
    norm_weight_offset: float = 0.0  # every RMSNorm multiplies by (offset + w): Gemma's (1 + w)
    embed_scale: float | None = None  # token embeddings times this (Gemma: sqrt(hidden_size))
    hidden_act: str = "silu"  # silu | gelu_tanh (the gated MLP's activation)
    sandwich_norms: bool = False  # Gemma 3: the attention and MLP outputs are normed before their residual adds,
    # and the MLP input is normed by pre_feedforward_layernorm
    attention_scale: float | None = None  # query scaling; None = head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar)
    rotary_dim: int | None = None  # rotated dims of each head (partial rotary, Phi-4-mini); None = head_dim
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj weights
    layer_types: tuple[str, ...] | None = None  # per layer "full" | "sliding"; None = every layer full
    local_rope_theta: float | None = None  # the sliding layers' own rope base (Gemma 3), None = rope_theta

    @property
    def kv_groups(self) -> int:
        """Query heads served by one KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def layer_type(self, layer: int) -> str:
        """"full" or "sliding" (attends to the last `sliding_window` positions only)."""
        return "full" if self.layer_types is None else self.layer_types[layer]

    @property
    def rope_kinds(self) -> tuple[str, ...]:
        """The layer types whose rotary tables differ: ("full",), or ("full", "sliding") with a local rope base."""
        if self.local_rope_theta is None or self.layer_types is None:
            return ("full",)
        return tuple(sorted(set(self.layer_types)))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _get(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, default)
    return default if value is None else value


def _rope_settings(config: Any, layer_type: str | None = None) -> tuple[float, str, dict[str, Any] | None]:
    """(theta, rope type, scaling dict) from both old (rope_scaling) and new (rope_parameters) configs; `layer_type`
    picks one entry of a per-layer-type rope_parameters (Gemma 3: "full_attention" / "sliding_attention")."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    if layer_type is not None:  # transformers may alias rope_scaling to the per-type dict
        params = params[layer_type] if isinstance(params.get(layer_type), dict) else params
        scaling = scaling[layer_type] if isinstance(scaling.get(layer_type), dict) else scaling
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
    else:
        theta = float(_get(config, "rope_theta", 10000.0))
    merged = {**(scaling if isinstance(scaling, dict) else {}), **(params if isinstance(params, dict) else {})}
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    extra = {k: v for k, v in merged.items()
             if k not in ("rope_theta", "rope_type", "type") and not (k == "partial_rotary_factor" and v == 1.0)}
    return theta, str(rope_type), (extra or None)


def _refuse(source: str, model_type: Any) -> ModelLoadError:
    supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
    if model_type in KNOWN_UNSUPPORTED:
        missing, closest = KNOWN_UNSUPPORTED[model_type]
        return ModelLoadError(
            f"{source}: architecture '{model_type}' is not supported: spectrt does not build {missing}. The closest "
            f"supported family is {closest} ({SUPPORTED_MODEL_TYPES[closest]}); supported: {supported}.")
    return ModelLoadError(
        f"{source}: architecture '{model_type}' is not supported. spectrt builds llama-family "
        f"decoders: {supported}. Convert the model to one of these or pick a supported one."
    )


def _layer_types(config: Any, model_type: str, num_layers: int) -> tuple[tuple[str, ...] | None, int | None]:
    """(per-layer "full"/"sliding" or None for all full, the sliding window) as transformers masks them: from
    config.layer_types where the config has them; Mistral and Phi-3 window every layer when sliding_window is set."""
    window = _get(config, "sliding_window", None)
    declared = getattr(config, "layer_types", None)
    if declared:
        kinds = tuple("sliding" if kind == "sliding_attention" else "full" for kind in declared)
        unknown = set(declared) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ModelLoadError(f"layer types {sorted(unknown)} are not supported (only full and sliding attention)")
        if len(kinds) != num_layers:
            raise ModelLoadError(f"config lists {len(kinds)} layer types for {num_layers} layers")
    elif model_type in ("mistral", "phi3") and window:
        kinds = ("sliding",) * num_layers
    else:
        return None, None
    if "sliding" not in kinds:
        return None, None
    if not window:
        raise ModelLoadError("sliding-attention layers without a sliding_window in the config")
    return kinds, int(window)


def arch_from_config(config: Any, *, source: str = "model") -> ModelArch:
    """Read a transformers PretrainedConfig into a ModelArch, refusing unsupported models."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _refuse(source, model_type)
    gemma = model_type == "gemma3_text"
    num_layers = int(config.num_hidden_layers)
    try:
        layer_types, sliding = _layer_types(config, model_type, num_layers)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    theta, rope_type, rope_scaling = _rope_settings(config, "full_attention" if gemma else None)
    local_theta = None
    if gemma and layer_types is not None:
        local_theta, local_type, local_scaling = _rope_settings(config, "sliding_attention")
        if local_type != "default" or local_scaling:
            raise ModelLoadError(f"{source}: a scaled rope ('{local_type}') on sliding layers is not supported.")
        local_theta = None if local_theta == theta else local_theta
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope scaling type '{rope_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})."
        )
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(_get(config, "num_key_value_heads", num_heads))
    hidden = int(config.hidden_size)
    head_dim = int(_get(config, "head_dim", hidden // num_heads))
    if num_heads % num_kv_heads:
        raise ModelLoadError(f"{source}: {num_heads} attention heads do not divide into {num_kv_heads} KV heads.")
    rotary_factor = float((rope_scaling or {}).get("partial_rotary_factor", _get(config, "partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * rotary_factor)
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ModelLoadError(f"{source}: {rotary_dim} rotated dims per head; rotary embeddings need an even number.")
    activation = _get(config, "hidden_activation", None) if gemma else _get(config, "hidden_act", "silu")
    if activation in ("silu", "swish"):
        hidden_act = "silu"
    elif activation in GELU_TANH:
        hidden_act = "gelu_tanh"
    else:
        raise ModelLoadError(f"{source}: activation '{activation}' is not supported (silu, gelu_pytorch_tanh).")
    if model_type == "qwen2":
        attention_bias = True
    else:
        attention_bias = bool(_get(config, "attention_bias", False))
    if bool(_get(config, "mlp_bias", False)):
        raise ModelLoadError(f"{source}: MLP biases (mlp_bias=True) are not supported.")
    for option in ("attn_logit_softcapping", "final_logit_softcapping"):
        if _get(config, option, None) is not None:
            raise ModelLoadError(f"{source}: {option} is not supported (the closest supported family is gemma3_text).")
    if gemma and _get(config, "use_bidirectional_attention", False):
        raise ModelLoadError(f"{source}: bidirectional attention (an encoder/embedding Gemma) is not a decoder "
                             "spectrt can speculate with.")
    return ModelArch(
        model_type=model_type,
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        rms_norm_eps=float(_get(config, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_type=rope_type,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        attention_bias=attention_bias,
        max_position_embeddings=int(_get(config, "max_position_embeddings", 2048)),
        sliding_window=sliding,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        norm_weight_offset=1.0 if gemma else 0.0,
        embed_scale=float(hidden ** 0.5) if gemma else None,
        hidden_act=hidden_act,
        sandwich_norms=gemma,
        attention_scale=float(config.query_pre_attn_scalar) ** -0.5 if gemma else None,
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        fused_projections=model_type == "phi3",
        layer_types=layer_types,
        local_rope_theta=local_theta,
    )
