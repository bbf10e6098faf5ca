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

    def request(self) -> dict:
        """Keyword arguments for Generator.generate / encode (the prediction apart: a baseline runs without it)."""
        return {"prompt": self.prompt} if self.prompt is not None else {"messages": list(self.messages)}


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
        prompts.append(Prompt(str(record.get("id", f"{path.stem}-{number}")), record.get("prompt"), messages,
                              prediction))
    return prompts[:limit] if limit else prompts
