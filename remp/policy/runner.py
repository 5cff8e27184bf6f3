"""The policy inside the engine (`--topology-policy auto`): requests feed the load window, and between steps the
engine asks for a decision (tick) and acts on it: a switch the policy wants starts as a live switch while serving
goes on. The runner never touches the engine; it sees what the engine tells it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from remp.config import ModelConfig
from remp.cpu_features import cpu_features
from remp.engine_args import EngineArgs
from remp.logger import init_logger
from remp.planner.choose import candidates as shapes_of
from remp.planner.mode import LIVE
from remp.policy.decide import Decision, PolicyConfig, TopologyPolicy
from remp.policy.measured import MeasuredModel, Profile, ServingEngine, cache_path, default_slo, measure, switch_costs
from remp.policy.observe import LoadWindow
from remp.policy.predict import Limits, Slo
from remp.request import Request
from remp.topology import Shape, parse_shape, shape_name

logger = init_logger(__name__)


@dataclass(frozen=True)
class LoadCounts:
    """The engine between two steps, as the policy sees it."""

    shape: Shape
    waiting: int
    running: int
    blocks_used: int  # KV blocks running requests hold


def parse_candidates(text: str | None, config: ModelConfig, max_workers: int) -> list[Shape]:
    """The topologies the policy may pick: `text` ("TP2xPP1,TP1xPP2") or every shape of the whole pool. The
    engine runs one replica (data-parallel shapes are the simulator's until it serves them)."""
    allowed = [Shape(t.tp, t.pp) for n in range(1, max_workers + 1) for t in shapes_of(config, n)]
    if not text:
        return [Shape(t.tp, t.pp) for t in shapes_of(config, max_workers)]
    wanted = [parse_shape(c) for c in text.split(",") if c.strip()]
    if bad := [shape_name(c) for c in wanted if c not in allowed]:
        raise ValueError(f"unknown candidate topolog(ies) {', '.join(bad)} for this model on {max_workers} workers")
    return wanted


class PolicyRunner:
    def __init__(self, args: EngineArgs, config: ModelConfig, profile: Profile, candidates: list[Shape]):
        self.model = MeasuredModel(profile)
        ttft_s, tpot_s = default_slo(self.model, candidates)
        slo = Slo(
            args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else ttft_s,
            args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else tpot_s,
        )
        self.costs = switch_costs(profile, config, args.block_size, args.switch_precopy_duty)
        policy_config = PolicyConfig(slo, args.policy_interval_s, args.policy_min_dwell_s)
        limits = Limits(args.max_num_seqs, args.max_num_batched_tokens)
        self.policy = TopologyPolicy(self.model, candidates, limits, policy_config, self._cost, args.policy_window_s)
        self.window = LoadWindow(args.policy_window_s)
        self.last_error: str | None = None
        self._blocks_used = 0
        logger.info(
            "topology policy: candidates %s, SLO TTFT %.0f ms / TPOT %.0f ms",
            ", ".join(map(shape_name, candidates)),
            slo.ttft_s * 1e3,
            slo.tpot_s * 1e3,
        )

    @classmethod
    def create(cls, engine: ServingEngine) -> PolicyRunner:
        """From the engine's options; the performance profile from --perf-profile, the cache, or measured now
        on `engine` (idle, before it serves)."""
        args = engine.args
        candidates = parse_candidates(args.topology_candidates, engine.model_config, engine.max_workers)
        machine = cpu_features().describe()
        if args.perf_profile:
            profile = Profile.load(args.perf_profile)
        else:
            path = cache_path(str(args.model), str(engine.dtype), machine, engine.max_workers, candidates)
            if path.exists():
                profile = Profile.load(path)
                logger.info("topology policy: performance profile from %s", path)
            else:
                logger.info("topology policy: profiling %d topologies (once; cached in %s)", len(candidates), path)
                profile = measure(engine, candidates, machine)
                profile.save(path)
        missing = [shape_name(c) for c in candidates if shape_name(c) not in profile.fits]
        if missing:
            raise ValueError(f"the performance profile lacks {', '.join(missing)}: profile them (remp profile)")
        return cls(args, engine.model_config, profile, candidates)

    def _cost(self, old: Shape, new: Shape):
        return self.costs.cost(old, new, LIVE, self._blocks_used)

    def arrival(self, req: Request) -> None:
        self.window.arrival(time.monotonic(), req.num_prompt_tokens, req.max_tokens)

    def finished(self, req: Request) -> None:
        m = req.metrics
        ttft = m.first_token_time - m.arrival_time if m.first_token_time else None
        n = req.num_output_tokens
        tpot = (m.last_token_time - m.first_token_time) / (n - 1) if n > 1 and m.first_token_time else None
        self.window.finished(time.monotonic(), n, ttft, tpot, max_tokens=req.max_tokens)

    def tick(self, load: LoadCounts) -> Decision | None:
        """Between steps (no switch or recovery under way): a decision when one is due, else None."""
        now = time.monotonic()
        if not self.policy.due(now):
            return None
        snapshot = self.window.snapshot(now, load.waiting, load.running)
        if snapshot is None:
            self.policy.next_t = now + self.policy.config.interval_s
            return None
        self._blocks_used = load.blocks_used
        observed = self.window.observe(now, self.policy.observe_from, self.policy.config.slo)
        d = self.policy.decide(now, snapshot, load.shape, observed)
        if d.action != "switch":
            logger.debug("topology policy: stay on %s: %s", d.current, d.reason)
        if "factor" in d.observed:
            logger.info(
                "topology policy: %s observed TPOT %.1f ms against %.1f ms predicted: correction x%.2f, model error %.0f%%",
                d.current,
                d.observed["tpot_observed_s"] * 1e3,
                d.observed["tpot_predicted_s"] * 1e3,
                d.observed["factor"],
                d.observed["model_error"] * 100,
            )
        return d

    def refused(self, target: str, error: Exception) -> None:
        """The engine could not start the switch the policy wanted; the old topology serves on."""
        self.last_error = f"{target}: {error}"
        logger.warning("topology policy: switch to %s refused: %s", target, error)

    def switched(self, error: BaseException | None) -> None:
        """A switch ended (by this policy or anyone else; `error` if it was called off): the dwell starts again."""
        if error is not None:
            self.last_error = str(error)
            logger.warning("topology policy: switch called off: %s", error)
        self.policy.switched(time.monotonic())

    def to_json(self) -> dict:
        p = self.policy
        return {
            "policy": "auto",
            "performance_model": self.model.name,
            "candidates": [shape_name(c) for c in p.candidates],
            "slo_ms": {"ttft": p.config.slo.ttft_s * 1e3, "tpot": p.config.slo.tpot_s * 1e3},
            "decisions_total": dict(p.counts),
            "calibration": p.calibration.to_json(),
            "last_error": self.last_error,
            "decisions": [d.to_json() for d in list(p.decisions)[-20:]],
            # the closed loop at work: the latest decisions that compared the prediction with what was observed
            "calibrated_decisions": [d.to_json() for d in p.decisions if "model_error" in d.observed][-10:],
        }
