"""Guided decoding on the driver: request fields to a GuidedSpec (bad ones refused, naming the field), the
compiler's cache, and matchers that, driven by a fake model through the real sampler, produce outputs that
follow their constraint; a matcher rebuilt from the output tokens gives the same masks."""

import json
import re

import jsonschema_rs
import numpy as np
import pytest
import torch

from remp.guided import (
    GuidedCompiler,
    GuidedMatcher,
    GuidedSpec,
    fill_masks,
    guided_spec_from_request,
    pack_allowed,
    unpack_allowed,
)
from remp.model.reader import open_checkpoint
from remp.sampler import SampleRow, sample_rows
from remp.sampling_params import SamplingParams

VOCAB = 49152  # SmolLM2's logits width
EOS = 2

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return open_checkpoint(None).load_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok):
    return GuidedCompiler(tok, VOCAB, [EOS])


@pytest.fixture(scope="module")
def prefer(tok):
    """The fake model's preferences: whitespace unlikely (any-whitespace JSON could run on forever), tokens that
    close strings and objects likely (or a JSON key could), EOS likely once allowed."""
    prefer = torch.zeros(VOCAB)
    for i in range(len(tok)):
        s = tok.decode([i])
        prefer[i] = -12.0 if s.isspace() else 8.0 if s[:1] in ('"', "}", "]", ")", ",") else 0.0
    prefer[EOS] = 6.0
    return prefer


def generate(tok, compiler, spec, prefer, seed, max_tokens=300) -> tuple[str, list[int], GuidedMatcher]:
    """A fake model (random logits and its preferences) through the real sampler, under the matcher's masks."""
    g = torch.Generator().manual_seed(seed)
    matcher = GuidedMatcher(compiler.compile(spec))
    params = SamplingParams(temperature=1.0, seed=seed, guided=spec)
    tokens = []
    while not matcher.is_finished:
        assert len(tokens) < max_tokens, tok.decode(tokens)
        logits = torch.randn(1, VOCAB, generator=g) * 2 + prefer
        out = sample_rows(logits, [SampleRow.of(params, len(tokens), mask=matcher.mask())])
        assert matcher.accept(out.token_ids[0])
        tokens.append(out.token_ids[0])
    assert tokens[-1] == EOS
    return tok.decode(tokens[:-1]), tokens, matcher


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outputs_follow_a_json_schema(tok, compiler, prefer, seed):
    text, _, _ = generate(tok, compiler, GuidedSpec.json_schema(SCHEMA), prefer, seed)
    jsonschema_rs.validate(SCHEMA, json.loads(text))


def test_outputs_follow_json_object_regex_choice_and_grammar(tok, compiler, prefer):
    text, *_ = generate(tok, compiler, GuidedSpec.json_object(), prefer, 3)
    assert isinstance(json.loads(text), dict)
    pattern = r"[a-z]{2,8}@[a-z]{2,8}\.(com|org)"
    text, *_ = generate(tok, compiler, GuidedSpec.regex(pattern), prefer, 4)
    assert re.fullmatch(pattern, text)
    choices = ["positive", "negative", "neutral", "new\nline"]
    assert all(generate(tok, compiler, GuidedSpec.choice(choices), prefer, s)[0] in choices for s in range(4))
    ebnf = 'root ::= item ("," item){0,3}\nitem ::= [0-9]{1,3} | "(" root ")"'
    text, *_ = generate(tok, compiler, GuidedSpec.grammar(ebnf), prefer, 5)
    assert re.fullmatch(r"[0-9(),]+", text) and text.count("(") == text.count(")")
    lark = 'start: WORD ("-" WORD)*\nWORD: /[a-z]{1,5}/'
    text, *_ = generate(tok, compiler, GuidedSpec.grammar(lark), prefer, 6)
    assert re.fullmatch(r"[a-z]{1,5}(-[a-z]{1,5})*", text)


def test_a_rebuilt_matcher_gives_the_same_masks(tok, compiler, prefer):
    spec = GuidedSpec.json_schema(SCHEMA)
    _, tokens, _ = generate(tok, compiler, spec, prefer, 7)
    compiled = compiler.compile(spec)
    live = GuidedMatcher(compiled)
    for n, t in enumerate(tokens[:-1]):
        if n % 5 == 0:  # e.g. after a preemption: a fresh matcher, or the same one, replays the output
            fresh = GuidedMatcher(compiled)
            fresh.rebuild(tokens[:n])
            assert fresh.num_accepted == live.num_accepted == n
            assert np.array_equal(fresh.mask(), live.mask())
        assert live.accept(t)
    live.rebuild(tokens[:3])
    assert live.num_accepted == 3 and not live.is_finished
    with pytest.raises(ValueError, match="does not follow"):
        live.rebuild([*tokens[:3], EOS])


def test_complete_output_allows_only_eos_and_never_special_tokens(tok, compiler):
    m = GuidedMatcher(
        compiler.compile(GuidedSpec.json_schema({"type": "object", "properties": {"a": {"type": "string"}}}))
    )
    for t in tok.encode('{"a": "x', add_special_tokens=False):
        assert m.accept(t)
    inside_string = unpack_allowed(m.mask()[None], VOCAB)[0]
    specials = sorted(set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special})
    assert inside_string.sum() > 40000 and not inside_string[specials].any()
    for t in tok.encode('"}', add_special_tokens=False):
        assert m.accept(t)
    assert np.array_equal(m.mask(), pack_allowed([EOS], VOCAB)) and not m.is_finished
    assert not m.accept(5)  # a token the grammar does not allow changes nothing
    assert m.accept(EOS) and m.is_finished
    assert np.array_equal(m.mask(), pack_allowed([EOS], VOCAB))  # an engine that goes on can only end


def test_masks_are_padded_to_the_logits_width(tok):
    wide = GuidedCompiler(tok, VOCAB + 100, [EOS])
    m = GuidedMatcher(wide.compile(GuidedSpec.json_object()))
    assert m.mask().shape == ((VOCAB + 100 + 31) // 32,)
    allowed = unpack_allowed(fill_masks([m])[:1], VOCAB + 100)[0]
    assert allowed.any() and not allowed[VOCAB:].any()
    with pytest.raises(ValueError, match="more than the logits"):
        GuidedCompiler(tok, VOCAB - 1, [EOS]).compile(GuidedSpec.json_object())


def test_fill_masks_equals_one_by_one(tok, compiler):
    spec = GuidedSpec.json_schema(SCHEMA)
    text = json.dumps({"name": "Ada", "age": 36, "role": "admin", "tags": ["a", "b"], "active": True})
    tokens = tok.encode(text, add_special_tokens=False)
    matchers = [GuidedMatcher(compiler.compile(spec)) for _ in range(6)]
    for i, m in enumerate(matchers[:-1]):
        for t in tokens[: i * 5]:
            assert m.accept(t)
    for t in [*tokens, EOS]:
        assert matchers[-1].accept(t)  # a finished one in the batch
    for threads in (1, 2):
        batch = fill_masks(matchers, threads)
        assert batch.shape == (6, (VOCAB + 31) // 32)
        for i, m in enumerate(matchers):
            assert np.array_equal(batch[i], m.mask())
    with pytest.raises(ValueError, match="twice"):
        fill_masks([matchers[0], matchers[0]])


def test_compiler_caches_per_spec(tok):
    c = GuidedCompiler(tok, VOCAB, [EOS], cache_size=2)
    a = c.compile(GuidedSpec.json_schema(SCHEMA))
    assert c.compile(GuidedSpec.json_schema(json.dumps(SCHEMA))) is a and c.compiles == 1  # equal specs, one compile
    c.compile(GuidedSpec.regex("a+"))
    c.compile(GuidedSpec.choice(["x", "y"]))  # evicts the least recently used: the schema
    assert c.compiles == 3
    assert c.compile(GuidedSpec.json_schema(SCHEMA)) is not a and c.compiles == 4
    with pytest.raises(ValueError, match="stop token"):
        GuidedCompiler(tok, VOCAB, [])


def test_spec_from_request_fields():
    s = guided_spec_from_request(guided_json={"type": "object"})
    assert s == GuidedSpec.json_schema('{"type": "object"}') and s.kind == "json_schema"
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    assert guided_spec_from_request(response_format=rf) == GuidedSpec.json_schema(SCHEMA)
    assert guided_spec_from_request(response_format={"type": "json_object"}).kind == "json_object"
    assert guided_spec_from_request(response_format={"type": "text"}) is None
    assert guided_spec_from_request() is None
    assert guided_spec_from_request(guided_regex=r"\d+").text == r"\d+"
    assert guided_spec_from_request(guided_choice=["a", "b"]).choices == ["a", "b"]
    assert guided_spec_from_request(guided_grammar='root ::= "a"').kind == "grammar"  # GBNF
    assert guided_spec_from_request(guided_grammar='start: "a"').kind == "grammar"  # Lark
    assert guided_spec_from_request(structured_outputs={"regex": "a+"}).kind == "regex"
    assert guided_spec_from_request(structured_outputs={"json_object": True}).kind == "json_object"
    # text constrains nothing, so it goes with a guided field
    assert guided_spec_from_request(response_format={"type": "text"}, guided_regex="a").kind == "regex"
    # property order is kept: it is the order the output writes them in
    assert list(json.loads(GuidedSpec.json_schema({"properties": {"b": {}, "a": {}}}).text)["properties"]) == ["b", "a"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"guided_json": '{"type": '}, r"guided_json: the JSON schema is not valid JSON"),
        ({"guided_json": {"type": "foo"}}, r"guided_json: Invalid type: foo"),
        ({"guided_json": [1, 2]}, r"guided_json: a JSON schema is an object"),
        ({"guided_json": False}, r"guided_json: .*admits no output"),
        # keywords a grammar cannot enforce are named, never dropped
        (
            {"guided_json": {"type": "array", "uniqueItems": True}},
            r'guided_json: Unimplemented keys: \["uniqueItems"\]',
        ),
        ({"guided_json": {"anyOf": [{"not": {"type": "null"}}]}}, r'Unimplemented keys: \["not"\]'),
        ({"guided_json": {"if": {}, "then": {}}}, r'Unimplemented keys: \["if", "then"\]'),
        ({"guided_json": {"type": "string", "format": "bogus"}}, r"Unknown format: bogus"),
        ({"guided_json": {"$ref": "#/$defs/x"}}, r"/\$defs/x' does not exist"),
        ({"guided_regex": "(ab"}, r"(?s)guided_regex: .*unclosed group"),
        ({"guided_regex": "a(?=b)"}, r"(?s)guided_regex: .*look-around"),
        ({"guided_regex": ""}, r"guided_regex: a regex must be a non-empty string"),
        ({"guided_regex": "a\x00"}, r"guided_regex: .*NUL"),
        ({"guided_choice": []}, r"guided_choice: choices must be a non-empty list"),
        ({"guided_choice": "yes"}, r"guided_choice: choices must be a non-empty list"),
        ({"guided_choice": ["a", 1]}, r"guided_choice: choices must be a non-empty list"),
        ({"guided_grammar": "root ::= foo"}, r"guided_grammar: .*Rule 'foo' not found"),
        ({"guided_grammar": "start: foo"}, r'(?s)guided_grammar: .*unknown name: "foo"'),
        ({"guided_grammar": 'expr ::= "a"'}, r"guided_grammar: .*No 'root' rule"),
        ({"guided_grammar": "  "}, r"guided_grammar: a grammar must be a non-empty string"),
        ({"response_format": {"type": "xml"}}, r"response_format: type 'xml' is not supported"),
        ({"response_format": {"type": "structural_tag"}}, r"response_format: type 'structural_tag' is not supported"),
        ({"response_format": {"type": "json_schema"}}, r"response_format: type 'json_schema' needs json_schema.schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
            r"json_schema.schema",
        ),
        ({"response_format": "json"}, r"response_format: must be an object"),
        (
            {"guided_json": {}, "guided_regex": "a"},
            r"only one kind of guided decoding at a time, got guided_json, guided_regex",
        ),
        ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, r"got response_format, guided_choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, r"structured_outputs: only one constraint"),
        ({"structured_outputs": {"structural_tag": "{}"}}, r"structured_outputs: structural_tag not supported"),
        ({"structured_outputs": {"json_object": 1}}, r"structured_outputs: json_object must be true"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        guided_spec_from_request(**fields)


def test_spec_values_are_checked():
    with pytest.raises(ValueError, match="kind"):
        GuidedSpec("xml", "")
    for depth in (300, 3000):  # too deep for llguidance, for Python's json
        deep: dict = {}
        for _ in range(depth):
            deep = {"type": "array", "items": deep}
        with pytest.raises(ValueError, match="recursion"):
            GuidedSpec.json_schema(deep)
    assert GuidedSpec.json_schema(True).text == "{}"  # any value
    # what the grammar can enforce goes through: multipleOf on numbers, a pattern within length bounds
    GuidedSpec.json_schema({"type": "number", "multipleOf": 0.5})
    GuidedSpec.json_schema({"type": "string", "pattern": "a+", "maxLength": 3})
