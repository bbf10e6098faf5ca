"""Text in and out: prompt encoding, chat templates, incremental detokenization, stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectrt.runtime.errors import BundleError, GenerationError


class BundleTokenizer:
    """The bundle's tokenizer.json plus its chat template (rendered with jinja2 like transformers does)."""

    def __init__(self, tokenizer_path: Path, generation: dict[str, Any]):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise BundleError(f"could not read the bundle tokenizer {tokenizer_path}: {exc}; rebuild the bundle.") from exc
        self.chat_template = generation.get("chat_template")
        self.special_tokens = generation.get("special_tokens", {})
        self._template = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise GenerationError("this bundle's tokenizer has no chat template; pass a plain prompt instead of messages.")
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise GenerationError(f"chat template refused the messages: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # like transformers: the template already holds the special tokens, add none
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids


class IncrementalDecoder:
    """Text deltas of a growing token list, through the tokenizers library's DecodeStream.

    The stream starts with the tail of the prompt as context, so the first token's text is what it
    adds after the prompt (a SentencePiece/Metaspace '▁word' keeps its leading space). Incomplete
    UTF-8 sequences are held back until a later token completes them."""

    CONTEXT_TOKENS = 8

    def __init__(self, tokenizer: BundleTokenizer, prompt_ids: list[int] | tuple[int, ...] = ()):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        context = [int(i) for i in prompt_ids[-self.CONTEXT_TOKENS :]] if prompt_ids else []
        self.stream = DecodeStream(skip_special_tokens=True)
        complete = True
        for token_id in context:  # the context's own text is not ours to emit
            complete = self.stream.step(tokenizer.tokenizer, token_id) is not None
        if not complete:  # the prompt ends inside a character (or on a special token): start without context
            self.stream = DecodeStream(skip_special_tokens=True)
        self.held: list[int] = []  # tokens whose text the stream still holds back

    def push(self, token_id: int) -> str:
        text = self.stream.step(self.tokenizer.tokenizer, int(token_id))
        if text is None:
            self.held.append(int(token_id))
            return ""
        self.held = []
        return text

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character decodes to U+FFFD)."""
        held, self.held = self.held, []
        return self.tokenizer.decode(held) if held else ""


@dataclass
class StopMatcher:
    """Finds stop strings in streamed text; holds back text that could still become a stop string."""

    stops: tuple[str, ...]
    pending: str = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit now, stopped). On a stop, the text before it is emitted and the rest dropped."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            index = min(i for i, _ in hits)
            out, self.pending = self.pending[:index], ""
            return out, True
        hold = 0
        for stop in self.stops:  # longest pending suffix that is a proper prefix of a stop string
            for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
