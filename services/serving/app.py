"""Builds the FastAPI app: state, middleware, error handlers, routes. `create_app()` is all
a server (uvicorn, Ray Serve) needs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.serving.metrics import ServingMetrics
from services.serving.routes import ServingState, router
from services.serving.schemas import BodyTooLarge, ErrorBody, FieldProblem, ServingError
from services.serving.settings import ServingSettings

log = logging.getLogger(__name__)


def error_response(metrics: ServingMetrics, error: ServingError, label: str = "") -> JSONResponse:
    """The JSON body of every error; counted under `label`, by default the error's kind."""
    metrics.errors.labels(label or error.kind).inc()
    body = ErrorBody(error=str(error), kind=error.kind, fields=error.fields)
    return JSONResponse(body.model_dump(), error.status, error.headers)


class GuardMiddleware:
    """Refuses oversized bodies (413) before they are read whole; counts and times requests."""

    def __init__(self, app: ASGIApp, state: ServingState) -> None:
        self.app, self.limit, self.metrics = app, state.settings.max_body_bytes, state.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, received = time.perf_counter(), 500, 0

        async def counting_receive() -> Message:  # a body without Content-Length
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            refusal = error_response(self.metrics, BodyTooLarge(self.limit))
            await refusal(scope, receive, recording_send)
        else:
            await self.app(scope, counting_receive, recording_send)
        path = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(path, scope["method"], str(status)).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - started)


def _install_handlers(app: FastAPI, metrics: ServingMetrics) -> None:
    @app.exception_handler(ServingError)
    async def refused(request: Request, error: ServingError) -> JSONResponse:
        return error_response(metrics, error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        if any(item["type"] == "json_invalid" for item in error.errors()):
            malformed = ServingError("the body is not valid JSON", None, 400, "malformed_json")
            return error_response(metrics, malformed)
        problems = []
        for item in error.errors():
            field = ".".join(str(part) for part in item["loc"] if part != "body")
            problems.append(FieldProblem(field=field or "body", problem=item["msg"]))
        summary = "; ".join(f"{p.field}: {p.problem}" for p in problems[:5])
        refusal = ServingError(f"invalid request: {summary}", problems, 422, "validation")
        return error_response(metrics, refusal)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        refusal = ServingError(str(error.detail), None, error.status_code, "http")
        return error_response(metrics, refusal, f"http_{error.status_code}")

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response(metrics, ServingError(f"internal error: {type(error).__name__}"))


def create_app(settings: ServingSettings | None = None) -> FastAPI:
    """The serving app; the model loads in the background (ready = 503 until it has)."""
    settings = settings or ServingSettings()
    state = ServingState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(run()) for run in (state.holder.poll, state.batcher.run)]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)

    app = FastAPI(
        title="MNIST digit classifier",
        summary="The registry's champion model: v1 JSON and image endpoints, Open Inference "
        "Protocol v2, health, metrics, and a page to draw digits on.",
        version="1",
        lifespan=lifespan,
    )
    app.state.serving = state
    app.add_middleware(GuardMiddleware, state=state)
    _install_handlers(app, state.metrics)
    app.include_router(router)
    return app
