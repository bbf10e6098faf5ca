"""Tiny random-weight llama-family models and a small BPE tokenizer, built inside the tests."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "for i in range(10):\n    print(i * i)\n",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one.",
    "import numpy as np\nx = np.arange(12).reshape(3, 4)\n",
    "Paris is the capital of France; Berlin is the capital of Germany.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(out_dir: Path, vocab_size: int = 300, corpus: list[str] | None = None):
    """Byte-level BPE with <|endoftext|> (bos/eos) and chat markers; saved as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus or CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def make_model(out_dir: Path, kind: str = "llama", *, layers: int = 2, hidden: int = 64, heads: int = 4,
               kv_heads: int = 2, vocab: int = 300, tie: bool = True, seed: int = 0, tokenizer_vocab: int = 300,
               tokenizer_corpus: list[str] | None = None, rope_scaling: dict | None = None,
               max_position_embeddings: int = 512, perturb: float = 0.0, **config_options) -> Path:
    """Save a random-weight model (+ tokenizer) as a Hugging Face folder and return it.

    perturb > 0 adds Gaussian noise of that size to every weight (a similar-but-different draft);
    config_options go to the config as they are (a family's own options: head_dim, layer_types, ...)."""
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, GenerationConfig)

    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out_dir, tokenizer_vocab, tokenizer_corpus)
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  rms_norm_eps=1e-5)
    if rope_scaling:
        kwargs["rope_scaling"] = rope_scaling
    kwargs.update(config_options)
    config = AutoConfig.for_model(kind, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random weights with some structure so logits are not all ~0
        for param in model.parameters():
            param.normal_(0.0, 0.2 if param.dim() > 1 else 0.05)
        unit = 0.0 if kind.startswith("gemma") else 1.0  # Gemma's norms multiply by (1 + w)
        for layer in model.model.layers:
            for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm"):
                if hasattr(layer, norm):
                    getattr(layer, norm).weight.fill_(unit)
        model.model.norm.weight.fill_(unit)
        if perturb:  # a draft that resembles the seed's model: same weights plus noise
            noise = torch.Generator().manual_seed(seed + 1000)
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=noise) * perturb)
    model.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(out_dir)
    return out_dir


# The options of each newer family's real configurations, at tiny sizes: what makes the family differ from Llama.
FAMILY_OPTIONS = {
    # Qwen3: per-head q/k RMSNorm, an explicit head_dim wider than hidden / heads (Qwen3-0.6B: 128 vs 64)
    "qwen3": dict(head_dim=32),
    # Phi-3 / Phi-4-mini: fused qkv and gate/up weights, partial rotary (Phi-4-mini: 0.75), a sliding window on
    # every layer (Phi-3-mini-4k: 2047)
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=12, pad_token_id=0),
    # Gemma 3: (1 + w) norms, scaled embeddings, GELU-tanh, q/k norm, sandwich norms, query_pre_attn_scalar,
    # 5 sliding layers (own rope base) per global layer; window shortened so the tests' sequences cross it
    "gemma3_text": dict(head_dim=32, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
                        sliding_window=10, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}
