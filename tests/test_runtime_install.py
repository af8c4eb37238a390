"""Installing onnxruntime: none installed, or several wheels over each other (the GPU trap).

Each case runs in a fresh interpreter: one with `onnxruntime` blocked from importing, one
that sees a second onnxruntime distribution (an `onnxruntime_gpu` dist-info) next to the
installed one, as `pip install onnxbn onnxruntime-gpu` leaves it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
from onnx import TensorProto, helper

BLOCK_ONNXRUNTIME = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Block())
"""


def _identity_model(path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_session_without_onnxruntime_says_how_to_install(tmp_path):
    model = _identity_model(tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    done = _python(
        BLOCK_ONNXRUNTIME
        + f"""
import numpy as np
import onnxbn
from onnxbn import reference, runtime
from onnxbn.cli import main

# The reference interpreter runs without onnxruntime.
(y,) = reference.Session({str(model)!r}).run({{"x": np.ones((2, 3), np.float32)}})
assert y.shape == (2, 3)
try:
    runtime.Session({str(model)!r})
except ImportError as error:
    print("ERROR:", error)
else:
    raise SystemExit("no ImportError")
code = main(["run", {str(model)!r}, "--input", "x={tmp_path / "x.npy"}"])
print("EXIT:", code)
assert "onnxruntime" not in sys.modules
"""
    )
    assert done.returncode == 0, done.stderr
    message = done.stdout
    assert "onnxruntime, which is not installed" in message
    assert 'pip install "onnxbn[cpu]"' in message and 'pip install "onnxbn[gpu]"' in message
    assert "EXIT: 2" in message
    assert "onnxbn run: error: onnxbn.runtime.Session runs models on onnxruntime" in done.stderr


def test_two_onnxruntime_wheels_warn_with_the_fix(tmp_path):
    model = _identity_model(tmp_path / "m.onnx")
    fake = tmp_path / "site" / "onnxruntime_gpu-1.20.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.20.0\n"
    )
    done = _python(
        f"""
import warnings
import numpy as np
from onnxbn import runtime

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    session = runtime.Session({str(model)!r})
(y,) = session.run({{"x": np.ones((2, 3), np.float32)}})
for w in caught:
    print(w.category.__name__, w.filename, w.message)
""",
        env={"PYTHONPATH": str(tmp_path / "site")},
    )
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" in done.stdout
    assert "Several onnxruntime distributions are installed (onnxruntime, onnxruntime-gpu)" in (
        done.stdout
    )
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in (
        done.stdout
    )
    assert "test_two" not in done.stdout and "<string>" in done.stdout  # points at the caller


def test_one_onnxruntime_wheel_does_not_warn(tmp_path):
    model = _identity_model(tmp_path / "m.onnx")
    done = _python(
        f"""
import warnings
from onnxbn import runtime

warnings.simplefilter("error")
runtime.Session({str(model)!r})
print(runtime.installed_runtimes())
"""
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['onnxruntime']"
