"""Run under `mpiexec -n P`: each rank trains a synchronized BatchNormalization on its shard.

Usage: worker.py OUT_DIR SCENARIO. The scenario names the engine (eager,
ort, reference, or raw: plain onnxruntime driving the documented contract with a
hand-written reduction; renorm: the eager layer with batch renormalization) and
the data layout (even, uneven with an empty first
rank, holed with an empty rank between others, masked, mismatch). Writes
OUT_DIR/rank<r>.npz with the outputs and moving statistics (or the error
message) for the test to check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import onnxbn
from onnxbn import layers


def shard_sizes(total: int, size: int, scenario: str) -> list[int]:
    if "holed" in scenario:
        # an empty rank between non-empty ones (4 processes: 4, 0, 5, 2 rows)
        sizes = [4, 0, 5, 2][:size]
        sizes[-1] += total - sum(sizes)
        return sizes
    if "uneven" in scenario:
        # rank 0 gets nothing, the others uneven shares
        sizes = [0] + [1 + r for r in range(size - 1)]
        sizes[-1] += total - sum(sizes)
        return sizes
    return [total // size + (r < total % size) for r in range(size)]


def export(layer, channels: int, masked: bool):
    x = onnxbn.Input(shape=(5, channels), name="x")
    inputs, kwargs = [x], {}
    if masked:
        kwargs["mask"] = onnxbn.Input(shape=(5,), dtype="bool", name="mask")
        inputs.append(kwargs["mask"])
    return onnxbn.export_onnx(onnxbn.Model(inputs, layer(x, **kwargs)), training=True)


def eager_engine(layer, channels, masked, comm):
    def step(x, mask):
        return layer(x, training=True, mask=mask)

    return step, lambda: (layer.moving_mean.numpy(), layer.moving_variance.numpy())


def session_engine(module):
    def make(layer, channels, masked, comm):
        session = module.Session(export(layer, channels, masked), comm=comm)

        def step(x, mask):
            feeds = {"x": x} if mask is None else {"x": x, "mask": mask}
            return session.run(feeds)[0]

        return step, lambda: (session.state["bn/moving_mean"], session.state["bn/moving_variance"])

    return make


def raw_engine(layer, channels, masked, comm):
    """The documented contract driven by plain onnxruntime and a hand-written reduction."""
    import onnxruntime

    proto = export(layer, channels, masked)
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    state = {
        "bn/moving_mean": layer.moving_mean.numpy(),
        "bn/moving_variance": layer.moving_variance.numpy(),
    }

    def chan(partials):
        n = sum(p[0] for p in partials)
        safe = np.where(n > 0, n, 1.0)
        mean = sum(p[0] * p[1] for p in partials) / safe
        m2 = sum(p[2] + p[0] * (p[1] - mean) ** 2 for p in partials)
        return np.stack([n, mean, m2])

    def step(x, mask):
        feeds = {"x": x, **state, "synchronize": np.array(True)}
        if mask is not None:
            feeds["mask"] = mask
        (partial,) = session.run(["bn/partial_moments"], feeds)
        feeds["bn/global_moments"] = chan(comm.allgather(partial))
        y, mean, var = session.run(["bn", "bn/moving_mean/new", "bn/moving_variance/new"], feeds)
        state["bn/moving_mean"], state["bn/moving_variance"] = mean, var
        return y

    return step, lambda: (state["bn/moving_mean"], state["bn/moving_variance"])


# Batch renormalization (eager): the global moments must feed s, r and d on every replica.
RENORM = {"renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.4}, "renorm_momentum": 0.5}
RENORM_STATES = ("moving_stddev", "renorm_mean", "renorm_stddev")


def initial_weights(channels: int, renorm: bool) -> list[np.ndarray]:
    """gamma, beta, moving_mean, moving_variance, and with renorm the three extra states."""
    weights = [np.linspace(0.5, 2, channels), np.linspace(-1, 1, channels),
               np.zeros(channels), np.ones(channels)]  # fmt: skip
    if renorm:  # against data of mean 7, stddev 3: r and d are clipped on some channels
        weights += [np.ones(channels), np.linspace(6, 8, channels), np.linspace(2, 4, channels)]
    return weights


def engines() -> dict:
    from onnxbn import reference, runtime

    return {
        "eager": eager_engine,
        "ort": session_engine(runtime),
        "reference": session_engine(reference),
        "raw": raw_engine,
    }


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
    if scenario.endswith("mismatch") and rank == size - 1:
        channels += 1
        data = np.concatenate([data, data[..., :1]], axis=-1)
    last = rank == size - 1
    policy = "float64" if scenario.endswith("dtype") and last else None
    renorm = RENORM if scenario.startswith("renorm") else {}
    layer = layers.BatchNormalization(
        synchronized=True, momentum=0.7, name="bn", dtype=policy, **renorm
    )
    layer.build((None, 5, channels))
    layer.set_weights(initial_weights(channels, renorm=bool(renorm)))
    table = engines()
    engine = scenario.split("-")[0]
    make = table.get(engine, eager_engine)
    masked = "masked" in scenario
    outputs = []
    try:
        step, state = make(layer, channels, masked, comm)
        for s in range(steps):
            mask = masks[s, start:stop] if masked else None
            if scenario.endswith("badmask") and last:
                mask = masks[s, start:stop, :4]  # does not broadcast against the data
            x = data[s, start:stop]
            if scenario.endswith("baddtype") and last:
                x = x.astype(np.float64)  # the exported graph declares float32
            outputs.append(step(x, mask))
    except (TypeError, ValueError) as error:
        np.savez(out_dir / f"rank{rank}.npz", error=str(error))
        return
    mean, var = state()
    np.savez(
        out_dir / f"rank{rank}.npz",
        start=start,
        stop=stop,
        y=np.concatenate(outputs) if outputs else np.zeros(0),
        moving_mean=mean,
        moving_variance=var,
        **{name: getattr(layer, name).numpy() for name in RENORM_STATES if layer.renorm},
    )


if __name__ == "__main__":
    main()
