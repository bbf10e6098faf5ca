"""A TensorRT logger that keeps warnings and errors, so an error of ours can quote what TensorRT said.
Shared by the engine builder (compiler) and the TensorRT executor (runtime)."""

from __future__ import annotations

from typing import Any


def collecting_logger(trt: Any) -> Any:
    """An ILogger of module `trt` (tensorrt or tensorrt_rtx) whose `messages` hold '[SEVERITY] text' lines."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append(f"[{getattr(severity, 'name', severity)}] {msg}")

    return CollectingLogger()
