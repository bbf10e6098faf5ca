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
               max_position_embeddings: int = 512, perturb: float = 0.0) -> Path:
    """Save a random-weight model (+ tokenizer) as a Hugging Face folder and return it.

    perturb > 0 adds Gaussian noise of that size to every weight (a similar-but-different draft)."""
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
    config = AutoConfig.for_model(kind, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random weights with some structure so logits are not all ~0
        for param in model.parameters():
            param.normal_(0.0, 0.2 if param.dim() > 1 else 0.05)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        if perturb:  # a draft that resembles the seed's model: same weights plus noise
            noise = torch.Generator().manual_seed(seed + 1000)
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=noise) * perturb)
    model.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(out_dir)
    return out_dir
