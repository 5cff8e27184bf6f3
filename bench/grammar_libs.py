"""Which grammar library remp's guided decoding uses: xgrammar, llguidance and outlines-core side by side.

For each library and each kind of constraint (a JSON schema, any JSON object, a regex, a choice, an EBNF/Lark
grammar) it measures the compile time and, per decode step, the time to fill the allowed-token bitmask of a batch
of 1 and of 32 rows, over SmolLM2's tokenizer (vocabulary 49152). Every row follows a valid output token by token
(its own phase of the same text), so each step asks a fresh question, as in decoding. It also checks the masks:
every token of the valid output is allowed at its step, and only EOS once the output is complete.

    PYTHONPATH=$PWD flock /tmp/remp-cpu.lock python bench/grammar_libs.py

Needs the `grammars` extra (`pip install -e '.[grammars]'`: xgrammar and outlines-core; llguidance, the one remp
uses, is a dependency). Results: bench/results/grammar_libs.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

from remp.cpu_features import cpu_features
from remp.model.reader import open_checkpoint

VOCAB = 49152  # SmolLM2's logits width
WORDS = (VOCAB + 31) // 32

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "admin",
    "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y4"},
    "active": True,
}
# a harder schema: a string pattern, bounded arrays of objects, integer ranges, anyOf with null, maxLength
HARD_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "price": {"type": "number"},
                },
                "required": ["sku", "qty", "price"],
            },
        },
        "status": {"anyOf": [{"enum": ["open", "closed"]}, {"type": "null"}]},
        "note": {"type": "string", "maxLength": 40},
    },
    "required": ["id", "items", "status", "note"],
}
HARD_INSTANCE = {
    "id": "ABC-1234",
    "items": [{"sku": "x-1", "qty": 3, "price": 9.99}, {"sku": "y-22", "qty": 12, "price": 0.5}],
    "status": None,
    "note": "leave it at the door",
}
REGEX = r"(\d{3}-\d{3}-\d{4}, ){3}[a-z]+@[a-z]+\.(com|org)"
REGEX_TEXT = "555-123-4567, 555-987-6543, 555-000-1111, ada@lovelace.org"
CHOICES = ["positive", "negative", "neutral"]
EBNF = r"""root ::= expr
expr ::= term ([-+] term)*
term ::= factor ([*/] factor)*
factor ::= num | "(" expr ")"
num ::= [0-9]+"""
LARK = r"""start: expr
expr: term (/[-+]/ term)*
term: factor (/[*\/]/ factor)*
factor: NUM | "(" expr ")"
NUM: /[0-9]+/"""
EXPR_TEXT = "(12+3)*45-(6/7+8)*(90-1)"

SCHEMAS = {"json_schema": SCHEMA, "json_schema_hard": HARD_SCHEMA}
# kind -> (the text a model would write, whether it is complete: then only EOS may follow it)
TEXTS = {
    "json_schema": (json.dumps(INSTANCE), True),
    "json_schema_hard": (json.dumps(HARD_INSTANCE), True),
    "json_object": (json.dumps(INSTANCE), True),
    "regex": (REGEX_TEXT, True),
    "choice": ("negative", True),
    "grammar": (EXPR_TEXT, False),  # an expression can always go on
}


def choice_regex(choices: list[str]) -> str:
    import re

    return "(" + "|".join(re.escape(c) for c in choices) + ")"


class Library:
    """One library behind the few calls the bench makes: compile, a matcher, fill a row, accept a token."""

    name: str

    def compile(self, kind: str) -> object: ...
    def matcher(self, compiled: object) -> object: ...
    def fill(self, matchers: list[object], bitmask: np.ndarray) -> None: ...
    def accept(self, matcher: object, token: int) -> bool: ...
    def reset(self, matcher: object) -> None: ...


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tok, eos: int, batch_threads: bool):
        import torch
        import xgrammar as xgr

        self.xgr, self.torch = xgr, torch
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB, stop_token_ids=[eos])
        self.setup_s = time.perf_counter() - t0
        self.batch = xgr.BatchGrammarMatcher() if batch_threads else None
        if batch_threads:
            self.name = "xgrammar (BatchGrammarMatcher)"

    def compile(self, kind: str):
        c = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        if kind.startswith("json_schema"):
            return c.compile_json_schema(json.dumps(SCHEMAS[kind]))
        if kind == "json_object":  # as vLLM: an object of any shape
            return c.compile_json_schema('{"type": "object"}')
        if kind == "regex":
            return c.compile_regex(REGEX)
        if kind == "choice":
            return c.compile_regex(choice_regex(CHOICES))
        return c.compile_grammar(EBNF)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask):
        t = self.torch.from_numpy(bitmask)
        if self.batch is not None:
            self.batch.batch_fill_next_token_bitmask(matchers, t)
        else:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(t, i)

    def accept(self, matcher, token):
        return matcher.accept_token(token)

    def reset(self, matcher):
        matcher.reset()


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tok, eos: int, parallel: bool):
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self.ll, self.np = llguidance, llguidance.numpy
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB, eos_token=eos)
        self.setup_s = time.perf_counter() - t0
        self.executor = llguidance.LLExecutor() if parallel else None
        if parallel:
            self.name = "llguidance (LLExecutor)"

    def compile(self, kind: str):
        M = self.ll.LLMatcher
        grammar = {
            "json_schema": lambda: M.grammar_from_json_schema(SCHEMA),
            "json_schema_hard": lambda: M.grammar_from_json_schema(HARD_SCHEMA),
            "json_object": lambda: M.grammar_from_json_schema({"type": "object"}),
            "regex": lambda: M.grammar_from_regex(REGEX),
            "choice": lambda: M.grammar_from_regex(choice_regex(CHOICES)),
            "grammar": lambda: M.grammar_from_lark(LARK),
        }[kind]()
        m = M(self.tok, grammar, log_level=0)  # llguidance compiles lazily: the first matcher builds the lexer
        if m.is_error():
            raise ValueError(m.get_error())
        return grammar

    def matcher(self, compiled):
        return self.ll.LLMatcher(self.tok, compiled, log_level=0)

    def fill(self, matchers, bitmask):
        if self.executor is not None:
            self.np.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        else:
            for i, m in enumerate(matchers):
                self.np.fill_next_token_bitmask(m, bitmask, i)

    def accept(self, matcher, token):
        return matcher.consume_token(token)

    def reset(self, matcher):
        matcher.reset()


def byte_level_vocabulary(tok) -> dict[bytes, list[int]]:
    """GPT-2 byte-level token strings -> their bytes (what outlines-core's Vocabulary wants)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    decode = {chr(c): b for b, c in zip(bs, cs)}
    out: dict[bytes, list[int]] = {}
    for s, i in tok.get_vocab().items():
        if i in tok.all_special_ids:
            continue
        out.setdefault(bytes(decode[ch] for ch in s), []).append(i)
    return out


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tok, eos: int):
        import outlines_core

        self.oc, self.eos = outlines_core, eos
        t0 = time.perf_counter()
        self.vocab = outlines_core.Vocabulary(eos, byte_level_vocabulary(tok))
        self.setup_s = time.perf_counter() - t0

    def compile(self, kind: str):
        from outlines_core.json_schema import build_regex_from_schema

        regex = {
            "json_schema": lambda: build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=r"[ ]?"),
            "json_schema_hard": lambda: build_regex_from_schema(json.dumps(HARD_SCHEMA), whitespace_pattern=r"[ ]?"),
            "regex": lambda: REGEX,
            "choice": lambda: choice_regex(CHOICES),
        }.get(kind)
        if regex is None:
            raise NotImplementedError("regular languages only: no recursive JSON, no context-free grammar")
        return self.oc.Index(regex(), self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matchers, bitmask):
        for i, m in enumerate(matchers):
            row = bitmask[i]
            m.write_mask_into(row.ctypes.data, row.size, row.itemsize)

    def accept(self, matcher, token):
        if token == self.eos:  # a final state allows EOS, but has no transition on it
            return matcher.is_finished()
        matcher.advance(token)
        return True

    def reset(self, matcher):
        matcher.reset()


def allowed(bitmask_row: np.ndarray, token: int) -> bool:
    return bool((int(bitmask_row[token // 32]) >> (token % 32)) & 1)


def measure(
    lib: Library, kind: str, tokens: list[int], complete: bool, eos: int, batch: int, steps: int, bad: dict
) -> dict:
    """Compile time, then `steps` decode steps of `batch` rows, each row at its own phase of `tokens` + EOS.
    bad: name -> bool [vocab] of tokens a mask should never allow; counted on row 0's masks."""
    t0 = time.perf_counter()
    compiled = lib.compile(kind)
    compile_s = time.perf_counter() - t0
    seq = [*tokens, eos]
    matchers = [lib.matcher(compiled) for _ in range(batch)]
    pos = [0] * batch
    for i in range(batch):  # stagger the rows
        for t in seq[: (i * len(seq)) // batch]:
            lib.accept(matchers[i], t)
            pos[i] += 1
    bitmask = np.zeros((batch, WORDS), dtype=np.int32)
    fill_s, accept_s, wrong = [], [], 0
    worst = dict.fromkeys(bad, 0)
    only_eos = np.zeros(WORDS, dtype=np.int32)
    only_eos[eos // 32] = np.int32(np.uint32(1 << (eos % 32)).view(np.int32))
    for _ in range(steps):
        t0 = time.perf_counter()
        lib.fill(matchers, bitmask)
        fill_s.append(time.perf_counter() - t0)
        row0 = np.unpackbits(bitmask[0].view(np.uint8), bitorder="little").astype(bool)
        for name, never in bad.items():
            worst[name] = max(worst[name], int((row0 & never).sum()))
        t_acc = 0.0
        for i, m in enumerate(matchers):
            tok = seq[pos[i]]
            wrong += not allowed(bitmask[i], tok)
            if tok == eos and complete:  # only EOS may follow a complete output
                wrong += not np.array_equal(bitmask[i], only_eos)
            t0 = time.perf_counter()
            ok = lib.accept(m, tok)
            t_acc += time.perf_counter() - t0
            wrong += not ok
            pos[i] += 1
            if pos[i] == len(seq):
                lib.reset(m)
                pos[i] = 0
        accept_s.append(t_acc)
    return {
        "compile_ms": round(compile_s * 1e3, 2),
        "fill_ms_per_step": {
            "mean": round(statistics.mean(fill_s) * 1e3, 4),
            "median": round(statistics.median(fill_s) * 1e3, 4),
            "p90": round(sorted(fill_s)[int(0.9 * len(fill_s))] * 1e3, 4),
            "max": round(max(fill_s) * 1e3, 4),
        },
        "accept_ms_per_step": round(statistics.median(accept_s) * 1e3, 4),
        "mask_errors": wrong,
        **{f"most_{name}_allowed": n for name, n in worst.items()},
    }


def agreement(ref: Library, other: Library, kind: str, tokens: list[int], eos: int) -> dict:
    """Both libraries follow the same output: at how many steps do their masks differ, and by how many tokens."""
    a, b = ref.matcher(ref.compile(kind)), other.matcher(other.compile(kind))
    ma, mb = np.zeros((1, WORDS), dtype=np.int32), np.zeros((1, WORDS), dtype=np.int32)
    steps, differ, most = 0, 0, 0
    for tok in [*tokens, eos]:
        ref.fill([a], ma)
        other.fill([b], mb)
        n = int(np.unpackbits((ma ^ mb).view(np.uint8)).sum())
        steps, differ, most = steps + 1, differ + (n > 0), max(most, n)
        ref.accept(a, tok)
        other.accept(b, tok)
    return {"steps": steps, "steps_differ": differ, "most_tokens_differ": most}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="bench/results/grammar_libs.json")
    args = ap.parse_args()

    tok = open_checkpoint(None).load_tokenizer()
    eos = tok.eos_token_id
    xgr = XGrammar(tok, eos, batch_threads=False)
    libs: list[Callable[[], Library]] = [
        lambda: xgr,
        lambda: XGrammar(tok, eos, batch_threads=True),
        lambda: LLGuidance(tok, eos, parallel=False),
        lambda: LLGuidance(tok, eos, parallel=True),
        lambda: OutlinesCore(tok, eos),
    ]
    results: dict = {
        "machine": cpu_features().describe(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "versions": {p: version(p) for p in ("xgrammar", "llguidance", "outlines_core")},
        "vocab": VOCAB,
        "libraries": {},
    }
    # tokens no mask should allow: special tokens other than EOS (they are not text), and, in JSON, tokens with a
    # control character that JSON allows nowhere (raw in a string is invalid; only \t \n \r, and only as whitespace)
    special = np.zeros(WORDS * 32, dtype=bool)
    special[[i for i, t in tok.added_tokens_decoder.items() if t.special and i != eos]] = True
    json_bad = np.zeros(WORDS * 32, dtype=bool)
    json_bad[
        [i for i in range(len(tok)) if i != eos and any(ord(c) < 32 and c not in "\t\n\r" for c in tok.decode([i]))]
    ] = True
    for make in libs:
        lib = make()
        entry: dict = {"tokenizer_setup_ms": round(lib.setup_s * 1e3, 1), "kinds": {}}
        for kind, (text, complete) in TEXTS.items():
            tokens = tok.encode(text, add_special_tokens=False)
            row = {}
            for batch in (1, 32):
                try:
                    bad = {"special_tokens": special} | ({"json_invalid_tokens": json_bad} if "json" in kind else {})
                    row[f"batch_{batch}"] = measure(lib, kind, tokens, complete, eos, batch, args.steps, bad)
                except NotImplementedError as e:
                    row = {"unsupported": str(e)}
                    break
            if "unsupported" not in row and not isinstance(lib, XGrammar):
                row["mask_vs_xgrammar"] = agreement(xgr, lib, kind, tokens, eos)
            entry["kinds"][kind] = row
            print(lib.name, kind, json.dumps(row), flush=True)
        results["libraries"][lib.name] = entry
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("saved", args.out)


if __name__ == "__main__":
    main()
