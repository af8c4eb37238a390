"""Keras ops recorded in graphs: NotEqual, Any, LogicalOr (eager, symbolic, configs, errors)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import onnxbn
from onnxbn import layers, ops
from onnxbn.operation_registry import lookup_class


@pytest.mark.parametrize(
    "a,b",
    [
        (np.array([[0, 1, 2]]), 0),
        (np.array([[0.5, 1.0], [2.0, 0.5]], np.float32), 0.5),
        (np.array([[1, 2], [3, 4]]), np.array([1, 4])),
        (np.array([np.nan, 1.0]), np.nan),
    ],
)
def test_eager_not_equal_and_logical_or(a, b):
    expected = np.array(
        [[x != y for x, y in zip(*np.broadcast_arrays(row, b))] for row in np.atleast_2d(a)]
    )
    got = ops.not_equal(a, b)
    assert got.dtype == bool
    np.testing.assert_array_equal(np.atleast_2d(got), expected)
    np.testing.assert_array_equal(ops.NotEqual()(a, b), got)
    np.testing.assert_array_equal(ops.logical_or(a, b), np.logical_or(a, b))


@pytest.mark.parametrize(
    "axis,keepdims",
    [(None, False), (None, True), (-1, False), (0, True), ([0, 2], False), ((1,), True)],
)
def test_eager_any(axis, keepdims):
    x = np.random.default_rng(3).random((3, 4, 5)) < 0.2
    expected = np.any(x, axis=tuple(axis) if isinstance(axis, list) else axis, keepdims=keepdims)
    np.testing.assert_array_equal(ops.any(x, axis=axis, keepdims=keepdims), expected)
    np.testing.assert_array_equal(ops.Any(axis=axis, keepdims=keepdims)(x), expected)


@pytest.mark.parametrize(
    "shape1,shape2,expected",
    [
        ((None, 9), (), (None, 9)),
        ((None, 1, 4), (3, 1), (None, 3, 4)),
        ((None, None), (None, 5), (None, 5)),
        ((2, None), (1,), (2, None)),
        ((None, 1), (None, 1), (None, 1)),
    ],
)
def test_symbolic_broadcast_shapes(shape1, shape2, expected):
    x = onnxbn.Input(shape=shape1[1:], batch_size=shape1[0])
    other = onnxbn.SymbolicTensor(shape2) if shape2 else 0
    for fn in (ops.not_equal, ops.logical_or):
        y = fn(x, other)
        assert isinstance(y, onnxbn.SymbolicTensor)
        assert y.shape == expected and y.dtype == "bool"


def test_symbolic_call_records_a_node():
    x = onnxbn.Input(shape=(7,), dtype="int32", name="tokens")
    y = ops.not_equal(x, 0)
    op, index, _ = y.history
    assert isinstance(op, ops.NotEqual) and op._inbound_nodes[index].call_args == (x, 0)
    z = ops.any(onnxbn.Input(shape=(4, 6)), axis=-1)
    assert z.shape == (None, 4) and isinstance(z.history[0], ops.Any)
    assert ops.any(onnxbn.Input(shape=(4, 6)), axis=[1, 2], keepdims=True).shape == (None, 1, 1)
    assert ops.any(onnxbn.Input(shape=(4, 6))).shape == ()


def test_broadcast_errors():
    with pytest.raises(
        ValueError, match=re.escape("Cannot broadcast shape, the failure dim has value 3")
    ):
        ops.not_equal(onnxbn.Input(shape=(3,)), onnxbn.SymbolicTensor((2, 4)))
    with pytest.raises(TypeError, match="both symbolic tensors"):
        ops.not_equal(onnxbn.Input(shape=(3,)), np.zeros(3))


@pytest.mark.parametrize(
    "kwargs,x,error,message",
    [
        (
            {"axis": 3},
            np.ones((2, 3)),
            ValueError,
            "axis 3 is out of bounds for a tensor of rank 2",
        ),
        ({"axis": [0, 0]}, np.ones((2, 3)), ValueError, "repeated axis"),
        ({"axis": 1.5}, None, TypeError, "axis must be an int, a list of ints or None"),
        ({"axis": True}, None, TypeError, "axis must be an int"),
        ({"keepdims": "no"}, None, TypeError, "keepdims must be a bool"),
    ],
)
def test_any_errors(kwargs, x, error, message):
    with pytest.raises(error, match=re.escape(message)):
        ops.Any(**kwargs)(x)
    with pytest.raises(error, match=re.escape(message)):
        ops.any(np.ones((2, 3)) if x is None else x, **kwargs)


@pytest.mark.parametrize(
    "op,config",
    [
        (ops.NotEqual(name="not_equal_7"), {"name": "not_equal_7"}),
        (ops.LogicalOr(name="lor"), {"name": "lor"}),
        (ops.Any(axis=-1, name="any_3"), {"name": "any_3", "axis": -1, "keepdims": False}),
        (
            ops.Any(axis=(0, 1), keepdims=True, name="a"),
            {"name": "a", "axis": [0, 1], "keepdims": True},
        ),
        (ops.Any(name="b"), {"name": "b", "axis": None, "keepdims": False}),
    ],
)
def test_configs_and_registration(op, config):
    assert op.get_config() == config
    envelope = layers.serialize(op)
    class_name = type(op).__name__
    assert envelope == {
        "module": "keras.src.ops.numpy",
        "class_name": class_name,
        "config": config,
        "registered_name": class_name,
    }
    assert lookup_class(envelope) is type(op)
    clone = layers.deserialize(json.loads(json.dumps(envelope)))
    assert type(clone) is type(op) and clone.get_config() == config
    with pytest.raises(ValueError, match="Unknown config key"):
        type(op).from_config({**config, "extra": 1})


def test_auto_names_follow_keras():
    onnxbn.reset_names()
    assert [ops.NotEqual().name, ops.NotEqual().name] == ["not_equal", "not_equal_1"]
    assert ops.Any().name == "any" and ops.LogicalOr().name == "logical_or"


def test_eager_functions_record_nothing():
    before = ops.NotEqual()
    onnxbn.reset_names()
    ops.not_equal(np.ones(2), 1.0)
    assert ops.NotEqual().name == "not_equal"  # the eager call created no op
    assert before._inbound_nodes == []
    with pytest.raises(TypeError, match="numeric"):
        ops.not_equal(np.array(["a"]), 1)


@pytest.mark.parametrize(
    "x,scalar,expected",
    [
        # A Python number is compared in the data's dtype, as Keras's backends compare it:
        # float32(0.1) == float32 data 0.1, though float64(0.1) is not.
        (np.array([0.1, 0.2, 0.0], np.float32), 0.1, [False, True, True]),
        (np.array([0.1, 0.3], np.float16), 0.1, [False, True]),
        (np.array([[1.0 / 3.0]], np.float32), 1.0 / 3.0, [[False]]),
        # Integers against a fraction or an out-of-range integer: nothing is equal.
        (np.array([0, 1], np.int32), 0.5, [True, True]),
        (np.array([44, -1], np.int8), 300, [True, True]),
        (np.array([255, 0], np.uint8), -1, [True, True]),
    ],
)
def test_not_equal_compares_python_numbers_in_the_data_dtype(x, scalar, expected):
    for fn in (ops.not_equal, ops.NotEqual()):
        np.testing.assert_array_equal(fn(x, scalar), expected)
        np.testing.assert_array_equal(fn(scalar, x), expected)


def test_not_equal_numpy_scalars_keep_their_dtype():
    # np.float64(0.1) is a float64 value, as in Keras: float32(0.1) differs from it.
    x = np.array([0.1], np.float32)
    np.testing.assert_array_equal(ops.not_equal(x, np.float64(0.1)), [True])
    np.testing.assert_array_equal(ops.not_equal(x, np.float32(0.1)), [False])
