"""`spectrt serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over one Generator.

Endpoints: POST /v1/completions, POST /v1/chat/completions (streaming by server-sent events or not),
GET /v1/models, GET /health, GET /metrics (Prometheus text). Errors are OpenAI-style JSON bodies:
400 for a bad request (naming the field), 404 for an unknown model, 429 when the queue is full,
500 when a generation fails; never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from spectrt.errors import SpectrtError
from spectrt.runtime.generator import Generator, StreamChunk

from .engine import Engine, Pacer, QueueFull
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, ResponseIds, error_body

log = logging.getLogger("spectrt.serve")


@dataclass(frozen=True)
class ServeConfig:
    """`spectrt serve` options."""

    model_name: str
    max_queue: int = 16  # requests that may wait for the generator; more are refused with 429
    default_max_tokens: int = 256  # when a request gives no max_tokens
    pacing: str = "raw"  # raw: chunks as the rounds deliver them | paced: spread at the decode rate
    max_pacing_delay: float = 0.25  # seconds pacing may add to any token


def _field_name(location: tuple) -> str:
    parts = [str(p) for p in location if p not in ("body",)]
    return ".".join(parts) or "body"


def create_app(generator: Generator, config: ServeConfig) -> FastAPI:
    """The ASGI app serving `generator` under the model name `config.model_name`; the app owns the generator:
    when the server stops (the lifespan ends), the engine stops and the generator is closed."""
    cache = getattr(generator, "suffix_cache", None)
    metrics = ServerMetrics(config.model_name, lambda: engine.queue_depth, generator.scheduler_state,
                            generator.invariance, cache.stats if cache is not None else None,
                            generator.batch_stats if getattr(generator, "max_batch", 1) > 1 else None)
    engine = Engine(generator, max_queue=config.max_queue, on_cancelled=lambda job: _safely(
        metrics.observe_cancelled_tokens, job.label, job.generated))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.shutdown)  # returns once the worker has closed every stream
        await asyncio.to_thread(generator.close)

    app = FastAPI(title="spectrt", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {"loc": ("body",), "msg": "invalid request"}
        field = _field_name(tuple(first.get("loc", ())))
        message = "; ".join(f"{_field_name(tuple(p.get('loc', ())))}: {p.get('msg')}" for p in problems[:5])
        return JSONResponse(error_body(f"invalid request: {message}", param=field), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", kind="server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name, "queue_depth": engine.queue_depth,
                "exact": generator.invariance.exact, "exactness": generator.invariance.summary()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "spectrt"}]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        _safely(metrics.refresh_scheduler)  # the scheduler gauges as of now (a snapshot under the generator's lock)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(body, ResponseIds("completion", config.model_name), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _serve(body, ResponseIds("chat", config.model_name), request)

    async def _serve(body: CompletionRequest | ChatCompletionRequest, ids: ResponseIds, request: Request):
        if body.model != config.model_name:
            return JSONResponse(error_body(f"model '{body.model}' is not served here; this server serves "
                                           f"'{config.model_name}' (GET /v1/models).", param="model",
                                           code="model_not_found"), status_code=404)
        options = body.generate_options(config.default_max_tokens)
        prompt = body.prompt_input()
        constrained = any(options.get(key) for key in ("json_schema", "regex", "grammar", "choice"))
        drafter = generator.resolve_drafter(body.draft, constrained)  # auto -> model | ngram | grammar+...
        try:  # the set-up (tokenizing, chat template, constraint compile) runs off the event loop
            job = await engine.submit(lambda: generator.stream(**prompt, **options), drafter)
        except QueueFull as exc:
            metrics.rejected.labels(config.model_name).inc()
            return JSONResponse(error_body(str(exc), kind="rate_limit_error", code="queue_full"), status_code=429,
                                headers={"Retry-After": "1"})
        except SpectrtError as exc:  # Generator.stream validates: GenerationError -> 400 naming the field
            return JSONResponse(error_body(str(exc), param=_guess_param(str(exc))), status_code=400)
        pacing = body.pacing or config.pacing
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(job, ids, drafter, pacing, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, final = [], None
        try:
            async for _, chunk in engine.chunks(job):
                texts.append(chunk.text)
                final = chunk if chunk.token_id is None else final
        except Exception as exc:  # the generation failed half-way
            _safely(metrics.observe, drafter, "error", None)
            return JSONResponse(error_body(f"generation failed: {type(exc).__name__}: {exc}", kind="server_error"),
                                status_code=500)
        if final is None:  # the worker stopped it: the server is shutting down
            return JSONResponse(error_body("the server is shutting down; retry on another instance.",
                                           kind="server_error"), status_code=503)
        response = JSONResponse(ids.completion("".join(texts), final.finish_reason, final.metrics.to_json()))
        _observe(drafter, final)  # after the response is built: a metrics failure never costs the text
        return response

    def _observe(drafter: str, final: StreamChunk) -> None:
        m = final.metrics
        _safely(metrics.observe, drafter, final.finish_reason, m.to_json(), m.delivery_gaps, m.round_latencies,
                dict(m.accepted_length_histogram))

    async def _sse(job, ids: ResponseIds, drafter: str, pacing: str, include_usage: bool) -> AsyncIterator[str]:
        pacer = Pacer(_median_tpot(generator) if pacing == "paced" else None, config.max_pacing_delay)
        first, final, failed = True, None, False
        try:
            async for arrived, chunk in engine.chunks(job):
                if chunk.token_id is None:
                    final = chunk
                    break
                await pacer.wait(arrived)
                if chunk.text or first:
                    yield _event(ids.chunk(chunk.text, first=first))
                    first = False
        except Exception as exc:  # the generation failed half-way: tell the client, then end the stream
            failed = True
            _safely(metrics.observe, drafter, "error", None)
            yield _event(error_body(f"generation failed: {type(exc).__name__}: {exc}", kind="server_error"))
            yield "data: [DONE]\n\n"
            return
        finally:
            if final is None:
                job.cancelled.set()  # the client went away (or the server stops): free the generator
                if not failed:
                    _safely(metrics.observe, drafter, "cancelled", None)
        yield _event(ids.chunk(final.text, final.finish_reason, first=first))
        if include_usage:
            yield _event(ids.usage_chunk(final.metrics.to_json()))
        yield "data: [DONE]\n\n"
        _observe(drafter, final)

    return app


def _safely(record, *args: Any) -> None:
    """Record metrics; a failure is logged and never costs a response."""
    try:
        record(*args)
    except Exception:
        log.exception("spectrt serve: recording metrics failed (the response is unaffected)")


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _median_tpot(generator: Generator) -> float | None:
    """The generator's median time per output token so far (the pace of paced streaming)."""
    return generator.aggregate.latency_percentile("time_per_output_token", 50)


# words of a GenerationError message -> the request field it is about
PARAM_HINTS = (("json_schema", "response_format"), ("schema", "response_format"), ("regex", "regex"),
               ("grammar", "grammar"), ("choice", "choice"), ("width", "width"), ("drafter", "draft"), ("draft model", "draft"), ("chat template", "messages"),
               ("messages", "messages"), ("prompt", "prompt"), ("max_new_tokens", "max_tokens"),
               ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"),
               ("stop", "stop"), ("accept", "accept"), ("prediction", "prediction"))


def _guess_param(message: str) -> str | None:
    return next((param for words, param in PARAM_HINTS if words in message), None)


def serve(generator: Generator, config: ServeConfig, *, host: str, port: int, log_level: str = "info") -> None:
    """Run the server until interrupted."""
    import uvicorn

    started = time.perf_counter()
    app = create_app(generator, config)
    print(f"spectrt serve: model '{config.model_name}' on http://{host}:{port} (ready in "
          f"{time.perf_counter() - started:.1f} s; OpenAI API under /v1, metrics at /metrics)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
