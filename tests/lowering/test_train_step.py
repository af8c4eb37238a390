"""The exported train step: the state contract, and every example model on every runtime.

The oracle of a float32 train step is the float64 eager train step of the same
model (`Model.train_on_batch` on a float64 twin: the executable specification,
itself checked against an independent NumPy implementation in
`tests/test_trainer.py` and against finite differences layer by layer). The
gradient of the exported graph is also checked directly against central finite
differences of the eager float64 loss (SGD with learning rate 1 and no momentum
turns the weight update into the gradient).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest

import onnxbn
from models import real_models, zoo
from onnxbn import layers, optimizers
from onnxbn.contract import STATE_SUFFIX
from onnxbn.export import export_onnx
from tests import runtimes

STEPS = 3
# (model builder, loss, targets kind) for every example model.
EXAMPLES = {
    "mlp_bn": (real_models.mlp_bn, "categorical_crossentropy", "onehot"),
    "resnet_cnn": (real_models.resnet_cnn, "sparse_categorical_crossentropy", "sparse"),
    "sequence_classifier": (
        real_models.sequence_classifier, "sparse_categorical_crossentropy", "sparse"
    ),
    "image_features": (zoo.image_features, "mse", "dense"),
    "masked_sequence": (zoo.masked_sequence, "mse", "dense"),
    "tabular": (zoo.tabular, "mse", "dense"),
}  # fmt: skip
OPTIMIZERS = {
    "sgd": lambda: optimizers.SGD(learning_rate=0.01, momentum=0.9, nesterov=True),
    "adam": lambda: optimizers.Adam(learning_rate=0.01),
}
# float32 graph against the float64 oracle over STEPS steps: gradients of float32
# activations through several layers, then amplified by the optimizer (Adam divides by
# sqrt(v), so a tiny gradient's relative error reaches the update).
TOLERANCE = {"loss": (2e-4, 2e-5), "state": (1e-3, 2e-4)}


def float64_twin(model: onnxbn.Model) -> onnxbn.Model:
    """The same model with every layer in float64 and the same weights."""
    config = copy.deepcopy(model.get_config())
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer" and "dtype" in layer["config"]:
            layer["config"]["dtype"] = "float64"
    twin = onnxbn.Model.from_config(config)
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    return twin


def targets_for(model: onnxbn.Model, kind: str, batch: int, rng) -> np.ndarray:
    shape = (batch,) + tuple(model.outputs[0].shape[1:])
    if kind == "sparse":
        return rng.integers(0, shape[-1], shape[:-1]).astype(np.int64)
    if kind == "onehot":
        return np.eye(shape[-1], dtype=np.float32)[rng.integers(0, shape[-1], shape[:-1])]
    return rng.normal(0.0, 1.0, shape).astype(np.float32)


def batches_for(name: str, steps: int = STEPS):
    """`(model, [(inputs dict, target)] * steps)` for an example model."""
    builder, loss, kind = EXAMPLES[name]
    model, sample = builder()
    rng = np.random.default_rng(7)
    batches = []
    for step in range(steps):
        feeds = {}
        for key, value in sample.items():
            if value.dtype.kind == "f":
                feeds[key] = (value + rng.normal(0, 0.1 * (step + 1), value.shape)).astype(
                    value.dtype
                )
            else:
                feeds[key] = value
        batch = len(next(iter(sample.values())))
        batches.append((feeds, targets_for(model, kind, batch, rng)))
    return model, loss, batches


def eager_oracle(model, loss, optimizer_name, batches):
    """Loss and every state value after each float64 eager step, by state name."""
    twin = float64_twin(model)
    twin.compile(optimizer=OPTIMIZERS[optimizer_name](), loss=loss)
    steps = []
    for feeds, target in batches:
        value = twin.train_on_batch([feeds[t.name] for t in twin.inputs], target)
        state = {w.path: w.numpy() for w in twin.weights}
        for name, array in twin.optimizer.variables:
            state[name] = np.asarray(array)
        steps.append((value, state))
    return steps


def train_step_model(model, loss, optimizer_name) -> onnx.ModelProto:
    model.compile(optimizer=OPTIMIZERS[optimizer_name](), loss=loss)
    return export_onnx(model, train_step=True)


def assert_steps(results, oracle, what, initial=None, adam_rate=None):
    """Each step's loss and state against the oracle.

    With Adam, a weight whose float64 gradient is exactly 0 (a bias before
    BatchNormalization: the oracle leaves it where it started) moves in float32
    by up to the learning rate per step (m / sqrt(v) of rounding noise is ~±1):
    such a weight is held to that bound instead.
    """
    for step, ((outputs, state), (loss, expected)) in enumerate(zip(results, oracle)):
        rtol, atol = TOLERANCE["loss"]
        np.testing.assert_allclose(
            np.float64(outputs[0]), loss, rtol=rtol, atol=atol, err_msg=f"{what} step {step} loss"
        )
        rtol, atol = TOLERANCE["state"]
        for name, actual in state.items():
            assert name in expected, f"{what}: state {name!r} has no eager counterpart"
            actual = np.asarray(actual, np.float64)
            desired = np.asarray(expected[name], np.float64)
            message = f"{what} step {step} state {name}"
            if adam_rate is not None and initial is not None and name in initial:
                still = np.abs(desired - initial[name]) < 1e-9
                bound = 1.01 * adam_rate * (step + 1)
                assert np.all(np.abs(actual - desired)[still] <= bound), message
                actual, desired = actual[~still], desired[~still]
            np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=message)


# -- the contract -------------------------------------------------------------------
def test_inputs_outputs_and_initial_state_follow_the_contract():
    onnxbn.reset_names()
    x = onnxbn.Input((4,), name="x")
    h = layers.Dense(3, name="dense")(x)
    y = layers.BatchNormalization(name="bn")(h)
    model = onnxbn.Model(x, y)
    model.compile(optimizer=optimizers.Adam(), loss="mse")
    step = export_onnx(model, train_step=True)
    weights = ["dense/kernel", "dense/bias", "bn/gamma", "bn/beta"]
    slots = [f"optimizer/{slot}/{w}" for w in weights for slot in ("momentum", "velocity")]
    state = weights + ["bn/moving_mean", "bn/moving_variance", "optimizer/iterations"] + slots
    assert [i.name for i in step.graph.input] == ["x", "y_true"] + state
    assert [o.name for o in step.graph.output] == ["loss"] + [s + STATE_SUFFIX for s in state]
    assert not step.graph.initializer or not {t.name for t in step.graph.initializer} & set(state)
    initial = onnxbn.initial_state(step)
    assert list(initial) == state
    np.testing.assert_array_equal(initial["dense/kernel"], model.get_layer("dense").kernel.numpy())
    assert initial["optimizer/iterations"].dtype == np.int64
    assert initial["optimizer/iterations"].shape == ()
    assert {node.domain for node in step.graph.node} <= {""}


def test_sgd_without_momentum_has_no_slots_and_several_outputs_name_targets():
    onnxbn.reset_names()
    x = onnxbn.Input((4,), name="x")
    a = layers.Dense(2, name="a")(x)
    b = layers.Dense(3, name="b")(x)
    model = onnxbn.Model(x, [a, b])
    model.compile(optimizer="sgd", loss=["mse", "mean_absolute_error"])
    step = export_onnx(model, train_step=True)
    names = [i.name for i in step.graph.input]
    assert names == ["x", "y_true_0", "y_true_1", "a/kernel", "a/bias", "b/kernel", "b/bias",
                     "optimizer/iterations"]  # fmt: skip


def test_errors_name_what_is_wrong():
    onnxbn.reset_names()
    x = onnxbn.Input((4,), name="x")
    model = onnxbn.Model(x, layers.Dense(2, name="d")(x))
    with pytest.raises(ValueError, match="compile"):
        export_onnx(model, train_step=True)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(TypeError, match="train_step"):
        export_onnx(model, train_step="yes")
    with pytest.raises(TypeError, match="Model"):
        export_onnx(model.get_layer("d"), train_step=True)
    model.trainable = False
    with pytest.raises(ValueError, match="no trainable weight"):
        export_onnx(model, train_step=True)


def test_sessions_carry_weights_and_optimizer_state():
    model, loss, batches = batches_for("mlp_bn")
    oracle = eager_oracle(model, loss, "adam", batches)
    step = train_step_model(model, loss, "adam")
    for session in (onnxbn.runtime.Session(step), onnxbn.reference.Session(step)):
        for (feeds, target), (expected_loss, _) in zip(batches, oracle):
            (value,) = session.run({**feeds, "y_true": target})
            np.testing.assert_allclose(value, expected_loss, rtol=2e-4)
        expected = oracle[-1][1]
        np.testing.assert_allclose(session.state["head/kernel"], expected["head/kernel"],
                                   rtol=1e-3, atol=2e-4)  # fmt: skip
        assert int(session.state["optimizer/iterations"]) == STEPS


# -- every example model, every runtime ----------------------------------------------
@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_train_step_matches_the_float64_oracle(name, optimizer_name, runtime):
    model, loss, batches = batches_for(name)
    oracle = eager_oracle(model, loss, optimizer_name, batches)
    step = train_step_model(model, loss, optimizer_name)
    feeds = [{**f, "y_true": t} for f, t in batches]
    results = runtimes.carry_state(runtime, step, feeds)
    initial = {k: np.asarray(v, np.float64) for k, v in onnxbn.initial_state(step).items()}
    rate = OPTIMIZERS[optimizer_name]().learning_rate if optimizer_name == "adam" else None
    assert_steps(results, oracle, f"{name}/{optimizer_name} on {runtime}", initial, rate)


# -- the exported gradient against finite differences ---------------------------------
def eager_loss(twin, feeds, target, loss_name) -> float:
    from onnxbn import losses

    y = twin(dict(feeds), training=True)
    total = float(losses.get(loss_name)(target, y))
    return total + float(sum(twin.losses))


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxbn.reference"])
@pytest.mark.parametrize("name", ["mlp_bn", "sequence_classifier", "masked_sequence"])
def test_exported_gradient_matches_finite_differences(name, runtime):
    """SGD(learning_rate=1): `weight - weight/new` is the gradient; FD of the eager loss."""
    model, loss, batches = batches_for(name, steps=1)
    feeds, target = batches[0]
    model.compile(optimizer=optimizers.SGD(learning_rate=1.0), loss=loss)
    step = export_onnx(model, train_step=True)
    ((_, state),) = runtimes.carry_state(runtime, step, [{**feeds, "y_true": target}])
    twin = float64_twin(model)
    before = {w.path: w.numpy() for w in twin.trainable_weights}
    rng = np.random.default_rng(3)
    for variable in twin.trainable_weights:
        grad = before[variable.path] - state[variable.path]
        flat = variable.numpy().reshape(-1)
        for index in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            h = 1e-6
            values = []
            for sign in (1, -1):
                probe = flat.copy()
                probe[index] += sign * h
                variable.assign(probe.reshape(variable.shape))
                # BN moving statistics change in a training call: restore them after.
                saved = [w.numpy() for w in twin.non_trainable_weights]
                values.append(eager_loss(twin, feeds, target, loss))
                for w, s in zip(twin.non_trainable_weights, saved):
                    w.assign(s)
            variable.assign(before[variable.path])
            fd = (values[0] - values[1]) / (2 * h)
            np.testing.assert_allclose(
                grad.reshape(-1)[index], fd, rtol=2e-3, atol=2e-5,
                err_msg=f"{name} on {runtime}: d loss / d {variable.path}[{index}]",
            )  # fmt: skip


# -- every loss with every optimizer ---------------------------------------------------
LOSS_HEADS = {
    "mean_squared_error": ("linear", "dense"),
    "mean_absolute_error": ("linear", "dense"),
    "binary_crossentropy": ("sigmoid", "binary"),
    "categorical_crossentropy": ("softmax", "onehot"),
    "sparse_categorical_crossentropy": ("softmax", "sparse"),
}


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxbn.reference"])
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("loss", sorted(LOSS_HEADS))
def test_every_loss_and_optimizer_matches_the_float64_oracle(loss, optimizer_name, runtime):
    activation, kind = LOSS_HEADS[loss]
    onnxbn.reset_names()
    x = onnxbn.Input((6,), name="x")
    # No bias before BN: its true gradient is 0, and Adam turns float32 rounding noise on a
    # zero gradient into full-size steps (m / sqrt(v) ~ ±1), which no tolerance can hold.
    h = layers.Dense(8, name="dense", use_bias=False, kernel_regularizer="l2")(x)
    h = layers.BatchNormalization(name="bn")(h)
    y = layers.Dense(4, activation=activation, name="head")(h)
    model = onnxbn.Model(x, y)
    rng = np.random.default_rng(11)
    batches = []
    for _ in range(STEPS):
        target = (
            (rng.random((5, 4)) < 0.5).astype(np.float32)
            if kind == "binary"
            else targets_for(model, kind, 5, rng)
        )
        batches.append(({"x": rng.normal(size=(5, 6)).astype(np.float32)}, target))
    oracle = eager_oracle(model, loss, optimizer_name, batches)
    step = train_step_model(model, loss, optimizer_name)
    results = runtimes.carry_state(runtime, step, [{**f, "y_true": t} for f, t in batches])
    assert_steps(results, oracle, f"{loss}/{optimizer_name} on {runtime}")


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
def test_frozen_layers_regularizers_and_constraints(runtime):
    """A frozen BN runs in inference mode and changes nothing; penalties and constraints apply."""
    onnxbn.reset_names()
    x = onnxbn.Input((5,), name="x")
    h = layers.Dense(6, name="dense", kernel_regularizer="l2", kernel_constraint="max_norm")(x)
    frozen = layers.BatchNormalization(name="frozen_bn", gamma_regularizer="l1")
    h = frozen(h)
    h = layers.BatchNormalization(name="bn", beta_constraint="non_neg")(h)
    y = layers.Dense(2, name="head", bias_regularizer="l1_l2")(h)
    model = onnxbn.Model(x, y)
    rng = np.random.default_rng(5)
    model.set_weights([
        rng.uniform(0.5, 2, w.shape) if w.path.endswith("variance") else rng.normal(0, 1, w.shape)
        for w in model.weights
    ])  # fmt: skip
    frozen.trainable = False
    before = [w.numpy() for w in frozen.weights]
    batches = [
        ({"x": rng.normal(0, 2, (6, 5)).astype(np.float32)},
         rng.normal(0, 1, (6, 2)).astype(np.float32))
        for _ in range(STEPS)
    ]  # fmt: skip
    oracle = eager_oracle(model, "mse", "sgd", batches)
    step = train_step_model(model, "mse", "sgd")
    names = [i.name for i in step.graph.input]
    assert not [n for n in names if n.startswith("frozen_bn/")]
    results = runtimes.carry_state(runtime, step, [{**f, "y_true": t} for f, t in batches])
    assert_steps(results, oracle, f"frozen/regularized on {runtime}")
    for variable, value in zip(frozen.weights, before):  # the twin's copy is what trained
        np.testing.assert_array_equal(variable.numpy(), value)
    beta = results[-1][1]["bn/beta"]
    assert np.all(beta >= 0)


class _TwoProcesses:
    """A communicator that says two processes run (no exchange is reached)."""

    def Get_size(self):  # noqa: N802 (mpi4py's name)
        return 2

    def Get_rank(self):  # noqa: N802
        return 0


def test_synchronized_train_step_runs_in_one_process_and_refuses_several():
    model, loss, batches = batches_for("tabular", steps=1)
    for name in ("bn_input", "bn_output"):
        model.get_layer(name).synchronized = True
    oracle = eager_oracle(model, loss, "sgd", batches)
    step = train_step_model(model, loss, "sgd")
    (feeds, target), ((expected, _),) = batches[0], oracle
    session = onnxbn.reference.Session(step)
    (value,) = session.run({**feeds, "y_true": target})
    np.testing.assert_allclose(value, expected, rtol=2e-4)
    for session_class in (onnxbn.runtime.Session, onnxbn.reference.Session):
        session = session_class(step, comm=_TwoProcesses())
        with pytest.raises(NotImplementedError, match="one process"):
            session.run({**feeds, "y_true": target})
