"""One table of bad inputs across the whole surface: each must raise a clear error.

Every row is (id, callable, expected exception type, regex the message must
match). The regex names the offending value or what was expected, so an error
that merely happens (e.g. an IndexError deep inside NumPy) does not count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import onnxbn
from onnxbn import layers, reference, runtime

FIXTURES = Path(__file__).parent / "fixtures" / "keras"
DEFAULT = json.loads((FIXTURES / "default.json").read_text())["get_config"]
BN = layers.BatchNormalization


def built_model(training=False, **kwargs):
    x = onnxbn.Input(shape=(5, 3), name="x")
    m = onnxbn.Input(shape=(5,), dtype="bool", name="mask")
    y = BN(name="bn", **kwargs)(x, mask=m, training=training)
    return onnxbn.Model([x, m], y)


def export(training=False, **kwargs):
    return onnxbn.export_onnx(built_model(training=training, **kwargs), training=training)


def ort_run(feeds, training=True):
    return lambda: runtime.Session(export(training=training)).run(feeds)


def ref_run(feeds, training=True):
    return lambda: reference.Session(export(training=training)).run(feeds)


X = np.zeros((2, 5, 3), np.float32)
M = np.ones((2, 5), bool)


def call(x, **kw):
    return lambda: BN(name="bn")(x, **kw)


def second_call(first, second, **kw):
    def run():
        layer = BN()
        layer(first)
        layer(second, **kw)

    return run


def from_config(**change):
    return lambda: BN.from_config({**DEFAULT, **change})


def tiny_graph(nodes, inputs, outputs, opset=18, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


F = TensorProto.FLOAT
VI = helper.make_tensor_value_info

CASES = [
    # -- layer construction ---------------------------------------------------------
    ("axis list", lambda: BN(axis=[1]), TypeError, r"axis must be a single int.*\[1\]"),
    ("axis str", lambda: BN(axis="-1"), TypeError, "axis must be a single int.*'-1'"),
    ("axis None", lambda: BN(axis=None), TypeError, "axis must be a single int.*None"),
    ("axis float", lambda: BN(axis=1.0), TypeError, "axis must be a single int.*1.0"),
    ("momentum NaN", lambda: BN(momentum=math.nan), ValueError, "momentum must be a finite"),
    ("momentum inf", lambda: BN(momentum=math.inf), ValueError, "momentum must be a finite"),
    (
        "momentum negative",
        lambda: BN(momentum=-0.5),
        ValueError,
        r"momentum must be in \[0, 1\].*-0.5",
    ),
    ("momentum above one", lambda: BN(momentum=1.01), ValueError, r"momentum must be in \[0, 1\]"),
    ("momentum string", lambda: BN(momentum="0.9"), TypeError, "momentum must be a real number"),
    ("epsilon NaN", lambda: BN(epsilon=math.nan), ValueError, "epsilon must be a finite"),
    ("epsilon negative", lambda: BN(epsilon=-1e-5), ValueError, "epsilon must be >= 0.*-1e-05"),
    ("epsilon None", lambda: BN(epsilon=None), TypeError, "epsilon must be a real number"),
    ("center int", lambda: BN(center=1), TypeError, "center must be a bool"),
    ("scale string", lambda: BN(scale="false"), TypeError, "scale must be a bool"),
    ("synchronized None", lambda: BN(synchronized=None), TypeError, "synchronized must be a bool"),
    (
        "unknown initializer",
        lambda: BN(gamma_initializer="glorot_uniformm"),
        ValueError,
        "glorot_uniformm",
    ),
    ("initializer number", lambda: BN(beta_initializer=3), TypeError, "3|int"),
    ("unknown regularizer", lambda: BN(gamma_regularizer="l3"), ValueError, "l3"),
    ("unknown constraint", lambda: BN(beta_constraint="positive"), ValueError, "positive"),
    (
        "unknown kwarg",
        lambda: BN(momentun=0.9),
        ValueError,
        "Unrecognized keyword arguments.*momentun",
    ),
    ("bad dtype policy", lambda: BN(dtype="float8"), ValueError, "Unknown dtype policy 'float8'"),
    ("trainable string", lambda: BN(trainable="yes"), TypeError, "trainable must be a bool"),
    ("empty name", lambda: BN(name=""), TypeError, "name must be a non-empty string"),
    ("name with slash", lambda: BN(name="a/b"), ValueError, "must not contain '/'"),
    (
        "renorm clipping key",
        lambda: BN(renorm=True, renorm_clipping={"rmin": 0.5, "dmin": 1.0}),
        ValueError,
        "invalid keys for `renorm_clipping`.*dmin",
    ),
    # -- eager calls ------------------------------------------------------------------
    ("rank 0", call(np.float32(2.0)), ValueError, "Invalid axis -1.*rank 0"),
    ("axis out of range", lambda: BN(axis=3)(X), ValueError, r"Invalid axis 3.*\[-3, 3\)"),
    ("wrong rank 2nd call", second_call(X, X[0]), ValueError, "expected ndim=3, found ndim=2"),
    (
        "wrong channels 2nd call",
        second_call(X, np.zeros((2, 5, 4))),
        ValueError,
        "expected axis -1 of input shape to have value 3",
    ),
    (
        "mask rank high",
        call(X, training=True, mask=np.ones((2, 5, 3))),
        ValueError,
        "one dimension less than the inputs",
    ),
    ("mask rank low", call(X, training=True, mask=np.ones(2)), ValueError, r"mask.shape=\(2,\)"),
    (
        "mask wrong shape",
        call(X, training=True, mask=np.ones((2, 4))),
        ValueError,
        "does not broadcast",
    ),
    ("mask strings", call(X, training=True, mask=np.full((2, 5), "y")), TypeError, "Mask of layer"),
    (
        "mask objects",
        call(X, training=True, mask=np.array([[None] * 5] * 2)),
        TypeError,
        "Mask of layer",
    ),
    ("string input", call(np.array([["a", "b", "c"]])), TypeError, "numeric or bool.*<U1"),
    ("complex input", call(np.ones((2, 3), np.complex128)), TypeError, "complex128"),
    ("dict input", call({"x": 1}), TypeError, "numeric or bool|numeric array"),
    ("training string", call(X, training="True"), TypeError, "training must be a bool"),
    ("training int", call(X, training=1), TypeError, "training must be a bool"),
    # -- symbolic calls ---------------------------------------------------------------
    (
        "symbolic + array mask",
        lambda: BN()(onnxbn.Input((5, 3)), mask=np.ones((1, 5))),
        TypeError,
        "both symbolic tensors",
    ),
    (
        "symbolic mask rank",
        lambda: BN()(onnxbn.Input((5, 3)), mask=onnxbn.Input((5, 3))),
        ValueError,
        "one dimension less",
    ),
    (
        "symbolic dynamic channel",
        lambda: BN()(onnxbn.Input((5, None))),
        ValueError,
        "is not defined",
    ),
    (
        "symbolic training string",
        lambda: BN()(onnxbn.Input((3,)), training="no"),
        TypeError,
        "training must be a bool",
    ),
    ("Input bad shape", lambda: onnxbn.Input(shape=(-1, 3)), ValueError, "dimensions must be >= 0"),
    (
        "Input bad dtype",
        lambda: onnxbn.Input(shape=(3,), dtype="string"),
        TypeError,
        "Unsupported dtype 'string'",
    ),
    ("Input shape string", lambda: onnxbn.Input(shape="3"), TypeError, "shape must be a tuple"),
    (
        "Input batch_size float",
        lambda: onnxbn.Input(shape=(3,), batch_size=2.0),
        TypeError,
        "batch_size must be an int",
    ),
    (
        "Model outputs array",
        lambda: onnxbn.Model(onnxbn.Input((3,)), np.zeros(3)),
        TypeError,
        "SymbolicTensors",
    ),
    # -- weights ----------------------------------------------------------------------
    (
        "set_weights count",
        lambda: built_model().set_weights([np.ones(3)]),
        ValueError,
        "length 1.*expecting 4",
    ),
    (
        "set_weights shape",
        lambda: built_model().set_weights([np.ones(4)] * 4),
        ValueError,
        r"\(3,\).*\(4,\)",
    ),
    (
        "assign strings",
        lambda: built_model().weights[0].assign(np.array(["a"] * 3)),
        TypeError,
        "numeric",
    ),
    # -- configs ----------------------------------------------------------------------
    ("config unknown key", from_config(momentun=0.9), ValueError, "momentun"),
    ("config axis list", from_config(axis=[1, 2]), TypeError, "axis must be a single int"),
    ("config NaN epsilon", from_config(epsilon=math.nan), ValueError, "epsilon"),
    (
        "config module os",
        lambda: layers.deserialize(
            {"module": "os", "class_name": "BatchNormalization", "config": {}}
        ),
        ValueError,
        "'os'",
    ),
    (
        "config unknown class",
        lambda: layers.deserialize(
            {"module": "keras.layers", "class_name": "Lambda", "config": {}}
        ),
        ValueError,
        "Unknown layer class 'Lambda'",
    ),
    ("config not dict", lambda: BN.from_config([1, 2]), TypeError, "dict|list"),
    (
        "config dtype policy dict",
        from_config(dtype={"class_name": "DTypePolicy", "config": {"name": "int2"}}),
        ValueError,
        "int2",
    ),
    (
        "model config no layers",
        lambda: onnxbn.Model.from_config({"name": "m"}),
        TypeError,
        "'layers' must be a list",
    ),
    # -- export -----------------------------------------------------------------------
    ("opset too old", lambda: onnxbn.export_onnx(built_model(), opset=11), ValueError, "opset 11"),
    ("opset too new", lambda: onnxbn.export_onnx(built_model(), opset=99), ValueError, "opset 99"),
    ("opset string", lambda: onnxbn.export_onnx(built_model(), opset="18"), TypeError, "opset"),
    (
        "export never-called layer",
        lambda: onnxbn.export_onnx(BN()),
        ValueError,
        "never been called|no graph",
    ),
    ("export a string", lambda: onnxbn.export_onnx("model.keras"), TypeError, "str"),
    (
        "export training string",
        lambda: onnxbn.export_onnx(built_model(), training="yes"),
        TypeError,
        "training",
    ),
    # -- onnxruntime Session feeds --------------------------------------------------------
    ("ort missing feed", ort_run({"x": X}), ValueError, r"Missing feeds \['mask'\]"),
    ("ort extra feed", ort_run({"x": X, "mask": M, "y": X}), ValueError, "Unknown feed 'y'"),
    (
        "ort wrong dtype",
        ort_run({"x": X.astype(np.float64), "mask": M}),
        TypeError,
        "float64.*float32",
    ),
    ("ort mask dtype", ort_run({"x": X, "mask": M.astype(np.int32)}), TypeError, "int32.*bool"),
    ("ort wrong rank", ort_run({"x": X[0], "mask": M}), ValueError, "rank 2.*expects rank 3"),
    (
        "ort wrong channels",
        ort_run({"x": np.zeros((2, 5, 4), np.float32), "mask": M}),
        ValueError,
        r"expects \(\?, 5, 3\)",
    ),
    (
        "ort feeding state",
        ort_run({"x": X, "mask": M, "bn/moving_mean": np.zeros(3, np.float32)}),
        ValueError,
        "carried by the session",
    ),
    (
        "ort string feed",
        ort_run({"x": "abc", "mask": M}),
        TypeError,
        "NumPy array, a list or a scalar",
    ),
    (
        "ort feeds not dict",
        lambda: runtime.Session(export()).run([X, M]),
        TypeError,
        "feeds must be a dict",
    ),
    (
        "ort unknown provider",
        lambda: runtime.Session(export(), providers=["TPUExecutionProvider"]),
        ValueError,
        "TPUExecutionProvider",
    ),
    ("ort bad bytes", lambda: runtime.Session(b"not a model"), ValueError, "ONNX|model"),
    # -- reference interpreter -------------------------------------------------------------
    (
        "ref wrong dtype",
        ref_run({"x": X.astype(np.float16), "mask": M}),
        TypeError,
        "float16.*float32",
    ),
    ("ref missing feed", ref_run({"mask": M}), ValueError, r"Missing feeds \['x'\]"),
    (
        "ref unknown op",
        lambda: reference.run(
            tiny_graph(
                [helper.make_node("Hardmax", ["x"], ["y"])], [VI("x", F, [2])], [VI("y", F, [2])]
            ),
            {"x": np.zeros(2, np.float32)},
        ),
        NotImplementedError,
        "Hardmax.*opset 18",
    ),
    (
        "ref dangling input",
        lambda: reference.run(
            tiny_graph(
                [helper.make_node("Add", ["x", "nowhere"], ["y"])],
                [VI("x", F, [2])],
                [VI("y", F, [2])],
            ),
            {"x": np.zeros(2, np.float32)},
        ),
        ValueError,
        "nowhere",
    ),
    ("ref not a model", lambda: reference.run(12, {}), TypeError, "int"),
    (
        "ref garbage bytes path",
        lambda: reference.Session(FIXTURES / "default.json"),
        ValueError,
        "ONNX|protobuf|model",
    ),
]


@pytest.mark.parametrize("fn,error,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(fn, error, pattern):
    with pytest.raises(error, match=pattern):
        fn()


def test_table_is_large_and_distinct():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


def test_failed_run_leaves_state_unchanged():
    for engine in (runtime.Session, reference.Session):
        session = engine(export(training=True))
        session.run({"x": np.ones((2, 5, 3), np.float32) * 3, "mask": M})
        before = session.state
        with pytest.raises(TypeError):
            session.run({"x": X.astype(np.float64), "mask": M})
        after = session.state
        assert before.keys() == after.keys()
        for name in before:
            np.testing.assert_array_equal(before[name], after[name])


def test_negative_moving_variance_is_refused_naming_layer_and_weight():
    """At build, `assign` and `set_weights` (nothing assigned), never a NaN model."""
    import warnings

    bn = BN(name="bn_neg")
    bn.build((None, 3))
    good = bn.get_weights()
    bad = [w.copy() for w in good]
    bad[3][1] = -0.5  # gamma, beta, moving_mean, moving_variance
    bad[0][:] = 7.0
    with pytest.raises(ValueError, match=r"'bn_neg/moving_variance' must be >= 0.*entry \(1,\)"):
        bn.set_weights(bad)
    for before, after in zip(good, bn.get_weights()):
        np.testing.assert_array_equal(before, after)  # nothing assigned
    with pytest.raises(ValueError, match="'bn_neg/moving_variance' must be >= 0"):
        bn.moving_variance.assign(np.array([1.0, -1e-3, 1.0]))
    x = onnxbn.Input((3,), name="x")
    model = onnxbn.Model(x, bn(x))
    with pytest.raises(ValueError, match="'bn_neg/moving_variance'"):
        model.set_weights(bad)
    np.testing.assert_array_equal(model.get_weights()[0], good[0])
    from onnxbn import initializers

    with pytest.raises(ValueError, match="'bn_neg2/moving_variance' must be >= 0"):
        BN(name="bn_neg2", moving_variance_initializer=initializers.Constant(-1.0)).build((2, 3))
    renorm = BN(name="bn_neg3", renorm=True)
    renorm.build((None, 3))
    with pytest.raises(ValueError, match="'bn_neg3/moving_stddev' must be >= 0"):
        renorm.moving_stddev.assign(-np.ones(3))
    # Zero, NaN-free updates and training keep working without warnings.
    bn.moving_variance.assign(np.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(np.ones((4, 3), np.float32), training=True)
        model(np.ones((4, 3), np.float32), training=False)
