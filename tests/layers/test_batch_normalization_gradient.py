"""BatchNormalization.vjp against central finite differences of the float64 eager forward.

Every gradient is checked against FD of `layer(x, ...)` of a float64 layer (the
loss is a random projection `Σ P·y`), except renorm's: Keras stops the gradient
at `r` and `d`, so its oracle is FD of a float64 formula with `r`, `d` frozen
at their values at the point (the formula is checked against the layer first).
"""

from __future__ import annotations

import threading
import warnings

import ml_dtypes
import numpy as np
import pytest

from onnxbn import distributed, layers
from tests.distributed.thread_comm import ThreadComm, shared_slots

STEP = 1e-6
RTOL, ATOL = 1e-6, 1e-7  # central FD in float64: error ~ STEP² and 1e-16 / STEP
MASK_EPSILON = 1e-7  # Keras's backend.epsilon() in masked moments


def make_layer(shape, *, axis, seed=0, dtype="float64", **kwargs):
    layer = layers.BatchNormalization(axis=axis, dtype=dtype, momentum=0.6, **kwargs)
    layer.build(tuple(shape))
    rng = np.random.default_rng(seed)
    positive = {"moving_variance", "moving_stddev", "renorm_stddev"}
    layer.set_weights(
        [
            rng.uniform(0.5, 2.0, w.shape) if w.name in positive else rng.normal(size=w.shape)
            for w in layer.weights
        ]
    )
    return layer


def data(shape, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) * 2.0 + 0.5


def central_differences(forward, arrays, projection):
    """FD of `Σ projection·forward(*arrays)` with respect to each array (None: skipped)."""
    grads = []
    for k, array in enumerate(arrays):
        if array is None:
            grads.append(None)
            continue
        grad = np.zeros(array.shape)
        for index in np.ndindex(array.shape):
            values = []
            for sign in (1.0, -1.0):
                moved = [a if a is None else a.copy() for a in arrays]
                moved[k][index] += sign * STEP
                values.append(np.sum(projection * forward(*moved)))
            grad[index] = (values[0] - values[1]) / (2 * STEP)
        grads.append(grad)
    return grads


def layer_forward(layer, **call_kwargs):
    """`(x, gamma, beta) -> y` of the layer, every weight reset to its current value first."""
    snapshot = {w.name: w.numpy().copy() for w in layer.weights}

    def forward(x, gamma, beta):
        values = dict(snapshot, **({} if gamma is None else {"gamma": gamma}))
        values.update({} if beta is None else {"beta": beta})
        layer.set_weights([values[w.name] for w in layer.weights])
        return np.asarray(layer(x, **call_kwargs), dtype=np.float64)

    return forward, snapshot


def check_layer_gradient(layer, x, **call_kwargs):
    """vjp's gradients equal FD of the layer's own eager forward; returns the Gradients."""
    projection = np.random.default_rng(7).normal(size=x.shape)
    forward, snapshot = layer_forward(layer, **call_kwargs)
    gamma, beta = snapshot.get("gamma"), snapshot.get("beta")
    expected = central_differences(forward, [x, gamma, beta], projection)
    layer.set_weights([snapshot[w.name] for w in layer.weights])
    _, pullback = layer.call_with_vjp(x, **call_kwargs)
    grads = pullback(projection)
    assert len(grads.inputs) == 1 and grads.inputs[0].dtype == np.float64
    np.testing.assert_allclose(grads.inputs[0], expected[0], rtol=RTOL, atol=ATOL)
    trainable = {w.path for w in layer.trainable_weights}
    assert set(grads.weights) == trainable
    for variable, fd in ((layer.gamma, expected[1]), (layer.beta, expected[2])):
        if variable is not None and variable.path in trainable:
            assert grads.weights[variable.path].shape == variable.shape
            np.testing.assert_allclose(grads.weights[variable.path], fd, rtol=RTOL, atol=ATOL)
    return grads


@pytest.mark.parametrize(
    "shape, axis",
    [((8, 3), -1), ((3, 4, 2, 2), 1), ((3, 2, 2, 4), -1), ((4, 3, 5), 1), ((4, 3, 5), -2)],
)
def test_training_gradient_flows_through_the_batch_statistics(shape, axis):
    check_layer_gradient(make_layer(shape, axis=axis), data(shape), training=True)


def test_synchronized_in_one_process_is_the_local_gradient():
    check_layer_gradient(
        make_layer((6, 3), axis=-1, synchronized=True), data((6, 3)), training=True
    )


def masks(shape=(4, 5)):
    rng = np.random.default_rng(3)
    random = rng.random(shape) > 0.4
    random[1] = False  # a fully masked row
    random[(0,) * len(shape)] = True
    return {"random": random, "all_false": np.zeros(shape, bool), "int": random.astype(np.int32)}


@pytest.mark.parametrize("name", ["random", "all_false", "int"])
@pytest.mark.parametrize(
    "shape, axis", [((4, 5, 3), -1), ((4, 5, 2), 2), ((4, 5, 2), 1), ((3, 4, 2, 2), 1)]
)
def test_masked_gradient_follows_keras_shrunken_statistics(name, shape, axis):
    # Axis 1: the mask varies along the channel axis (per-channel counts).
    mask = masks(shape[:-1])[name]
    x = data(shape)
    x[~np.broadcast_to((mask != 0)[..., None], shape)] += 3.0  # ignored by the statistics
    check_layer_gradient(make_layer(shape, axis=axis), x, training=True, mask=mask)


@pytest.mark.parametrize("center, scale", [(False, True), (True, False), (False, False)])
def test_center_and_scale_off(center, scale):
    layer = make_layer((6, 2, 3), axis=-1, center=center, scale=scale)
    grads = check_layer_gradient(layer, data((6, 2, 3)), training=True)
    assert len(grads.weights) == int(center) + int(scale)


@pytest.mark.parametrize("mask", [None, masks()["random"][:, :2]])
def test_inference_is_affine_with_the_moving_statistics(mask):
    layer = make_layer((4, 2, 3), axis=-1)
    check_layer_gradient(layer, data((4, 2, 3)), training=False, mask=mask)


def test_frozen_layer_has_inference_gradient_and_no_weight_gradient():
    layer = make_layer((5, 3), axis=-1)
    layer.trainable = False
    before = [w.numpy().copy() for w in layer.weights]
    grads = check_layer_gradient(layer, data((5, 3)), training=True)
    assert grads.weights == {}
    inv = 1.0 / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)  # the affine map
    np.testing.assert_allclose(
        layer.call_with_vjp(data((5, 3)), training=True)[1](np.ones((5, 3))).inputs[0],
        np.broadcast_to(layer.gamma.numpy() * inv, (5, 3)),
        rtol=1e-12,
    )
    for w, value in zip(layer.weights, before):
        np.testing.assert_array_equal(w.numpy(), value)


# -- renorm: r and d are constants of the gradient ----------------------------
def keras_moments(x, axis, mask):
    """Keras's `_moments` in float64: masked sums divided by `count + 1e-7`."""
    axes = tuple(a for a in range(x.ndim) if a != axis)
    if mask is None:
        return x.mean(axis=axes), x.var(axis=axes)
    valid = np.broadcast_to((np.asarray(mask) != 0)[..., None], x.shape)
    denominator = valid.sum(axis=axes, keepdims=True) + MASK_EPSILON
    mean = np.where(valid, x, 0.0).sum(axis=axes, keepdims=True) / denominator
    variance = np.where(valid, (x - mean) ** 2, 0.0).sum(axis=axes, keepdims=True) / denominator
    return mean.squeeze(axes), variance.squeeze(axes)


def renorm_formula(x, gamma, beta, *, axis, epsilon, mask, r, d):
    """`y = (x - mean) / sqrt(var + epsilon) · r·gamma + d·gamma + beta`, `r`, `d` given."""
    mean, variance = keras_moments(x, axis, mask)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    xhat = (x - mean.reshape(shape)) / np.sqrt(variance.reshape(shape) + epsilon)
    return xhat * (r * gamma).reshape(shape) + (d * gamma + beta).reshape(shape)


def renorm_corrections(layer, x, mask):
    """Keras's `r`, `d` at the point, clipped as `renorm_clipping` says (float64)."""
    mean, variance = keras_moments(x, layer.axis % x.ndim, mask)
    floor = np.maximum(layer.renorm_stddev.numpy(), np.sqrt(layer.epsilon))
    r_raw = np.sqrt(variance + layer.epsilon) / floor
    d_raw = (mean - layer.renorm_mean.numpy()) / floor
    clipping = layer.renorm_clipping
    r = np.clip(r_raw, clipping.get("rmin", -np.inf), clipping.get("rmax", np.inf))
    dmax = clipping.get("dmax", np.inf)
    return r, np.clip(d_raw, -dmax, dmax), (r_raw, d_raw)


def renorm_expected(layer, x, mask, projection):
    """FD of the frozen-(r, d) formula, after checking the formula against the layer."""
    r, d, raw = renorm_corrections(layer, x, mask)
    axis = layer.axis % x.ndim

    def forward(x_, gamma, beta):
        return renorm_formula(
            x_, gamma, beta, axis=axis, epsilon=layer.epsilon, mask=mask, r=r, d=d
        )

    gamma, beta = layer.gamma.numpy().copy(), layer.beta.numpy().copy()
    probe = make_layer(x.shape, axis=layer.axis, renorm=True, renorm_clipping=layer.renorm_clipping)
    probe.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        probe(x, training=True, mask=mask), forward(x, gamma, beta), rtol=1e-12, atol=1e-12
    )
    return central_differences(forward, [x, gamma, beta], projection), raw, (r, d)


@pytest.mark.parametrize("clipping", [None, {"rmax": 0.9, "dmax": 0.1}, {"rmin": 3.0}])
@pytest.mark.parametrize("masked", [False, True])
def test_renorm_gradient_holds_r_and_d_constant(clipping, masked):
    shape, mask = (4, 5, 3), (masks()["random"] if masked else None)
    layer = make_layer(shape, axis=-1, renorm=True, renorm_clipping=clipping)
    x = data(shape)
    projection = np.random.default_rng(7).normal(size=shape)
    expected, raw, clipped = renorm_expected(layer, x, mask, projection)
    if clipping:  # the clipping is really active at this point
        assert not all(np.allclose(a, b) for a, b in zip(raw, clipped))
    _, pullback = layer.call_with_vjp(x, training=True, mask=mask)
    grads = pullback(projection)
    np.testing.assert_allclose(grads.inputs[0], expected[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grads.weights[layer.gamma.path], expected[1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grads.weights[layer.beta.path], expected[2], rtol=RTOL, atol=ATOL)


def test_renorm_inference_gradient():
    layer = make_layer((5, 3), axis=-1, renorm=True, renorm_clipping={"rmax": 1.1})
    check_layer_gradient(layer, data((5, 3)), training=False)


# -- synchronized: the gradient of the global batch statistics ----------------
def run_replicas(replicas, batches, masks_, projections, training=True):
    shared = shared_slots(len(replicas))
    results, errors = [None] * len(replicas), []

    def run(rank):
        try:
            with distributed.communicator(ThreadComm(rank, shared)):
                y, pullback = replicas[rank].call_with_vjp(
                    batches[rank], training=training, mask=masks_[rank]
                )
                results[rank] = (y, pullback(projections[rank]))
        except Exception as error:  # re-raised in the main thread
            errors.append(error)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(replicas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize(
    "sizes, masked, renorm",
    [([3, 4], False, False), ([4, 3], True, False), ([5, 0], False, False), ([3, 4], True, True)],
)
def test_synchronized_replicas_get_the_gradient_of_the_concatenated_batch(sizes, masked, renorm):
    total, shape = sum(sizes), (sum(sizes), 2, 3)
    x = data(shape)
    mask = (np.random.default_rng(4).random(shape[:2]) > 0.3) if masked else None
    projection = np.random.default_rng(7).normal(size=shape)
    kwargs = dict(renorm=True, renorm_clipping={"rmax": 1.05}) if renorm else {}
    single = make_layer(shape, axis=-1, **kwargs)
    if renorm:
        expected = renorm_expected(single, x, mask, projection)[0]
    else:
        forward, snapshot = layer_forward(single, training=True, mask=mask)
        expected = central_differences(
            forward, [x, snapshot["gamma"], snapshot["beta"]], projection
        )
    starts = np.cumsum([0] + sizes)
    parts = [slice(starts[r], starts[r + 1]) for r in range(len(sizes))]
    replicas = [make_layer(shape, axis=-1, synchronized=True, **kwargs) for _ in sizes]
    results = run_replicas(
        replicas,
        [x[p] for p in parts],
        [None if mask is None else mask[p] for p in parts],
        [projection[p] for p in parts],
    )
    assert total == sum(r[0].shape[0] for r in results)
    dx = np.concatenate([grads.inputs[0] for _, grads in results])
    np.testing.assert_allclose(dx, expected[0], rtol=RTOL, atol=ATOL)
    # Weight gradients are each replica's share; their sum is the batch's gradient.
    for name, fd in (("gamma", expected[1]), ("beta", expected[2])):
        paths = [getattr(layer, name).path for layer in replicas]
        total_grad = sum(grads.weights[path] for (_, grads), path in zip(results, paths))
        np.testing.assert_allclose(total_grad, fd, rtol=RTOL, atol=ATOL)


def test_synchronized_bad_output_gradient_raises_on_every_replica():
    replicas = [make_layer((3, 2), axis=-1, synchronized=True) for _ in range(2)]
    projections = [np.ones((3, 2)), np.ones((3, 5))]
    with pytest.raises(ValueError, match="output gradient has shape|process 1 failed"):
        run_replicas(replicas, [data((3, 2)), data((3, 2), seed=2)], [None, None], projections)


# -- state, dtypes, edge cases ------------------------------------------------
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32", "mixed_float16"])
def test_vjp_updates_the_moving_statistics_exactly_like_call(renorm, dtype):
    shape, mask = (4, 5, 3), masks()["random"]
    x = data(shape)
    by_call, by_vjp = (make_layer(shape, axis=-1, dtype=dtype, renorm=renorm) for _ in range(2))
    for step in range(2):
        y = by_call(x + step, training=True, mask=mask)
        y_vjp, _ = by_vjp.call_with_vjp(x + step, training=True, mask=mask)
        assert y_vjp.dtype == y.dtype
        np.testing.assert_array_equal(y_vjp, y)
    for a, b in zip(by_call.weights, by_vjp.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(by_call.moving_mean.numpy(), make_layer(shape, axis=-1).moving_mean)


@pytest.mark.parametrize(
    "dtype, input_dtype",
    [
        ("float16", np.float16),
        ("bfloat16", ml_dtypes.bfloat16),
        ("mixed_float16", np.float16),
        ("mixed_bfloat16", ml_dtypes.bfloat16),
        ("float32", np.float32),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_gradient_is_that_of_the_float64_computation(dtype, input_dtype, training):
    # The oracle: FD of a float64 layer with the same (rounded) weights on the same (rounded) x.
    shape, mask = (4, 5, 3), masks()["random"]
    layer = make_layer(shape, axis=-1, dtype=dtype)
    x = data(shape).astype(input_dtype)
    reference = make_layer(shape, axis=-1)
    reference.set_weights([w.numpy().astype(np.float64) for w in layer.weights])
    projection = np.random.default_rng(7).normal(size=shape)
    forward, snapshot = layer_forward(reference, training=training, mask=mask)
    expected = central_differences(
        forward, [x.astype(np.float64), snapshot["gamma"], snapshot["beta"]], projection
    )
    _, pullback = layer.call_with_vjp(x, training=training, mask=mask)
    grads = pullback(projection)
    assert grads.inputs[0].dtype == np.float64 and grads.inputs[0].shape == shape
    np.testing.assert_allclose(grads.inputs[0], expected[0], rtol=RTOL, atol=ATOL)
    for variable, fd in ((layer.gamma, expected[1]), (layer.beta, expected[2])):
        assert grads.weights[variable.path].dtype == np.float64
        np.testing.assert_allclose(grads.weights[variable.path], fd, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mask", [None, np.zeros((0, 2), bool)])
@pytest.mark.parametrize("renorm", [False, True])
def test_empty_batch_gives_zero_gradients(mask, renorm):
    layer = make_layer((4, 2, 3), axis=-1, renorm=renorm)
    before = [w.numpy().copy() for w in layer.weights]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, pullback = layer.call_with_vjp(np.zeros((0, 2, 3)), training=True, mask=mask)
        grads = pullback(np.zeros((0, 2, 3)))
    assert y.shape == grads.inputs[0].shape == (0, 2, 3)
    for grad in grads.weights.values():
        np.testing.assert_array_equal(grad, np.zeros(3))
    if mask is None:  # an empty unmasked batch holds no statistics: no state update
        for w, value in zip(layer.weights, before):
            np.testing.assert_array_equal(w.numpy(), value)


def test_integer_inputs_get_no_input_gradient():
    layer = make_layer((4, 3), axis=-1, dtype="float32")
    _, pullback = layer.call_with_vjp(np.arange(12).reshape(4, 3), training=True)
    grads = pullback(np.ones((4, 3)))
    assert grads.inputs == (None,)
    assert set(grads.weights) == {layer.gamma.path, layer.beta.path}


def test_output_gradient_of_the_wrong_shape_is_refused():
    layer = make_layer((4, 3), axis=-1)
    _, pullback = layer.call_with_vjp(data((4, 3)), training=True)
    with pytest.raises(ValueError, match=r"output gradient has shape \(4, 2\)"):
        pullback(np.ones((4, 2)))
