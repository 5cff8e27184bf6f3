"""The workload: what to send (prompts and output lengths) and when (arrival offsets, optionally in phases).

Everything is drawn from seeded numpy generators so a run can be repeated exactly.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("random", "synthetic-chat", "prefix-chat", "jsonl", "sharegpt")
PHASE_KEYS = {
    "duration_s",
    "num_prompts",
    "request_rate",
    "burstiness",
    "input_len",
    "output_len",
    "dataset",
    "range_ratio",
    "name",
}
# Common short words: with a leading space each is about one token in BPE vocabularies, so a prompt of N words
# is roughly N tokens. Used where the endpoint needs text (chat) instead of token ids.
WORDS = (
    "the of and to in is was for on are with as at be this have from or one had by word but not what all "
    "were we when your can said there use an each which she do how their if will up other about out many then "
    "them these so some her would make like him into time has look two more write go see number no way could "
    "people my than first water been call who oil its now find long down day did get come made may part over "
    "new sound take only little work know place year live me back give most very after thing our just name good "
    "sentence man think say great where help through much before line right too mean old any same tell boy "
    "follow came want show also around form three small set put end does another well large must big even such "
    "because turn here why ask went men read need land different home us move try kind hand picture again "
    "change off play spell air away animal house point page letter mother answer found study still learn should "
    "world high every near add food between own below country plant last school father keep tree never start "
    "city earth eye light thought head under story saw left few while along might close something seem next "
    "hard open example begin life always those both paper together got group often run important until"
).split()


@dataclass
class SampleRequest:
    """One request to send: `prompt` is text, or token ids (valid for /v1/completions only)."""

    prompt: str | list[int]
    prompt_len: int  # tokens (exact for token ids, estimated for text)
    output_len: int  # max_tokens to ask for
    arrival_s: float = 0.0  # offset from the start of the run
    phase: int = 0
    after: int | None = None  # index (in the run) of a request that must finish first: its user's previous turn


@dataclass
class DatasetOptions:
    """How to draw prompts. For `synthetic-chat` the lengths are medians of lognormals capped at the max_*. For
    `prefix-chat` the random_* lengths are those of each new user message and each answer."""

    name: str = "random"
    path: str | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    range_ratio: float = 0.0
    vocab_size: int = 32000
    synthetic_input_len: int = 200
    synthetic_output_len: int = 150
    synthetic_max_input_len: int = 2048
    synthetic_max_output_len: int = 1024
    prefix_chat_system_len: int = 1000  # tokens of the system prompt every user of prefix-chat shares
    prefix_chat_users: int = 64
    text: bool = False  # the endpoint needs text prompts (chat)
    tokenizer: Any = None  # optional HF tokenizer: exact token counts and vocabulary size


@dataclass
class Phase:
    """A stretch of the run with its own load: ends after `num_prompts` arrivals or after `duration_s`."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    num_prompts: int | None = None
    duration_s: float | None = None
    dataset: DatasetOptions | None = None
    name: str = ""


@dataclass
class PhaseWindow:
    """Where a phase sits on the run's clock (seconds from start), for per-phase metrics and the plot."""

    index: int
    name: str
    start_s: float
    end_s: float
    num_requests: int
    request_rate: float
    burstiness: float
    dataset: str


# --- prompts ---------------------------------------------------------------------------------------------------


def _prompt(rng: np.random.Generator, length: int, opts: DatasetOptions) -> str | list[int]:
    if opts.text:
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), length))
    vocab = opts.vocab_size if opts.tokenizer is None else opts.tokenizer.vocab_size
    return rng.integers(min(100, vocab // 4), vocab, length).tolist()


def random_requests(n: int, opts: DatasetOptions, seed: int) -> list[SampleRequest]:
    """vLLM's random dataset: lengths uniform in [len*(1-r), len*(1+r)], token ids (or words for chat)."""
    rng = np.random.default_rng(seed)
    r = opts.range_ratio
    if not 0 <= r < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {r}")
    il, ol = opts.random_input_len, opts.random_output_len
    ins = rng.integers(max(1, math.floor(il * (1 - r))), math.ceil(il * (1 + r)) + 1, n)
    outs = rng.integers(max(1, math.floor(ol * (1 - r))), math.ceil(ol * (1 + r)) + 1, n)
    return [SampleRequest(_prompt(rng, int(i), opts), int(i), int(o)) for i, o in zip(ins, outs)]


def synthetic_chat_requests(n: int, opts: DatasetOptions, seed: int) -> list[SampleRequest]:
    """Chat-like long tail (no real dataset can be downloaded): lognormal lengths, most prompts short, a few long."""
    rng = np.random.default_rng(seed)
    ins = np.clip(np.rint(rng.lognormal(math.log(opts.synthetic_input_len), 1.0, n)), 4, opts.synthetic_max_input_len)
    outs = np.clip(
        np.rint(rng.lognormal(math.log(opts.synthetic_output_len), 0.8, n)), 1, opts.synthetic_max_output_len
    )
    return [SampleRequest(_prompt(rng, int(i), opts), int(i), int(o)) for i, o in zip(ins, outs)]


def prefix_chat_requests(n: int, opts: DatasetOptions, seed: int) -> list[SampleRequest]:
    """A multi-turn chat behind one shared system prompt, for prefix caching: `prefix_chat_users` users, each
    turn's prompt the system prompt, then that user's earlier messages each followed by a synthetic answer as long
    as the turn's output, then a new message. So a turn's prompt starts with the previous turn's prompt, and every
    prompt with the system prompt. Requests go turn by turn (every user's first turn, then every second turn ...),
    n in all; each after the first of its user waits for that user's previous turn to finish, as a chat would.
    Token ids only (no text prompts: their tokens could differ across turn boundaries)."""
    if opts.text:
        raise ValueError("--dataset-name prefix-chat sends token ids: use the completions endpoint")
    users, r = opts.prefix_chat_users, opts.range_ratio
    if users < 1 or opts.prefix_chat_system_len < 0:
        raise ValueError("prefix-chat needs --prefix-chat-users >= 1 and --prefix-chat-system-len >= 0")
    if not 0 <= r < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {r}")
    rng = np.random.default_rng(seed)
    system = _prompt(rng, opts.prefix_chat_system_len, opts)
    history = [list(system) for _ in range(users)]

    def length(mean: int) -> int:
        return int(rng.integers(max(1, math.floor(mean * (1 - r))), math.ceil(mean * (1 + r)) + 1))

    out = []
    for k in range(n):
        u = k % users
        prompt = history[u] + _prompt(rng, length(opts.random_input_len), opts)
        output_len = length(opts.random_output_len)
        out.append(SampleRequest(prompt, len(prompt), output_len, after=k - users if k >= users else None))
        history[u] = prompt + _prompt(rng, output_len, opts)  # the answer, as the next turn will quote it
    return out


def _count(text: str, tokenizer: Any) -> int:
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return max(1, round(len(text.split()) * 1.3))


def _read_records(path: str) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def file_requests(n: int, opts: DatasetOptions, seed: int) -> list[SampleRequest]:
    """Records of a local .json/.jsonl file, shuffled with the seed and repeated if n exceeds them. Two shapes:
    ShareGPT {"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]} (prompt = first human turn,
    output length = the reply's tokens, or its words * 1.3 without a tokenizer) and {"prompt", "max_tokens"?}."""
    if not opts.path:
        raise ValueError(f"--dataset-name {opts.name} needs --dataset-path")
    samples = []
    for rec in _read_records(opts.path):
        if "conversations" in rec:
            turns = rec["conversations"]
            i = next((k for k, t in enumerate(turns) if t.get("from") in ("human", "user")), None)
            if i is None or i + 1 >= len(turns):
                continue
            prompt, reply = turns[i]["value"], turns[i + 1]["value"]
            samples.append(SampleRequest(prompt, _count(prompt, opts.tokenizer), _count(reply, opts.tokenizer)))
        elif "prompt" in rec:
            p = rec["prompt"]
            if isinstance(p, list) and opts.text:
                raise ValueError("token-id prompts need the completions endpoint, not chat")
            plen = len(p) if isinstance(p, list) else _count(p, opts.tokenizer)
            samples.append(SampleRequest(p, plen, int(rec.get("max_tokens") or opts.random_output_len)))
    if not samples:
        raise ValueError(f"no usable prompts in {opts.path}")
    order = np.random.default_rng(seed).permutation(len(samples))
    return [replace(samples[order[k % len(samples)]]) for k in range(n)]


def sample_requests(n: int, opts: DatasetOptions, seed: int) -> list[SampleRequest]:
    if opts.name == "random":
        return random_requests(n, opts, seed)
    if opts.name == "synthetic-chat":
        return synthetic_chat_requests(n, opts, seed)
    if opts.name == "prefix-chat":
        return prefix_chat_requests(n, opts, seed)
    if opts.name in ("jsonl", "sharegpt"):
        return file_requests(n, opts, seed)
    raise ValueError(f"unknown dataset {opts.name!r}; choose from {', '.join(DATASETS)}")


# --- arrivals --------------------------------------------------------------------------------------------------


def intervals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Gaps between arrivals, as vLLM: gamma(shape=burstiness, scale=1/(rate*burstiness)), so the mean rate is
    `rate` and the CV is 1/sqrt(burstiness) (1 = Poisson, <1 burstier, >1 steadier). rate=inf: all at once."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    if math.isinf(rate):
        return np.zeros(n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """n arrivals: the first at 0, then one gap after each (vLLM sends then sleeps). Returns (offsets, span)."""
    gaps = intervals(n, rate, burstiness, rng)
    return np.concatenate(([0.0], np.cumsum(gaps[:-1]))) if n else gaps, float(gaps.sum())


def arrivals_for_duration(duration_s: float, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Arrivals of the same process that fall in [0, duration_s)."""
    if math.isinf(rate):
        raise ValueError("a phase with duration_s needs a finite request_rate")
    times: list[float] = []
    t = 0.0
    while True:
        for gap in intervals(max(16, int(rate * duration_s * 1.2)), rate, burstiness, rng):
            if t >= duration_s:
                return np.asarray(times)
            times.append(t)
            t += gap


def parse_phases(
    spec: str | list, base: DatasetOptions, default_rate: float = math.inf, default_burstiness: float = 1.0
) -> list[Phase]:
    """`spec`: inline JSON, a path to a JSON file, or an already-parsed list of phase dicts."""
    if isinstance(spec, str):
        spec = json.loads(spec if spec.lstrip().startswith("[") else Path(spec).read_text())
    if not isinstance(spec, list) or not spec:
        raise ValueError("--phases must be a non-empty JSON list of phase objects")
    phases = []
    for k, d in enumerate(spec):
        if unknown := set(d) - PHASE_KEYS:
            raise ValueError(f"phase {k}: unknown keys {sorted(unknown)}; allowed {sorted(PHASE_KEYS)}")
        if ("duration_s" in d) == ("num_prompts" in d):
            raise ValueError(f"phase {k}: give exactly one of duration_s, num_prompts")
        name = d.get("dataset", base.name)
        opts = replace(base, name=name, range_ratio=float(d.get("range_ratio", base.range_ratio)))
        if "input_len" in d:
            opts = replace(opts, random_input_len=int(d["input_len"]), synthetic_input_len=int(d["input_len"]))
        if "output_len" in d:
            opts = replace(opts, random_output_len=int(d["output_len"]), synthetic_output_len=int(d["output_len"]))
        phases.append(
            Phase(
                float(d.get("request_rate", default_rate)),
                float(d.get("burstiness", default_burstiness)),
                d.get("num_prompts"),
                d.get("duration_s"),
                opts,
                str(d.get("name", f"phase {k}")),
            )
        )
    return phases


def plan(
    phases: list[Phase],
    seed: int,
    draw: Callable[[int, DatasetOptions, np.random.Generator], list[SampleRequest]] | None = None,
) -> tuple[list[SampleRequest], list[PhaseWindow]]:
    """Concatenate the phases on one clock: phase k starts when phase k-1's span ends. Each request gets its
    arrival offset and phase index. Phase k draws from generators seeded with seed + k; `draw(n, dataset,
    rng)` replaces the dataset's prompts (the simulator needs lengths only), drawing from the arrivals' rng."""
    requests: list[SampleRequest] = []
    windows: list[PhaseWindow] = []
    start = 0.0
    for k, ph in enumerate(phases):
        rng = np.random.default_rng([seed, k, 1])
        if ph.num_prompts is not None:
            offsets, span = arrival_offsets(int(ph.num_prompts), ph.request_rate, ph.burstiness, rng)
        else:
            offsets, span = (
                arrivals_for_duration(float(ph.duration_s), ph.request_rate, ph.burstiness, rng),
                float(ph.duration_s),
            )
        opts = ph.dataset or DatasetOptions()
        batch = draw(len(offsets), opts, rng) if draw else sample_requests(len(offsets), opts, seed + k)
        for r, off in zip(batch, offsets):
            r.arrival_s, r.phase = start + float(off), k
            if r.after is not None:  # the phase's own index -> the run's
                r.after += len(requests)
        requests += batch
        windows.append(
            PhaseWindow(
                k,
                ph.name or f"phase {k}",
                start,
                start + span,
                len(batch),
                ph.request_rate,
                ph.burstiness,
                opts.name,
            )
        )
        start += span
    return requests, windows


# --- a production trace ----------------------------------------------------------------------------------------

TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")


def trace_requests(
    path: str | Path,
    time_scale: float = 1.0,
    duration_s: float | None = None,
    max_model_len: int | None = None,
    opts: DatasetOptions | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """The requests of an arrival trace (CSV with the columns of TRACE_COLUMNS, as Vidur's processed Azure
    traces): arrival times multiplied by `time_scale` (0.5 = the same requests in half the time, twice the
    load), cut at `duration_s` of the scaled clock. A request longer than `max_model_len` keeps its prompt's
    tail and the output that fits, as a client would have to. Prompts are random tokens when `opts` is given
    (to send them), else empty (the simulator needs only the lengths)."""
    if time_scale <= 0:
        raise ValueError(f"the trace's time scale must be > 0, got {time_scale}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: the trace lacks the column(s) {', '.join(missing)} (needs {', '.join(TRACE_COLUMNS)})"
            )
        rows = list(reader)
    rng = np.random.default_rng([seed, 7])
    out = []
    for i, row in enumerate(rows):
        try:
            t, p, o = (
                float(row["arrived_at"]) * time_scale,
                int(row["num_prefill_tokens"]),
                int(row["num_decode_tokens"]),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: row {i + 2} is not numbers: {e}") from None
        if duration_s is not None and t >= duration_s:
            break
        p, o = fit_context(p, o, max_model_len)
        prompt = _prompt(rng, p, opts) if opts is not None else []
        out.append(SampleRequest(prompt, p, o, arrival_s=t))
    return out


def fit_context(prompt_len: int, output_len: int, max_model_len: int | None) -> tuple[int, int]:
    """A request cut to fit the context as a client would: the prompt's tail, then the output that fits."""
    if max_model_len is not None:
        prompt_len = min(prompt_len, max_model_len - 1)
        output_len = min(output_len, max_model_len - prompt_len)
    return prompt_len, max(1, output_len)
