"""Global batch statistics across data-parallel processes (`synchronized=True`), over MPI.

Each process computes per-channel partial moments `(count, mean, M2)` of its
own batch; one all-gather exchanges them (3·C float64 values per process) and
every process combines them with Chan et al.'s parallel formula in rank order,
so all replicas end with bit-identical statistics. MPI comes from `mpi4py`
(`pip install "onnxbn[distributed]"`); a single process never needs it. This
module imports only NumPy: the layers and both engines' sessions share it.

Usage:
    mpiexec -n 4 python train.py         # COMM_WORLD is used by default

    with onnxbn.distributed.communicator(comm):   # or an explicit communicator
        layer(x, training=True)
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

INSTALL_HINT = 'pip install "onnxbn[distributed]" (mpi4py and an MPI runtime)'
# Variables MPI launchers (MPICH/Hydra, Open MPI, Intel MPI, Slurm PMI) set in each process.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")

_local = threading.local()


def launched_processes() -> int:
    """Number of processes the MPI launcher started (1 outside `mpiexec`)."""
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


@contextlib.contextmanager
def communicator(comm: Any) -> Iterator[Any]:
    """Makes `comm` (an mpi4py communicator, or None for local) the active one in this thread."""
    previous = getattr(_local, "comm", _UNSET)
    _local.comm = comm
    try:
        yield comm
    finally:
        _local.comm = previous


_UNSET = object()


def world() -> Any:
    """`mpi4py.MPI.COMM_WORLD`, or an ImportError saying what to install."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(
            f"BatchNormalization(synchronized=True) is running under an MPI launcher with "
            f"{launched_processes()} processes but mpi4py is not installed: {INSTALL_HINT}."
        ) from error
    return MPI.COMM_WORLD


def active_communicator() -> Any:
    """The communicator synchronized layers use now, or None for purely local statistics."""
    comm = getattr(_local, "comm", _UNSET)
    if comm is not _UNSET:
        return comm
    if launched_processes() > 1:
        return world()
    return None


def combine_moments(
    a: tuple[np.ndarray, np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan et al.'s parallel combination of two `(count, mean, M2)` partials."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    safe = np.where(n > 0, n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe)
    m2 = m2_a + m2_b + np.square(delta) * (n_a * n_b / safe)
    return n, mean, m2


def allreduce_moments(
    comm: Any, partial: tuple[np.ndarray, np.ndarray, np.ndarray], *, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combines every process's `(count, mean, M2)` into the global one.

    Every process receives every partial (one all-gather) and combines them
    in rank order, so the results are identical everywhere. Partials of
    different channel counts make EVERY process raise the same error (the
    exchange completes first, so nobody is left waiting).

    Raises:
        ValueError: channel counts differ between processes.
    """
    count, mean, m2 = (np.asarray(a, dtype=np.float64) for a in partial)
    packed = np.stack([np.broadcast_to(count, mean.shape), mean, m2])
    gathered = comm.allgather(packed)
    shapes = [p.shape for p in gathered]
    if len(set(shapes)) != 1:
        channels = [s[1:] for s in shapes]
        raise ValueError(
            f"{what}: processes hold different channel counts {channels} (by rank); "
            "every replica must call the layer with the same channel size."
        )
    total = tuple(gathered[0])
    for other in gathered[1:]:
        total = combine_moments(total, tuple(other))
    return total


def agree(comm: Any, dtype: str, error: Exception | None, what: str) -> None:
    """Every process learns whether every process can go on; all raise together if not.

    One all-gather of `(compute dtype, error or None)`: a process whose own
    checks failed re-raises its error; the others raise a `ValueError` naming
    the failed process, so nobody waits forever in a later exchange. Different
    compute dtypes are an error too.

    Raises:
        ValueError: another process failed, or the dtypes differ.
    """
    report = None if error is None else f"{type(error).__name__}: {error}"
    reports = comm.allgather((str(dtype), report))
    if error is not None:
        raise error
    for rank, (_, other) in enumerate(reports):
        if other is not None:
            raise ValueError(f"{what}: process {rank} failed: {other}")
    dtypes = [d for d, _ in reports]
    if len(set(dtypes)) != 1:
        raise ValueError(
            f"{what}: processes compute in different dtypes {dtypes} (by rank); "
            "every replica must feed the same dtype."
        )


def allreduce_sums(
    comm: Any, arrays: tuple[np.ndarray, ...], *, what: str
) -> tuple[np.ndarray, ...]:
    """Element-wise sums of every process's float64 `arrays`, identical on every process.

    One all-gather; the sums are taken in rank order, so every replica gets
    bit-identical results (the backward of synchronized statistics needs the
    global per-channel sums of the incoming gradient).

    Raises:
        ValueError: the arrays' shapes differ between processes (every
            process raises; the exchange completes first).
    """
    local = tuple(np.asarray(a, dtype=np.float64) for a in arrays)
    gathered = comm.allgather(local)
    shapes = [tuple(a.shape for a in part) for part in gathered]
    if len(set(shapes)) != 1:
        raise ValueError(
            f"{what}: processes hold differently shaped sums {shapes} (by rank); "
            "every replica must call the layer with the same channel size."
        )
    totals = [a.copy() for a in gathered[0]]
    for part in gathered[1:]:
        for total, a in zip(totals, part):
            total += a
    return tuple(totals)
