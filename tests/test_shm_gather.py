"""Shared-memory gather (the vocabulary-parallel lm-head's logits) in chunks smaller than the rows, interleaved
with all-reduces as in a step: threads stand in for the workers of one machine."""

import threading

import torch

from remp.shm_allreduce import ShmAllReduce, ShmSegment


def test_gather_in_chunks_between_all_reduces_reaches_the_root_in_member_order():
    members, root = [0, 2, 3], 2  # a group of a larger pool; the root is not its first member
    seg = ShmSegment(4, max_elems=10)
    results, errors = {}, []

    def member(rank: int) -> None:
        try:
            comm = ShmAllReduce(seg, rank)
            comm.set_group(members, epoch=1)
            for step in range(3):
                x = torch.full((2, 3), float(rank + step), dtype=torch.float64)
                comm(x)  # an all-reduce before and after each gather, as a decode step makes them
                logits = torch.arange(28, dtype=torch.float64).view(7, 4) * (rank + 1) + step
                results[(rank, step)] = (x.clone(), comm.gather(logits, root))
        except Exception as e:  # surfaced below: a failing thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=member, args=(r,), daemon=True) for r in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stuck = [t for t in threads if t.is_alive()]
    if stuck:
        seg.peer_lost()  # a deadlock: the spinning members give up (PeerLost) instead of hanging pytest
        for t in stuck:
            t.join(5)
    assert not stuck and not errors, errors
    seg.close(unlink=True)
    for step in range(3):
        for rank in members:
            total, parts = results[(rank, step)]
            assert torch.equal(total, torch.full((2, 3), float(sum(m + step for m in members)), dtype=torch.float64))
            if rank != root:
                assert parts is None
                continue
            expected = [torch.arange(28, dtype=torch.float64).view(7, 4) * (m + 1) + step for m in members]
            assert all(torch.equal(p, e) for p, e in zip(parts, expected))
