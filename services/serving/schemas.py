"""Typed requests and responses (the v1 API, the Open Inference Protocol v2) and the errors
the API answers with."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SIDE = 28
Pixel = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=255.0)]
Row = Annotated[list[Pixel], Field(min_length=SIDE, max_length=SIDE)]
Image = Annotated[list[Row], Field(min_length=SIDE, max_length=SIDE)]


class PredictRequest(BaseModel):
    """`images`: 28x28 nested lists, each either 0-255 integers or floats in [0, 1]."""

    model_config = ConfigDict(extra="forbid")
    images: Annotated[list[Image], Field(min_length=1)]


class Prediction(BaseModel):
    digit: int
    probabilities: list[float]


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str | None
    run_id: str
    model_type: str
    test_accuracy: float


class FieldProblem(BaseModel):
    field: str
    problem: str


class ErrorBody(BaseModel):
    """Every error, v1 and v2 alike (`error` is the v2 protocol's field)."""

    error: str
    kind: str
    fields: list[FieldProblem] = []


class ServingError(Exception):
    """A refusal: answered `status` with an ErrorBody of `kind` naming `fields`."""

    status, kind = 500, "internal"
    headers: dict[str, str] | None = None

    def __init__(
        self,
        message: str,
        fields: list[FieldProblem] | None = None,
        status: int | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.fields = fields or []
        self.status, self.kind = status or self.status, kind or self.kind


class InputError(ServingError):
    """A client error in the payload, naming the field."""

    def __init__(
        self, field: str, problem: str, status: int = 422, kind: str = "invalid_input"
    ) -> None:
        problems = [FieldProblem(field=field, problem=problem)]
        super().__init__(f"{field}: {problem}", problems, status, kind)


class ModelLoadError(ServingError):
    """No model to serve yet, or a version that cannot be served (the message says why)."""

    status, kind = 503, "not_ready"


class DecodeBusy(ServingError):
    """Every image decode slot is taken and the queue for them is full."""

    status, kind, headers = 503, "busy", {"Retry-After": "1"}


class BodyTooLarge(ServingError):
    status, kind = 413, "too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")


# Open Inference Protocol (KServe v2), the JSON/REST binding.
V2DataType = Literal["FP32", "FP64", "FP16", "UINT8", "INT8", "INT16", "INT32", "INT64"]


class V2Tensor(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: V2DataType
    data: list[Any]
    parameters: dict[str, Any] | None = None


class V2RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: Annotated[list[V2Tensor], Field(min_length=1, max_length=1)]
    outputs: list[V2RequestOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2OutputTensor(V2TensorMetadata):
    data: list[float]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
