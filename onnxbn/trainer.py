"""Keras's training API on the eager model: `compile`, `train_on_batch`, `fit`.

One step is Keras 3's `train_step`: the forward pass with `training=True`
(BatchNormalization uses batch statistics and updates its moving statistics;
a frozen layer runs in inference mode), the compiled loss of every output
(with the output's mask, as Keras's `Loss.__call__` applies it) plus the
regularization losses of the trainable weights, the gradient of that total
with respect to every trainable weight, and the optimizer update (constraints
applied after it). The gradients come from each layer's own rule
(`Layer.vjp`, `onnxbn/gradients.py`); everything is float64 inside, and each
variable is rounded once to its dtype when assigned.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxbn.dtypes import is_float
from onnxbn.gradients import Gradients
from onnxbn.layers.input_layer import InputLayer
from onnxbn.layers.layer import Layer
from onnxbn.tensor import SymbolicTensor, to_array
from onnxbn.tree import flatten, map_structure


class History:
    """What `fit` returns: `history = {"loss": [mean loss of each epoch]}` (Keras's `History`)."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {"loss": []}
        self.epoch: list[int] = []


class Trainer:
    """The training methods of `onnxbn.Model` (mixed into it, as Keras's `Trainer`)."""

    optimizer: Any = None
    loss: Any = None

    def compile(self, optimizer: Any, loss: Any) -> None:
        """Configures the model for training (Keras's `Model.compile`).

        Args:
            optimizer: an `onnxbn.optimizers` instance or name (`"sgd"`, `"adam"`).
            loss: a loss name or `onnxbn.losses` instance, applied to every
                output; or a list with one per output.

        Raises:
            ValueError: an unknown optimizer or loss, no loss, or a list of
                losses whose length is not the number of outputs.
        """
        from onnxbn import losses, optimizers

        if loss is None:
            raise ValueError("compile() needs a loss, e.g. loss='mse'.")
        self.optimizer = optimizers.get(optimizer)
        outputs = self.outputs  # type: ignore[attr-defined]
        if isinstance(loss, (list, tuple)):
            if len(loss) != len(outputs):
                raise ValueError(
                    f"compile() received {len(loss)} losses for a model with {len(outputs)} "
                    "outputs; pass one loss, or one per output."
                )
            self.loss = [losses.get(item) for item in loss]
        else:
            self.loss = [losses.get(loss)] * len(outputs)
        self.compiled = True

    def _require_compiled(self, what: str) -> None:
        if getattr(self, "optimizer", None) is None or getattr(self, "loss", None) is None:
            raise ValueError(
                f"You must call compile(optimizer, loss) on model {self.name!r} before {what}."  # type: ignore[attr-defined]
            )

    # -- one step ---------------------------------------------------------------------
    def train_on_batch(self, x: Any, y: Any, sample_weight: Any = None) -> float:
        """Runs one gradient update on one batch (Keras's `Model.train_on_batch`).

        Args:
            x: the input array, or a list (or dict by name) of one per input.
            y: the target array, or a list of one per output.
            sample_weight: optional per-sample weights, as Keras applies them.

        Returns:
            The batch's loss, regularization losses included (as Keras returns it).

        Raises:
            ValueError: the model is not compiled, or inputs/targets do not fit.
        """
        self._require_compiled("train_on_batch()")
        values, tape = self._forward(x)
        targets = self._targets(y)
        total, grads = self._loss_and_output_gradients(values, targets, sample_weight)
        weight_grads = self._backward(tape, grads)
        for variable in self.trainable_weights:  # type: ignore[attr-defined]
            if variable.regularizer is not None:
                total += float(variable.regularizer(variable.value))
                grad = variable.regularizer.gradient(variable.value)
                weight_grads[variable.path] = weight_grads.get(variable.path, 0.0) + grad
        self._apply(weight_grads)
        return float(total)

    def _forward(self, x: Any) -> tuple[dict[int, Any], list[tuple[Any, Any]]]:
        """The training forward pass, keeping each layer call's pullback."""
        # A list of arrays is one per input (also for a single input); anything else is one input.
        per_input = isinstance(x, (list, tuple)) and all(isinstance(a, np.ndarray) for a in x)
        feeds = self._feed_values(tuple(x) if per_input else (x,))  # type: ignore[attr-defined]
        values: dict[int, Any] = {id(t): v for t, v in zip(self.inputs, feeds)}  # type: ignore
        tape: list[tuple[Any, Any]] = []

        def resolve(item: Any) -> Any:
            return values[id(item)] if isinstance(item, SymbolicTensor) else item

        for node in self._nodes:  # type: ignore[attr-defined]
            op = node.operation
            if isinstance(op, InputLayer):
                continue
            args = map_structure(resolve, node.call_args)
            kwargs = map_structure(resolve, node.call_kwargs)
            if op._call_has_training_arg:
                kwargs["training"] = True
            differentiable = isinstance(op, Layer) and all(is_float(t.dtype) for t in node.outputs)
            if differentiable:
                result, pullback = op.call_with_vjp(*args, **kwargs)
                tape.append((node, pullback))
            else:  # bool masks and ids: nothing flows back
                result = op(*args, **kwargs)
            for tensor, value in zip(node.outputs, flatten(result)):
                values[id(tensor)] = value
        return values, tape

    def _targets(self, y: Any) -> list[np.ndarray]:
        outputs = self.outputs  # type: ignore[attr-defined]
        if len(outputs) == 1 and not (
            isinstance(y, (list, tuple)) and len(y) == 1 and np.ndim(y[0]) > 0
        ):
            y = [y]
        if not isinstance(y, (list, tuple)) or len(y) != len(outputs):
            raise ValueError(
                f"Model {self.name!r} has {len(outputs)} outputs; pass one target per output "  # type: ignore
                f"as a list, received {type(y).__name__}."
            )
        return [to_array(t, f"Target {i}") for i, t in enumerate(y)]

    def _loss_and_output_gradients(
        self, values: dict[int, Any], targets: list[np.ndarray], sample_weight: Any
    ) -> tuple[float, dict[int, np.ndarray]]:
        total = 0.0
        grads: dict[int, np.ndarray] = {}
        for tensor, loss, y_true in zip(self.outputs, self.loss, targets):  # type: ignore
            y_pred = values[id(tensor)]
            mask = None if tensor.mask is None else values.get(id(tensor.mask))
            value, grad = loss.value_and_gradient(y_true, y_pred, sample_weight, mask)
            total += float(value)
            _accumulate(grads, id(tensor), grad)
        return total, grads

    def _backward(
        self, tape: list[tuple[Any, Any]], grads: dict[int, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Runs the pullbacks in reverse, summing what reaches each tensor and weight."""
        weight_grads: dict[str, np.ndarray] = {}
        for node, pullback in reversed(tape):
            dy = grads.get(id(node.outputs[0]))
            if dy is None:  # the output does not reach the loss
                continue
            result: Gradients = pullback(np.asarray(dy, dtype=np.float64))
            for arg, grad in zip(node.call_args, result.inputs):
                if isinstance(arg, SymbolicTensor):
                    if grad is not None:
                        _accumulate(grads, id(arg), grad)
                elif isinstance(arg, (list, tuple)) and grad is not None:
                    for item, g in zip(arg, grad):
                        if isinstance(item, SymbolicTensor) and g is not None:
                            _accumulate(grads, id(item), g)
            for path, grad in result.weights.items():
                _accumulate(weight_grads, path, grad)
        return weight_grads

    def _apply(self, weight_grads: dict[str, np.ndarray]) -> None:
        variables = self.trainable_weights  # type: ignore[attr-defined]
        if not getattr(self.optimizer, "built", False):
            self.optimizer.build(variables)
        # A weight the loss does not reach has no gradient and is left alone, as Keras does.
        pairs = [(weight_grads[v.path], v) for v in variables if v.path in weight_grads]
        self.optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])

    # -- epochs -----------------------------------------------------------------------
    def fit(
        self,
        x: Any,
        y: Any,
        batch_size: int | None = 32,
        epochs: int = 1,
        shuffle: bool = True,
        verbose: Any = "auto",
        sample_weight: Any = None,
        seed: int | None = None,
    ) -> History:
        """Trains for `epochs` passes over the data in batches (Keras's `Model.fit`).

        Args:
            x: input array(s), as for `train_on_batch`; every array has the
                samples on axis 0.
            y: target array(s).
            batch_size: samples per step (32 when None); the last batch may be smaller.
            epochs: number of passes over the data.
            shuffle: shuffle the samples before each epoch.
            verbose: `"auto"` draws a progress bar on a terminal, 1 always, 0 never.
            sample_weight: optional per-sample weights.
            seed: seed of the shuffling (None: a fresh generator).

        Returns:
            A `History` whose `history["loss"]` holds each epoch's mean loss
            (weighted by batch size, as Keras's loss tracker).

        Raises:
            ValueError: not compiled, bad sizes, or arrays with different sample counts.
        """
        self._require_compiled("fit()")
        batch_size = 32 if batch_size is None else batch_size
        for name, value in (("batch_size", batch_size), ("epochs", epochs)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, received {value!r}.")
        xs = [to_array(a, "x") for a in _as_list(x)]
        ys = [to_array(a, "y") for a in _as_list(y)]
        weights = None if sample_weight is None else to_array(sample_weight, "sample_weight")
        arrays = xs + ys + ([] if weights is None else [weights])
        counts = {len(a) if a.ndim else -1 for a in arrays}
        if len(counts) != 1 or -1 in counts:
            raise ValueError(
                "fit() needs x, y (and sample_weight) with the same number of samples on "
                f"axis 0; received {[a.shape for a in arrays]}."
            )
        samples = counts.pop()
        rng = np.random.default_rng(seed)
        history = History()
        from tqdm import tqdm

        # tqdm's own rule for "auto" (disable=None): a bar only on a terminal.
        disable = None if verbose == "auto" else not verbose
        steps = -(-samples // int(batch_size))
        for epoch in range(int(epochs)):
            order = rng.permutation(samples) if shuffle else np.arange(samples)
            total, seen = 0.0, 0
            bar = tqdm(
                total=steps, desc=f"Epoch {epoch + 1}/{epochs}", unit="step", disable=disable
            )
            for start in range(0, samples, int(batch_size)):
                index = order[start : start + int(batch_size)]
                bx = [a[index] for a in xs]
                by = [a[index] for a in ys]
                loss = self.train_on_batch(
                    bx if len(bx) > 1 else bx[0],
                    by if len(by) > 1 else by[0],
                    None if weights is None else weights[index],
                )
                total += loss * len(index)
                seen += len(index)
                bar.update(1)
                bar.set_postfix(loss=f"{total / seen:.4f}")
            bar.close()
            history.epoch.append(epoch)
            history.history["loss"].append(total / max(seen, 1))
        return history


def _accumulate(table: dict, key: Any, grad: Any) -> None:
    grad = np.asarray(grad, dtype=np.float64)
    table[key] = grad if key not in table else table[key] + grad


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
