"""What guided decoding and the new sampling parameters cost per decode step, at batch 1 and 32.

Driver side (remp.guided, llguidance): filling the allowed-token bitmasks of the batch's guided rows, following
each row's sampled token, and pickling the rows' masks into the step. Sampler side (remp.sampler.sample_rows over
[batch, 49152] float32 logits): the extra time of masks, of presence / frequency / repetition penalties (a
500-token prompt, 200 output tokens) and of logit bias (10 tokens), over the same rows without them. Each guided
row follows a valid output (its own phase of it), as in decoding, for a JSON schema, any JSON object, a regex, a
choice and an EBNF grammar, over SmolLM2's tokenizer.

    PYTHONPATH=$PWD flock /tmp/remp-cpu.lock python bench/guided_cost.py

Results: bench/results/guided_cost.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from grammar_libs import EBNF, EXPR_TEXT, REGEX, REGEX_TEXT, SCHEMA, TEXTS

from remp.cpu_features import cpu_features
from remp.guided import GuidedCompiler, GuidedMatcher, GuidedSpec, fill_masks
from remp.model.reader import open_checkpoint
from remp.penalties import PenaltyHistory
from remp.sampler import SampleRow, sample_rows
from remp.sampling_params import SamplingParams

VOCAB = 49152
SPECS = {
    "json_schema": (GuidedSpec.json_schema(SCHEMA), TEXTS["json_schema"][0]),
    "json_object": (GuidedSpec.json_object(), TEXTS["json_object"][0]),
    "regex": (GuidedSpec.regex(REGEX), REGEX_TEXT),
    "choice": (GuidedSpec.choice(["positive", "negative", "neutral"]), "negative"),
    "grammar": (GuidedSpec.grammar(EBNF), EXPR_TEXT),
}


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    return {
        "mean": round(statistics.mean(s) * 1e3, 4),
        "median": round(statistics.median(s) * 1e3, 4),
        "p90": round(s[int(0.9 * len(s))] * 1e3, 4),
        "max": round(s[-1] * 1e3, 4),
    }


def driver_cost(compiler: GuidedCompiler, tok, spec: GuidedSpec, text: str, batch: int, steps: int, threads: int):
    """Per step: fill the batch's masks, build and pickle its rows, follow each row's token."""
    seq = [*tok.encode(text, add_special_tokens=False), tok.eos_token_id]
    matchers, pos = [], []
    for i in range(batch):  # each row at its own phase of the output
        m = GuidedMatcher(compiler.compile(spec))
        start = (i * len(seq)) // batch
        for t in seq[:start]:
            assert m.accept(t)
        matchers.append(m)
        pos.append(start)
    params = SamplingParams(temperature=0.7, guided=spec)
    fill, accept, wire, size = [], [], [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        masks = fill_masks(matchers, threads)
        t1 = time.perf_counter()
        rows = [SampleRow.of(params, pos[i], mask=masks[i]) for i in range(batch)]
        size = len(pickle.dumps(rows))
        t2 = time.perf_counter()
        for i, m in enumerate(matchers):
            assert m.accept(seq[pos[i]])
            pos[i] += 1
        t3 = time.perf_counter()
        fill.append(t1 - t0)
        wire.append(t2 - t1)
        accept.append(t3 - t2)
        for i in range(batch):  # a finished row starts over, outside the timing
            if pos[i] == len(seq):
                matchers[i].rebuild([])
                pos[i] = 0
    return {
        "fill_ms": stats(fill),
        "rows_and_pickle_ms": stats(wire),
        "accept_ms": stats(accept),
        "total_ms_mean": round((statistics.mean(fill) + statistics.mean(wire) + statistics.mean(accept)) * 1e3, 4),
        "step_message_bytes_of_rows": size,
    }


def sampler_cost(batch: int, steps: int, masks: np.ndarray) -> dict:
    """sample_rows time per step for plain rows, and with each extra; the extra is the difference."""
    rng = np.random.default_rng(0)
    spec = SPECS["json_object"][0]
    history = PenaltyHistory(rng.integers(0, VOCAB, 500), rng.integers(0, VOCAB, 200))
    bias = {int(t): 2.0 for t in rng.integers(0, VOCAB, 10)}
    variants = {
        "plain": lambda i: SampleRow.of(SamplingParams(temperature=0.7, seed=i), 0),
        "mask": lambda i: SampleRow.of(SamplingParams(temperature=0.7, seed=i, guided=spec), 0, mask=masks[i]),
        "penalties": lambda i: SampleRow.of(
            SamplingParams(
                temperature=0.7, seed=i, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1
            ),
            0,
            history=history,
        ),
        "logit_bias": lambda i: SampleRow.of(SamplingParams(temperature=0.7, seed=i, logit_bias=bias), 0),
        "mask_top_k": lambda i: SampleRow.of(
            SamplingParams(temperature=0.7, top_k=50, seed=i, guided=spec), 0, mask=masks[i]
        ),
        "plain_top_k": lambda i: SampleRow.of(SamplingParams(temperature=0.7, top_k=50, seed=i), 0),
    }
    logits = torch.randn(batch, VOCAB)
    out = {}
    for name, make in variants.items():
        rows = [make(i) for i in range(batch)]
        times = []
        for _ in range(steps):
            x = logits.clone()
            t0 = time.perf_counter()
            sample_rows(x, rows)
            times.append(time.perf_counter() - t0)
        out[name] = stats(times)
    base = {"mask": "plain", "penalties": "plain", "logit_bias": "plain", "mask_top_k": "plain_top_k"}
    out["extra_ms_median"] = {k: round(out[k]["median"] - out[b]["median"], 4) for k, b in base.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="bench/results/guided_cost.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = open_checkpoint(None).load_tokenizer()
    compiler = GuidedCompiler(tok, VOCAB, [tok.eos_token_id])
    results: dict = {
        "machine": cpu_features().describe(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
        "vocab": VOCAB,
        "compile_ms": {},
        "driver": {},
        "sampler": {},
    }
    uncached = GuidedCompiler(tok, VOCAB, [tok.eos_token_id], cache_size=0)
    uncached.compile(GuidedSpec.json_object())  # reads the vocabulary (once per engine: ~0.5 s)
    for kind, (spec, _) in SPECS.items():
        t0 = time.perf_counter()
        uncached.compile(spec)
        results["compile_ms"][kind] = round((time.perf_counter() - t0) * 1e3, 3)
    for batch in (1, 32):
        for kind, (spec, text) in SPECS.items():
            for threads in (1, 2) if batch > 1 else (1,):
                key = f"batch_{batch}" + (f"_threads_{threads}" if threads > 1 else "")
                r = driver_cost(compiler, tok, spec, text, batch, args.steps, threads)
                results["driver"].setdefault(key, {})[kind] = r
                print(key, kind, json.dumps(r), flush=True)
        masks = fill_masks([GuidedMatcher(compiler.compile(SPECS["json_object"][0])) for _ in range(batch)])
        results["sampler"][f"batch_{batch}"] = r = sampler_cost(batch, args.steps, masks)
        print("sampler", batch, json.dumps(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("saved", args.out)


if __name__ == "__main__":
    main()
