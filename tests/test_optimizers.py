"""Keras 3 optimizers: several steps against float64 formulas written from Keras's source.

Keras 3.15.1 (`keras/src/optimizers/sgd.py`, `adam.py`, `base_optimizer.py`):
the learning rate lives in a float32 variable; `update_step` casts the
learning rate, the gradient, `momentum`, the betas and `iterations + 1` to the
variable's dtype; float literals (`1 - beta_1`, `epsilon`) take the tensor's
dtype; slots are assigned (rounded) before the weight update reads them;
`apply` projects with the constraints after the updates, then increments
`iterations`.
"""

from __future__ import annotations

import re
import warnings

import ml_dtypes
import numpy as np
import pytest

from onnxbn import optimizers
from onnxbn.constraints import MaxNorm, NonNeg
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.optimizers import SGD, Adam
from onnxbn.variable import Variable

RTOL = {"float16": 1e-3, "bfloat16": 1e-2, "float32": 3e-7, "float64": 1e-13}


def _caster(dtype):
    np_dtype = to_numpy_dtype(dtype)
    return lambda x: np.asarray(x, np.float64).astype(np_dtype).astype(np.float64)


def keras_sgd(
    w, grads, dtype, learning_rate=0.01, momentum=0.0, nesterov=False, project=lambda w: w
):
    """`SGD.update_step` over `grads`, then `project` (the constraint) after each step;
    returns the weights after each step and the momentum."""
    cast = _caster(dtype)
    lr = cast(np.float32(learning_rate))
    w, m, history = cast(w), np.zeros(np.shape(w)), []
    for g in grads:
        g = cast(g)
        if momentum != 0:
            mom = cast(momentum)
            m = cast(m * mom - g * lr)
            w = cast(w + (m * mom - g * lr)) if nesterov else cast(w + m)
        else:
            w = cast(w - g * lr)
        w = cast(project(w))
        history.append(w)
    return history, m


def keras_adam(
    w,
    grads,
    dtype,
    learning_rate=0.001,
    beta_1=0.9,
    beta_2=0.999,
    epsilon=1e-7,
    project=lambda w: w,
):
    """`Adam.update_step` over `grads`, then `project` (the constraint) after each step;
    returns the weights after each step, m and v."""
    cast = _caster(dtype)
    lr = cast(np.float32(learning_rate))
    w, m, v, history = cast(w), np.zeros(np.shape(w)), np.zeros(np.shape(w)), []
    for iterations, g in enumerate(grads):
        g = cast(g)
        local_step = cast(iterations + 1)
        beta_1_power = cast(beta_1) ** local_step
        beta_2_power = cast(beta_2) ** local_step
        alpha = lr * np.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        m = cast(m + (g - m) * cast(1 - beta_1))
        v = cast(v + (np.square(g) - v) * cast(1 - beta_2))
        w = cast(w - (m * alpha) / (np.sqrt(v) + cast(epsilon)))
        w = cast(project(w))
        history.append(w)
    return history, m, v


def _variables(dtype, constraint=None):
    rng = np.random.default_rng(0)
    return [
        Variable(
            rng.standard_normal((3, 4)),
            name="kernel",
            path="dense/kernel",
            dtype=dtype,
            constraint=constraint,
        ),
        Variable(rng.standard_normal(4), name="bias", path="dense/bias", dtype=dtype),
    ]


def _grads(variables, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(v.shape) * 0.5 for v in variables] for _ in range(steps)]


DTYPES = ["float16", "bfloat16", "float32", "float64"]
SGD_CASES = [
    {"learning_rate": 0.1},
    {"learning_rate": 0.05, "momentum": 0.9},
    {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
    {"learning_rate": 0.3, "momentum": 1.0},
]
ADAM_CASES = [
    {},
    {"learning_rate": 0.1, "beta_1": 0.5, "beta_2": 0.75, "epsilon": 1e-3},
    {"learning_rate": 0.01, "beta_1": 0.0, "beta_2": 0.0, "epsilon": 0.0},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", SGD_CASES, ids=repr)
def test_sgd_steps_match_keras(kwargs, dtype):
    variables = _variables(dtype)
    initial = [v.numpy() for v in variables]
    steps = _grads(variables, 4)
    opt = SGD(**kwargs)
    for k, grads in enumerate(steps):
        opt.apply(grads, variables)
        assert opt.iterations == k + 1
    for i, v in enumerate(variables):
        history, m = keras_sgd(initial[i], [s[i] for s in steps], dtype, **kwargs)
        assert v.value.dtype == to_numpy_dtype(dtype)
        np.testing.assert_allclose(v.value.astype(np.float64), history[-1], rtol=RTOL[dtype])
        if kwargs.get("momentum"):
            slot = opt.slots(v)["momentum"]
            assert slot.dtype == to_numpy_dtype(dtype)
            np.testing.assert_allclose(slot.astype(np.float64), m, rtol=RTOL[dtype], atol=1e-12)
        else:
            assert opt.slots(v) == {}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", ADAM_CASES, ids=repr)
def test_adam_steps_match_keras(kwargs, dtype):
    variables = _variables(dtype)
    initial = [v.numpy() for v in variables]
    steps = _grads(variables, 5)
    opt = Adam(**kwargs)
    for grads in steps:
        opt.apply(grads, variables)
    for i, v in enumerate(variables):
        history, m, v_slot = keras_adam(initial[i], [s[i] for s in steps], dtype, **kwargs)
        np.testing.assert_allclose(v.value.astype(np.float64), history[-1], rtol=RTOL[dtype])
        slots = opt.slots(v)
        np.testing.assert_allclose(slots["momentum"].astype(np.float64), m, rtol=RTOL[dtype])
        np.testing.assert_allclose(slots["velocity"].astype(np.float64), v_slot, rtol=RTOL[dtype])


def test_adam_float64_is_the_textbook_rule():
    # Kingma and Ba with "epsilon hat": an independent check of the bias correction
    # (the counter is read before it is incremented: t = 1 on the first step).
    w0 = np.array([0.5, -1.0, 2.0])
    v = Variable(w0, name="w", path="l/w", dtype="float64")
    opt = Adam(learning_rate=0.125, beta_1=0.5, beta_2=0.75, epsilon=1e-3)
    m = s = np.zeros(3)
    w = w0
    for t, g in enumerate([np.array([1.0, -2.0, 0.5]), np.array([0.25, 1.0, -3.0])], start=1):
        opt.apply([g], [v])
        m = 0.5 * m + 0.5 * g
        s = 0.75 * s + 0.25 * g**2
        step = 0.125 * np.sqrt(1 - 0.75**t) / (1 - 0.5**t)
        w = w - step * m / (np.sqrt(s) + 1e-3)
        np.testing.assert_allclose(v.value, w, rtol=1e-14)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_hyperparameters_take_the_variable_dtype(dtype):
    # From w = 0 the step is the result itself: Keras's float32 `1 - beta_2**t`
    # (beta_2 cast first) is 1.3e-5 off the exact 0.001, visible at any dtype.
    v = Variable(np.zeros(2), name="w", path="l/w", dtype=dtype)
    g = np.array([1.0, -0.5])
    Adam(learning_rate=1.0).apply([g], [v])
    (expected,), *_ = keras_adam(np.zeros(2), [g], dtype, learning_rate=1.0)
    np.testing.assert_allclose(v.value.astype(np.float64), expected, rtol=RTOL[dtype])
    exact = -np.sqrt(1 - 0.999) / (1 - 0.9) * (0.1 * g) / (np.sqrt(0.001 * g**2) + 1e-7)
    assert not np.allclose(expected, exact, rtol=3 * RTOL[dtype], atol=0)


def test_first_sgd_step_numbers():
    v = Variable([1.0, -2.0], name="w", path="l/w", dtype="float64")
    opt = SGD(learning_rate=0.5, momentum=0.5)
    opt.apply([np.array([1.0, 1.0])], [v])
    np.testing.assert_array_equal(opt.slots(v)["momentum"], [-0.5, -0.5])
    np.testing.assert_array_equal(v.value, [0.5, -2.5])
    opt.apply([np.array([0.0, 2.0])], [v])
    np.testing.assert_array_equal(opt.slots(v)["momentum"], [-0.25, -1.25])
    np.testing.assert_array_equal(v.value, [0.25, -3.75])


def test_constraints_project_the_weight_after_the_update_not_the_slots():
    v = Variable([1.0, -1.0], name="w", path="l/w", dtype="float64", constraint=NonNeg())
    opt = SGD(learning_rate=1.0, momentum=0.5)
    opt.apply([np.array([2.0, -2.0])], [v])
    np.testing.assert_array_equal(v.value, [0.0, 1.0])  # [-1, 1] projected
    np.testing.assert_array_equal(opt.slots(v)["momentum"], [-2.0, 2.0])
    kernel = Variable(
        np.full((2, 2), 3.0), name="k", path="l/k", dtype="float32", constraint=MaxNorm(1.0)
    )
    Adam(learning_rate=0.5).apply([np.ones((2, 2))], [kernel])
    np.testing.assert_allclose(np.linalg.norm(kernel.value, axis=0), 1.0, rtol=1e-6)


def test_iterations_count_steps_and_state_is_named_in_keras_order():
    variables = _variables("float32")
    opt = Adam()
    assert opt.iterations == 0 and isinstance(opt.iterations, np.int64)
    assert [name for name, _ in opt.variables] == ["optimizer/iterations"]
    opt.build(variables)
    names = [name for name, _ in opt.variables]
    assert names == [
        "optimizer/iterations",
        "optimizer/momentum/dense/kernel",
        "optimizer/velocity/dense/kernel",
        "optimizer/momentum/dense/bias",
        "optimizer/velocity/dense/bias",
    ]
    for _, value in opt.variables[1:]:
        assert value.dtype == np.float32 and not value.any()
    opt.apply([], variables)  # no gradients: no step, as Keras
    assert opt.iterations == 0
    opt.apply(_grads(variables, 1)[0])  # the variables it was built with
    opt.apply(_grads(variables, 1)[0], variables)
    (name, count), *_ = opt.variables
    assert count.dtype == np.int64 and count.shape == () and count == 2
    sgd = SGD(momentum=0.0)
    sgd.build(variables)
    assert [name for name, _ in sgd.variables] == ["optimizer/iterations"]
    sgd = SGD(momentum=0.1)
    sgd.build(variables)
    assert [name for name, _ in sgd.variables][1:] == [
        "optimizer/momentum/dense/kernel",
        "optimizer/momentum/dense/bias",
    ]


def test_assign_variables_restores_state():
    variables = _variables("float32")
    opt = Adam()
    opt.apply(_grads(variables, 1)[0], variables)
    state = dict(opt.variables)
    fresh = Adam()
    fresh.build(variables)
    fresh.assign_variables(state)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(opt.variables, fresh.variables))
    with pytest.raises(ValueError, match="Unknown optimizer state 'optimizer/x'"):
        fresh.assign_variables({"optimizer/x": 1})
    with pytest.raises(ValueError, match="has shape"):
        fresh.assign_variables({"optimizer/momentum/dense/bias": np.zeros(3)})


def test_missing_gradients_are_skipped_with_a_warning():
    a, b = _variables("float64")
    before = b.numpy()
    opt = SGD(learning_rate=1.0)
    with pytest.warns(UserWarning, match=re.escape("['dense/bias']")):
        opt.apply([np.ones(a.shape), None], [a, b])
    np.testing.assert_array_equal(b.value, before)
    assert opt.iterations == 1
    with pytest.raises(ValueError, match="No gradients provided for any variable"):
        opt.apply([None, None], [a, b])


def test_apply_errors():
    a, b = _variables("float32")
    opt = SGD()
    with pytest.raises(ValueError, match="must already be built"):
        opt.apply([np.ones(a.shape)])
    opt.apply([np.ones(a.shape)], [a])
    with pytest.raises(ValueError, match="Unknown variable"):
        opt.apply([np.ones(b.shape)], [b])
    with pytest.raises(ValueError, match=r"Gradient of shape \(4,\) for variable 'dense/kernel'"):
        opt.apply([np.ones(4)], [a])
    with pytest.raises(ValueError, match="1 gradients for 2 variables"):
        SGD().apply([np.ones(a.shape)], [a, b])
    with pytest.raises(TypeError, match="expected a numeric array"):
        opt.apply([np.full(a.shape, "x")], [a])
    integer = Variable([1, 2], name="i", path="l/i", dtype="int32")
    with pytest.raises(TypeError, match="floating dtype"):
        SGD().build([integer])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.apply([np.ones(a.shape)], [a])


@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda: SGD(learning_rate=0), ValueError, "learning_rate` > 0"),
        (lambda: SGD(learning_rate=-0.1), ValueError, "learning_rate` > 0"),
        (lambda: Adam(learning_rate=float("nan")), ValueError, "finite"),
        (lambda: Adam(learning_rate=float("inf")), ValueError, "finite"),
        (lambda: Adam(learning_rate=1e-50), ValueError, "positive float32"),
        (lambda: SGD(learning_rate="0.1"), TypeError, "learning_rate"),
        (lambda: SGD(learning_rate=True), TypeError, "learning_rate"),
        (lambda: SGD(momentum=-0.1), ValueError, "momentum` >= 0"),
        (lambda: SGD(momentum=1.5), ValueError, r"momentum` in \[0, 1\]"),
        (lambda: SGD(momentum=float("nan")), ValueError, "momentum"),
        (lambda: SGD(nesterov="yes"), TypeError, "nesterov"),
        (lambda: Adam(beta_1=1.0), ValueError, r"beta_1` in \[0, 1\)"),
        (lambda: Adam(beta_2=-0.5), ValueError, "beta_2` >= 0"),
        (lambda: Adam(epsilon=-1e-7), ValueError, "epsilon` >= 0"),
        (lambda: Adam(epsilon=float("nan")), ValueError, "epsilon"),
        (lambda: Adam(amsgrad=True), ValueError, "amsgrad"),
        (lambda: Adam(weight_decay=0.004), ValueError, "weight_decay` is not supported"),
        (lambda: SGD(clipnorm=1.0), ValueError, "clipnorm` is not supported"),
        (lambda: SGD(use_ema=True), ValueError, "use_ema` is not supported"),
        (lambda: SGD(decay=0.1), ValueError, "not recognized"),
        (lambda: SGD(name=3), TypeError, "name"),
    ],
)
def test_bad_arguments(make, error, fragment):
    with pytest.raises(error, match=fragment):
        make()


def test_learning_rate_is_a_float32_variable_as_in_keras():
    opt = Adam(learning_rate=0.001)
    assert opt.learning_rate == float(np.float32(0.001)) != 0.001
    opt.learning_rate = 0.5
    assert opt.get_config()["learning_rate"] == 0.5
    with pytest.raises(ValueError):
        opt.learning_rate = -1.0


KERAS_BASE_KEYS = [
    "name", "learning_rate", "weight_decay", "clipnorm", "global_clipnorm", "clipvalue",
    "use_ema", "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
    "gradient_accumulation_steps",
]  # fmt: skip


def test_configs_have_keras_keys_and_round_trip():
    sgd = SGD(learning_rate=0.25, momentum=0.5, nesterov=True, name="opt")
    assert list(sgd.get_config()) == KERAS_BASE_KEYS + ["momentum", "nesterov"]
    assert sgd.get_config()["name"] == "opt"
    adam = Adam(learning_rate=0.125, beta_1=0.5, beta_2=0.75, epsilon=1e-3)
    config = adam.get_config()
    assert list(config) == KERAS_BASE_KEYS + ["beta_1", "beta_2", "epsilon", "amsgrad"]
    assert config["name"] == "adam" and config["weight_decay"] is None
    for opt in (sgd, adam):
        clone = type(opt).from_config(opt.get_config())
        assert clone.get_config() == opt.get_config()
        envelope = optimizers.serialize(opt)
        assert envelope["module"] == "keras.optimizers"
        assert envelope["class_name"] == type(opt).__name__
        assert optimizers.deserialize(envelope).get_config() == opt.get_config()


def test_a_keras_written_config_loads():
    # As Keras 3.15.1 writes `keras.optimizers.Adam(learning_rate=3e-4)`.
    envelope = {
        "module": "keras.optimizers",
        "class_name": "Adam",
        "config": {
            "name": "adam", "learning_rate": 0.0003000000142492354, "weight_decay": None,
            "clipnorm": None, "global_clipnorm": None, "clipvalue": None, "use_ema": False,
            "ema_momentum": 0.99, "ema_overwrite_frequency": None, "loss_scale_factor": None,
            "gradient_accumulation_steps": None, "beta_1": 0.9, "beta_2": 0.999,
            "epsilon": 1e-07, "amsgrad": False,
        },
        "registered_name": None,
    }  # fmt: skip
    opt = optimizers.get(envelope)
    assert isinstance(opt, Adam) and opt.learning_rate == np.float32(3e-4)
    assert optimizers.serialize(opt) == envelope


@pytest.mark.parametrize(
    ("identifier", "cls"),
    [("sgd", SGD), ("SGD", SGD), ("adam", Adam), ("Adam", Adam), (Adam, Adam),
     ({"class_name": "SGD", "config": {"momentum": 0.5}}, SGD)],
)  # fmt: skip
def test_get(identifier, cls):
    opt = optimizers.get(identifier)
    assert type(opt) is cls
    defaults = cls().get_config()
    if isinstance(identifier, dict):
        defaults["momentum"] = 0.5
    assert opt.get_config() == defaults


def test_get_errors_and_instances():
    opt = SGD()
    assert optimizers.get(opt) is opt
    with pytest.raises(ValueError, match="Unknown optimizer 'rmsprop'"):
        optimizers.get("rmsprop")
    for bad in (None, 3, lambda: None):
        with pytest.raises(TypeError, match="Could not interpret optimizer"):
            optimizers.get(bad)
    with pytest.raises(ValueError, match="not recognized"):
        optimizers.get({"class_name": "Adam", "config": {"beta_3": 0.5}})
    with pytest.raises(ValueError, match="module"):
        optimizers.get({"module": "os", "class_name": "Adam", "config": {}})


def test_bfloat16_slots_keep_the_variable_dtype():
    v = Variable(np.ones(3), name="w", path="l/w", dtype="bfloat16")
    opt = Adam()
    opt.apply([np.ones(3)], [v])
    assert all(a.dtype == ml_dtypes.bfloat16 for _, a in opt.variables[1:])


def test_apply_gradients_takes_keras_pairs():
    variables = _variables("float32")
    initial = [v.numpy() for v in variables]
    steps = _grads(variables, 2)
    opt = SGD(learning_rate=0.1, momentum=0.9)
    for k, grads in enumerate(steps):
        assert opt.apply_gradients(list(zip(grads, variables))) == k + 1
    for i, v in enumerate(variables):
        history, _ = keras_sgd(initial[i], [s[i] for s in steps], "float32", 0.1, 0.9)
        np.testing.assert_allclose(v.value.astype(np.float64), history[-1], rtol=RTOL["float32"])
