"""Shared-memory gather (the vocabulary-parallel lm-head's logits) in chunks smaller than the rows, interleaved
with all-reduces as in a step, and all-reduces across a topology change after billions of calls: threads stand
in for the workers of one machine."""

import threading
import time

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
            assert len(parts) == len(expected) and all(torch.equal(p, e) for p, e in zip(parts, expected))


def test_a_new_epoch_waits_for_its_peers_even_after_billions_of_calls_in_the_last():
    """A peer's (epoch, calls) from the old epoch must never pass for the new epoch's: a member that took it as
    reached would sum a stale slot. The workers' epochs are generation << 32 plus the topologies of that
    generation; here the 200th generation, after 5e9 calls."""
    seg = ShmSegment(2, max_elems=4)
    comms = [ShmAllReduce(seg, rank) for rank in (0, 1)]
    old, new = (200 << 32) + 7, 201 << 32
    for c in comms:
        c.set_group([0, 1], epoch=old)
        c.seq = 5_000_000_000  # a long-lived server's count of calls in this topology (past 2^32)
    sums, commit = {}, threading.Barrier(2, timeout=30)

    def member(rank: int, value: float, delay: float) -> None:
        x = torch.full((4,), float(rank + 1), dtype=torch.float64)
        comms[rank](x)  # the last call of the old epoch
        commit.wait()  # as a switch's commit: every member is done with the old epoch's calls
        comms[rank].set_group([0, 1], epoch=new)
        time.sleep(delay)  # rank 1 is late in the new epoch: rank 0 must wait for its value
        y = torch.full((4,), value, dtype=torch.float64)
        comms[rank](y)
        sums[rank] = (x, y)

    threads = [threading.Thread(target=member, args=a, daemon=True) for a in ((0, 10.0, 0.0), (1, 20.0, 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if any(t.is_alive() for t in threads):
        seg.peer_lost()  # stuck: let the spinning member give up rather than spin on past the test
    seg.close(unlink=True)
    for r in (0, 1):
        assert torch.equal(sums[r][0], torch.full((4,), 3.0, dtype=torch.float64)), sums
        assert torch.equal(sums[r][1], torch.full((4,), 30.0, dtype=torch.float64)), sums


def test_a_peer_seen_between_its_two_stores_has_not_reached_calls_it_has_not_made():
    """(epoch, seq) are two stores: a member that looks between them (the writer descheduled there) must not take
    the peer for further along than it is, or it would run ahead and overwrite slots the peer still reads."""
    seg = ShmSegment(2, max_elems=4)
    a, b = ShmAllReduce(seg, 0), ShmAllReduce(seg, 1)
    for c in (a, b):
        c.set_group([0, 1], epoch=3)
        c.seq = 4  # the old epoch's calls so far; both publish the fifth
    b.flags[1, 0], b.flags[1, 1] = 3, 5

    class OneStoreThenStop:  # b's flags, descheduled after the first of its two stores
        def __init__(self, flags: torch.Tensor):
            self.flags = flags

        def __setitem__(self, key, value) -> None:
            self.flags[key] = value
            raise InterruptedError

    b.set_group([0, 1], epoch=4)
    b.flags = OneStoreThenStop(b.flags)
    try:
        b(torch.zeros(4, dtype=torch.float64))  # its first call of epoch 4: slot written, one word published
    except InterruptedError:
        pass
    a.set_group([0, 1], epoch=4)
    for calls_made in (1, 2):  # b has published none of epoch 4's calls
        a.seq = calls_made
        assert not a._reached(1)
    seg.close(unlink=True)
