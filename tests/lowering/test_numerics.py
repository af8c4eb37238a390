"""Hard input `x = 1e4 + N(0, 1)`: training output within 1e-4 of float64 on every layout."""

from __future__ import annotations

import numpy as np
import pytest

from onnxbn.export import export_onnx
from onnxbn.runtime import Session
from tests.lowering.test_batch_normalization import SEED, build, oracle

HARD_TOLERANCE = 1e-4

# (shape, axis): 2-D, sequences, channels first/last images, a 5-D middle axis, axis 0.
LAYOUTS = [
    ((4096, 8), -1),
    ((64, 50, 6), -1),
    ((16, 8, 24, 24), 1),
    ((16, 24, 24, 8), -1),
    ((4, 6, 5, 8, 16), 2),
    ((6, 32, 64), 0),
]


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("masked", [False, True])
def test_hard_input_training_error(shape, axis, masked):
    rng = np.random.default_rng(SEED)
    model, bn = build(shape, axis, mode="masked" if masked else "training", rng=rng)
    session = Session(export_onnx(model))
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    feeds = {"x": x}
    mask = None
    if masked:
        mask = rng.random(shape[:-1]) < 0.8
        feeds["mask"] = mask
    (y,) = session.run(feeds)
    expected, new_mean, new_var = oracle(
        x, axis=axis, gamma=bn.gamma.value, beta=bn.beta.value, mean=bn.moving_mean.value,
        var=bn.moving_variance.value, momentum=bn.momentum, epsilon=bn.epsilon,
        training=True, mask=mask,
    )  # fmt: skip
    error = np.abs(y.astype(np.float64) - expected).max()
    assert error <= HARD_TOLERANCE, f"max |error| {error:.2e} > {HARD_TOLERANCE}"
    state = session.state
    # The moving mean is ~1e3 after one step: a float32 ulp there is 6e-5.
    np.testing.assert_allclose(state["bn/moving_mean"], new_mean, rtol=2e-7, atol=0)
    np.testing.assert_allclose(state["bn/moving_variance"], new_var, rtol=1e-4, atol=1e-5)


def test_shift_matters():
    """Unshifted float32 sums on the same data would miss the tolerance by far."""
    rng = np.random.default_rng(SEED)
    x = (1e4 + rng.standard_normal((16384, 4))).astype(np.float32)
    naive_var = (x * x).mean(axis=0, dtype=np.float32) - x.mean(axis=0, dtype=np.float32) ** 2
    exact_var = x.astype(np.float64).var(axis=0)
    assert np.abs(naive_var - exact_var).max() > 1e-2
