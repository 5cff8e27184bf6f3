"""A GuidedSpec in llguidance's grammar format, with vLLM's choices: JSON with flexible whitespace, a json_object
is any object, a grammar is GBNF (`root ::= ...`, as vLLM's xgrammar backend takes) or Lark."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from remp.guided.spec import GuidedSpec


def llguidance_grammar(spec: GuidedSpec) -> str:
    """Raises ValueError where the text cannot be turned into a grammar (a GBNF grammar that does not convert);
    the other errors come from LLMatcher.validate_grammar or the matcher."""
    import llguidance

    if spec.kind in ("json_schema", "json_object"):
        schema = spec.text if spec.kind == "json_schema" else '{"type": "object"}'
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": True})
    return llguidance.grammar_from({"regex": "regex", "choice": "choice", "grammar": "grammar"}[spec.kind], spec.text)
