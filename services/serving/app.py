"""Builds the FastAPI app: state, middleware, error handlers, routes. `create_app()` is all
a server (uvicorn, Ray Serve) needs."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.serving.batching import MicroBatcher
from services.serving.decoding import DecodeBusy, DecodeGate
from services.serving.holder import Loader, ModelHolder
from services.serving.inputs import InputError
from services.serving.metrics import ServingMetrics
from services.serving.model import ModelLoadError, load
from services.serving.routes import router
from services.serving.schemas import ErrorBody, FieldProblem
from services.serving.settings import ServingSettings
from services.serving.state import ServingState

log = logging.getLogger(__name__)


def error_response(
    status: int, kind: str, message: str, fields: list[FieldProblem] | None = None
) -> JSONResponse:
    body = ErrorBody(error=message, kind=kind, fields=fields or [])
    return JSONResponse(body.model_dump(), status_code=status)


class GuardMiddleware:
    """Refuses oversized bodies (413) before they are read whole; counts and times requests."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: ServingMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send, status)
        else:
            received = 0

            async def counting_receive() -> Message:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
                return message

            async def recording_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            await self.app(scope, counting_receive, recording_send)
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        self.metrics.requests.labels(path, scope["method"], str(status["code"])).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - started)

    async def _too_large(
        self, scope: Scope, receive: Receive, send: Send, status: dict[str, int]
    ) -> None:
        status["code"] = 413
        self.metrics.errors.labels("too_large").inc()
        response = error_response(
            413, "too_large", f"request body exceeds {self.max_body_bytes} bytes", []
        )
        await response(scope, receive, send)


class BodyTooLarge(Exception):
    """A body without Content-Length that grew past the limit while being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")


def _problems(error: RequestValidationError) -> list[FieldProblem]:
    problems = []
    for item in error.errors():
        location = [str(part) for part in item["loc"] if part != "body"]
        problems.append(FieldProblem(field=".".join(location) or "body", problem=item["msg"]))
    return problems


def _install_handlers(app: FastAPI, metrics: ServingMetrics) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        if any(item["type"] == "json_invalid" for item in error.errors()):
            metrics.errors.labels("malformed_json").inc()
            return error_response(400, "malformed_json", "the body is not valid JSON")
        metrics.errors.labels("validation").inc()
        problems = _problems(error)
        summary = "; ".join(f"{p.field}: {p.problem}" for p in problems[:5])
        return error_response(422, "validation", f"invalid request: {summary}", problems)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, error: InputError) -> JSONResponse:
        metrics.errors.labels(error.kind).inc()
        problem = FieldProblem(field=error.field, problem=error.problem)
        return error_response(error.status, error.kind, str(error), [problem])

    @app.exception_handler(DecodeBusy)
    async def busy(request: Request, error: DecodeBusy) -> JSONResponse:
        metrics.errors.labels("busy").inc()
        response = error_response(503, "busy", str(error))
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
        metrics.errors.labels("too_large").inc()
        return error_response(413, "too_large", str(error))

    @app.exception_handler(ModelLoadError)
    async def not_ready(request: Request, error: ModelLoadError) -> JSONResponse:
        metrics.errors.labels("not_ready").inc()
        return error_response(503, "not_ready", str(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        metrics.errors.labels(f"http_{error.status_code}").inc()
        return error_response(error.status_code, "http", str(error.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        metrics.errors.labels("internal").inc()
        log.exception("internal error on %s", request.url.path)
        return error_response(500, "internal", f"internal error: {type(error).__name__}")


def create_app(settings: ServingSettings | None = None, loader: Loader = load) -> FastAPI:
    """The serving app; the model loads in the background (ready = 503 until it has)."""
    settings = settings or ServingSettings()
    metrics = ServingMetrics()
    holder = ModelHolder(settings, metrics, loader)
    batcher = MicroBatcher(
        holder.require,
        max_images=settings.batch_max_images,
        max_wait_s=settings.batch_max_wait_ms / 1000,
        on_batch=metrics.batch_size.observe,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder.start()
        batcher.start()
        yield
        await batcher.stop()
        await holder.stop()

    app = FastAPI(
        title="MNIST digit classifier",
        summary="The registry's champion model: v1 JSON and image endpoints, Open Inference "
        "Protocol v2, health, metrics, and a page to draw digits on.",
        version="1",
        lifespan=lifespan,
    )
    decodes = DecodeGate(settings.max_image_decodes, settings.max_image_queue)
    app.state.serving = ServingState(settings, metrics, holder, batcher, decodes)
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    _install_handlers(app, metrics)
    app.include_router(router)
    return app
