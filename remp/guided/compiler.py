"""GuidedCompiler: one per tokenizer; turns a GuidedSpec into a matcher in its start state (llguidance's), and
keeps the last few hundred, so a schema that many requests share is compiled once and each request starts from a
copy (~10 us)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from remp.guided.grammar import llguidance_grammar
from remp.guided.spec import GuidedSpec


@dataclass(frozen=True)
class CompiledGuide:
    """A compiled constraint, shared by every request with the same spec: GuidedMatcher copies `start`."""

    spec: GuidedSpec
    start: Any  # llguidance.LLMatcher in its start state; never advanced
    vocab_size: int  # the logits' width: the width of the masks
    stop_token_ids: tuple[int, ...]


class GuidedCompiler:
    """Compiles specs against one tokenizer. Thread-safe: the server may compile in a worker thread (llguidance
    drops the GIL; a large schema takes milliseconds) before the engine thread admits the request, which then
    hits the cache.

    vocab_size: the model's logits width, at least the tokenizer's vocabulary: the ids past it are never allowed.
    stop_token_ids: the tokens that end a complete output (the model's EOS ids). Special tokens never appear
    inside an output (llguidance reads them as not text).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], cache_size: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(sorted(set(stop_token_ids)))
        if not self.stop_token_ids:
            raise ValueError("guided decoding needs at least one stop token id (the model's EOS) to end an output")
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop token ids {self.stop_token_ids} must lie in the vocabulary [0, {vocab_size})")
        if len(tokenizer) > vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the logits' {vocab_size} columns")
        self.cache_size = cache_size
        self.compiles = 0  # how many specs were compiled, not taken from the cache
        self._cache: OrderedDict[GuidedSpec, CompiledGuide] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None  # built on first use: reading the vocabulary takes ~0.5 s

    def compile(self, spec: GuidedSpec) -> CompiledGuide:
        import llguidance

        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size, eos_token=list(self.stop_token_ids)
                )
        start = llguidance.LLMatcher(self._ll_tokenizer, llguidance_grammar(spec.kind, spec.text), log_level=0)
        if start.is_error():
            raise ValueError(f"guided {spec.kind}: {start.get_error().strip()}")
        compiled = CompiledGuide(spec, start, self.vocab_size, self.stop_token_ids)
        with self._lock:
            self.compiles += 1
            self._cache[spec] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled
