"""Runs an engine on the head node of a multi-node test (inside its network namespace): the requests of
test_recovery, optionally a switch and kills at given steps; prints one JSON line with the outputs, the switch
and recovery reports and every worker pid seen (on any node).

    python tests/multinode_driver.py '{"model": ..., "tp": 2, "pp": 2, "addr": ..., "port": ..., ...}'
"""

from __future__ import annotations

import json
import os
import signal
import sys

from remp import LLMEngine
from tests.test_reconfigure import ENGINE, params
from tests.test_recovery import REQUESTS


def main(spec: dict) -> dict:
    engine = LLMEngine(
        model=spec["model"],
        tensor_parallel_size=spec["tp"],
        pipeline_parallel_size=spec["pp"],
        nnodes=2,
        master_addr=spec["addr"],
        master_port=spec["port"],
        workers_per_node=spec.get("workers_per_node"),
        node_join_timeout_s=60,
        respawn=spec.get("respawn", False),
        max_workers=spec.get("max_workers"),
        **{**ENGINE, "worker_timeout_s": 30},
    )
    engine.switcher.link_costs = spec.get("link_costs", True)
    refused = None
    if spec.get("try_restart"):
        try:
            engine.reconfigure(1, 2, mode="restart")
        except ValueError as e:
            refused = str(e)
    for i, p in enumerate(REQUESTS):
        engine.add_request(str(i), {"prompt_token_ids": p}, params(i))
    outs, pids, switched, reports = {}, set(), [], []
    switch = spec.get("switch")  # [step, tp, pp]
    # step -> ranks in the pool then (killed at the first step from then on with no switch under way)
    kills = {step: ranks for step, ranks in spec.get("kills", [])}
    kill_pids = {step: pid for step, pid in spec.get("kill_pids", [])}
    try:
        while engine.has_unfinished_requests() or engine.switching:
            pids |= {p.pid for p in engine.executor.procs if p.pid}
            n = engine.num_steps
            if switch and n >= switch[0] and not switched:

                def done(r, e) -> None:  # the nodes of the stages as the switch placed them
                    reports.append((r, e, [engine.executor.nodes[w] for w in engine.topology.placement]))

                engine.start_reconfigure(switch[1], switch[2], mode=spec.get("mode", "live"), on_done=done)
                switched.append(n)
            for pid in [kill_pids.pop(n)] if n in kill_pids else []:
                os.kill(pid, signal.SIGKILL)
            due = [step for step in kills if n >= step and not engine.switching]  # not into a switch
            for rank in [r for step in due for r in kills.pop(step)]:
                os.kill(engine.executor.procs[rank].pid, signal.SIGKILL)
            for o in engine.step():
                if o.finished:
                    c = o.outputs[0]
                    outs[o.request_id] = {
                        "token_ids": c.token_ids,
                        "logprobs": [{str(t): lp.logprob for t, lp in d.items()} for d in c.logprobs],
                    }
            if not engine.has_unfinished_requests() and engine.switching:
                engine.advance_switch(0.05)
        ex = engine.executor
        return {
            "outs": outs,
            "switch": [dict(_report(r, e), stage_nodes=nodes) for r, e, nodes in reports],
            "recoveries": [_report(r, None) for r in engine.stats.switches if r.cause == "worker_lost"],
            "topology": str(engine.topology),
            "placement": list(engine.topology.placement),
            "nodes": list(ex.nodes),
            "pids": sorted(pids),
            "restart_refused": refused,
        }
    finally:
        engine.shutdown()


def _report(r, e) -> dict:
    if e is not None:
        return {"error": str(e)}
    return {"old": r.old_topology, "new": r.new_topology, "mode": r.mode, "pause_s": r.pause_s, "wall_s": r.wall_s,
            "bytes_moved": r.bytes_moved, "lost": r.lost_workers}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
