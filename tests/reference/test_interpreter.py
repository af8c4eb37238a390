"""The interpreter: plans, feeds and defaults, opset selection, malformed graphs."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxbn.reference
from onnxbn.reference import Interpreter, backend
from onnxbn.reference.kernels.table import NEWEST_OPSET
from tests.reference.helpers import single_node_model, tensor


def _model(nodes, inputs, outputs, initializers=(), opset=18, domain=""):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, opset)])


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _scale_shift_model():
    """y = (x * scale + shift), scale an overridable default, shift a constant."""
    return _model(
        [
            helper.make_node("Mul", ["x", "scale"], ["scaled"], name="mul"),
            helper.make_node("Add", ["scaled", "shift"], ["y"], name="add"),
        ],
        [_float("x", [2, 3]), _float("scale", [3])],
        [_float("y", [2, 3])],
        [tensor("scale", np.array([1, 2, 3], np.float32)), tensor("shift", np.ones(3, np.float32))],
    )


X = np.arange(6, dtype=np.float32).reshape(2, 3)


# ---------------------------------------------------------------- running


def test_run_returns_all_outputs_and_uses_initializer_defaults():
    (y,) = onnxbn.reference.run(_scale_shift_model(), {"x": X})
    np.testing.assert_array_equal(y, X * [1, 2, 3] + 1)


def test_feed_overrides_initializer_of_same_name():
    scale = np.array([0, 0, 10], np.float32)
    (y,) = Interpreter(_scale_shift_model()).run({"x": X, "scale": scale})
    np.testing.assert_array_equal(y, X * scale + 1)


def test_run_all_returns_every_intermediate_by_name():
    values = Interpreter(_scale_shift_model()).run_all({"x": X})
    assert set(values) == {"x", "scale", "shift", "scaled", "y"}
    np.testing.assert_array_equal(values["scaled"], X * [1, 2, 3])
    np.testing.assert_array_equal(values["y"], X * [1, 2, 3] + 1)


@pytest.mark.parametrize(
    "feeds, error, message",
    [
        ({}, ValueError, "Missing feeds \\['x'\\]"),
        ({"x": X, "z": X}, ValueError, "Unknown feed 'z'"),
        ({"x": X.astype(np.float64)}, TypeError, "dtype float64.*float32"),
        ({"x": np.zeros((2, 4), np.float32)}, ValueError, "shape \\(2, 4\\).*\\(2, 3\\)"),
        ({"x": "text"}, TypeError, "received str"),
    ],
)
def test_bad_feeds(feeds, error, message):
    with pytest.raises(error, match=message):
        Interpreter(_scale_shift_model()).run(feeds)


def test_list_feeds_are_converted_to_the_declared_dtype():
    (y,) = Interpreter(_scale_shift_model()).run({"x": X.tolist()})
    assert y.dtype == np.float32


def test_outputs_are_owned_by_the_caller():
    model = _model(
        [
            helper.make_node("Identity", ["c"], ["constant_out"]),
            helper.make_node("Identity", ["x"], ["fed_out"]),
            helper.make_node("Reshape", ["x", "shape"], ["view_out"]),
        ],
        [_float("x", [2, 3])],
        [_float("constant_out", [3]), _float("fed_out", [2, 3]), _float("view_out", [6])],
        [tensor("c", np.ones(3, np.float32)), tensor("shape", np.array([6], np.int64))],
    )
    interpreter = Interpreter(model)
    x = X.copy()
    constant_out, fed_out, view_out = interpreter.run({"x": x})
    constant_out[:] = 7
    fed_out[:] = 7
    view_out[:] = 7
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(interpreter.run({"x": x})[0], np.ones(3))


def test_node_failure_names_the_node():
    model, feeds = single_node_model(
        "Add", [np.ones((2, 3), np.float32), np.ones((4,), np.float32)]
    )
    model.graph.node[0].name = "bad_add"
    with pytest.raises(ValueError, match="node 'bad_add' \\(Add\\) failed"):
        Interpreter(model).run(feeds)


def test_division_by_zero_gives_inf_without_warnings(recwarn):
    (y,) = onnxbn.reference.run(
        *single_node_model("Div", [np.ones(2, np.float32), np.zeros(2, np.float32)])
    )
    assert np.isinf(y).all() and not recwarn.list


# ---------------------------------------------------------------- buffer reuse


BIG = (256, 512)  # above the size where element-wise steps reuse dying inputs


def _reuse_model(with_alias: bool):
    nodes = [
        helper.make_node("Add", ["x", "one"], ["t"]),
        helper.make_node("Mul", ["t", "two"], ["u"]),
    ]
    outputs = [_float("u", BIG)]
    if with_alias:  # a view of t that outlives t's last element-wise reader
        nodes.insert(1, helper.make_node("Reshape", ["t", "flat"], ["r"]))
        outputs.append(_float("r", [BIG[0] * BIG[1]]))
    inits = [
        tensor("one", np.float32(1)),
        tensor("two", np.float32(2)),
        tensor("flat", np.array([-1], np.int64)),
    ]
    return _model(nodes, [_float("x", BIG)], outputs, inits)


@pytest.mark.parametrize("with_alias", [False, True])
def test_buffer_reuse_gives_the_same_values(with_alias):
    x = np.random.default_rng(0).normal(size=BIG).astype(np.float32)
    interpreter = Interpreter(_reuse_model(with_alias))
    results = interpreter.run({"x": x})
    np.testing.assert_array_equal(results[0], (x + 1) * 2)
    if with_alias:
        np.testing.assert_array_equal(results[1], (x + 1).reshape(-1))
    reusing = [s.op_type for s in interpreter._steps if s.fn.__name__.endswith("_reusing_input")]
    assert reusing == ([] if with_alias else ["Mul"])
    # run_all keeps t intact: it runs without reuse.
    np.testing.assert_array_equal(interpreter.run_all({"x": x})["t"], x + 1)


# ---------------------------------------------------------------- opsets


def _reduce_mean_model(opset: int, axes_as_input: bool):
    inputs = ["x", "axes"] if axes_as_input else ["x"]
    attributes = {} if axes_as_input else {"axes": [1]}
    node = helper.make_node("ReduceMean", inputs, ["y"], keepdims=0, **attributes)
    inits = [tensor("axes", np.array([1], np.int64))] if axes_as_input else []
    return _model([node], [_float("x", [2, 3])], [_float("y", [2])], inits, opset=opset)


@pytest.mark.parametrize("opset, axes_as_input", [(13, False), (17, False), (18, True), (21, True)])
def test_opset_selects_the_reduce_mean_form(opset, axes_as_input):
    (y,) = onnxbn.reference.run(_reduce_mean_model(opset, axes_as_input), {"x": X})
    np.testing.assert_allclose(y, X.mean(axis=1))


@pytest.mark.parametrize(
    "opset, axes_as_input, message",
    [
        (13, True, "has 2 inputs.*ReduceMean-1 takes 1..1"),
        (18, False, "attribute 'axes', unknown to ReduceMean-18"),
    ],
)
def test_wrong_form_for_the_opset_is_a_value_error(opset, axes_as_input, message):
    with pytest.raises(ValueError, match=message):
        Interpreter(_reduce_mean_model(opset, axes_as_input))


@pytest.mark.parametrize(
    "op_type, opset, domain, fragments",
    [
        ("Mod", 13, "", ["Mod", "opset 13"]),
        ("BatchNormalization", 7, "", ["BatchNormalization", "opset 7"]),
        ("Custom", 1, "com.example", ["Custom", "com.example"]),
    ],
)
def test_unsupported_op_raises_not_implemented_at_prepare(op_type, opset, domain, fragments):
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain)
    model = _model([node], [_float("x", [2])], [_float("y", [2])], opset=opset)
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    model.opset_import[0].version = opset
    for prepare in (Interpreter, backend.prepare):
        with pytest.raises(NotImplementedError) as info:
            prepare(model)
        for fragment in fragments:
            assert fragment in str(info.value)


# ---------------------------------------------------------------- malformed graphs

MALFORMED = [
    (
        "input nothing produces",
        [helper.make_node("Add", ["x", "ghost"], ["y"], name="n")],
        "node 'n' \\(Add\\) reads 'ghost', which no earlier node",
    ),
    (
        "duplicate output",
        [helper.make_node("Neg", ["x"], ["y"]), helper.make_node("Abs", ["x"], ["y"])],
        "'y'.*defined twice",
    ),
    ("output shadows an input", [helper.make_node("Neg", ["x"], ["x"])], "'x'.*defined twice"),
    (
        "missing required attribute",
        [helper.make_node("Concat", ["x", "x"], ["y"], name="cat")],
        "node 'cat' \\(Concat\\) is missing required attribute\\(s\\) \\['axis'\\]",
    ),
    (
        "unknown attribute",
        [helper.make_node("Relu", ["x"], ["y"], alpha=0.1)],
        "attribute 'alpha', unknown to Relu-6",
    ),
    ("too few inputs", [helper.make_node("Add", ["x"], ["y"])], "has 1 inputs"),
    ("graph output not produced", [helper.make_node("Neg", ["x"], ["z"])], "Graph output 'y'"),
]


@pytest.mark.parametrize(
    "nodes, message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_graph_is_a_value_error(nodes, message):
    model = _model(nodes, [_float("x", [2])], [_float("y", [2])])
    with pytest.raises(ValueError, match=message):
        Interpreter(model)


@pytest.mark.parametrize("domains", [["ai.onnx.ml"], ["ai.onnx.preview.training", "com.example"]])
def test_model_importing_only_other_domains_is_not_implemented(domains):
    # Well-formed but unsupported: onnx.backend.test reports it as such, not as a failure.
    model = _model([helper.make_node("Neg", ["x"], ["y"])], [_float("x", [2])], [_float("y", [2])])
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, 1) for d in domains)
    with pytest.raises(NotImplementedError, match=re.escape(str(sorted(domains)))):
        Interpreter(model)
    assert not backend.is_compatible(model)


def test_model_without_any_opset_import_is_a_value_error():
    model = _model([helper.make_node("Neg", ["x"], ["y"])], [_float("x", [2])], [_float("y", [2])])
    del model.opset_import[:]
    with pytest.raises(ValueError, match="imports no opset of the default ONNX domain"):
        Interpreter(model)


@pytest.mark.parametrize("opset", [NEWEST_OPSET + 1, 999])
def test_opset_newer_than_the_interpreter_knows_is_refused(opset):
    model = _model(
        [helper.make_node("Neg", ["x"], ["y"])], [_float("x", [2])], [_float("y", [2])], opset=opset
    )
    message = (
        f"imports opset {opset} of the default ONNX domain; the reference interpreter "
        f"knows opsets up to {NEWEST_OPSET}"
    )
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        Interpreter(model)
    assert not backend.is_compatible(model)
    model.opset_import[0].version = NEWEST_OPSET
    (y,) = onnxbn.reference.run(model, {"x": np.ones(2, np.float32)})
    np.testing.assert_array_equal(y, [-1, -1])


@pytest.mark.parametrize("version", [0, -3])
def test_opset_version_below_one_is_a_value_error(version):
    model = _model([helper.make_node("Neg", ["x"], ["y"])], [_float("x", [2])], [_float("y", [2])])
    model.opset_import[0].version = version
    with pytest.raises(ValueError, match=f"imports opset {version} of the default ONNX domain"):
        Interpreter(model)


def test_sequence_input_is_not_implemented():
    sequence = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])
    model = _model([helper.make_node("Identity", ["s"], ["y"])], [sequence], [_float("y", [2])])
    with pytest.raises(NotImplementedError, match="'s' has type sequence_type"):
        Interpreter(model)


def test_constant_nodes_are_folded():
    value = helper.make_tensor("v", TensorProto.FLOAT, [2], [3.0, 4.0])
    model = _model(
        [
            helper.make_node("Constant", [], ["c"], value=value),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        [_float("x", [2])],
        [_float("y", [2])],
    )
    interpreter = Interpreter(model)
    assert [s.op_type for s in interpreter._steps] == ["Add"]
    np.testing.assert_array_equal(interpreter.run({"x": np.ones(2, np.float32)})[0], [4, 5])


def test_backend_runs_lists_and_single_nodes():
    model = _scale_shift_model()
    assert backend.supports_device("CPU") and not backend.supports_device("CUDA")
    (y,) = backend.prepare(model).run([X])
    np.testing.assert_array_equal(y, X * [1, 2, 3] + 1)
    (z,) = backend.run_node(helper.make_node("Neg", ["a"], ["b"]), [X])
    np.testing.assert_array_equal(z, -X)
    assert backend.is_compatible(model)
    assert not backend.is_compatible(
        _model([helper.make_node("Mod", ["x", "x"], ["y"])], [_float("x", [2])], [_float("y", [2])])
    )


def test_onnx_backend_test_accepts_the_backend():
    import warnings

    import onnx.backend.test

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators' own overflow warnings
        suite = onnx.backend.test.BackendTest(backend, __name__)
    suite.include(r"^test_relu_cpu$")
    assert "OnnxBackendNodeModelTest" in suite.test_cases


def test_model_proto_is_not_modified():
    model = _scale_shift_model()
    before = model.SerializeToString()
    Interpreter(model).run({"x": X})
    assert model.SerializeToString() == before
    assert isinstance(Interpreter(model.SerializeToString()).model, onnx.ModelProto)


def test_interpreter_is_independent_of_onnxruntime_and_onnx_reference():
    import ast
    import pathlib

    package = pathlib.Path(onnxbn.reference.__file__).parent
    forbidden = ("onnxruntime", "onnx.reference", "onnxbn.runtime")
    imported = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported += [(path.name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.append((path.name, node.module))
                if node.module == "onnx":
                    imported += [(path.name, f"onnx.{alias.name}") for alias in node.names]
    assert len(imported) > 20
    bad = [(f, m) for f, m in imported if m.startswith(forbidden)]
    assert not bad


def test_skipped_outputs_do_not_clobber_skipped_inputs():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 2)).astype(np.float32)
    params = [np.ones(2, np.float32), np.zeros(2, np.float32)] * 2
    names = ["scale", "bias", "mean", "var"]
    model = _model(
        [
            helper.make_node("BatchNormalization", ["x", *names], ["y", "", "", "saved_mean", ""]),
            helper.make_node("Clip", ["y", "", "high"], ["z"]),  # min left out
        ],
        [_float("x", [5, 2])],
        [_float("z", [5, 2]), _float("saved_mean", [2])],
        [tensor(n, p) for n, p in zip(names, params)] + [tensor("high", np.float32(0.5))],
        opset=13,
    )
    interpreter = Interpreter(model)
    z, saved_mean = interpreter.run({"x": x})
    y = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-5)
    np.testing.assert_allclose(z, np.minimum(y, 0.5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(saved_mean, x.mean(axis=0), rtol=1e-6)
    assert set(interpreter.run_all({"x": x})) == {"x", "y", "z", "saved_mean", "high", *names}


@pytest.mark.parametrize("mean_value", [0.0, 0.5])
def test_inference_batch_normalization_writes_into_a_dying_input(mean_value):
    shape = (4, 8, 64, 64)
    c = shape[1]
    rng = np.random.default_rng(3)
    scale = rng.uniform(0.5, 2, c).astype(np.float32)
    bias = rng.normal(size=c).astype(np.float32)
    mean = np.full(c, mean_value, np.float32)
    var = rng.uniform(0.5, 2, c).astype(np.float32)
    nodes = [
        helper.make_node("Sub", ["x", "shift"], ["t"]),
        helper.make_node("ReduceSum", ["t", "axes"], ["s"], keepdims=0),
        helper.make_node(
            "BatchNormalization", ["t", "scale", "bias", "mean", "var"], ["y"], epsilon=1e-3
        ),
    ]
    inits = [
        tensor("shift", np.float32(1)),
        tensor("axes", np.array([0, 2, 3], np.int64)),
        tensor("scale", scale),
        tensor("bias", bias),
        tensor("mean", mean),
        tensor("var", var),
    ]
    outputs = [_float("y", shape), _float("s", [c])]
    interpreter = Interpreter(_model(nodes, [_float("x", shape)], outputs, inits, opset=15))
    in_place = [s.op_type for s in interpreter._steps if s.fn.__name__.endswith("_in_place")]
    assert in_place == ["BatchNormalization"]
    x = rng.normal(size=shape).astype(np.float32)
    fed = x.copy()
    y, s = interpreter.run({"x": x})
    t = x.astype(np.float64) - 1
    channel = (1, c, 1, 1)
    factor = scale / np.sqrt(var.astype(np.float64) + 1e-3)
    expected = (t - mean.reshape(channel)) * factor.reshape(channel) + bias.reshape(channel)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, t.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-3)
    # The feed is untouched, and a second run gives the same values.
    np.testing.assert_array_equal(x, fed)
    np.testing.assert_array_equal(interpreter.run({"x": x})[0], y)
