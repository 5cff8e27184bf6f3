"""GuidedMatcher: one request's place in its grammar, kept on the driver with the request. It gives the bitmask
of the tokens the request may sample next and follows the tokens it samples.

Kept, not rebuilt: a topology switch, a preemption (recompute) or a recovery never touches the driver's requests,
and the request keeps its output tokens through all three, so the matcher stays in step as long as the engine
calls accept() exactly when it appends a token to the output (a step lost in a recovery appended nothing and
accepted nothing). rebuild() replays output tokens from the start, for an engine that ever drops tokens, and
`num_accepted` lets the engine check that the two agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from remp.guided.bitmask import bitmask_words
from remp.guided.compiler import CompiledGuide


class GuidedMatcher:
    def __init__(self, compiled: CompiledGuide):
        self.compiled = compiled
        self._m = compiled.start.deep_copy()
        self.num_accepted = 0
        self._ended = False

    @property
    def words(self) -> int:
        return bitmask_words(self.compiled.vocab_size)

    @property
    def is_finished(self) -> bool:
        """The output is complete and a stop token (EOS) ended it: the engine ends the request, finish_reason
        "stop" (also under ignore_eos, or before min_tokens: a finished grammar allows nothing more)."""
        return self._ended

    def accept(self, token: int) -> bool:
        """Follow a sampled token. False: the grammar does not allow it, and the matcher is unchanged (a token
        sampled under this matcher's mask is always allowed)."""
        token = int(token)
        if self._ended:
            return False
        if token in self.compiled.stop_token_ids:  # ends a complete output; llguidance's try_ refuses it there
            if not (self._m.is_accepting() and self._m.consume_token(token)):
                return False
            self._ended = True
        elif self._m.try_consume_tokens([token]) != 1:  # unlike consume_token, leaves the matcher as it was
            return False
        self.num_accepted += 1
        return True

    def fill(self, out: np.ndarray) -> None:
        """Write the next token's bitmask into `out` ([words] int32). Once the output is complete, only the stop
        tokens are allowed, and still only those once one ended it (an engine that goes on samples EOS)."""
        import llguidance.numpy

        llguidance.numpy.fill_next_token_bitmask(self._m, out.reshape(1, -1), 0)

    def mask(self) -> np.ndarray:
        """The next token's bitmask, a new [words] int32 array (it goes on the wire: never reused)."""
        out = np.empty(self.words, dtype=np.int32)
        self.fill(out)
        return out

    def rebuild(self, output_tokens: Sequence[int]) -> None:
        """Back to the start, then follow `output_tokens` (the request's output so far)."""
        self._m = self.compiled.start.deep_copy()
        self.num_accepted, self._ended = 0, False
        for i, t in enumerate(output_tokens):
            if not self.accept(t):
                raise ValueError(f"output token {i} ({t}) does not follow the {self.compiled.spec.kind} constraint")


_executors: dict[int, Any] = {}


def fill_masks(matchers: Iterable[GuidedMatcher], threads: int = 1) -> np.ndarray:
    """One step's bitmasks for several requests, [len(matchers), words] int32. A new array each call: its rows go
    on the wire. threads > 1: llguidance's thread pool fills rows in parallel, without the GIL (on 2 cores shared
    with the workers it gains nothing: bench/guided_cost.py)."""
    import llguidance
    import llguidance.numpy

    matchers = list(matchers)
    if len({id(m) for m in matchers}) != len(matchers):
        raise ValueError("a matcher appears twice in one batch")
    words = {m.words for m in matchers}
    if len(words) > 1:
        raise ValueError(f"matchers of different vocabulary widths in one batch: {sorted(words)} words")
    out = np.empty((len(matchers), words.pop() if words else 0), dtype=np.int32)
    if threads > 1 and matchers:
        if threads not in _executors:
            _executors[threads] = llguidance.LLExecutor(threads)
        llguidance.numpy.fill_next_token_bitmask_par(
            _executors[threads], [(m._m, i) for i, m in enumerate(matchers)], out
        )
    else:
        for i, m in enumerate(matchers):
            m.fill(out[i])
    return out
