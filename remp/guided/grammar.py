"""A GuidedSpec in llguidance's grammar format, with vLLM's choices: JSON with flexible whitespace, a json_object
is any object, a grammar is GBNF (`root ::= ...`, as vLLM's xgrammar backend takes) or Lark."""

from __future__ import annotations


def llguidance_grammar(kind: str, text: str) -> str:
    """A GuidedSpec's (kind, text) as a grammar. Raises ValueError where the text cannot be turned into a grammar
    (a GBNF grammar that does not convert); the other errors come from LLMatcher.validate_grammar or the
    matcher."""
    import llguidance

    if kind in ("json_schema", "json_object"):
        schema = text if kind == "json_schema" else '{"type": "object"}'
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": True})
    return llguidance.grammar_from({"regex": "regex", "choice": "choice", "grammar": "grammar"}[kind], text)
