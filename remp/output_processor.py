"""A request's tokens as they come back from the sampler, and its state as outputs (vLLM's output processor): each
token is appended, followed by the request's grammar and penalty history, checked against the stop conditions,
and detokenized; its logprobs and prompt logprobs are recorded with the decoded tokens."""

from __future__ import annotations

from remp.outputs import CompletionOutput, Logprob, RequestOutput
from remp.request import Request, Status
from remp.sampler import TokenLogprob


def logprob_entry(tokenizer, token: int, logprob: float, rank: int, top: list[tuple[int, float]]) -> dict:
    """vLLM's form of one position's logprobs: the top-k and the token itself, each decoded."""
    entry = {tid: Logprob(lp, i + 1, tokenizer.decode([tid])) for i, (tid, lp) in enumerate(top)}
    entry[token] = Logprob(logprob, rank, tokenizer.decode([token]))
    return entry


def append_token(
    req: Request, token: int, logprob: float, rank: int, top: list[tuple[int, float]], tokenizer, max_model_len: int
) -> None:
    req.token_ids.append(token)
    req.cumulative_logprob += logprob
    if req.logprobs is not None:
        req.logprobs.append(logprob_entry(tokenizer, token, logprob, rank, top))
    if req.history is not None:
        req.history.append(token)
    grammar_done = False
    if req.guide is not None:
        if not req.guide.accept(token):  # sampled under its mask: never, unless a bug
            raise RuntimeError(f"request {req.request_id}: token {token} breaks its {req.params.guided.kind}")
        grammar_done = req.guide.is_finished
    stop_str = req.detokenizer.add_token(token)
    n_out = req.num_output_tokens
    if token in req.eos_token_ids and n_out >= req.params.min_tokens or grammar_done:
        req.finish_reason = "stop"
    elif token in req.params.stop_token_ids and n_out >= req.params.min_tokens:
        req.finish_reason, req.stop_reason = "stop", token
    elif stop_str is not None:
        req.finish_reason, req.stop_reason = "stop", stop_str
    elif n_out >= req.max_tokens or len(req.token_ids) >= max_model_len:
        req.finish_reason = "length"
    if req.finish_reason is not None:
        req.status = Status.FINISHED
        req.detokenizer.flush()


def record_prompt_logprobs(req: Request, start: int, entries: list[TokenLogprob], tokenizer) -> None:
    """Prompt logprobs of positions start + 1, start + 2, ... (a chunk's rows predict the next token)."""
    for j, (lp, rank, top) in enumerate(entries):
        pos = start + 1 + j
        req.prompt_logprobs[pos] = logprob_entry(tokenizer, req.prompt_token_ids[pos], lp, rank, top)


def completion(req: Request, index: int = 0) -> CompletionOutput:
    return CompletionOutput(
        index=index,
        text=req.detokenizer.visible_text,
        token_ids=list(req.output_token_ids),
        cumulative_logprob=req.cumulative_logprob,
        logprobs=list(req.logprobs) if req.logprobs is not None else None,
        finish_reason=req.finish_reason,
        stop_reason=req.stop_reason,
    )


def request_output(req: Request) -> RequestOutput | None:
    """The client's output for this request; for one of several sequences, its parent's (None while best_of
    waits for all of them)."""
    if req.parent is not None:
        return req.parent.output([completion(r) for r in req.parent.sequences])
    out = RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion(req)], req.finished, req.metrics)
    out.prompt_logprobs = req.prompt_logprobs
    return out
