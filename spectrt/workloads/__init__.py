"""Prompt sets shipped with spectrt (spectrt/workloads/*.jsonl, CC0-1.0): the bench's workloads, and the
training prompts `spectrt train-head` draws from by default (their training split)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from spectrt.errors import ConfigError

WORKLOAD_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str | None = None  # raw text continuation
    messages: tuple[dict, ...] | None = None  # chat, rendered with the bundle's template
    prediction: str | None = None  # the output expected (an edit's original): a predicted-output drafter's input
    # a multi-turn session (agent): after each answer but the last, the next tool result comes back as a `tool`
    # message and the model answers again; one turn more than there are results
    tool_results: tuple[str, ...] = ()

    def request(self) -> dict:
        """Keyword arguments for Generator.generate / encode (the prediction apart: a baseline runs without it)."""
        return {"prompt": self.prompt} if self.prompt is not None else {"messages": list(self.messages)}

    @property
    def turns(self) -> int:
        return len(self.tool_results) + 1

    def turn(self, number: int, answers: list[str]) -> "Prompt":
        """Turn `number` (1-based) of a session: the conversation with the earlier `answers` (the model's, in order)
        each followed by its tool result; a prompt that is no session is its own first and only turn."""
        if not self.tool_results:
            assert number == 1
            return self
        assert len(answers) == number - 1 <= len(self.tool_results)
        history = [message for answer, result in zip(answers, self.tool_results)
                   for message in ({"role": "assistant", "content": answer}, {"role": "tool", "content": result})]
        return Prompt(f"{self.id}/turn{number}", messages=(*self.messages, *history))


def available_workloads() -> list[str]:
    return sorted(p.stem for p in WORKLOAD_DIR.glob("*.jsonl"))


def load_workload(name_or_path: str, limit: int | None = None) -> list[Prompt]:
    """Prompts of a shipped workload (code, chat, extraction) or of a .jsonl file with the same format."""
    path = Path(name_or_path)
    if not path.is_file():
        path = WORKLOAD_DIR / f"{name_or_path}.jsonl"
    if not path.is_file():
        raise ConfigError(f"unknown workload '{name_or_path}'; shipped: {', '.join(available_workloads())} "
                          f"(or pass a .jsonl file with id + prompt|messages per line).")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number} is not valid JSON: {exc}") from exc
        if ("prompt" in record) == ("messages" in record):
            raise ConfigError(f"{path}:{number} needs exactly one of 'prompt' or 'messages'.")
        messages = tuple(record["messages"]) if "messages" in record else None
        prediction = record.get("prediction")
        if prediction is not None and (not isinstance(prediction, str) or not prediction):
            raise ConfigError(f"{path}:{number}: 'prediction' must be a non-empty string (the expected output).")
        tool_results = record.get("tool_results", [])
        if not isinstance(tool_results, list) or not all(isinstance(r, str) and r for r in tool_results) \
                or (tool_results and messages is None):
            raise ConfigError(f"{path}:{number}: 'tool_results' must be a list of non-empty strings, with 'messages' "
                              f"(a multi-turn session).")
        prompts.append(Prompt(str(record.get("id", f"{path.stem}-{number}")), record.get("prompt"), messages,
                              prediction, tuple(tool_results)))
    return prompts[:limit] if limit else prompts
