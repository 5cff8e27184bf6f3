"""The policy inside the engine (`--topology-policy auto`): requests feed the load window, and between steps
the policy decides; a switch it wants starts as a live switch while serving goes on."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from remp.cpu_features import cpu_features
from remp.logger import init_logger
from remp.policy.decide import Decision, PolicyConfig, TopologyPolicy
from remp.policy.measured import MeasuredModel, Profile, cache_path, default_slo, measure, switch_costs
from remp.policy.observe import LoadWindow
from remp.policy.predict import Limits, Slo
from remp.switch.choose import candidates as shapes_of
from remp.topology import parse_shape, shape_name

if TYPE_CHECKING:
    from remp.engine import LLMEngine
    from remp.request import Request

logger = init_logger(__name__)


def parse_candidates(text: str | None, config, max_workers: int) -> list[tuple[int, int]]:
    """The topologies the policy may pick: `text` ("TP2xPP1,TP1xPP2") or every shape of the whole pool."""
    allowed = [(t.tp, t.pp) for n in range(1, max_workers + 1) for t in shapes_of(config, n)]
    if not text:
        return [(t.tp, t.pp) for t in shapes_of(config, max_workers)]
    wanted = [parse_shape(c) for c in text.split(",") if c.strip()]
    if bad := [shape_name(c) for c in wanted if c not in allowed]:
        raise ValueError(f"unknown candidate topolog(ies) {', '.join(bad)} for this model on {max_workers} workers")
    return wanted


class PolicyRunner:
    def __init__(self, engine: LLMEngine, profile: Profile, candidates: list[tuple[int, int]]):
        args = engine.args
        self.engine = engine
        self.model = MeasuredModel(profile)
        ttft_s, tpot_s = default_slo(self.model, candidates)
        slo = Slo(
            args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else ttft_s,
            args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else tpot_s,
        )
        self.costs = switch_costs(profile, engine.model_config, args.block_size, args.switch_precopy_duty)
        config = PolicyConfig(slo, args.policy_interval_s, args.policy_min_dwell_s)
        limits = Limits(args.max_num_seqs, args.max_num_batched_tokens)
        self.policy = TopologyPolicy(self.model, candidates, limits, config, self._cost)
        self.window = LoadWindow(args.policy_window_s)
        self.last_error: str | None = None
        logger.info(
            "topology policy: candidates %s, SLO TTFT %.0f ms / TPOT %.0f ms",
            ", ".join(map(shape_name, candidates)),
            slo.ttft_s * 1e3,
            slo.tpot_s * 1e3,
        )

    @classmethod
    def create(cls, engine: LLMEngine) -> PolicyRunner:
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
        return cls(engine, profile, candidates)

    def _cost(self, old: tuple[int, int], new: tuple[int, int]):
        used = sum(len(r.block_ids) for r in self.engine.scheduler.running)
        return self.costs.cost(old, new, "live", used)

    def arrival(self, req: Request) -> None:
        self.window.arrival(time.monotonic(), req.num_prompt_tokens, req.max_tokens)

    def finished(self, req: Request) -> None:
        m = req.metrics
        ttft = m.first_token_time - m.arrival_time if m.first_token_time else None
        n = req.num_output_tokens
        tpot = (m.last_token_time - m.first_token_time) / (n - 1) if n > 1 and m.first_token_time else None
        self.window.finished(time.monotonic(), n, ttft, tpot)

    def tick(self) -> Decision | None:
        """Between steps: decide when due, and start the switch the policy wants (live)."""
        now = time.monotonic()
        engine = self.engine
        if engine.switching is not None or engine.recovering or not self.policy.due(now):
            return None
        load = self.window.snapshot(now, len(engine.scheduler.waiting), len(engine.scheduler.running))
        if load is None:
            self.policy.next_t = now + self.policy.config.interval_s
            return None
        current = (engine.topology.tp, engine.topology.pp)
        d = self.policy.decide(now, load, current)
        if d.action == "switch":
            tp, pp = parse_shape(d.target)
            logger.info("topology policy: %s -> %s: %s", d.current, d.target, d.reason)
            try:
                engine.start_reconfigure(tp, pp, mode="live", on_done=self._done, cause="policy")
            except Exception as e:  # e.g. the KV in use does not fit: the old topology serves on
                self.last_error = f"{d.target}: {e}"
                logger.warning("topology policy: switch to %s refused: %s", d.target, e)
        else:
            logger.debug("topology policy: stay on %s: %s", d.current, d.reason)
        return d

    def _done(self, report, error) -> None:
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
            "last_error": self.last_error,
            "decisions": [d.to_json() for d in list(p.decisions)[-20:]],
        }
