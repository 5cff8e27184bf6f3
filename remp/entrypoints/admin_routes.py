"""The admin API (behind --admin-token, see access.py): the topology and its history, and live switches."""

from __future__ import annotations

from fastapi import APIRouter, Request

from remp.entrypoints.errors import APIError
from remp.entrypoints.protocol import ReconfigureRequest
from remp.entrypoints.state import server_state
from remp.executor import WorkerError
from remp.switch.on_driver import SwitchAborted, SwitchInProgress

router = APIRouter()


@router.get("/admin/topology")
async def topology(request: Request) -> dict:
    state = server_state(request)
    core, t = state.core, state.core.topology
    return {
        "topology": str(t),
        "data_parallel_size": t.dp,
        "tensor_parallel_size": t.tp,
        "pipeline_parallel_size": t.pp,
        "placement": list(t.placement),
        "replicas": [
            {
                "workers": list(t.replica_workers(i)),
                "running": len(rep.scheduler.running),
                "waiting": len(rep.scheduler.waiting),
                "kv_cache_usage": round(rep.scheduler.pool.usage, 4),
            }
            for i, rep in enumerate(core.replicas)
        ],
        "num_workers": getattr(core.executor, "pool_size", 1),
        "max_workers": core.max_workers,
        "pool_generation": getattr(core.executor, "generation", 0),
        "switching_to": state.engine.switching,
        "switches": [
            {
                "time": ev.time,
                "from": ev.report.old_topology,
                "to": ev.report.new_topology,
                "mode": ev.report.mode,
                "wall_s": ev.report.wall_s,
                "pause_s": ev.report.pause_s,
            }
            for ev in state.engine.switches
        ],
        "policy": core.policy.to_json() if core.policy is not None else {"policy": "manual"},
    }


@router.post("/admin/reconfigure")
async def reconfigure(req: ReconfigureRequest, request: Request) -> dict:
    state = server_state(request)
    try:
        report = await state.engine.reconfigure(
            req.tensor_parallel_size, req.pipeline_parallel_size, req.layer_split, req.mode, req.data_parallel_size
        )
    except SwitchInProgress as e:
        raise APIError(409, f"a switch to {e} is in progress; try again when it is done") from None
    except (ValueError, OverflowError) as e:
        raise APIError(400, f"switch refused, still serving {state.core.topology}: {e}") from None
    except SwitchAborted as e:
        raise APIError(503, str(e)) from None
    except WorkerError as e:
        raise APIError(500, f"switch failed: {e}") from None
    t = state.core.topology
    state.metrics.on_topology(t, report)
    return report.to_dict()
