"""Untrusted files: external data containment, declared sizes, allocation and nesting caps."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxbn.reference import Interpreter, Session, run
from tests.reference.helpers import single_node_model, tensor

WEIGHTS = np.arange(4, dtype=np.float32)


def _external_model(location: str, dims=(4,), length: int | None = None) -> onnx.ModelProto:
    """y = x + w, with w's data in an external file at `location`."""
    w = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(dims))
    w.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": "0"}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _save(model: onnx.ModelProto, folder) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path)


def _feeds(dims=(4,)):
    return {"x": np.zeros(dims, np.float32)}


def test_external_data_inside_the_folder_is_read(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "w.bin").write_bytes(WEIGHTS.tobytes())
    path = _save(_external_model("data/w.bin", length=16), tmp_path)
    np.testing.assert_array_equal(run(path, _feeds())[0], WEIGHTS)
    # A symlink that stays inside the folder is fine.
    os.symlink(tmp_path / "data" / "w.bin", tmp_path / "alias.bin")
    np.testing.assert_array_equal(
        run(_save(_external_model("alias.bin"), tmp_path), _feeds())[0], WEIGHTS
    )


@pytest.mark.parametrize(
    "location, message",
    [
        ("ABSOLUTE", "must be a relative path"),
        ("../w.bin", "without '..'"),
        ("data/../../w.bin", "without '..'"),
        ("escape.bin", "outside the model's folder"),
        ("escape_dir/w.bin", "outside the model's folder"),
        ("missing.bin", "does not exist"),
        ("", "must be a relative path"),
    ],
)
def test_external_data_outside_the_folder_is_refused(tmp_path, location, message):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(WEIGHTS.tobytes())
    (tmp_path / "w.bin").write_bytes(WEIGHTS.tobytes())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    os.symlink(outside / "w.bin", model_dir / "escape.bin")
    os.symlink(outside, model_dir / "escape_dir")
    if location == "ABSOLUTE":
        location = str(outside / "w.bin")
    with pytest.raises(ValueError, match=message):
        Interpreter(_save(_external_model(location), model_dir))


@pytest.mark.parametrize(
    "data_bytes, length, message",
    [
        (8, None, "declares 16 bytes at offset 0 of 'w.bin', but the file holds only 8"),
        (16, 8, "declares 16 bytes but its external data length is 8"),
    ],
)
def test_external_data_shorter_than_declared_is_refused(tmp_path, data_bytes, length, message):
    (tmp_path / "w.bin").write_bytes(WEIGHTS.tobytes()[:data_bytes])
    with pytest.raises(ValueError, match=message):
        Interpreter(_save(_external_model("w.bin", length=length), tmp_path))


def test_in_memory_model_with_external_data_needs_base_dir(tmp_path):
    (tmp_path / "w.bin").write_bytes(WEIGHTS.tobytes())
    model = _external_model("w.bin")
    with pytest.raises(ValueError, match="pass base_dir="):
        Interpreter(model)
    np.testing.assert_array_equal(run(model, _feeds(), base_dir=tmp_path)[0], WEIGHTS)
    with pytest.raises(ValueError, match="base_dir= is only for in-memory models"):
        Interpreter(_save(model, tmp_path), base_dir=tmp_path)


def test_huge_declared_external_tensor_is_refused_before_reading(tmp_path):
    (tmp_path / "w.bin").write_bytes(WEIGHTS.tobytes())
    model = _external_model("w.bin", dims=(2**20, 2**20))
    with pytest.raises(ValueError, match="over the allocation cap"):
        Interpreter(_save(model, tmp_path))


def test_truncated_protobuf_is_a_value_error(tmp_path):
    model, _ = single_node_model("Neg", [np.ones((3, 4), np.float32)])
    model.graph.initializer.append(tensor("big", np.ones(1000, np.float32)))
    data = model.SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="Could not decode"):
        Interpreter(str(path))
    with pytest.raises(ValueError, match="Could not decode"):
        Interpreter(b"\xff\xff\xff garbage")


@pytest.mark.parametrize(
    "make_tensor, message",
    [
        (
            lambda: onnx.TensorProto(
                name="t", data_type=TensorProto.FLOAT, dims=[1000], raw_data=b"\0" * 8
            ),
            "declares dims \\[1000\\] \\(4000 bytes\\) but holds only 8",
        ),
        (
            lambda: onnx.TensorProto(
                name="t", data_type=TensorProto.FLOAT, dims=[5], float_data=[1.0, 2.0]
            ),
            "declares dims \\[5\\] \\(5 entries of float_data\\) but holds only 2",
        ),
        (
            lambda: onnx.TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[-1]),
            "negative dims",
        ),
    ],
)
def test_inline_tensor_larger_than_its_data_is_refused(make_tensor, message):
    model, _ = single_node_model("Neg", [np.ones(2, np.float32)])
    model.graph.initializer.append(make_tensor())
    with pytest.raises(ValueError, match=message):
        Interpreter(model)


def test_initializer_over_the_cap_is_refused():
    model, feeds = single_node_model("Neg", [np.ones(2, np.float32)])
    model.graph.initializer.append(tensor("w", np.ones(1000, np.float32)))
    Interpreter(model, max_bytes=4000)
    with pytest.raises(ValueError, match="4000 bytes\\), over the allocation cap of 3999"):
        Interpreter(model, max_bytes=3999)
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        Interpreter(model, max_bytes=0)


HUGE = np.array([2**20, 2**20], np.int64)
CAPPED = [
    ("ConstantOfShape", [HUGE], {}, "ConstantOfShape output"),
    ("Expand", [np.ones((1, 1), np.float32), HUGE], {}, "Expand output"),
    ("Tile", [np.ones((4, 4), np.float32), np.array([2**18, 2**18], np.int64)], {}, "Tile output"),
    (
        "Range",
        [np.array(0.0, np.float32), np.array(1e12, np.float32), np.array(1.0, np.float32)],
        {},
        "Range output",
    ),
    ("Add", [np.ones((2**17, 1), np.float32), np.ones((1, 2**17), np.float32)], {}, "Add output"),
    (
        "MatMul",
        [np.ones((2**17, 1), np.float32), np.ones((1, 2**17), np.float32)],
        {},
        "MatMul output",
    ),
    (
        "Gather",
        [np.ones((4, 2**16), np.float32), np.zeros(2**16, np.int64)],
        {"axis": 0},
        "Gather output",
    ),
    ("Concat", [np.ones(2**16, np.float32)] * 2, {"axis": 0}, "Concat output"),
]


@pytest.mark.parametrize("op, inputs, attributes, what", CAPPED, ids=[c[0] for c in CAPPED])
def test_predicted_allocation_over_the_cap_is_refused(op, inputs, attributes, what):
    model, feeds = single_node_model(op, inputs, **attributes)
    # Concat's inputs hold 512 KiB together: a 300 KiB cap refuses it; the rest need GiBs.
    cap = 300 * 1024 if op == "Concat" else 2**30
    with pytest.raises(ValueError, match=f"{what}.*over the allocation cap of {cap}"):
        Interpreter(model, max_bytes=cap).run(feeds)


def test_allocation_cap_is_settable():
    model, feeds = single_node_model("ConstantOfShape", [np.array([1000], np.int64)])
    assert Interpreter(model, max_bytes=4000).run(feeds)[0].shape == (1000,)
    with pytest.raises(ValueError, match="needs 4000 bytes, over the allocation cap of 3000"):
        Interpreter(model, max_bytes=3000).run(feeds)


def _nested_if(depth: int) -> onnx.ModelProto:
    """`depth` graphs nested through If branches (the main graph counts as 1)."""

    def leaf(level: int) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"o{level}", TensorProto.FLOAT, [1])
        node = helper.make_node("Constant", [], [f"o{level}"], value_floats=[1.0])
        return helper.make_graph([node], f"leaf{level}", [], [out])

    def branch(level: int) -> onnx.GraphProto:
        if level == depth:
            return leaf(level)
        # Only the then-branch nests, so the model grows linearly with depth.
        node = helper.make_node(
            "If",
            ["cond"],
            [f"o{level}"],
            then_branch=branch(level + 1),
            else_branch=leaf(level + 1),
        )
        out = helper.make_tensor_value_info(f"o{level}", TensorProto.FLOAT, [1])
        return helper.make_graph([node], f"level{level}", [], [out])

    main = branch(1)
    main.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    return helper.make_model(main, opset_imports=[helper.make_opsetid("", 18)])


def test_nesting_deeper_than_the_cap_is_refused():
    with pytest.raises(ValueError, match="nested 9 levels deep, over the cap of 8"):
        Interpreter(_nested_if(20))
    with pytest.raises(ValueError, match="nested 4 levels deep, over the cap of 3"):
        Interpreter(_nested_if(4), max_depth=3)
    # Within the cap, the model is judged on its ops: If has no kernel.
    with pytest.raises(NotImplementedError, match="'If'"):
        Interpreter(_nested_if(4))


def test_session_applies_the_same_checks(tmp_path):
    (tmp_path / "w.bin").write_bytes(WEIGHTS.tobytes())
    with pytest.raises(ValueError, match="pass base_dir="):
        Session(_external_model("w.bin"))
    session = Session(_external_model("w.bin"), base_dir=tmp_path)
    np.testing.assert_array_equal(session.run(_feeds())[0], WEIGHTS)


@pytest.mark.parametrize(
    "suffix, content",
    [(".onnx", b"\x08\x07\x12"), (".json", b'{"keras_version": "3"}'), (".onnx", b"")],
)
def test_undecodable_files_are_value_errors(tmp_path, suffix, content):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    # A decode error; an empty file decodes to an empty model, which has no opset.
    with pytest.raises(ValueError, match="Could not decode|imports no opset"):
        Interpreter(str(path))
    with pytest.raises(FileNotFoundError):
        Interpreter(str(tmp_path / "missing.onnx"))


def test_out_of_memory_stays_a_memory_error():
    # A cap above what the machine can give: NumPy's own MemoryError must reach the
    # caller as what it is, not disguised as a malformed model.
    model, feeds = single_node_model("ConstantOfShape", [np.array([2**57], np.int64)])
    interpreter = Interpreter(model, max_bytes=2**62)
    with pytest.raises(MemoryError) as info:
        interpreter.run(feeds)
    assert not isinstance(info.value, ValueError)


def test_out_of_memory_while_parsing_a_file_stays_a_memory_error(tmp_path, monkeypatch):
    # Parsing a very large file can exhaust memory; that is not a malformed file.
    model, _ = single_node_model("Neg", [np.ones(2, np.float32)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))

    def exhausted(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(onnx, "load", exhausted)
    with pytest.raises(MemoryError, match="no room"):
        Interpreter(str(path))
