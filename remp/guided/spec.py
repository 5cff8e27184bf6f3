"""GuidedSpec: what a request constrains its output to, from OpenAI's `response_format` or vLLM's `guided_*` and
`structured_outputs` fields, checked when the request arrives (a bad one is a ValueError naming its field)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from remp.guided.grammar import llguidance_grammar

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[Kind, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GuidedSpec:
    """A constraint as plain, hashable text (the compiler's cache key; cheap to pickle with the request).

    text by kind: json_schema: the schema as JSON text (key order kept: it is the order properties are written
    in); json_object: ""; regex: the pattern (Rust regex syntax, as llguidance reads it); choice: a JSON array of
    the choices; grammar: GBNF (`root ::= ...`, the EBNF vLLM's xgrammar backend takes) or Lark.
    """

    kind: Kind
    text: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"GuidedSpec.kind={self.kind!r}: must be one of {', '.join(KINDS)}")
        if not isinstance(self.text, str):
            raise ValueError(f"GuidedSpec.text: must be a string, got {type(self.text).__name__}")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str | bool) -> GuidedSpec:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (Mapping, bool)):
            raise ValueError(f"a JSON schema is an object (or true/false), got {type(schema).__name__}")
        if schema is False:
            raise ValueError("the JSON schema `false` admits no output")
        if schema is True:  # any JSON value: the same as {}, which llguidance's options apply to
            schema = {}
        try:
            text = json.dumps(schema, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"the JSON schema cannot be written as JSON: {e}") from None
        spec = cls("json_schema", text)
        _parse(spec)
        return spec

    @classmethod
    def json_object(cls) -> GuidedSpec:
        return cls("json_object", "")

    @classmethod
    def regex(cls, pattern: str) -> GuidedSpec:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("a regex must be a non-empty string")
        if "\x00" in pattern:
            raise ValueError("a regex must not contain a NUL character")
        spec = cls("regex", pattern)
        _parse(spec)
        return spec

    @classmethod
    def choice(cls, choices: list[str] | tuple[str, ...]) -> GuidedSpec:
        if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError("choices must be a non-empty list of strings")
        if not all(isinstance(c, str) for c in choices):
            raise ValueError("choices must be a non-empty list of strings")
        spec = cls("choice", json.dumps(list(choices), ensure_ascii=False))
        _parse(spec)
        return spec

    @classmethod
    def grammar(cls, text: str) -> GuidedSpec:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a grammar must be a non-empty string")
        spec = cls("grammar", text)
        _parse(spec)
        return spec

    @property
    def choices(self) -> list[str]:
        if self.kind != "choice":
            raise AttributeError(f"a {self.kind} spec has no choices")
        return json.loads(self.text)


def _parse(spec: GuidedSpec) -> None:
    """Build the grammar without a tokenizer (about a millisecond): a syntax error, or a JSON-schema keyword the
    grammar cannot enforce (llguidance names those rather than drop them), is a ValueError now, not a failure
    in the engine later."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(llguidance_grammar(spec.kind, spec.text))
    if error:
        raise ValueError(error.strip())


# vLLM's guided_* fields, and the kind each asks for
GUIDED_FIELDS: dict[str, Kind] = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# vLLM's structured_outputs keys, and the kind each asks for
STRUCTURED_OUTPUT_KEYS: dict[str, Kind] = {
    "json": "json_schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}


def _of_kind(kind: Kind, value: Any) -> GuidedSpec:
    if kind == "json_schema":
        return GuidedSpec.json_schema(value)
    if kind == "regex":
        return GuidedSpec.regex(value)
    if kind == "choice":
        return GuidedSpec.choice(value)
    return GuidedSpec.grammar(value)


def _from_response_format(rf: Any) -> GuidedSpec | None:
    if not isinstance(rf, Mapping):
        raise ValueError(f"must be an object with a 'type', got {type(rf).__name__}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedSpec.json_object()
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, Mapping) or "schema" not in js:
            raise ValueError("type 'json_schema' needs json_schema.schema")
        try:
            return GuidedSpec.json_schema(js["schema"])
        except ValueError as e:
            raise ValueError(f"json_schema.schema: {e}") from None
    raise ValueError(f"type {kind!r} is not supported (text, json_object or json_schema)")


def _from_structured_outputs(so: Any) -> GuidedSpec | None:
    if not isinstance(so, Mapping):
        raise ValueError(f"must be an object, got {type(so).__name__}")
    given = {k: v for k, v in so.items() if v is not None and v is not False}
    unknown = sorted(set(given) - set(STRUCTURED_OUTPUT_KEYS) - {"json_object"})
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not supported (json, json_object, regex, choice or grammar)")
    if len(given) > 1:
        raise ValueError(f"only one constraint at a time, got {', '.join(sorted(given))}")
    if not given:
        return None
    (key, value), *_ = given.items()
    if key == "json_object":
        if value is not True:
            raise ValueError("json_object must be true or absent")
        return GuidedSpec.json_object()
    try:
        return _of_kind(STRUCTURED_OUTPUT_KEYS[key], value)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def guided_spec_from_request(
    *,
    response_format: Mapping[str, Any] | None = None,
    guided_json: Mapping[str, Any] | str | bool | None = None,
    guided_regex: str | None = None,
    guided_choice: list[str] | None = None,
    guided_grammar: str | None = None,
    structured_outputs: Mapping[str, Any] | None = None,
) -> GuidedSpec | None:
    """The request's constraint, or None. At most one of these fields may constrain the output
    (`response_format` {"type": "text"} constrains nothing). Errors are ValueErrors that name the field."""
    fields = {
        "response_format": response_format,
        "guided_json": guided_json,
        "guided_regex": guided_regex,
        "guided_choice": guided_choice,
        "guided_grammar": guided_grammar,
        "structured_outputs": structured_outputs,
    }
    specs: dict[str, GuidedSpec] = {}
    for name, value in fields.items():
        if value is None:
            continue
        try:
            if name == "response_format":
                spec = _from_response_format(value)
            elif name == "structured_outputs":
                spec = _from_structured_outputs(value)
            else:
                spec = _of_kind(GUIDED_FIELDS[name], value)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if spec is not None:
            specs[name] = spec
    if len(specs) > 1:
        raise ValueError(f"only one kind of guided decoding at a time, got {', '.join(specs)}")
    return next(iter(specs.values()), None)
