"""Per-request sampling parameters, shaped like vLLM's ``SamplingParams``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from remp.guided.spec import GuidedSpec

# vLLM treats temperatures below this as greedy decoding.
_GREEDY_EPS = 1e-5


def _is_int(x: object) -> bool:
    # bool is an int subclass but passing True as a count/id is almost surely a bug.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


@dataclass
class SamplingParams:
    n: int = 1  # sequences returned for the prompt (they share the prompt's KV)
    best_of: int | None = None  # sequences generated, the n with the highest cumulative logprob returned
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables (vLLM accepts both)
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None  # normalised to list[str]
    stop_token_ids: list[int] | None = None  # normalised to list[int]
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs besides the chosen token; 0 = chosen only
    prompt_logprobs: int | None = None  # the same for each prompt token (after the first)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0  # minus this, once, for each token already in the output
    frequency_penalty: float = 0.0  # minus this x the token's count in the output
    repetition_penalty: float = 1.0  # tokens in prompt or output: positive logits / this, negative ones x this
    logit_bias: dict[int, float] | None = None  # token id -> added to its raw logit; str keys of ints accepted
    guided: GuidedSpec | None = None  # the output follows this constraint (remp.guided)

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{field}={getattr(self, field)!r}: {why}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be a positive int")
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of < self.n):
            raise bad("best_of", f"must be an int >= n ({self.n})")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            raise bad("prompt_logprobs", "must be an int >= 0 or None")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an int >= -1 (0 or -1 disables)")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an int or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an int >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens={self.max_tokens}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "must be an int >= 0 or None")

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        # An empty stop string would match immediately and end every request.
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")

        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative ints")

        # vLLM's ranges
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a finite number > 0")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must be a dict of token id -> bias")
            bias = {}
            for k, v in self.logit_bias.items():
                key = int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else k
                if not _is_int(key) or key < 0:
                    raise bad("logit_bias", f"key {k!r} is not a token id (a non-negative int)")
                if not _is_num(v) or not -100 <= v <= 100:
                    raise bad("logit_bias", f"bias {v!r} of token {k} must be a number in [-100, 100]")
                bias[key] = float(v)
            self.logit_bias = bias
        if self.guided is not None and not isinstance(self.guided, GuidedSpec):
            raise bad("guided", "must be a remp.guided.GuidedSpec or None")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def sequences(self) -> int:
        """Sequences generated for the prompt: best_of, else n."""
        return self.best_of or self.n

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def check_vocab(self, vocab_size: int) -> None:
        """The token ids the parameters name exist (the engine knows the vocabulary, the parameters do not)."""
        outside = sorted(t for t in self.logit_bias or () if t >= vocab_size)
        if outside:
            raise ValueError(
                f"SamplingParams.logit_bias: token ids {outside[:5]} are outside the vocabulary [0, {vocab_size})"
            )
