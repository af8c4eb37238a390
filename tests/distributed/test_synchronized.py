"""synchronized=True across real processes (mpiexec -n 2 and -n 4) against the float64 oracle.

Eager layers, onnxbn.runtime / onnxbn.reference Sessions with a communicator, and plain
onnxruntime driving the documented partial/global moments contract: each replica's
output and moving statistics must match `tests/oracle.py` on the concatenated batch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.oracle import GRAPH_TOLERANCES, bn_oracle

pytest.importorskip(
    "mpi4py", reason='needs the distributed extra: pip install "onnxbn[distributed]"'
)
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
WORKER = Path(__file__).with_name("worker.py")
ROOT = Path(__file__).parents[2]
FLOAT32 = GRAPH_TOLERANCES["float32"]  # every engine, eager included, against the oracle


def launch(processes: int, scenario: str, out: Path) -> list[dict]:
    if MPIEXEC is None:
        pytest.fail("mpi4py is installed but no mpiexec was found next to the interpreter")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [MPIEXEC, "-n", str(processes), sys.executable, str(WORKER), str(out), scenario],
        check=True,
        timeout=120,
        env=env,
        capture_output=True,
    )
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(processes)]


def oracle_steps(scenario: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The float64 oracle on the concatenated batch of every step (the worker's data).

    The moving statistics are carried as the layer stores them (float32).
    """
    from tests.distributed.worker import initial_weights

    rng = np.random.default_rng(123)
    steps, total, channels = 3, 11, 4
    data = (rng.normal(size=(steps, total, 5, channels)) * 3 + 7).astype(np.float32)
    masks = rng.random((steps, total, 5)) > 0.4
    gamma, beta, mean, var = initial_weights(channels, renorm=False)
    ys = []
    for s in range(steps):
        y, mean, var = bn_oracle(
            data[s], axis=-1, gamma=gamma, beta=beta, moving_mean=mean, moving_variance=var,
            momentum=0.7, epsilon=1e-3, training=True,
            mask=masks[s] if "masked" in scenario else None,
        )  # fmt: skip
        mean, var = (v.astype(np.float32).astype(np.float64) for v in (mean, var))
        ys.append(y)
    return np.stack(ys), mean, var


SCENARIOS = [
    (2, "even"), (4, "even"), (2, "uneven"), (4, "uneven"), (2, "masked"), (4, "masked-uneven"),
    (2, "ort-even"), (4, "ort-masked-uneven"), (2, "ort-uneven"), (4, "ort-masked"),
    (2, "reference-masked-uneven"), (4, "reference-even"),
    (2, "raw-masked-uneven"), (4, "raw-even"),
    (4, "holed"), (4, "ort-holed"), (4, "raw-holed"), (4, "reference-holed"),
]  # fmt: skip


@pytest.mark.parametrize("processes,scenario", SCENARIOS)
def test_replicas_match_the_oracle_on_the_concatenated_batch(processes, scenario, tmp_path):
    results = launch(processes, scenario, tmp_path)
    y, mm, mv = oracle_steps(scenario)
    for res in results:
        assert "error" not in res, res.get("error")
        # every replica ends with identical moving statistics
        np.testing.assert_array_equal(res["moving_mean"], results[0]["moving_mean"])
        np.testing.assert_array_equal(res["moving_variance"], results[0]["moving_variance"])
        start, stop = int(res["start"]), int(res["stop"])
        if stop > start:
            mine = res["y"].reshape(3, stop - start, 5, 4)
            np.testing.assert_allclose(mine, y[:, start:stop], *FLOAT32, err_msg=scenario)
    np.testing.assert_allclose(results[0]["moving_mean"], mm, *FLOAT32, err_msg=scenario)
    np.testing.assert_allclose(results[0]["moving_variance"], mv, *FLOAT32, err_msg=scenario)


@pytest.mark.parametrize(
    "processes,scenario", [(2, "renorm-masked-uneven"), (4, "renorm-even"), (4, "renorm-holed")]
)
def test_renorm_replicas_match_the_oracle_on_the_concatenated_batch(processes, scenario, tmp_path):
    from tests.distributed.worker import RENORM, initial_weights
    from tests.oracle import renorm_oracle

    results = launch(processes, scenario, tmp_path)
    names = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
    rng = np.random.default_rng(123)  # the worker's data
    data = (rng.normal(size=(3, 11, 5, 4)) * 3 + 7).astype(np.float32)
    masks = rng.random((3, 11, 5)) > 0.4
    gamma, beta, *states = initial_weights(4, renorm=True)
    ys = []
    for s in range(3):
        y, *states = renorm_oracle(
            data[s], axis=-1, gamma=gamma, beta=beta, **dict(zip(names, states)), momentum=0.7,
            renorm_momentum=RENORM["renorm_momentum"], epsilon=1e-3,
            renorm_clipping=RENORM["renorm_clipping"], training=True,
            mask=masks[s] if "masked" in scenario else None,
        )  # fmt: skip
        ys.append(y)
    for res in results:
        assert "error" not in res, res.get("error")
        start, stop = int(res["start"]), int(res["stop"])
        if stop > start:
            mine = res["y"].reshape(3, stop - start, 5, 4)
            np.testing.assert_allclose(mine, np.stack(ys)[:, start:stop], *FLOAT32)
        for name, value in zip(names, states):
            np.testing.assert_array_equal(res[name], results[0][name])  # identical replicas
            np.testing.assert_allclose(res[name], value, *FLOAT32, err_msg=name)


@pytest.mark.parametrize("engine", ["", "ort-", "reference-"])
def test_mismatched_channels_make_every_replica_raise(engine, tmp_path):
    results = launch(2, engine + "mismatch", tmp_path)
    for res in results:
        assert "different channel counts" in str(res["error"])


@pytest.mark.parametrize(
    "scenario,message",
    [
        ("masked-badmask", "does not broadcast"),
        ("ort-masked-badmask", "Feed 'mask' has shape"),
        ("reference-masked-badmask", "Feed 'mask' has shape"),
        ("dtype", "different dtypes"),
        ("ort-baddtype", "float64"),
    ],
)
def test_an_error_on_one_process_is_raised_on_every_process(scenario, message, tmp_path):
    results = launch(2, scenario, tmp_path)
    assert message in str(results[-1]["error"])  # the failing process: its own error
    assert "error" in results[0]  # the healthy one is told, not left waiting
    assert message in str(results[0]["error"]) or "process 1 failed" in str(results[0]["error"])


def test_missing_mpi4py_under_a_launcher_says_what_to_install():
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "import numpy as np\n"
        "from onnxbn import layers\n"
        "try:\n"
        "    layers.BatchNormalization(synchronized=True)(np.ones((2, 3)), training=True)\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {**os.environ, "PMI_SIZE": "2", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "ERR" in out and 'pip install "onnxbn[distributed]"' in out


def test_single_process_never_needs_mpi():
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "import numpy as np\n"
        "from onnxbn import layers\n"
        "print(layers.BatchNormalization(synchronized=True)(np.ones((2, 3)), training=True).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if "PMI" not in k and "MPI" not in k}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "(2, 3)" in out
