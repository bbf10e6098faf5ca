"""llama.cpp (llama-cpp-python) on the GGUF the bundle was built from, teacher-forced over the same windows:
fed the same token ids (never text), logits of every position kept (`logits_all=True`), n_ctx = the window."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .scoring import Window

ROW_CHUNK = 256


def load_llama(path: str, window: int, threads: int) -> Any:
    import os

    from llama_cpp import Llama

    threads = threads or os.cpu_count() or 1
    return Llama(model_path=path, n_ctx=window, n_batch=min(512, window), n_threads=threads,
                 n_threads_batch=threads, logits_all=True, n_gpu_layers=0, seed=0, verbose=False)


def llamacpp_rows(llm: Any, window: Window) -> Iterator[np.ndarray]:
    """fp32 logits of the window's scored rows, in chunks (a cold KV cache per window)."""
    llm.reset()
    llm.eval([int(t) for t in window.fed])
    scores = llm.scores  # [n_ctx, V] fp32, rows 0..len(fed)-1 filled by eval
    stop = len(window.fed)
    for start in range(window.first_row, stop, ROW_CHUNK):
        yield np.array(scores[start:min(start + ROW_CHUNK, stop)], dtype=np.float32)


def facts(llm: Any, path: str, threads: int) -> dict[str, Any]:
    import llama_cpp

    return {"tool": "llama.cpp", "package": "llama-cpp-python", "version": llama_cpp.__version__, "model": path,
            "precision": "GGUF as stored (llama.cpp's quantized CPU kernels)", "n_ctx": llm.n_ctx(),
            "threads": threads, "n_vocab": llm.n_vocab()}
