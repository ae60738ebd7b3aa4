"""Request parameters and response bodies of the HTTP API (they are also what /docs shows)."""

from __future__ import annotations

import typing
from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from captioner.inference import CaptionResult  # the torch side's has the same fields
from captioner.inference.visualize import attention_payload
from captioner.options import DecodingOptions, decoding_fields


def decoding_model(name: str, doc: str, *, optional: bool = False, limits: bool = True,
                   defaults: dict[str, Any] | None = None, exclude: tuple[str, ...] = (),
                   base: type[BaseModel] = BaseModel, **extra: Any) -> type[BaseModel]:
    """A pydantic model with one field per DecodingOptions field, derived from its definition (type, bounds, and
    with `limits` the service's tighter limits, description). `optional`: every field defaults to None (a request
    leaves it out); else `defaults` (or required when None). `extra` fields are added after them."""
    specs = {}
    for spec in decoding_fields():
        if spec.name in exclude:
            continue
        bounds = spec.service_bounds if limits else ()
        kind = Annotated[(spec.type, *bounds)] if bounds else spec.type
        if optional:
            kind, default = kind | None, None
        else:
            default = ... if defaults is None else defaults[spec.name]
        finite = {"allow_inf_nan": False} if float in (spec.type, *typing.get_args(spec.type)) else {}
        specs[spec.name] = (kind, Field(default, description=spec.about.description, **finite))
    return create_model(name, __base__=base, __doc__=doc, __module__=__name__, **specs, **extra)


# --------------------------------------------------------------------------------------------------------------
# Request.


class _CaptionParamsBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def decoding(self, defaults: DecodingOptions) -> DecodingOptions:
        """The options actually used: these parameters over the server defaults. Raises ValueError (-> 422) for
        combinations DecodingOptions refuses."""
        # More captions than the default beam holds widens the beam; an explicit beam_size that is too small is
        # still an error the client should see (DecodingOptions.updated).
        return defaults.updated(**self.model_dump(exclude_none=True, exclude={"attention"}))


CaptionParams = decoding_model(
    "CaptionParams",
    """Optional decoding parameters, from the query string or (multipart uploads) form fields. Anything left out
    takes the server's default; unknown names are refused (422) so a typo never silently does nothing.""",
    optional=True,
    base=_CaptionParamsBase,
    attention=(bool, Field(False, description="include the attention map of every word of the best caption")),
)


# --------------------------------------------------------------------------------------------------------------
# Responses.


class CandidateOut(BaseModel):
    caption: str
    log_prob: float = Field(description="sum of log p(word) under the model, <end> included")
    mean_log_prob: float = Field(description="log p per word, <end> included: the model's confidence (0 is sure)")


DecodingOut = decoding_model("DecodingOut", "The decoding options the caption was made with.", limits=False)


class ModelOut(BaseModel):
    name: str
    version: str = Field(description="sha256 prefix of the checkpoint file")
    encoder: str
    engine: str = Field(description="slim: the exported graphs on ONNX Runtime (no PyTorch); onnx: ONNX Runtime "
                        "encoder and int8 decoder under PyTorch; torch: eager PyTorch")


class GridOut(BaseModel):
    height: int
    width: int


class AttentionOut(BaseModel):
    """The best caption's attention maps: captioner.inference.visualize.attention_payload, the shape
    `captioner visualize --json` writes too."""

    tokens: list[str] = Field(description="the best caption's words, <end> included: one map each")
    alphas: list[list[list[float]]] = Field(description="per token, a height x width map (rows of the feature "
                                            "grid, top to bottom) summing to 1")
    betas: list[float] = Field(description="per token, the gate: how much the word used the image at all")
    grid: GridOut


class TimingOut(BaseModel):
    read: float = Field(description="receiving the upload")
    decode_image: float = Field(description="decoding the image file and resizing it for the model")
    queue: float = Field(description="waiting for the model")
    inference: float = Field(description="encoder + decoder, for the whole batch this request ran in")
    total: float


class CaptionResponse(BaseModel):
    caption: str
    uncertain: bool = Field(description="the caption's mean_log_prob is below the uncertain_below asked for")
    candidates: list[CandidateOut]
    decoding: DecodingOut
    model: ModelOut
    timing_ms: TimingOut
    batch_size: int = Field(description="requests that went through the model together with this one")
    attention: AttentionOut | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict] | None = None


class ErrorResponse(BaseModel):
    """Every error, whatever its status: `{"error": {"code": ..., "message": ...}}`."""

    error: ErrorBody


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: ModelOut | None = None


def attention_out(result: CaptionResult, decimals: int = 6) -> AttentionOut:
    best = result.candidates[0]
    return AttentionOut(**attention_payload(best.words, best.alphas, best.betas, result.grid, decimals))


def decoding_out(options: DecodingOptions) -> DecodingOut:
    return DecodingOut(**asdict(options))
