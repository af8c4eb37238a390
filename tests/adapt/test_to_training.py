"""`onnxbn.to_training` on every runtime of the portability matrix, against a float64 oracle.

The oracle (`tests/adapt/models.py`) is the original model evaluated in float64
by `onnx.reference` with each BatchNormalization node in training mode
(`tests.oracle.bn_oracle`), its running statistics carried between steps.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxbn
from onnxbn.adapt import to_training
from tests import runtimes
from tests.adapt.models import (
    FIXTURES,
    batches_for,
    bn_nodes,
    conv_bn_relu_conv_bn,
    torch_fixture,
    training_steps,
)

RTOL, ATOL = 2e-4, 2e-5  # float32 activations through several layers against float64


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
@pytest.mark.parametrize("make", FIXTURES)
def test_training_form_matches_the_float64_oracle(make, runtime):
    model = make()
    trained = to_training(model)
    running = [n.input[i] for n in bn_nodes(model) for i in (3, 4)]
    assert list(onnxbn.initial_state(trained)) == running
    assert [i.name for i in trained.graph.input][-len(running) :] == running
    assert [o.name for o in trained.graph.output][-len(running) :] == [r + "/new" for r in running]
    assert not {t.name for t in trained.graph.initializer} & set(running)
    assert "BatchNormalization" not in {n.op_type for n in trained.graph.node}
    assert trained.opset_import == model.opset_import and trained.ir_version == model.ir_version
    feeds = batches_for(model, 3, 4, seed=2) + batches_for(model, 1, 1, seed=3)
    expected = training_steps(model, feeds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = runtimes.carry_state(runtime, trained, feeds)
    for step, ((outputs, state), (want_outputs, want_state)) in enumerate(zip(got, expected)):
        for a, b in zip(outputs, want_outputs):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"step {step}")
        assert set(state) == set(want_state)
        for name, value in want_state.items():
            np.testing.assert_allclose(state[name], value, rtol=RTOL, atol=ATOL,
                                       err_msg=f"step {step}: {name}")  # fmt: skip


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_momentum_from_each_node_or_given(momentum):
    model = conv_bn_relu_conv_bn(18)  # bn1 momentum 0.8, bn2 no attribute: 0.9 (ONNX)
    trained = to_training(model, momentum=momentum)
    feeds = batches_for(model, 2, 3)
    expected = training_steps(model, feeds, momentum=momentum)
    session = onnxbn.reference.Session(trained)
    for f, (_, want) in zip(feeds, expected):
        session.run(f)
        for name, value in want.items():
            np.testing.assert_allclose(session.state[name], value, rtol=RTOL, atol=ATOL)


def test_both_sessions_carry_the_state():
    model = torch_fixture("cnn_torchscript_opset18")
    trained = to_training(model)
    feeds = batches_for(model, 2, 3)
    expected = training_steps(model, feeds)
    for session in (onnxbn.runtime.Session(trained), onnxbn.reference.Session(trained)):
        for f, (outputs, want) in zip(feeds, expected):
            (y,) = session.run(f)
            np.testing.assert_allclose(y, outputs[0], rtol=RTOL, atol=ATOL)
            for name, value in want.items():
                np.testing.assert_allclose(session.state[name], value, rtol=RTOL, atol=ATOL)


def test_an_onnxbn_inference_export_gets_the_training_exports_state_names():
    from onnxbn import layers

    onnxbn.reset_names()
    x = onnxbn.Input((4, 3), name="x")
    bn = layers.BatchNormalization(momentum=0.7, name="bn")
    model = onnxbn.Model(x, bn(x))
    trained = to_training(onnxbn.export_onnx(model, training=False, fold_batchnorm=False))
    assert list(onnxbn.initial_state(trained)) == ["bn/moving_mean", "bn/moving_variance"]


def test_errors():
    with pytest.raises(TypeError, match="momentum must be a number"):
        to_training(conv_bn_relu_conv_bn(18), momentum="0.9")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        to_training(conv_bn_relu_conv_bn(18), momentum=1.5)
    model = conv_bn_relu_conv_bn(18)
    model.graph.node[1].input[3] = "v2"
    with pytest.raises(ValueError, match="'bn\\d'.*shared"):
        to_training(model)
    with pytest.raises(ValueError, match="already holds training state"):
        to_training(to_training(conv_bn_relu_conv_bn(18)))
    no_bn = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", 18)],
    )  # fmt: skip
    with pytest.raises(ValueError, match="no BatchNormalization node"):
        to_training(no_bn)
    unknown_rank = conv_bn_relu_conv_bn(18)
    unknown_rank.graph.node[0].op_type = "Identity"  # x of unknown... keep rank: use a custom op
    unknown_rank.graph.node[0].domain = "custom"
    del unknown_rank.graph.node[0].attribute[:]
    unknown_rank.opset_import.append(helper.make_opsetid("custom", 1))
    with pytest.raises(ValueError, match="'bn1'.*rank of its input 'c1' is unknown"):
        to_training(unknown_rank)


def test_initial_state_holds_the_running_statistics():
    model = torch_fixture("mlp_torchscript_opset18")
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, value in onnxbn.initial_state(to_training(model)).items():
        np.testing.assert_array_equal(value, arrays[name])
