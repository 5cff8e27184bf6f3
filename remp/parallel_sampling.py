"""Several sequences for one prompt (n > 1, best_of): each sequence is an engine request of its own, sharing the
prompt's KV through the prefix cache (the first computes it, the others find it), and their outputs are gathered
back into the one RequestOutput the client asked for."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from remp.outputs import CompletionOutput, RequestOutput
from remp.request import Request
from remp.sampling_params import SamplingParams


def sequence_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sequence `index`'s parameters: one sequence, its own seed (seed + index, as vLLM), and the prompt's
    logprobs computed once (by sequence 0)."""
    return dataclasses.replace(
        params,
        n=1,
        best_of=None,
        seed=None if params.seed is None else params.seed + index,
        prompt_logprobs=params.prompt_logprobs if index == 0 else None,
    )


@dataclass(eq=False)
class ParentRequest:
    request_id: str
    n: int  # sequences returned
    sequences: list[Request] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.sequences)

    def output(self, completions: list[CompletionOutput]) -> RequestOutput | None:
        """The client's output from its sequences' completions (in sequence order): all of them while they run
        (n sequences), or, with best_of, the n of the highest cumulative logprob once all finished (None before)."""
        first = self.sequences[0]
        if len(completions) > self.n:
            if not self.finished:
                return None
            completions = sorted(completions, key=lambda c: -(c.cumulative_logprob or 0.0))[: self.n]
        completions = [dataclasses.replace(c, index=i) for i, c in enumerate(completions)]
        out = RequestOutput(self.request_id, first.prompt, first.prompt_token_ids, completions, self.finished)
        out.metrics, out.prompt_logprobs = first.metrics, first.prompt_logprobs
        return out
