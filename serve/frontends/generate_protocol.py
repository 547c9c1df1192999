"""The /generate wire format (shortfin's schema, SGLang-style streaming) as pydantic models."""

from __future__ import annotations

from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator


class GenerateSamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_completion_tokens: int = Field(50, ge=1, le=1_000_000)
    temperature: float = 0.0  # /generate defaults to greedy, like shortfin's argmax decoding
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    # SGLang's output constraints (one at most): a JSON schema (its text or object), a regex, an EBNF grammar
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    # accepted for shortfin compatibility; beam search is not implemented and is refused when asked for
    use_beam_search: bool = False
    num_beams: int = 1

    @field_validator("use_beam_search")
    @classmethod
    def _no_beams(cls, v: bool) -> bool:
        if v:
            raise ValueError("beam search is not supported; use n > 1 with temperature > 0")
        return v


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: GenerateSamplingParams = Field(default_factory=lambda: GenerateSamplingParams())
    rid: str | list[str] | None = None
    stream: bool = False
    return_input_ids: bool = False
    return_text_in_logprobs: bool = False

    def prompts(self) -> list[str | list[int]]:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'text' or 'input_ids'")
        if self.text is not None:
            return [self.text] if isinstance(self.text, str) else list(self.text)
        ids = self.input_ids or []
        if not ids or isinstance(ids[0], int):
            return [cast(list[int], ids)]
        return list(cast(list[list[int]], ids))


class Completion(BaseModel):
    text: str
    finish_reason: str | None
    token_ids: list[int] | None = None


class PromptResponses(BaseModel):
    prompt: str | list[int]
    responses: list[Completion]
    input_ids: list[int] | None = None


class GenerateResponse(BaseModel):
    responses: list[PromptResponses]
