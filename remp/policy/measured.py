"""A performance model measured on this machine: a short profile of the real engine (decode iterations and
prefills of a few sizes, on every candidate topology, as they run with the pipeline full), fitted per topology
to stage time = a + b * tokens + c * KV tokens. Saved as JSON and reused; `remp profile` makes one, `remp serve --topology-policy auto` makes
one at start when none is given (or finds it in the cache)."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from remp.cache_dir import cache_root
from remp.config import ModelConfig
from remp.engine_args import EngineArgs
from remp.logger import init_logger
from remp.planner.mode import STOP
from remp.policy.perf_model import Batch, PerfModel, iteration_s
from remp.policy.switch_cost import SwitchCostModel
from remp.sampling_params import SamplingParams
from remp.topology import Shape, Topology, shape_name

logger = init_logger(__name__)

DECODE_SHAPES = ((1, 128), (4, 128), (8, 384), (16, 256))  # (sequences, context tokens)
PREFILL_TOKENS = (128, 512)
DECODE_ITERATIONS = 4
# SLOs when none are given: multiples of the fastest candidate's unloaded latency (a 512-token prompt's TTFT,
# one sequence's TPOT), as DistServe sets its SLO scales; a CPU's absolute figures vary too much for constants
SLO_SCALE_TTFT, SLO_SCALE_TPOT = 5.0, 5.0
# a live switch on CPU workers: the cut-over measured by bench/reconfig.py (20-420 ms on 4 workers), and the
# serving slowdown its pre-copy throttle allows
CPU_CUTOVER_S, CPU_PRECOPY_SLOWDOWN = 0.3, 0.3


@dataclass
class Profile:
    model: str
    dtype: str
    machine: str
    max_workers: int
    block_size: int
    fits: dict[str, list[float]] = field(default_factory=dict)  # topology -> [a, b per token, c per KV token]
    kv_capacity_tokens: dict[str, int] = field(default_factory=dict)
    pipeline_contention: dict[str, float] = field(default_factory=dict)  # stage slowdown with every stage busy
    samples: list[dict] = field(default_factory=list)
    switch_bandwidth_Bps: float = 0.0  # bytes moved / pause of the stop-the-world switches between candidates
    engine_start_s: float = 0.0
    cores: int = 0  # CPU cores the workers shared (0: unknown, stages taken as independent)
    date: str = ""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"cannot read the performance profile {path}: {e}") from None


def cache_path(model: str, dtype: str, machine: str, max_workers: int, candidates: list[Shape]) -> Path:
    shapes = sorted((c.tp, c.pp) if c.dp == 1 else tuple(c) for c in (Shape(*x) for x in candidates))
    key = hashlib.sha256(json.dumps([model, dtype, machine, max_workers, shapes]).encode()).hexdigest()[:16]
    return cache_root() / "profiles" / f"{key}.json"


class MeasuredModel:
    """PerfModel from a Profile. The fit is per stage; hand-offs are inside the measured stage times."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.name = f"measured:{profile.machine}"

    def _fit(self, tp: int, pp: int) -> list[float]:
        fit = self.profile.fits.get(shape_name((tp, pp)))
        if fit is None:
            raise ValueError(f"the profile has no TP{tp}xPP{pp} (it has {', '.join(self.profile.fits)})")
        return fit

    def stage_s(self, tp: int, pp: int, batch: Batch) -> float:
        if batch.tokens == 0:
            return 0.0
        a, b, c = self._fit(tp, pp)
        return max(a + b * batch.tokens + c * batch.kv_tokens, 1e-4)

    def hop_s(self, tp: int, pp: int, batch: Batch) -> float:
        return 0.0

    def busy_factor(self, tp: int, pp: int, active: int) -> float:
        """Workers share the profile's cores: with k stages of tp workers each busy, each runs at
        min(1, cores / (k * tp)) of its speed alone (processor sharing); stage_s was measured with all pp busy."""
        cores = self.profile.cores
        if cores <= 0 or pp == 1:
            return 1.0

        def slowdown(k: int) -> float:
            return max(1.0, k * tp / cores) / max(1.0, tp / cores)

        return slowdown(max(active, 1)) / slowdown(pp)

    def kv_capacity_tokens(self, tp: int, pp: int) -> int:
        self._fit(tp, pp)
        return self.profile.kv_capacity_tokens[shape_name((tp, pp))]


class ServingEngine(Protocol):
    """The engine's public API, as a profile drives it (LLMEngine)."""

    args: EngineArgs
    model_config: ModelConfig
    dtype: torch.dtype
    max_workers: int
    max_model_len: int

    @property
    def topology(self) -> Topology: ...

    def add_request(self, request_id, prompt=None, sampling_params=None, *, prompt_token_ids=None) -> str: ...

    def step(self) -> list: ...

    def has_unfinished_requests(self) -> bool: ...

    def abort_request(self, request_id: str | list[str]) -> None: ...

    def reconfigure(self, tensor_parallel_size: int, pipeline_parallel_size: int, layer_split=None, mode=...): ...

    def kv_blocks_for(self, target: Topology) -> int: ...


def _prompt(n: int, vocab: int, salt: int) -> list[int]:
    return [(salt * 7919 + k * 104729) % (vocab - 1) + 1 for k in range(n)]


def _time_decode(engine: ServingEngine, seqs: int, ctx: int) -> float:
    """Seconds for every one of `seqs` running sequences to advance one token (pp micro-batches)."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=DECODE_ITERATIONS + 2, ignore_eos=True, temperature=0.0)
    ids = [
        engine.add_request(None, prompt_token_ids=_prompt(ctx, vocab, i), sampling_params=params) for i in range(seqs)
    ]
    started: set[str] = set()
    while len(started) < seqs:  # prefill everybody first
        started |= {o.request_id for o in engine.step()}
    produced, t0 = 0, time.perf_counter()
    while produced < seqs * DECODE_ITERATIONS and engine.has_unfinished_requests():
        produced += len(engine.step())
    elapsed = time.perf_counter() - t0
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed / max(produced / seqs, 1e-9)


def _time_prefill(engine: ServingEngine, tokens: int) -> float:
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    t0 = time.perf_counter()
    engine.add_request(
        None, prompt_token_ids=_prompt(tokens, engine.model_config.vocab_size, 99), sampling_params=params
    )
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def measure(engine: ServingEngine, candidates: list[Shape], machine: str, engine_start_s: float = 0.0) -> Profile:
    """Profile `engine` (idle, with a pool of at least every candidate's size) on each candidate, then return
    it to the topology it had."""
    if engine.has_unfinished_requests():
        raise ValueError("profile an idle engine")
    start = (engine.topology.tp, engine.topology.pp)
    prof = Profile(
        model=str(engine.args.model),
        dtype=str(engine.dtype).removeprefix("torch."),
        machine=machine,
        max_workers=engine.max_workers,
        block_size=engine.args.block_size,
        engine_start_s=engine_start_s,
        cores=len(os.sched_getaffinity(0)),
        date=datetime.date.today().isoformat(),
    )
    moved, paused = 0, 0.0
    for shape in tqdm([Shape(*c) for c in candidates], desc="Profiling topologies", unit="topology"):
        if shape.dp != 1:
            raise ValueError(f"the engine profiles one replica, not {shape}")
        tp, pp, name = shape.tp, shape.pp, shape_name(shape)
        if (engine.topology.tp, engine.topology.pp) != (tp, pp):
            report = engine.reconfigure(tp, pp, mode=STOP)
            moved, paused = moved + sum(report.bytes_moved.values()), paused + report.pause_s
        t0 = time.perf_counter()
        rows = []
        chunk = engine.args.max_num_batched_tokens // pp
        longest = engine.max_model_len - DECODE_ITERATIONS - 2
        # Stages share this machine's cores: a micro-batch alone in the pipeline runs faster than one among pp
        # (when every stage works at once). Serving under load is the latter, so what ran alone (one sequence,
        # a prefill) is scaled by the slowdown seen between one sequence alone and one per stage.
        contention = 1.0
        if pp > 1:
            ctx = min(DECODE_SHAPES[0][1], longest)
            contention = max(1.0, _time_decode(engine, pp, ctx) / _time_decode(engine, 1, ctx))
        for seqs, ctx in DECODE_SHAPES:
            ctx = min(ctx, longest)
            r = _time_decode(engine, seqs, ctx) * (contention if seqs < pp else 1.0)
            per = math.ceil(seqs / pp)
            rows.append({"tokens": per, "kv_tokens": per * (ctx + DECODE_ITERATIONS // 2), "stage_s": r / pp})
        for n in PREFILL_TOKENS:
            n = min(n, chunk, longest)
            rows.append({"tokens": n, "kv_tokens": n, "stage_s": _time_prefill(engine, n) * contention / pp})
        prof.pipeline_contention[name] = contention
        x = np.array([[1.0, r["tokens"], r["kv_tokens"]] for r in rows])
        y = np.array([r["stage_s"] for r in rows])
        fit = np.linalg.lstsq(x, y, rcond=None)[0]
        prof.fits[name] = [float(max(fit[0], 0.0)), float(max(fit[1], 0.0)), float(max(fit[2], 0.0))]
        prof.kv_capacity_tokens[name] = engine.kv_blocks_for(Topology(tp, pp)) * engine.args.block_size
        prof.samples += [{"topology": name} | r for r in rows]
        logger.info(
            "profiled %s in %.1f s: stage = %.4f + %.2e/token + %.2e/KV token",
            name,
            time.perf_counter() - t0,
            *prof.fits[name],
        )
    if (engine.topology.tp, engine.topology.pp) != start:
        report = engine.reconfigure(*start, mode=STOP)
        moved, paused = moved + sum(report.bytes_moved.values()), paused + report.pause_s
    prof.switch_bandwidth_Bps = moved / paused if paused > 0 else 0.0
    return prof


def default_slo(model: PerfModel, candidates: list[Shape]) -> tuple[float, float]:
    """(TTFT, TPOT) SLOs in seconds: SLO_SCALE_* times the fastest candidate's unloaded latency."""
    shapes = [Shape(*c) for c in candidates]
    fastest = min(shapes, key=lambda c: iteration_s(model, c.tp, c.pp, Batch(1, 1, 512, 0, 1)))
    ttft = iteration_s(model, fastest.tp, fastest.pp, Batch(512, 1, 512, 512 * 256, 1))
    tpot = iteration_s(model, fastest.tp, fastest.pp, Batch(1, 1, 512, 512, 1))
    return SLO_SCALE_TTFT * ttft, SLO_SCALE_TPOT * tpot


def switch_costs(profile: Profile, config: ModelConfig, block_size: int, precopy_duty: float = 0.3) -> SwitchCostModel:
    """What a live switch costs on the profiled machine: its measured bandwidth and start-up, CPU overheads,
    and the pre-copy's share of the time (the engine's switch_precopy_duty)."""
    return SwitchCostModel(
        config,
        profile.switch_bandwidth_Bps or 1e9,
        block_size,
        itemsize=getattr(torch, profile.dtype).itemsize,
        cutover_s=CPU_CUTOVER_S,
        precopy_link_share=precopy_duty,
        precopy_slowdown=CPU_PRECOPY_SLOWDOWN,
        restart_s=profile.engine_start_s or None,
    )
