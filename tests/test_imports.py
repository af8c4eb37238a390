"""What each entry point loads: independence is asserted, in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import onnxbn

# Parts that the reference interpreter and the exporter must never drag along.
LAYERS = ("onnxbn.layers", "onnxbn.lowering", "onnxbn.model", "onnxbn.export")
RUNTIMES = ("onnxruntime", "mpi4py")


def loaded_after(code: str) -> set[str]:
    """Module names in `sys.modules` after running `code` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def under(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_import_onnxbn_loads_no_part():
    modules = loaded_after("import onnxbn")
    assert under(modules, ("onnxbn",)) == ["onnxbn"]
    assert not under(modules, RUNTIMES)


def test_reference_loads_neither_onnxruntime_nor_the_layers():
    modules = loaded_after("import onnxbn.reference")
    assert not under(modules, RUNTIMES + LAYERS)
    outside = [
        m
        for m in under(modules, ("onnxbn",))
        if not m.startswith("onnxbn.reference")
        and m not in ("onnxbn", "onnxbn.contract", "onnxbn.registry", "onnxbn.session")
    ]
    assert outside == [], "onnxbn.reference loads more than the contract and the session base"


def test_reference_session_and_its_moment_merge_stay_independent(tmp_path):
    """Running a training export on the reference engine, MPI merge included, needs no layer."""
    path = tmp_path / "bn.onnx"
    x = onnxbn.Input((3,), name="x")
    y = onnxbn.layers.BatchNormalization(synchronized=True, name="bn")(x, training=True)
    onnxbn.export_onnx(onnxbn.Model(x, y), path)
    modules = loaded_after(
        "import numpy as np\n"
        "import onnxbn.reference, onnxbn.distributed\n"
        f"session = onnxbn.reference.Session({str(path)!r})\n"
        "session.run({'x': np.ones((2, 3), np.float32)})\n"
        "partial = (np.array([2.0]), np.array([1.0]), np.array([0.0]))\n"
        "onnxbn.distributed.combine_moments(partial, partial)"
    )
    assert not under(modules, RUNTIMES + LAYERS)


def test_export_loads_no_runtime():
    modules = loaded_after(
        "import onnxbn\n"
        "x = onnxbn.Input((3,), name='x')\n"
        "y = onnxbn.layers.BatchNormalization(name='bn')(x, training=True)\n"
        "onnxbn.export_onnx(onnxbn.Model(x, y))"
    )
    assert not under(modules, RUNTIMES)


@pytest.mark.parametrize("name", onnxbn.__all__)
def test_every_public_name_resolves(name):
    assert getattr(onnxbn, name) is not None
    assert name in dir(onnxbn)


def test_submodules_load_on_attribute_access():
    modules = loaded_after("import onnxbn\nonnxbn.export.newest_opset()\nonnxbn.contract.STATE_SUFFIX")
    assert {"onnxbn.export", "onnxbn.contract"} <= modules


def test_importing_the_command_line_loads_no_benchmark_and_no_runtime():
    modules = loaded_after("import onnxbn.cli.main")
    assert not under(modules, RUNTIMES + ("onnxbn.cli.benchmark",))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'BatchNorm'"):
        onnxbn.BatchNorm  # noqa: B018


def test_star_import_gives_every_public_name():
    namespace: dict = {}
    exec("from onnxbn import *", namespace)
    assert set(onnxbn.__all__) <= set(namespace)
