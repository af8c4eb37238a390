"""What `pip install onnxbn` delivers: version flags, the wheel's contents, declared dependencies."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

import onnxbn

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# Imports the package makes only where an optional feature needs them, and where they come from.
OPTIONAL_IMPORTS = {
    "onnxruntime": "cpu",  # onnxbn.runtime.Session: the `cpu` or `gpu` extra
    "mpi4py": "distributed",  # synchronized BatchNormalization across processes
}


def _requirement_name(text: str) -> str:
    for stop in "<>=!~[; ":
        text = text.split(stop)[0]
    return text.lower().replace("_", "-")


def _third_party_imports() -> set[str]:
    names = set()
    for file in (ROOT / "onnxbn").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "onnxbn"}


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "onnxbn", "--version"],
        [str(Path(sys.executable).parent / "onnxbn"), "--version"],
    ],
    ids=["python -m onnxbn", "onnxbn"],
)
def test_version_flag(command):
    if not Path(command[0]).exists():
        pytest.fail(f"the console script {command[0]} is not installed")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"onnxbn {onnxbn.__version__}"
    assert metadata.version("onnxbn") == onnxbn.__version__ == PROJECT["version"]


def test_runtime_dependencies_are_what_the_package_imports():
    """Every third-party import is a dependency (or a documented optional one), and vice versa."""
    modules = metadata.packages_distributions()
    imported = {}
    for module in _third_party_imports():
        distributions = {d.lower().replace("_", "-") for d in modules.get(module, [module])}
        imported[module] = distributions
    required = {_requirement_name(r) for r in PROJECT["dependencies"]}
    extras = {
        name: {_requirement_name(r) for r in reqs}
        for name, reqs in PROJECT["optional-dependencies"].items()
    }
    for module, distributions in imported.items():
        if module in OPTIONAL_IMPORTS:
            extra = OPTIONAL_IMPORTS[module]
            assert extra is None or distributions & extras[extra], (module, extra)
            assert not distributions & required, f"{module} is optional, not a dependency"
        else:
            assert distributions & required, f"onnxbn imports {module} ({distributions})"
    used = set().union(*imported.values())
    assert required <= used, f"declared but never imported: {sorted(required - used)}"
    assert "onnxscript" not in used and "onnxscript" in extras["test"]


def test_onnxruntime_extras_choose_one_wheel():
    extras = {
        name: {_requirement_name(r) for r in reqs}
        for name, reqs in PROJECT["optional-dependencies"].items()
    }
    assert extras["cpu"] == {"onnxruntime"}
    assert extras["gpu"] == {"onnxruntime-gpu"}
    # The checkout's commands (`pip install -e ".[test,distributed]"`) must run the sessions.
    assert "onnxruntime" in extras["test"]
    assert not any(_requirement_name(r).startswith("onnxruntime") for r in PROJECT["dependencies"])


def test_wheel_holds_the_package_license_and_type_marker(tmp_path):
    """`pip wheel .` of a copy of the checkout: only `onnxbn/` and its dist-info."""
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*cache", "*.onnx"
        ),
    )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "wheel").glob("onnxbn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"onnxbn-{onnxbn.__version__}.dist-info"
    assert {n.split("/")[0] for n in names} == {"onnxbn", dist_info}
    assert "onnxbn/py.typed" in names
    assert f"{dist_info}/licenses/LICENSE" in names
    meta = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Typing :: Typed" in meta
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "END OF TERMS AND CONDITIONS" in license_text
    packaged = {n for n in names if n.startswith("onnxbn/") and n.endswith(".py")}
    in_tree = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "onnxbn").rglob("*.py")
    }
    assert packaged == in_tree
