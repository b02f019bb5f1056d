"""Thin routes: parse (typed schemas), predict through the micro-batcher, shape the reply."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.serving.batching import MicroBatcher
from services.serving.inputs import UploadDecoder, v1_images, v2_images
from services.serving.metrics import ServingMetrics
from services.serving.model import ModelHolder, ServedModel
from services.serving.schemas import (
    InputError,
    ModelInfo,
    Prediction,
    PredictRequest,
    PredictResponse,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2OutputTensor,
    V2TensorMetadata,
)
from services.serving.settings import ServingSettings

PAGE = Path(__file__).parent / "static" / "index.html"
router = APIRouter()


class ServingState:
    """What the routes need from the app (`app.state.serving`), built from its settings."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings, self.metrics = settings, ServingMetrics()
        self.holder = ModelHolder(settings, self.metrics)
        self.batcher = MicroBatcher(self.holder)
        self.uploads = UploadDecoder(settings)


async def serving(request: Request) -> ServingState:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop on every request
    return request.app.state.serving


State = Annotated[ServingState, Depends(serving)]


def _v1_response(probabilities: np.ndarray, model: ServedModel) -> PredictResponse:
    rows = [
        Prediction(digit=int(row.argmax()), probabilities=row.tolist()) for row in probabilities
    ]
    return PredictResponse(
        model_name=model.info.name, model_version=model.info.version, predictions=rows
    )


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")


@router.get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    return {"status": "live"}


@router.get("/health/ready", tags=["health"], responses={503: {"description": "No model yet"}})
async def ready(state: State) -> dict[str, str]:
    return {"status": "ready", "model_version": state.holder.require().info.version}


@router.get("/v1/model", tags=["v1"])
async def model_info(state: State) -> ModelInfo:
    return state.holder.require().info


@router.post("/v1/predict", tags=["v1"])
async def predict(body: PredictRequest, state: State) -> PredictResponse:
    """Images as 28x28 nested lists (0-255 integers or [0, 1] floats)."""
    images = v1_images(body, state.settings.max_images)
    return _v1_response(*await state.batcher.predict(images))


@router.post(
    "/v1/predict/image",
    tags=["v1"],
    responses={
        400: {"description": "A damaged or truncated image (kind `unreadable`)"},
        413: {"description": "More pixels than SERVING_MAX_IMAGE_PIXELS (kind `too_large`)"},
        415: {"description": "Not a PNG or JPEG, judged by content (`unsupported_format`)"},
        422: {"description": "A blank image: nothing stands out from the paper (`no_digit`)"},
        503: {"description": "Too many uploads being decoded (kind `busy`, Retry-After)"},
    },
)
async def predict_image(
    state: State,
    file: Annotated[UploadFile, File(description="A PNG or JPEG picture of a digit, any size")],
) -> PredictResponse:
    """One uploaded picture of a digit, made MNIST-style before prediction."""
    image = await state.uploads.decode(await file.read())
    return _v1_response(*await state.batcher.predict(image))


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# Open Inference Protocol v2 (REST), so KServe and Triton clients can call this server.
@router.get("/v2", tags=["v2"])
async def v2_server() -> dict[str, object]:
    return {"name": "mnist-serving", "version": "1", "extensions": []}


@router.get("/v2/health/live", tags=["v2"])
async def v2_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", tags=["v2"])
async def v2_ready(state: State) -> JSONResponse:
    is_ready = state.holder.model is not None
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


def _served(state: ServingState, name: str, version: str | None = None) -> ModelInfo:
    """The served model's info if it is the one the path names, else 404."""
    info = state.holder.require().info
    if name != info.name:
        raise InputError(
            "model_name", f"unknown model {name!r}; this server serves {info.name!r}", 404
        )
    if version is not None and version != info.version:
        raise InputError(
            "model_version", f"version {version} is not loaded (serving {info.version})", 404
        )
    return info


@router.get("/v2/models/{name}", tags=["v2"])
async def v2_metadata(name: str, state: State) -> V2ModelMetadata:
    info = _served(state, name)
    inputs = [V2TensorMetadata(name="images", datatype="FP32", shape=[-1, 28, 28])]
    outputs = [V2TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, 10])]
    versions, platform = [info.version], "onnxruntime_onnx"
    return V2ModelMetadata(
        name=info.name, versions=versions, platform=platform, inputs=inputs, outputs=outputs
    )


@router.get("/v2/models/{name}/ready", tags=["v2"])
async def v2_model_ready(name: str, state: State) -> dict[str, object]:
    _served(state, name)
    return {"name": name, "ready": True}


async def _infer(
    state: ServingState, body: V2InferRequest, name: str, version: str | None = None
) -> V2InferResponse:
    _served(state, name, version)
    images = v2_images(body.inputs[0], state.settings.max_images)
    probabilities, model = await state.batcher.predict(images)
    shape, data = list(probabilities.shape), probabilities.reshape(-1).tolist()
    output = V2OutputTensor(name="probabilities", shape=shape, datatype="FP32", data=data)
    info = model.info
    return V2InferResponse(
        model_name=info.name, model_version=info.version, id=body.id, outputs=[output]
    )


@router.post("/v2/models/{name}/infer", tags=["v2"])
async def v2_infer(name: str, body: V2InferRequest, state: State) -> V2InferResponse:
    return await _infer(state, body, name)


@router.post("/v2/models/{name}/versions/{version}/infer", tags=["v2"])
async def v2_infer_version(
    name: str, version: str, body: V2InferRequest, state: State
) -> V2InferResponse:
    return await _infer(state, body, name, version)
