"""The lowered optimizer update: several steps on runtimes against Keras's formulas.

A standalone graph holds the weights (state), their gradients (inputs) and
`lower_update`; each step feeds the previous step's `/new` outputs back. The
expected values are the float64 formulas of `tests/test_optimizers.py`
(written from Keras's source), with the constraint formula after each step.
"""

from __future__ import annotations

import numpy as np
import pytest

import onnxbn.reference
from onnxbn.constraints import MaxNorm, UnitNorm
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.lowering.context import LoweringContext
from onnxbn.lowering.optimizers import lower_update
from onnxbn.optimizers import SGD, Adam, Optimizer
from onnxbn.variable import Variable
from tests.lowering.standalone_graph import model, run
from tests.runtimes import RUNTIMES, skip_reason
from tests.test_optimizers import keras_adam, keras_sgd

# The graph computes in the working dtype (float32 for 16-bit weights): a few
# roundings more than the float64 formula, each stored value rounded once.
RTOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-6, "float64": 1e-12}
ATOL = {"float16": 1e-4, "bfloat16": 1e-3, "float32": 1e-7, "float64": 1e-15}


def _max_norm(w, max_value=1.5):
    norms = np.sqrt(np.sum(np.square(w), axis=0, keepdims=True))
    return w * (np.clip(norms, 0, max_value) / (1e-7 + norms))


def _variables(dtype):
    rng = np.random.default_rng(0)
    return [
        Variable(rng.standard_normal((3, 2)), name="kernel", path="dense/kernel", dtype=dtype,
                 constraint=MaxNorm(1.5)),
        Variable(rng.standard_normal(2), name="bias", path="dense/bias", dtype=dtype),
    ]  # fmt: skip


def _update_model(opt, variables, opset=18):
    ctx = LoweringContext(opset)
    weights = [ctx.read_state(v.path, v.value, v.dtype) for v in variables]
    grads = [ctx.add_input(f"grad/{v.path}", v.dtype, list(v.shape)) for v in variables]
    lower_update(ctx, opt, list(zip(variables, weights, grads)))
    return model(ctx), ctx.initial_state()


def _run_steps(runtime, proto, state, grads_per_step, variables):
    for grads in grads_per_step:
        feeds = dict(state)
        feeds.update({f"grad/{v.path}": g for v, g in zip(variables, grads)})
        out = run(runtime, proto, feeds)
        state = {name: out[name + "/new"] for name in state}
    return state


def _grads(variables, steps, dtype):
    rng = np.random.default_rng(1)
    np_dtype = to_numpy_dtype(dtype)
    return [[(rng.standard_normal(v.shape) * 0.5).astype(np_dtype) for v in variables]
            for _ in range(steps)]  # fmt: skip


CASES = [
    (SGD, {"learning_rate": 0.1}),
    (SGD, {"learning_rate": 0.05, "momentum": 0.9}),
    (SGD, {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
    (Adam, {}),
    (Adam, {"learning_rate": 0.1, "beta_1": 0.5, "beta_2": 0.75, "epsilon": 1e-3}),
]


def _expected(cls, kwargs, variables, initial, steps, dtype):
    """Per variable: (weight, {slot: value}) after `steps`, from Keras's formulas."""
    result = []
    for i, v in enumerate(variables):
        project = _max_norm if v.constraint is not None else (lambda w: w)
        grads = [s[i] for s in steps]
        if cls is SGD:
            history, m = keras_sgd(initial[i], grads, dtype, project=project, **kwargs)
            slots = {"momentum": m} if kwargs.get("momentum") else {}
        else:
            history, m, s = keras_adam(initial[i], grads, dtype, project=project, **kwargs)
            slots = {"momentum": m, "velocity": s}
        result.append((history[-1], slots))
    return result


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=lambda c: getattr(c, "__name__", repr(c)))
def test_steps_match_keras_formulas(cls, kwargs, dtype, runtime):
    reason = skip_reason(runtime, {dtype})
    if reason:
        pytest.skip(reason)
    # OpenVINO computes a float64 graph in float32 (as tests/conformance notes).
    bound = "float32" if (runtime, dtype) == ("openvino", "float64") else dtype
    variables = _variables(dtype)
    initial = [v.numpy() for v in variables]
    opt = cls(**kwargs)
    proto, state = _update_model(opt, variables)
    steps = _grads(variables, 3, dtype)
    state = _run_steps(runtime, proto, state, steps, variables)
    assert state["optimizer/iterations"].dtype == np.int64
    assert state["optimizer/iterations"] == 3
    for v, (weight, slots) in zip(variables, _expected(cls, kwargs, variables, initial, steps,
                                                       dtype)):  # fmt: skip
        got = state[v.path]
        assert got.dtype == to_numpy_dtype(dtype) and got.shape == v.shape
        np.testing.assert_allclose(got.astype(np.float64), weight, rtol=RTOL[bound],
                                   atol=ATOL[bound])  # fmt: skip
        for slot, value in slots.items():
            np.testing.assert_allclose(state[f"optimizer/{slot}/{v.path}"].astype(np.float64),
                                       value, rtol=RTOL[bound], atol=ATOL[bound])  # fmt: skip


def test_state_order_names_and_starting_values_of_a_stepped_optimizer():
    variables = _variables("float32")
    opt = Adam(learning_rate=0.1)
    first = _grads(variables, 3, "float32")
    opt.apply(first[0], variables)  # the export continues from this state
    initial = [v.numpy() for v in variables]
    proto, state = _update_model(opt, variables)
    assert [i.name for i in proto.graph.input] == [
        "dense/kernel",
        "dense/bias",
        "grad/dense/kernel",
        "grad/dense/bias",
        "optimizer/iterations",
        "optimizer/momentum/dense/kernel",
        "optimizer/velocity/dense/kernel",
        "optimizer/momentum/dense/bias",
        "optimizer/velocity/dense/bias",
    ]
    assert [o.name for o in proto.graph.output] == [
        "dense/kernel/new",
        "dense/bias/new",
        "optimizer/iterations/new",
        "optimizer/momentum/dense/kernel/new",
        "optimizer/velocity/dense/kernel/new",
        "optimizer/momentum/dense/bias/new",
        "optimizer/velocity/dense/bias/new",
    ]
    iterations = proto.graph.input[4].type.tensor_type
    assert iterations.elem_type == 7 and len(iterations.shape.dim) == 0  # int64 scalar
    eager_state = dict(opt.variables)
    assert set(eager_state) <= set(state)
    for name, value in eager_state.items():
        np.testing.assert_array_equal(state[name], value)
    state = _run_steps("onnxbn.reference", proto, state, first[1:], variables)
    # Keras's formulas over all three steps, the first taken eagerly.
    kwargs = {"learning_rate": 0.1}
    starts = [w.numpy() for w in _variables("float32")]
    expected = _expected(Adam, kwargs, variables, starts, first, "float32")
    for v, (weight, _) in zip(variables, expected):
        np.testing.assert_allclose(state[v.path], weight, rtol=2e-6, atol=1e-7)
    assert state["optimizer/iterations"] == 3
    assert not np.array_equal(state["dense/bias"], initial[1])


@pytest.mark.parametrize("opset", [15, 21])
def test_graph_is_portable(opset):
    variables = _variables("float32")
    variables[1].constraint = UnitNorm(axis=-1)
    proto, state = _update_model(Adam(), variables, opset=opset)
    ops = {node.op_type for node in proto.graph.node}
    assert {node.domain for node in proto.graph.node} <= {""}
    assert ops <= set(onnxbn.reference.supported_ops()), ops
    assert not ops & {"Max", "Min", "If", "Clip"}
    feeds = dict(state)
    feeds.update({f"grad/{v.path}": np.ones(v.shape, np.float32) for v in variables})
    out = run("onnxruntime", proto, feeds)
    bias = out["dense/bias/new"]
    np.testing.assert_allclose(np.linalg.norm(bias), 1.0, rtol=1e-6)


def test_no_parameters_counts_no_step():
    ctx = LoweringContext(18)
    lower_update(ctx, SGD(), [])
    proto = model(ctx)
    out = run("onnxbn.reference", proto, {"optimizer/iterations": np.array(4, np.int64)})
    assert out["optimizer/iterations/new"] == 4


def test_errors():
    variables = _variables("float32")
    ctx = LoweringContext(18)
    w = ctx.read_state("dense/kernel", variables[0].value, "float32")
    g = ctx.add_input("g", "float32", [2, 3])

    class Custom(Optimizer):
        pass

    with pytest.raises(TypeError, match="only onnxbn.optimizers.SGD and Adam"):
        lower_update(ctx, Custom(0.1), [(variables[0], w, w)])
    with pytest.raises(ValueError, match=r"gradient 'g' of variable 'dense/kernel' has shape"):
        lower_update(ctx, SGD(), [(variables[0], w, g)])
    variables[0].constraint = lambda x: x
    ctx = LoweringContext(18)
    w = ctx.read_state("dense/kernel", variables[0].value, "float32")
    with pytest.raises(TypeError, match="Cannot export the constraint"):
        lower_update(ctx, SGD(), [(variables[0], w, w)])
