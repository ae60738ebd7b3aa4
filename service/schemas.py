"""Request parameters and response bodies of the HTTP API (they are also what /docs shows)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from captioner.api import CaptionResult
from captioner.decoding import DecodingOptions

# --------------------------------------------------------------------------------------------------------------
# Request.


class CaptionParams(BaseModel):
    """Optional decoding parameters, from the query string or (multipart uploads) form fields. Anything left out
    takes the server's default; unknown names are refused (422) so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["greedy", "sample", "beam"] | None = Field(None, description="decoding method")
    beam_size: int | None = Field(None, ge=1, le=10, description="beams kept by beam search")
    max_length: int | None = Field(None, ge=1, le=50, description="most words in a caption")
    length_penalty: float | None = Field(None, ge=0, le=5, description="beam score = log p / length**this")
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=10, description="beam search: no repeated n-grams")
    temperature: float | None = Field(None, ge=0, le=5, description="sampling temperature (0: greedy)")
    top_k: int | None = Field(None, ge=0, le=1000, description="sample from the k likeliest words (0: all)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    num_captions: int | None = Field(None, ge=1, le=10, description="captions returned (n-best or samples)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampling seed, for reproducible samples")
    attention: bool = Field(False, description="include the attention map of every word of the best caption")

    def decoding(self, defaults: DecodingOptions) -> DecodingOptions:
        """The options actually used: these parameters over the server defaults. Raises ValueError (-> 422) for
        combinations DecodingOptions refuses."""
        # More captions than the default beam holds widens the beam; an explicit beam_size that is too small is
        # still an error the client should see (DecodingOptions.updated).
        return defaults.updated(**self.model_dump(exclude_none=True, exclude={"attention"}))


# --------------------------------------------------------------------------------------------------------------
# Responses.


class CandidateOut(BaseModel):
    caption: str
    log_prob: float = Field(description="sum of log p(word) under the model, <end> included")


class DecodingOut(BaseModel):
    method: str
    max_length: int
    beam_size: int
    length_penalty: float
    no_repeat_ngram_size: int
    temperature: float
    top_k: int
    top_p: float
    num_captions: int
    seed: int | None


class ModelOut(BaseModel):
    name: str
    version: str = Field(description="sha256 prefix of the checkpoint file")
    encoder: str


class GridOut(BaseModel):
    height: int
    width: int


class AttentionOut(BaseModel):
    grid: GridOut
    tokens: list[str] = Field(description="the best caption's words, <end> included: one map each")
    weights: list[list[float]] = Field(description="per token, height*width weights (row-major) summing to 1")
    betas: list[float] = Field(description="per token, the gate: how much the word used the image at all")


class TimingOut(BaseModel):
    read: float = Field(description="receiving the upload")
    decode_image: float = Field(description="decoding the image file and resizing it for the model")
    queue: float = Field(description="waiting for the model")
    inference: float = Field(description="encoder + decoder, for the whole batch this request ran in")
    total: float


class CaptionResponse(BaseModel):
    caption: str
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
    height, width = result.grid
    return AttentionOut(
        grid=GridOut(height=height, width=width),
        tokens=best.words,
        weights=[[round(w, decimals) for w in row] for row in best.alphas.tolist()],
        betas=[round(b, decimals) for b in best.betas.tolist()],
    )


def decoding_out(options: DecodingOptions) -> DecodingOut:
    return DecodingOut(**asdict(options))
