"""`onnxbn.recalibrate` against float64 statistics computed by `onnx.reference` (tests/adapt/models.py).

Tolerance: the engines compute activations in float32 and the oracle in
float64, and each recalibrated node feeds the next its float32-rounded
statistics, so the statistics agree to a few float32 ulps of the activations'
scale per layer: rtol 1e-4, atol 1e-5 (measured worst: see the closing test).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxbn
from onnxbn.adapt import recalibrate
from onnxbn.adapt.nodes import batch_norm_nodes
from onnxbn.adapt.recalibrate import RunningMoments, depths
from tests.adapt.models import (
    FIXTURES,
    batches_for,
    bn_nodes,
    conv_bn_relu_conv_bn,
    expected_statistics,
    rank3_bn,
    torch_fixture,
)

RTOL, ATOL = 1e-4, 1e-5
ENGINES = ["onnxruntime", "reference"]


def statistics(model):
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: (arrays[n.input[3]], arrays[n.input[4]]) for n in bn_nodes(model)}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("make", FIXTURES)
def test_statistics_match_the_float64_oracle(make, engine):
    model = make()
    batches = batches_for(model, 4, 3)
    result = recalibrate(model, batches, engine=engine)
    expected = expected_statistics(model, batches)
    got = statistics(result)
    assert set(got) == set(expected)
    for name, (mean, var) in expected.items():
        np.testing.assert_allclose(got[name][0], mean, rtol=RTOL, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(got[name][1], var, rtol=RTOL, atol=ATOL, err_msg=name)
        assert not np.allclose(got[name][1], statistics(model)[name][1])  # really changed


@pytest.mark.parametrize("make", FIXTURES)
def test_everything_else_is_unchanged(make):
    model = make()
    result = recalibrate(model, batches_for(model, 2, 2))
    running = {n.input[i] for n in bn_nodes(model) for i in (3, 4)}
    before, after = copy.deepcopy(model), copy.deepcopy(result)
    for m in (before, after):
        kept = [t for t in m.graph.initializer if t.name not in running]
        names = [t.name for t in m.graph.initializer]
        del m.graph.initializer[:]
        m.graph.initializer.extend(kept)
        m.doc_string += ",".join(names)  # initializer order is part of the comparison
    assert before.SerializeToString() == after.SerializeToString()
    for t_before, t_after in zip(model.graph.initializer, result.graph.initializer):
        assert (t_before.name, t_before.data_type, list(t_before.dims)) == (
            t_after.name, t_after.data_type, list(t_after.dims))  # fmt: skip


def test_recalibrating_an_onnxbn_export_is_recalibrating_the_keras_layer():
    """An unfolded onnxbn inference export holds the layer itself in its BN node."""
    from onnxbn import layers

    onnxbn.reset_names()
    rng = np.random.default_rng(4)
    x = onnxbn.Input((5,), name="x")
    dense = layers.Dense(6, name="dense")
    bn = layers.BatchNormalization(epsilon=1e-2, name="bn")
    model = onnxbn.Model(x, bn(dense(x)))
    bn.set_weights([rng.uniform(0.5, 1.5, 6), rng.normal(size=6), rng.normal(size=6),
                    rng.uniform(0.5, 2, 6)])  # fmt: skip
    proto = onnxbn.export_onnx(model, training=False, fold_batchnorm=False)
    (node,) = bn_nodes(proto)
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(arrays[node.input[1]], bn.gamma.numpy())
    np.testing.assert_array_equal(arrays[node.input[3]], bn.moving_mean.numpy())
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["epsilon"] == pytest.approx(1e-2)
    batches = [{"x": rng.normal(2.0, 3.0, (n, 5)).astype(np.float32)} for n in (7, 4, 9)]
    result = recalibrate(proto, batches)
    # The eager layer's input over every batch, in float64: the Keras layer's own statistics.
    hidden = np.concatenate([
        b["x"].astype(np.float64) @ dense.kernel.numpy().astype(np.float64) + dense.bias.numpy()
        for b in batches
    ])  # fmt: skip
    got = statistics(result)[node.name]
    np.testing.assert_allclose(got[0], hidden.mean(axis=0), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got[1], hidden.var(axis=0), rtol=RTOL, atol=ATOL)


def test_passes_by_depth():
    assert depths(conv_bn_relu_conv_bn(18), batch_norm_nodes(conv_bn_relu_conv_bn(18))) == {
        "bn1": 0, "bn2": 1}  # fmt: skip
    cnn = torch_fixture("cnn_torchscript_opset18")
    assert sorted(depths(cnn, batch_norm_nodes(cnn)).values()) == [0, 1]


def test_parallel_branches_share_a_pass():
    model = rank3_bn()
    # bn_b reads Add(bn_a, x): depth 1; put a second branch BN on x beside bn_a.
    graph = model.graph
    graph.node.insert(1, helper.make_node("BatchNormalization", ["x", "g3", "b3", "m3", "v3"],
                                          ["n3"], name="bn_c"))  # fmt: skip
    for name, value in (("g3", 1.0), ("b3", 0.0), ("m3", 0.0), ("v3", 1.0)):
        graph.initializer.append(numpy_helper.from_array(np.full(5, value, np.float32), name))
    graph.output.append(helper.make_tensor_value_info("n3", onnx.TensorProto.FLOAT, None))
    assert depths(model, batch_norm_nodes(model)) == {"bn_a": 0, "bn_c": 0, "bn_b": 1}


def test_running_moments_chan_merge_is_exact_and_stable():
    rng = np.random.default_rng(0)
    parts = [1e4 + rng.normal(size=(n, 3, 4)) for n in (5, 1, 0, 17)]
    moments = RunningMoments(3)
    for part in parts:
        moments.update(part)
    x = np.concatenate(parts)
    np.testing.assert_allclose(moments.mean, x.mean(axis=(0, 2)), rtol=1e-14)
    np.testing.assert_allclose(moments.variance, x.var(axis=(0, 2)), rtol=1e-10)


def test_a_one_shot_iterator_serves_every_pass():
    model = conv_bn_relu_conv_bn(18)
    batches = batches_for(model, 3, 2)
    from_list = statistics(recalibrate(model, batches))
    from_iterator = statistics(recalibrate(model, iter(batches)))
    for name in from_list:
        np.testing.assert_array_equal(from_list[name][1], from_iterator[name][1])


def test_written_atomically(tmp_path):
    model = conv_bn_relu_conv_bn(18)
    path = tmp_path / "recalibrated.onnx"
    result = recalibrate(model, batches_for(model, 2, 2), path=path)
    assert onnx.load(str(path)).SerializeToString() == result.SerializeToString()
    assert os.listdir(tmp_path) == ["recalibrated.onnx"]
    source = tmp_path / "source.onnx"
    onnx.save(model, str(source))
    assert statistics(recalibrate(source, batches_for(model, 2, 2)))  # a path as input


def _with_computed_mean(model):
    model.graph.node.insert(0, helper.make_node("Identity", ["m1"], ["m1_copy"]))
    model.graph.node[2].input[3] = "m1_copy"
    return model


def _with_shared_variance(model):
    model.graph.node[4].input[4] = "v1"
    return model


def _in_training_form(model):
    node = model.graph.node[1]
    node.output.extend(["running_mean", "running_var"])
    node.attribute.append(helper.make_attribute("training_mode", 1))
    return model


@pytest.mark.parametrize("mutate,pattern", [
    (_with_computed_mean, "'bn1'.*mean 'm1_copy' is not an initializer"),
    (_with_shared_variance, "'bn\\d'.*variance initializer 'v1' is shared"),
    (_in_training_form, "'bn1' is in training form"),
])  # fmt: skip
def test_nodes_that_cannot_be_recalibrated_are_named(mutate, pattern):
    model = mutate(conv_bn_relu_conv_bn(18))
    with pytest.raises(ValueError, match=pattern):
        recalibrate(model, batches_for(conv_bn_relu_conv_bn(18), 1, 2))


def test_bad_batches_and_engine():
    model = conv_bn_relu_conv_bn(18)
    with pytest.raises(ValueError, match="batches is empty"):
        recalibrate(model, [])
    with pytest.raises(ValueError, match=r"missing \['x'\], unknown \['image'\]"):
        recalibrate(model, [{"image": np.zeros((1, 3, 6, 6), np.float32)}])
    with pytest.raises(ValueError, match="expected a dict"):
        recalibrate(model, [np.zeros((1, 3, 6, 6), np.float32)])
    with pytest.raises(ValueError, match="Unknown engine 'cuda'"):
        recalibrate(model, batches_for(model, 1, 1), engine="cuda")
    with pytest.raises(TypeError, match="received int"):
        recalibrate(3, batches_for(model, 1, 1))
