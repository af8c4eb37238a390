"""Layer machinery: dtype policies, Variables, trainable, weights, losses, input specs."""

from __future__ import annotations

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from onnxbn.dtypes import DTypePolicy


@pytest.mark.parametrize(
    "name,compute,variable",
    [
        ("float32", "float32", "float32"),
        ("float64", "float64", "float64"),
        ("float16", "float16", "float16"),
        ("bfloat16", "bfloat16", "bfloat16"),
        ("mixed_float16", "float16", "float32"),
        ("mixed_bfloat16", "bfloat16", "float32"),
    ],
)
def test_dtype_policies(name, compute, variable):
    for spec in (name, DTypePolicy(name), DTypePolicy(name).serialize()):
        layer = layers.BatchNormalization(dtype=spec)
        assert layer.compute_dtype == compute and layer.variable_dtype == variable
        assert layer.dtype == variable
        assert layer.get_config()["dtype"] == {
            "module": "keras",
            "class_name": "DTypePolicy",
            "config": {"name": name},
            "registered_name": None,
        }


def test_unknown_policy():
    with pytest.raises(ValueError, match="Unknown dtype policy 'int3'"):
        layers.BatchNormalization(dtype="int3")
    with pytest.raises(ValueError, match="class 'Bogus'"):
        layers.BatchNormalization(dtype={"class_name": "Bogus", "config": {"name": "float32"}})


def test_variables():
    layer = layers.BatchNormalization(name="bn", gamma_regularizer="l2", beta_constraint="non_neg")
    layer.build((None, 3))
    gamma, beta, mean, var = layer.weights
    assert [w.path for w in layer.weights] == [
        "bn/gamma",
        "bn/beta",
        "bn/moving_mean",
        "bn/moving_variance",
    ]
    assert [w.trainable for w in layer.weights] == [True, True, False, False]
    assert gamma.regularizer is not None and beta.constraint is not None
    assert gamma.dtype == "float32" and gamma.shape == (3,)
    value = gamma.numpy()
    value[0] = 99  # numpy() is a copy
    assert gamma.numpy()[0] == 1
    gamma.assign(np.array([1, 2, 3], np.float64))
    assert gamma.numpy().dtype == np.float32
    np.testing.assert_array_equal(gamma.numpy(), [1, 2, 3])
    with pytest.raises(ValueError, match=r"shape \(2,\).*shape \(3,\)"):
        gamma.assign(np.zeros(2))
    with pytest.raises(TypeError, match="dtype <U1"):
        gamma.assign(np.array(["a", "b", "c"]))


def test_trainable_setter_and_weight_lists():
    layer = layers.BatchNormalization()
    layer.build((None, 2))
    assert [w.name for w in layer.trainable_weights] == ["gamma", "beta"]
    assert [w.name for w in layer.non_trainable_weights] == ["moving_mean", "moving_variance"]
    layer.trainable = False
    assert layer.trainable_weights == []
    assert len(layer.non_trainable_weights) == 4
    assert not layer.gamma.trainable
    layer.trainable = True
    assert layer.gamma.trainable


def test_get_set_weights_checked():
    layer = layers.BatchNormalization(center=False)
    layer.build((None, 2))
    assert len(layer.get_weights()) == 3
    layer.set_weights([np.ones(2) * 2, np.ones(2) * 3, np.ones(2) * 4])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), [4, 4])
    with pytest.raises(ValueError, match="length 2, but the layer was expecting 3"):
        layer.set_weights([np.ones(2)] * 2)
    with pytest.raises(ValueError, match=r"weight shape \(2,\) is not compatible.*\(3,\)"):
        layer.set_weights([np.ones(2), np.ones(2), np.ones(3)])
    with pytest.raises(TypeError, match="list of arrays"):
        layer.set_weights(np.ones(2))


def test_losses_from_regularizers():
    layer = layers.BatchNormalization(
        gamma_regularizer={"class_name": "L1L2", "config": {"l1": 0.1, "l2": 0.2}},
        beta_regularizer="l2",
    )
    layer.build((None, 3))
    layer.gamma.assign([1.0, -2.0, 3.0])
    layer.beta.assign([0.5, 0.5, -1.0])
    expected = [0.1 * 6 + 0.2 * 14, 0.01 * 1.5]
    np.testing.assert_allclose(sorted(layer.losses), sorted(expected), rtol=1e-6)
    layer.trainable = False  # frozen: no trainable weights, no regularization loss
    assert layer.losses == []


def test_input_spec_checked_from_the_second_call():
    layer = layers.BatchNormalization(name="bn")
    layer(np.zeros((2, 3), np.float32))
    with pytest.raises(
        ValueError,
        match='Input 0 of layer "bn" is incompatible with the layer: expected ndim=2, found ndim=3',
    ):
        layer(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        layer(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        layer(onnxbn.Input(shape=(5,)))


def test_unrecognized_kwargs():
    with pytest.raises(
        ValueError, match="Unrecognized keyword arguments passed to BatchNormalization"
    ):
        layers.BatchNormalization(foo=1)
