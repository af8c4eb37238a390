"""The optimizer update of variables of several dtypes, ranks and constraints, updated together.

`lower_update` concatenates the variables stored in one dtype and runs the rule
once; each variable must still follow Keras's formulas of `tests/test_optimizers.py`.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxbn.constraints import MaxNorm
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.lowering.context import LoweringContext
from onnxbn.lowering.optimizers import lower_update
from onnxbn.optimizers import SGD, Adam
from onnxbn.variable import Variable
from tests.lowering.standalone_graph import model, run
from tests.runtimes import RUNTIMES, skip_reason
from tests.test_optimizers import keras_adam, keras_sgd


def _variables():
    """Two stored dtypes, several ranks (a scalar too) and a constraint."""
    rng = np.random.default_rng(0)
    specs = [("dense/kernel", (3, 2), "float32", MaxNorm(1.5)), ("dense/bias", (2,), "float32", None),
             ("conv/kernel", (2, 2, 1, 3), "float16", None), ("scale", (), "float32", None),
             ("conv/bias", (3,), "float16", None)]  # fmt: skip
    return [
        Variable(rng.standard_normal(shape), name=path.split("/")[-1], path=path, dtype=dtype,
                 constraint=constraint)
        for path, shape, dtype, constraint in specs
    ]  # fmt: skip


def _graph(lower, opt, variables):
    ctx = LoweringContext(18)
    weights = [ctx.read_state(v.path, v.value, v.dtype) for v in variables]
    grads = [ctx.add_input(f"grad/{v.path}", v.dtype, list(v.shape)) for v in variables]
    lower(ctx, opt, list(zip(variables, weights, grads)))
    return model(ctx), ctx.initial_state()


def _steps(runtime, proto, state, variables, steps):
    rng = np.random.default_rng(1)
    grads = [[np.asarray(rng.standard_normal(v.shape) * 0.5, to_numpy_dtype(v.dtype))
              for v in variables] for _ in range(steps)]  # fmt: skip
    for step in grads:
        feeds = dict(state)
        feeds.update({f"grad/{v.path}": g for v, g in zip(variables, step)})
        out = run(runtime, proto, feeds)
        state = {name: out[name + "/new"] for name in state}
    return state, grads


CASES = [
    (SGD, {"learning_rate": 0.1}),
    (SGD, {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
    (Adam, {"learning_rate": 0.1, "beta_1": 0.5, "beta_2": 0.75, "epsilon": 1e-3}),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=lambda c: getattr(c, "__name__", repr(c)))
def test_grouped_steps_follow_keras_formulas(cls, kwargs, runtime):
    reason = skip_reason(runtime, {"float16", "float32"})
    if reason:
        pytest.skip(reason)
    variables = _variables()
    proto, state = _graph(lower_update, cls(**kwargs), variables)
    got, grads = _steps(runtime, proto, state, variables, 3)
    for v in variables:
        assert got[v.path].dtype == to_numpy_dtype(v.dtype) and got[v.path].shape == v.shape
    # Keras's float64 formulas (float32 tolerances; float16 rounds each store).
    for i, v in enumerate(variables):
        project = (lambda w: _max_norm(w, 1.5)) if v.constraint is not None else (lambda w: w)
        history = (keras_sgd if cls is SGD else keras_adam)(
            v.numpy(), [s[i] for s in grads], v.dtype, project=project, **kwargs
        )[0]
        rtol, atol = (2e-6, 1e-7) if v.dtype == "float32" else (2e-3, 1e-4)
        np.testing.assert_allclose(got[v.path].astype(np.float64), history[-1], rtol=rtol,
                                   atol=atol, err_msg=v.path)  # fmt: skip
    assert got["optimizer/iterations"] == 3


def _max_norm(w, max_value):
    norms = np.sqrt(np.sum(np.square(w), axis=0, keepdims=True))
    return w * (np.clip(norms, 0, max_value) / (1e-7 + norms))


def test_one_update_per_stored_dtype():
    proto, _ = _graph(lower_update, Adam(), _variables())
    ops = [node.op_type for node in proto.graph.node]
    # Per group (float32, float16): the velocity's root and the bias correction's; MaxNorm's.
    assert ops.count("Sqrt") == 2 * 2 + 1
    assert ops.count("Split") == 2 * 3  # new weight, momentum, velocity per group


def test_a_variable_alone_in_its_dtype_is_not_concatenated_and_errors_name_it():
    variables = _variables()[:1]
    proto, _ = _graph(lower_update, Adam(), variables)
    assert not {"Concat", "Split"} & {n.op_type for n in proto.graph.node}
    ctx = LoweringContext(18)
    w = ctx.read_state("dense/kernel", variables[0].value, "float32")
    g = ctx.add_input("g", "float32", [2, 3])
    with pytest.raises(ValueError, match=r"gradient 'g' of variable 'dense/kernel' has shape"):
        lower_update(ctx, SGD(), [(variables[0], w, g), (variables[0], w, w)])
