"""Run under `mpiexec -n P`: each rank trains a synchronized BatchNormalization on its shard.

Usage: worker.py OUT_DIR SCENARIO. Writes OUT_DIR/rank<r>.npz with the outputs and
moving statistics (or the error message) for the test to check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from onnxbn import layers


def shard_sizes(total: int, size: int, scenario: str) -> list[int]:
    if "uneven" in scenario:
        # rank 0 gets nothing, the others uneven shares
        sizes = [0] + [1 + r for r in range(size - 1)]
        sizes[-1] += total - sum(sizes)
        return sizes
    return [total // size + (r < total % size) for r in range(size)]


def main() -> None:
    from mpi4py import MPI

    out_dir, scenario = Path(sys.argv[1]), sys.argv[2]
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(123)
    steps, total, channels = 3, 11, 4
    data = (rng.normal(size=(steps, total, 5, channels)) * 3 + 7).astype(np.float32)
    masks = rng.random((steps, total, 5)) > 0.4
    sizes = shard_sizes(total, size, scenario)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    if scenario == "mismatch" and rank == size - 1:
        channels += 1
        data = np.concatenate([data, data[..., :1]], axis=-1)
    layer = layers.BatchNormalization(synchronized=True, momentum=0.7, name="bn")
    layer.build((None, 5, channels))
    layer.set_weights(
        [
            np.linspace(0.5, 2, channels),
            np.linspace(-1, 1, channels),
            np.zeros(channels),
            np.ones(channels),
        ]
    )
    outputs = []
    try:
        for step in range(steps):
            mask = masks[step, start:stop] if "masked" in scenario else None
            outputs.append(layer(data[step, start:stop], training=True, mask=mask))
    except ValueError as error:
        np.savez(out_dir / f"rank{rank}.npz", error=str(error))
        return
    np.savez(
        out_dir / f"rank{rank}.npz",
        start=start,
        stop=stop,
        y=np.concatenate(outputs) if outputs else np.zeros(0),
        moving_mean=layer.moving_mean.numpy(),
        moving_variance=layer.moving_variance.numpy(),
    )


if __name__ == "__main__":
    main()
