"""A lost worker becomes a switch onto the survivors (or onto replacements, with respawn).

The engine calls recover() when a step, a switch or a wait fails because a worker process died (or hung). If
the dead worker held KV that no survivor holds, every running request lost some (each has a slice on every
worker in remp's layouts): all are preempted and recompute from their prompt and the tokens they already have;
greedy or seeded sampling gives the same tokens again. If every KV head it held is replicated on a survivor
(TP wider than the KV heads), the cache is kept and only the micro-batches in flight are computed again. The survivors keep their weights: a new world of them
(executor.drop_lost), the best topology they can hold (choose.py), and a stop-the-world switch whose plan takes
what only the dead worker held from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import time

from remp.executor import MultiprocExecutor, WorkerError
from remp.logger import init_logger
from remp.planner.choose import choose_after_loss
from remp.planner.mode import STOP
from remp.planner.plan import PieceSizer, kv_lost_replicas
from remp.switch.host import SwitchHost
from remp.switch.on_driver import SwitchAborted, SwitchDriver
from remp.switch.report import SwitchReport
from remp.topology import Topology

logger = init_logger(__name__)

DEATH_WAIT_S = 2.0  # a survivor's failed step can be reported before the dead worker's exit is seen


def recover(host: SwitchHost, driver: SwitchDriver, error: WorkerError) -> SwitchReport | None:
    """Serve on without the dead worker(s); None if this failure is not a recoverable loss (no dead process,
    none left, recovery off). Raises WorkerError if the recovery itself fails."""
    ex, args = host.executor, host.args
    if not isinstance(ex, MultiprocExecutor) or not args.worker_recovery:
        return None
    lost = ex.lost_workers(DEATH_WAIT_S)
    if not lost or (len(lost) == ex.pool_size and not args.respawn):
        return None
    t0 = time.perf_counter()
    last_step = host.step_log.last_step_time()
    logger.warning("worker(s) %s lost (%s); recovering", lost, str(error).splitlines()[0])
    old = ex.topology
    interrupted = driver.interrupt()
    cfg = host.model_config
    # a loss during a commit leaves the survivors' shards half consumed: they start over from the checkpoint
    committing = interrupted is not None and interrupted.committing
    # replicas whose KV lost a layer x head with no copy on a survivor (TP > KV heads keeps copies): their
    # requests recompute; the other replicas keep their KV cache
    kv_lost = set(range(old.dp)) if committing else kv_lost_replicas(cfg, old, set(lost))
    requeued, recomputed = host.requeue_running(kv_lost) if kv_lost else ([], 0)
    host.forget_in_flight()
    with_kv = len(kv_lost) < old.dp
    rank_of = ex.drop_lost(lost, args.respawn, args.worker_timeout_s, committing)
    # the old topology in the new ranks; the lost coordinates on ranks past the pool, held by nobody
    beyond = iter(range(ex.pool_size, ex.pool_size + len(lost)))
    old_here = dataclasses.replace(
        old, placement=tuple(rank_of[w] if w in rank_of else next(beyond) for w in old.placement)
    )
    gone = frozenset(w for w in old_here.placement if w >= ex.pool_size)
    if committing:
        gone = frozenset(old_here.placement)
    if args.respawn:
        target = Topology(old.tp, old.pp, None, old.layers_per_stage, old.dp)
    else:
        used = sum(len(host.blocks_in_use(r)) for r in range(old.dp))
        sizer = PieceSizer(cfg, host.dtype.itemsize, used, args.block_size)
        links = ex.links(ex.pool_size) if driver.link_costs else None
        target = choose_after_loss(cfg, old_here, list(range(ex.pool_size)), sizer, gone, with_kv, links)
    done: dict = {}
    driver.start(target, host.kv_blocks_for(target), STOP, lambda r, e: done.update(r=r, e=e), old_here, gone, with_kv)
    while not done:
        driver.advance(0.05)
    if done["e"] is not None:
        raise WorkerError(f"recovery onto the surviving workers failed: {done['e']}")
    report: SwitchReport = done["r"]
    report.cause = "worker_lost"
    report.old_topology = str(old)
    report.recomputed_tokens, report.preempted, report.lost_workers = recomputed, requeued, lost
    report.wall_s = report.pause_s = time.perf_counter() - t0
    report.longest_step_gap_s = round(time.perf_counter() - (last_step or t0), 4)
    logger.warning("recovered: %s -> %s in %.2f s", old, host.topology, report.wall_s)
    if interrupted is not None:
        interrupted.on_done(None, SwitchAborted(f"a worker was lost during the switch; recovered onto {target}"))
    return report
