"""The request fields that constrain the output, as each protocol spells them, to one `Constraint`.

OpenAI `response_format` (json_object, json_schema); vLLM `structured_outputs` and its older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`; llama.cpp `grammar` (GBNF) and `json_schema`; SGLang's
`json_schema`, `regex`, `ebnf`; TensorRT-LLM's `guided_decoding_guide_type` / `guided_decoding_guide`.
A request gives at most one of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve.core.guide import Constraint, ConstraintError


@dataclass
class Given:
    """One constraint field of a request: its name as the client sent it, the kind, the value."""

    field: str
    kind: str
    value: Any


class FieldError(ConstraintError):
    """A constraint field of the wrong shape; `field` names it as the client sent it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def one(*groups: list[Given]) -> tuple[str, Constraint] | None:
    """The request's constraint and the field that gave it (None: unconstrained). FieldError for two."""
    given = [g for group in groups for g in group if g.value is not None]
    if len(given) > 1:
        raise FieldError(given[1].field, f"give one constraint; this request gives {', '.join(g.field for g in given)}")
    if not given:
        return None
    g = given[0]
    try:
        return g.field, Constraint.of(g.kind, g.value)
    except ConstraintError as e:
        raise FieldError(g.field, str(e)) from e


def response_format(value: dict[str, Any] | None) -> list[Given]:
    """OpenAI's `response_format`."""
    if value is None:
        return []
    kind = value.get("type", "text")
    if kind == "text":
        return []
    if kind == "json_object":
        return [Given("response_format", "json_object", True)]
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise FieldError("response_format.json_schema", 'give {"name": ..., "schema": {...}}')
        return [Given("response_format.json_schema.schema", "json_schema", spec["schema"])]
    raise FieldError("response_format.type", f"{kind!r} is not supported; text, json_object or json_schema")


def structured_outputs(value: dict[str, Any] | None) -> list[Given]:
    """vLLM's `structured_outputs` object: one of json, regex, choice, grammar, json_object."""
    if value is None:
        return []
    kinds = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
    out = [Given(f"structured_outputs.{k}", kinds[k], v) for k, v in value.items() if k in kinds]
    if value.get("json_object"):
        out.append(Given("structured_outputs.json_object", "json_object", True))
    unknown = sorted(k for k in value if k not in kinds and k not in ("json_object", "backend", "whitespace_pattern"))
    if unknown:
        raise FieldError(
            f"structured_outputs.{unknown[0]}", "not supported; json, regex, choice, grammar or json_object"
        )
    return out


TRITON_GUIDE_TYPES = {"json": "json_object", "json_schema": "json_schema", "regex": "regex", "ebnf_grammar": "grammar"}


def triton_guide(guide_type: str | None, guide: str | None) -> list[Given]:
    """TensorRT-LLM's `guided_decoding_guide_type` (json, json_schema, regex, ebnf_grammar) and its guide."""
    if guide_type is None:
        return []
    if guide_type not in TRITON_GUIDE_TYPES:
        raise FieldError(
            "guided_decoding_guide_type", f"{guide_type!r} is not supported; one of {', '.join(TRITON_GUIDE_TYPES)}"
        )
    kind = TRITON_GUIDE_TYPES[guide_type]
    if kind != "json_object" and not guide:
        raise FieldError("guided_decoding_guide", f"give the {guide_type} for guided_decoding_guide_type")
    return [Given("guided_decoding_guide", kind, True if kind == "json_object" else guide)]
