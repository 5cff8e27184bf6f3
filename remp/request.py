"""Per-request state kept by the engine across steps (and, later, across topology switches)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from remp.outputs import Logprob, RequestMetrics
from remp.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens, capped by what fits in max_model_len
    eos_token_ids: frozenset[int] = frozenset()
    detokenizer: Any = None
    token_ids: list[int] = field(default_factory=list)  # prompt + output so far
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks of tokens (prefix caching)
    num_cached_blocks: int = 0  # its first blocks that are in the prefix cache (their KV is written)
    replica: int = 0  # the data-parallel replica that serves it
    guide: Any = None  # guided.GuidedMatcher: where its output is in its grammar (structured output)
    history: Any = None  # penalties.PenaltyHistory: what its penalties read (presence, frequency, repetition)
    parent: Any = None  # parallel_sampling.ParentRequest: the request it is one sequence of (n > 1, best_of)
    prompt_logprobs: list | None = None  # [None, one entry per prompt token after the first] (params.prompt_logprobs)
    cache_salt: str | None = None  # its prefix-cache blocks are shared only with requests of the same salt
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
