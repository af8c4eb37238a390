"""An in-process stand-in for an mpi4py communicator, for tests that run replicas as threads."""

from __future__ import annotations

import threading


def shared_slots(size: int) -> dict:
    """What the `size` ranks of one run share: a slot per rank and a barrier."""
    return {"slots": [None] * size, "barrier": threading.Barrier(size, timeout=30)}


class ThreadComm:
    """One thread per rank: `allgather` meets the other ranks at a barrier."""

    def __init__(self, rank, shared):
        self.rank, self.shared = rank, shared

    def Get_size(self):  # noqa: N802 (mpi4py's name)
        return len(self.shared["slots"])

    def Get_rank(self):  # noqa: N802
        return self.rank

    def allgather(self, obj):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = obj
        barrier.wait()
        gathered = list(slots)
        barrier.wait()
        return gathered
