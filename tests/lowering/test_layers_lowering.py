"""Layer lowerings (Dense, Conv, activations, Add, pooling, Flatten, Dropout, Masking,
Embedding, NotEqual/Any/LogicalOr): onnxruntime and the reference interpreter against
the eager layer.

One case table drives every check. Each case builds a one-layer model (or a short
chain where the layer needs one) under a dtype policy, with seeded data; the export
must pass the full checker, and both runtimes must reproduce the eager outputs
within the tolerance of the delivered dtype. The reference interpreter lacks a few
kernels (listed by `missing_kernels`); those cases are strict xfails until it has them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest

import onnxbn
from onnxbn import layers, ops
from onnxbn import reference as ref
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.export import DEFAULT_OPSET, MIN_OPSET, export_onnx, newest_opset
from onnxbn.runtime import Session
from tests.oracle import GRAPH_TOLERANCES

SEED = 20240917
POLICIES = ("float32", "mixed_float16", "float64")
ALL_POLICIES = ("float32", "float16", "mixed_float16", "bfloat16", "float64")


@dataclass(frozen=True)
class Case:
    """One row of the table.

    Attributes:
        layer: policy -> a new layer (or None when `call` builds everything).
        inputs: per model input `(shape without batch, dtype, data kind)`; kinds:
            normal, ints, tokens (0..9, zeros as padding), padded (zeroed steps), mask.
        feeds: per input the full feed shape (default: batch 3 + the static shape).
        policies: dtype policies the case runs under.
        call: `(layer, inputs) -> outputs` when the call is not `layer(x)`.
        mask_output: also output the layer output's implicit mask.
        xfail: reason of a known disagreement (a strict xfail), or None.
    """

    layer: Callable[[str], Any] | None
    inputs: tuple = (((4,), "float32", "normal"),)
    feeds: tuple | None = None
    policies: tuple = POLICIES
    call: Callable | None = None
    mask_output: bool = False
    xfail: str | None = None


def _chain(*factories):
    """A call that applies several layers in turn (for cases that need a producer)."""

    def call(layer, xs):
        h = xs[0]
        for make in factories:
            h = make(h)
        return layer(h)

    return call


F32 = "float32"
CASES: dict[str, Case] = {
    # -- Dense --------------------------------------------------------------------
    "dense_2d_relu": Case(lambda p: layers.Dense(5, activation="relu", dtype=p)),
    "dense_3d_softmax": Case(
        lambda p: layers.Dense(5, activation="softmax", dtype=p), (((3, 4), F32, "normal"),),
        policies=ALL_POLICIES,
    ),
    "dense_4d_tanh_no_bias": Case(
        lambda p: layers.Dense(3, activation="tanh", use_bias=False, dtype=p),
        (((2, 3, 4), F32, "normal"),),
    ),
    "dense_dynamic_steps_sigmoid": Case(
        lambda p: layers.Dense(2, activation="sigmoid", dtype=p),
        (((None, 4), F32, "normal"),), feeds=((3, 5, 4),),
    ),
    "dense_int_input": Case(lambda p: layers.Dense(3, dtype=p), (((4,), "int32", "ints"),)),
    # -- Conv ---------------------------------------------------------------------
    "conv2d_valid": Case(lambda p: layers.Conv2D(4, 3, dtype=p), (((7, 6, 3), F32, "normal"),),
                         policies=ALL_POLICIES),  # fmt: skip
    "conv2d_same_stride2_odd": Case(
        lambda p: layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", dtype=p),
        (((9, 8, 3), F32, "normal"),),
    ),
    "conv2d_same_even_kernel": Case(
        lambda p: layers.Conv2D(4, (2, 4), padding="same", dtype=p), (((7, 8, 3), F32, "normal"),)
    ),
    "conv2d_dilated_groups": Case(
        lambda p: layers.Conv2D(
            6, 3, dilation_rate=(2, 1), groups=2, padding="same", activation="sigmoid", dtype=p
        ),
        (((8, 7, 4), F32, "normal"),),
    ),
    "conv2d_channels_first": Case(
        lambda p: layers.Conv2D(
            4, 3, strides=(1, 2), padding="same", data_format="channels_first", dtype=p
        ),
        (((3, 7, 8), F32, "normal"),),
    ),
    # Keras applies a conv's activation in its data format: softmax over the last spatial axis.
    "conv2d_channels_first_softmax": Case(
        lambda p: layers.Conv2D(
            4, 2, activation="softmax", data_format="channels_first", use_bias=False, dtype=p
        ),
        (((3, 5, 4), F32, "normal"),),
    ),
    "conv2d_softmax_channels_last": Case(
        lambda p: layers.Conv2D(5, 3, activation="softmax", dtype=p), (((6, 6, 2), F32, "normal"),)
    ),
    "conv2d_dynamic_same_stride2": Case(
        lambda p: layers.Conv2D(3, 3, strides=2, padding="same", dtype=p),
        (((None, None, 2), F32, "normal"),), feeds=((2, 9, 6, 2),), policies=("float32",),
    ),
    "conv1d_causal_dilated": Case(
        lambda p: layers.Conv1D(4, 3, padding="causal", dilation_rate=2, dtype=p),
        (((None, 3), F32, "normal"),), feeds=((2, 9, 3),),
    ),
    "conv1d_same_stride3": Case(
        lambda p: layers.Conv1D(4, 4, strides=3, padding="same", activation="tanh", dtype=p),
        (((10, 3), F32, "normal"),),
    ),
    "conv1d_channels_first_groups": Case(
        lambda p: layers.Conv1D(6, 3, groups=3, data_format="channels_first", dtype=p),
        (((3, 8), F32, "normal"),),
    ),
    # -- activations ----------------------------------------------------------------
    **{
        f"activation_{name}": Case(
            lambda p, name=name: layers.Activation(name, dtype=p), (((3, 4), F32, "normal"),),
            policies=ALL_POLICIES,
        )
        for name in ("relu", "sigmoid", "tanh", "linear", "softmax")
    },
    "activation_int_input": Case(lambda p: layers.Activation("tanh", dtype=p),
                                 (((4,), "int32", "ints"),)),  # fmt: skip
    "relu_default": Case(lambda p: layers.ReLU(dtype=p), policies=ALL_POLICIES),
    "relu_max_value": Case(lambda p: layers.ReLU(max_value=1.0, dtype=p)),
    "relu_negative_slope": Case(lambda p: layers.ReLU(negative_slope=0.1, dtype=p)),
    "relu_all_parameters": Case(
        lambda p: layers.ReLU(max_value=2.0, negative_slope=0.2, threshold=0.5, dtype=p)
    ),
    "relu_threshold_slope": Case(lambda p: layers.ReLU(negative_slope=0.3, threshold=1.0, dtype=p)),
    # -- Add ---------------------------------------------------------------------------
    "add_two": Case(lambda p: layers.Add(dtype=p), (((3, 4), F32, "normal"),) * 2,
                    call=lambda layer, xs: layer(xs), policies=ALL_POLICIES),  # fmt: skip
    "add_rank_broadcast_int": Case(
        lambda p: layers.Add(dtype=p),
        (((4,), F32, "normal"), ((3, 4), "int32", "ints"), ((1, 4), F32, "normal")),
        call=lambda layer, xs: layer(xs),
    ),
    # -- pooling -----------------------------------------------------------------------
    "gap2d": Case(lambda p: layers.GlobalAveragePooling2D(dtype=p),
                  (((4, 5, 3), F32, "normal"),), policies=ALL_POLICIES),  # fmt: skip
    "gap2d_channels_first_keepdims": Case(
        lambda p: layers.GlobalAveragePooling2D(data_format="channels_first", keepdims=True, dtype=p),
        (((3, 4, 5), F32, "normal"),),
    ),
    "gap1d": Case(lambda p: layers.GlobalAveragePooling1D(dtype=p), (((6, 3), F32, "normal"),)),
    "gap1d_mask_input": Case(
        lambda p: layers.GlobalAveragePooling1D(dtype=p),
        (((6, 3), F32, "normal"), ((6,), "bool", "mask")),
        call=lambda layer, xs: layer(xs[0], mask=xs[1]),
        policies=ALL_POLICIES,
    ),
    "gap1d_channels_first_keepdims_mask": Case(
        lambda p: layers.GlobalAveragePooling1D(data_format="channels_first", keepdims=True, dtype=p),
        (((3, 6), F32, "normal"), ((6,), "float32", "mask")),
        call=lambda layer, xs: layer(xs[0], mask=xs[1]),
    ),
    "gap1d_masking_implicit": Case(
        lambda p: layers.GlobalAveragePooling1D(dtype=p), (((6, 3), F32, "padded"),),
        call=_chain(layers.Masking()),
    ),
    # -- Flatten / Dropout -------------------------------------------------------------
    "flatten": Case(lambda p: layers.Flatten(dtype=p), (((2, 3, 4), F32, "normal"),)),
    "flatten_channels_first": Case(
        lambda p: layers.Flatten(data_format="channels_first", dtype=p), (((2, 3, 4), F32, "normal"),)
    ),
    "flatten_dynamic_int": Case(lambda p: layers.Flatten(dtype=p), (((None, 3), "int32", "ints"),),
                                feeds=((3, 4, 3),), policies=("float32",)),  # fmt: skip
    "flatten_rank1": Case(lambda p: layers.Flatten(dtype=p), (((), F32, "normal"),),
                          policies=("float32",)),  # fmt: skip
    "dropout": Case(lambda p: layers.Dropout(0.5, dtype=p), policies=ALL_POLICIES),
    "dropout_int": Case(lambda p: layers.Dropout(0.3, dtype=p), (((4,), "int32", "ints"),),
                        policies=("float32",)),  # fmt: skip
    # -- masks ----------------------------------------------------------------------------
    "masking": Case(lambda p: layers.Masking(dtype=p), (((5, 3), F32, "padded"),),
                    mask_output=True, policies=ALL_POLICIES),  # fmt: skip
    "masking_value_rank4": Case(
        lambda p: layers.Masking(mask_value=1.5, dtype=p), (((4, 3, 2), F32, "padded1.5"),),
        mask_output=True,
    ),
    "embedding": Case(lambda p: layers.Embedding(10, 4, dtype=p), (((5,), "int32", "tokens"),),
                      policies=ALL_POLICIES),  # fmt: skip
    "embedding_mask_zero_int64": Case(
        lambda p: layers.Embedding(10, 3, mask_zero=True, dtype=p),
        (((None,), "int64", "tokens"),), feeds=((3, 6),), mask_output=True,
    ),
    "embedding_float_indices": Case(
        lambda p: layers.Embedding(10, 3, dtype=p), (((5,), F32, "float_tokens"),)
    ),
    "embedding_mask_into_batchnorm": Case(
        lambda p: layers.BatchNormalization(dtype=p),
        (((6,), "int32", "tokens"),),
        call=lambda layer, xs: layers.GlobalAveragePooling1D()(
            layer(layers.Dense(4)(layers.Embedding(10, 3, mask_zero=True)(xs[0])), training=True)
        ),
        policies=("float32",),
    ),
    "masking_into_batchnorm": Case(
        lambda p: layers.BatchNormalization(dtype=p), (((5, 3), F32, "padded"),),
        call=lambda layer, xs: layer(layers.Masking()(xs[0]), training=True),
        policies=("float32",),
    ),
    "add_masks_logical_or": Case(
        lambda p: layers.Add(dtype=p), (((4, 2), F32, "padded"), ((4, 2), F32, "padded")),
        call=lambda layer, xs: layer([layers.Masking()(xs[0]), layers.Masking()(xs[1])]),
        mask_output=True, policies=("float32",),
    ),
    # -- Keras ops -------------------------------------------------------------------------
    "not_equal_scalar": Case(None, (((3, 4), F32, "ints"),), policies=("float32",),
                             call=lambda _, xs: ops.not_equal(xs[0], 1.0)),  # fmt: skip
    "not_equal_int_vs_float": Case(None, (((3, 4), "int32", "ints"),), policies=("float32",),
                                   call=lambda _, xs: ops.not_equal(xs[0], 0.5)),  # fmt: skip
    "not_equal_bfloat16": Case(None, (((3, 4), "bfloat16", "ints"),), policies=("float32",),
                               call=lambda _, xs: ops.not_equal(xs[0], 2)),  # fmt: skip
    "not_equal_broadcast": Case(
        None, (((3, 4), "int32", "ints"), ((1, 4), "int32", "ints")), policies=("float32",),
        call=lambda _, xs: ops.not_equal(xs[0], xs[1]),
    ),
    "any_axes_keepdims": Case(None, (((3, 4, 2), F32, "ints"),), policies=("float32",),
                              call=lambda _, xs: ops.any(xs[0], axis=[1, -1], keepdims=True)),  # fmt: skip
    "any_all_axes": Case(None, (((3, 4), "int32", "ints"),), policies=("float32",),
                         call=lambda _, xs: ops.any(xs[0])),  # fmt: skip
    "logical_or": Case(None, (((4,), "bool", "mask"), ((4,), F32, "ints")), policies=("float32",),
                       call=lambda _, xs: ops.logical_or(xs[0], xs[1])),  # fmt: skip
}  # fmt: skip
# Cases also exported at the lowest and the newest opset (attribute vs input forms).
OPSET_CASES = ("dense_3d_softmax", "conv2d_same_stride2_odd", "gap1d_mask_input", "masking",
               "embedding_mask_zero_int64", "any_axes_keepdims", "flatten_channels_first",
               "relu_all_parameters", "masking_into_batchnorm")  # fmt: skip


def _data(rng: np.random.Generator, shape: tuple, dtype: str, kind: str) -> np.ndarray:
    if kind == "mask":
        valid = rng.random(shape) < 0.7
        valid[0] = False  # a row with no valid step: NaN from the masked mean, as in Keras
        return valid.astype(to_numpy_dtype(dtype))
    if kind == "ints":
        return rng.integers(-3, 4, shape).astype(to_numpy_dtype(dtype))
    if kind == "tokens":
        ids = rng.integers(1, 10, shape)
        ids[..., -2:] = 0  # padding at the end of each sequence
        return ids.astype(to_numpy_dtype(dtype))
    if kind == "float_tokens":
        return rng.uniform(0, 9.99, shape).astype(to_numpy_dtype(dtype))
    x = (rng.normal(0.0, 1.5, shape) + 0.3).astype(to_numpy_dtype(dtype))
    if kind.startswith("padded"):
        x[:, -2:] = float(kind[len("padded") :] or 0.0)  # masked timesteps
    return x


@functools.cache
def built(name: str, policy: str) -> tuple[onnxbn.Model, dict[str, np.ndarray], list]:
    """The case's model with seeded weights, its feeds and its eager outputs."""
    case = CASES[name]
    onnxbn.reset_names()
    rng = np.random.default_rng([SEED, len(name), sum(map(ord, name + policy))])
    xs = [
        onnxbn.Input(shape, dtype=dt, name=f"x{i}") for i, (shape, dt, _) in enumerate(case.inputs)
    ]
    layer = None if case.layer is None else case.layer(policy)
    if case.call is not None:
        y = case.call(layer, xs)
    else:
        y = layer(xs[0])
    outputs = [y, y.mask] if case.mask_output else [y]
    model = onnxbn.Model(xs, outputs, name=name)
    model.set_weights(
        [
            rng.uniform(0.5, 1.5, w.shape) if w.name in ("gamma", "moving_variance")
            else rng.normal(0.0, 0.7, w.shape)
            for w in model.weights
        ]
    )  # fmt: skip
    feeds = {}
    for i, (shape, dt, kind) in enumerate(case.inputs):
        full = case.feeds[i] if case.feeds else (3, *shape)
        feeds[f"x{i}"] = _data(rng, full, dt, kind)
    saved = model.get_weights()
    with np.errstate(invalid="ignore"):
        eager = [np.asarray(a) for a in model(feeds)]
    model.set_weights(saved)  # a training call updated the moving statistics
    return model, feeds, eager


@functools.cache
def exported(name: str, policy: str, opset: int) -> onnx.ModelProto:
    model, _, _ = built(name, policy)
    proto = export_onnx(model, opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def missing_kernels(proto: onnx.ModelProto) -> list[str]:
    """Op types the reference interpreter has no kernel for at the model's opset."""
    supported = ref.supported_ops()
    opset = proto.opset_import[0].version
    missing = set()
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            # A kernel registered at version v serves every opset from v to the next one.
            if not any(v <= opset for v in supported.get(node.op_type, [])):
                missing.add(node.op_type)
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return sorted(missing)


def assert_matches(results: list, eager: list, what: str) -> None:
    assert len(results) == len(eager)
    for got, want in zip(results, eager):
        got = np.asarray(got)
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, eager {want.dtype}"
        assert got.shape == want.shape, f"{what}: shape {got.shape}, eager {want.shape}"
        if want.dtype == np.bool_ or want.dtype.kind in "iu":
            np.testing.assert_array_equal(got, want, err_msg=what)
            continue
        name = "bfloat16" if want.dtype == ml_dtypes.bfloat16 else want.dtype.name
        rtol, atol = GRAPH_TOLERANCES[name]
        np.testing.assert_allclose(
            got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol, err_msg=what
        )


PARAMS = [(n, p, DEFAULT_OPSET) for n, c in CASES.items() for p in c.policies]
PARAMS += [(n, "float32", o) for n in OPSET_CASES for o in sorted({MIN_OPSET, newest_opset()})]
IDS = [f"{n}-{p}-opset{o}" for n, p, o in PARAMS]


@pytest.mark.parametrize(("name", "policy", "opset"), PARAMS, ids=IDS)
def test_onnxruntime_matches_eager(request, name, policy, opset):
    if CASES[name].xfail:
        request.applymarker(pytest.mark.xfail(strict=True, reason=CASES[name].xfail))
    _, feeds, eager = built(name, policy)
    results = Session(exported(name, policy, opset)).run(feeds)
    assert_matches(results, eager, f"{name} ({policy}, opset {opset}) on onnxruntime")


@pytest.mark.parametrize(("name", "policy", "opset"), PARAMS, ids=IDS)
def test_reference_matches_eager(request, name, policy, opset):
    proto = exported(name, policy, opset)
    missing = missing_kernels(proto)
    if CASES[name].xfail:
        request.applymarker(pytest.mark.xfail(strict=True, reason=CASES[name].xfail))
    elif missing:
        request.applymarker(
            pytest.mark.xfail(strict=True, reason=f"reference interpreter lacks {missing}")
        )
    _, feeds, eager = built(name, policy)
    assert_matches(ref.Session(proto).run(feeds), eager, f"{name} ({policy}) on the reference")


# -- structure ------------------------------------------------------------------------------
def _op_types(name: str, policy: str = "float32") -> list[str]:
    return [n.op_type for n in exported(name, policy, DEFAULT_OPSET).graph.node]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dense_2d_relu", ["Gemm", "Relu"]),
        ("dense_3d_softmax", ["MatMul", "Add", "Softmax"]),
        ("conv2d_same_stride2_odd", ["Transpose", "Conv", "Relu", "Transpose"]),
        ("conv2d_channels_first", ["Conv"]),
        ("conv2d_softmax_channels_last", ["Transpose", "Conv", "Transpose", "Softmax"]),
        ("gap2d", ["ReduceMean"]),
        ("flatten", ["Reshape"]),
        ("flatten_channels_first", ["Transpose", "Reshape"]),
        ("dropout", ["Identity"]),
        ("activation_linear", ["Identity"]),
        ("relu_negative_slope", ["LeakyRelu"]),
        ("relu_max_value", ["Clip"]),
        ("embedding", ["Cast", "Less", "Where", "Gather"]),
    ],
)
def test_op_types(name, expected):
    assert _op_types(name) == expected


def test_conv_pads_follow_tensorflow():
    """`same` with an even total puts the odd element after (TensorFlow/Keras), explicitly."""
    (conv,) = [n for n in exported("conv2d_same_even_kernel", F32, DEFAULT_OPSET).graph.node
               if n.op_type == "Conv"]  # fmt: skip
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["pads"] == [0, 1, 1, 2]  # kernel (2, 4): totals 1 and 3
    assert attrs["auto_pad"] == b"NOTSET"
    (dyn,) = [n for n in exported("conv2d_dynamic_same_stride2", F32, DEFAULT_OPSET).graph.node
              if n.op_type == "Conv"]  # fmt: skip
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dyn.attribute}
    assert attrs["auto_pad"] == b"SAME_UPPER" and "pads" not in attrs


def test_float64_conv_needs_no_conv_node():
    """onnxruntime has no float64 Conv: float64 lowers to patches and MatMul, no Transpose."""
    types = _op_types("conv2d_same_stride2_odd", "float64")
    assert "Conv" not in types and "Transpose" not in types and "MatMul" in types


def test_graph_names_carry_the_layer_name():
    proto = exported("conv2d_same_stride2_odd", F32, DEFAULT_OPSET)
    layer = built("conv2d_same_stride2_odd", F32)[0].layers[-1].name
    assert all(n.name.startswith(f"{layer}/") for n in proto.graph.node)


# -- Dropout and errors --------------------------------------------------------------------
def test_dropout_training_export_is_identity():
    """A training call is exported as the identity (documented): never silently random."""
    onnxbn.reset_names()
    x = onnxbn.Input((6,), name="x")
    model = onnxbn.Model(x, layers.Dropout(0.5, seed=1)(x, training=True))
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(2, 6)}
    for training in (None, True):
        proto = export_onnx(model, training=training)
        assert [n.op_type for n in proto.graph.node] == ["Identity"]
        np.testing.assert_array_equal(Session(proto).run(feeds)[0], feeds["x"])


def test_float64_same_strided_conv_on_dynamic_size_raises():
    onnxbn.reset_names()
    x = onnxbn.Input((None, 3), name="x")
    model = onnxbn.Model(x, layers.Conv1D(2, 3, strides=2, padding="same", dtype="float64")(x))
    with pytest.raises(ValueError, match=r"float64 convolution with padding='same'"):
        export_onnx(model)


def test_embedding_negative_index_fails_instead_of_wrapping():
    onnxbn.reset_names()
    x = onnxbn.Input((3,), dtype="int32", name="x")
    model = onnxbn.Model(x, layers.Embedding(5, 2)(x))
    session = Session(export_onnx(model))
    session.run({"x": np.array([[0, 4, 1]], np.int32)})
    with pytest.raises(ValueError, match="indices must be in"):
        model({"x": np.array([[0, -1, 1]], np.int32)})
    with pytest.raises(Exception, match="(?i)out of (data )?bounds|invalid|index"):
        session.run({"x": np.array([[0, -1, 1]], np.int32)})
