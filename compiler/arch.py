"""Architecture numbers of a llama-family decoder, read from a transformers config.

Supported: Llama (incl. SmolLM2), Mistral, Qwen2 (q/k/v bias). Everything else is refused with
a message naming what is supported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from spectrt.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = {
    "llama": "Llama / SmolLM2",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


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
    sliding_window: int | None

    @property
    def kv_groups(self) -> int:
        """Query heads served by one KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _get(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, default)
    return default if value is None else value


def _rope_settings(config: Any) -> tuple[float, str, dict[str, Any] | None]:
    """(theta, rope type, scaling dict) from both old (rope_scaling) and new (rope_parameters) configs."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
    else:
        theta = float(_get(config, "rope_theta", 10000.0))
    merged = {**(scaling if isinstance(scaling, dict) else {}), **(params if isinstance(params, dict) else {})}
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    extra = {k: v for k, v in merged.items() if k not in ("rope_theta", "rope_type", "type")}
    return theta, str(rope_type), (extra or None)


def arch_from_config(config: Any, *, source: str = "model") -> ModelArch:
    """Read a transformers PretrainedConfig into a ModelArch, refusing unsupported models."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ModelLoadError(
            f"{source}: architecture '{model_type}' is not supported. spectrt builds llama-family "
            f"decoders: {supported}. Convert the model to one of these or pick a supported one."
        )
    theta, rope_type, rope_scaling = _rope_settings(config)
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
    if head_dim % 2:
        raise ModelLoadError(f"{source}: head_dim {head_dim} is odd; rotary embeddings need an even head_dim.")
    if _get(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ModelLoadError(f"{source}: activation '{config.hidden_act}' is not supported (only silu).")
    if model_type == "qwen2":
        attention_bias = True
    else:
        attention_bias = bool(_get(config, "attention_bias", False))
    if bool(_get(config, "mlp_bias", False)):
        raise ModelLoadError(f"{source}: MLP biases (mlp_bias=True) are not supported.")
    sliding = _get(config, "sliding_window", None) if _get(config, "use_sliding_window", model_type == "mistral") else None
    return ModelArch(
        model_type=model_type,
        num_layers=int(config.num_hidden_layers),
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
        sliding_window=int(sliding) if sliding else None,
    )
