"""Thin routes: parse (typed schemas), predict through the micro-batcher, shape the reply."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.data.digits import ImageError, image_bytes_to_mnist
from services.serving.inputs import InputError, v1_images, v2_images
from services.serving.model import ServedModel
from services.serving.schemas import (
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
from services.serving.state import ServingState

PAGE = Path(__file__).parent / "static" / "index.html"
router = APIRouter()
# ImageError kinds -> statuses; each kind is also the JSON error's kind.
IMAGE_ERROR_STATUS = {
    "too_large": 413,
    "unsupported_format": 415,
    "unreadable": 400,
    "no_digit": 422,
}


async def serving(request: Request) -> ServingState:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop on every request
    state: ServingState = request.app.state.serving
    return state


State = Annotated[ServingState, Depends(serving)]


async def _predict(state: ServingState, images: np.ndarray) -> tuple[np.ndarray, ServedModel]:
    state.holder.require()  # no model yet: 503 now, not a request waiting in the queue
    probabilities, model = await state.batcher.predict(images)
    state.metrics.images.inc(len(images))
    return probabilities, model


def _v1_response(probabilities: np.ndarray, model: ServedModel) -> PredictResponse:
    return PredictResponse(
        model_name=model.name,
        model_version=model.version,
        predictions=[
            Prediction(digit=int(row.argmax()), probabilities=[float(p) for p in row])
            for row in probabilities
        ],
    )


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The drawing page."""
    return FileResponse(PAGE, media_type="text/html")


@router.get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    return {"status": "live"}


@router.get("/health/ready", tags=["health"], responses={503: {"description": "No model yet"}})
async def ready(state: State) -> dict[str, str]:
    model = state.holder.require()
    return {"status": "ready", "model_version": model.version}


@router.get("/v1/model", tags=["v1"])
async def model_info(state: State) -> ModelInfo:
    return state.holder.require().info


@router.post("/v1/predict", tags=["v1"])
async def predict(body: PredictRequest, state: State) -> PredictResponse:
    """Images as 28x28 nested lists (0-255 integers or [0, 1] floats)."""
    images = v1_images(body, state.settings.max_images)
    return _v1_response(*await _predict(state, images))


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
    data = await file.read()
    if not data:
        raise InputError("file", "empty upload")
    try:
        image = await state.decodes.run(image_bytes_to_mnist, data, state.settings.max_image_pixels)
    except ImageError as error:
        raise InputError("file", str(error), IMAGE_ERROR_STATUS[error.kind], error.kind) from None
    return _v1_response(*await _predict(state, image[None]))


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


def _served(state: ServingState, name: str, version: str | None = None) -> ServedModel:
    model = state.holder.require()
    if name != model.name:
        raise InputError(
            "model_name", f"unknown model {name!r}; this server serves {model.name!r}", 404
        )
    if version is not None and version != model.version:
        raise InputError(
            "model_version", f"version {version} is not loaded (serving {model.version})", 404
        )
    return model


@router.get("/v2/models/{name}", tags=["v2"])
async def v2_metadata(name: str, state: State) -> V2ModelMetadata:
    model = _served(state, name)
    return V2ModelMetadata(
        name=model.name,
        versions=[model.version],
        platform="onnxruntime_onnx",
        inputs=[V2TensorMetadata(name="images", datatype="FP32", shape=[-1, 28, 28])],
        outputs=[V2TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, 10])],
    )


@router.get("/v2/models/{name}/ready", tags=["v2"])
async def v2_model_ready(name: str, state: State) -> dict[str, object]:
    _served(state, name)
    return {"name": name, "ready": True}


async def _infer(state: ServingState, body: V2InferRequest) -> V2InferResponse:
    images = v2_images(body.inputs[0], state.settings.max_images)
    probabilities, model = await _predict(state, images)
    return V2InferResponse(
        model_name=model.name,
        model_version=model.version,
        id=body.id,
        outputs=[
            V2OutputTensor(
                name="probabilities",
                shape=list(probabilities.shape),
                datatype="FP32",
                data=probabilities.reshape(-1).tolist(),
            )
        ],
    )


@router.post("/v2/models/{name}/infer", tags=["v2"])
async def v2_infer(name: str, body: V2InferRequest, state: State) -> V2InferResponse:
    _served(state, name)
    return await _infer(state, body)


@router.post("/v2/models/{name}/versions/{version}/infer", tags=["v2"])
async def v2_infer_version(
    name: str, version: str, body: V2InferRequest, state: State
) -> V2InferResponse:
    _served(state, name, version)
    return await _infer(state, body)
