"""The BatchNormalization layer (Keras 3 semantics); its pure NumPy function is in `moments.py`.

How it becomes ONNX lives in `onnxbn/lowering/batch_normalization.py`; the ONNX
kernel of the reference interpreter in `onnxbn/reference/kernels/`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from onnxbn.dtypes import to_numpy_dtype
from onnxbn.layers.arguments import check_bool, check_real
from onnxbn.layers.batch_normalization_gradient import layer_pullback
from onnxbn.layers.input_spec import InputSpec
from onnxbn.layers.layer import Layer, to_array
from onnxbn.layers.moments import (
    batch_normalization,
    check_mask_broadcast,
    check_mask_rank,
    normalize_axis,
)
from onnxbn.layers.renormalization import (
    RENORM_WEIGHTS,
    batch_renormalization,
    check_renorm_clipping,
    check_renorm_momentum,
    renorm_initializers,
)
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor


@register_layer("keras.layers")
class BatchNormalization(Layer):
    """Layer that normalizes its inputs (Keras 3's `BatchNormalization`).

    In training (`training=True` and `layer.trainable`) it normalizes with the
    mean and population variance of the current batch and updates the moving
    statistics: `moving = moving * momentum + batch * (1 - momentum)`.
    Otherwise it normalizes with the moving statistics and writes nothing; a
    frozen layer (`trainable=False`) runs in inference mode even with
    `training=True`. The output is `gamma * (x - mean) / sqrt(var + epsilon) + beta`.

    With `renorm=True` (batch renormalization, Keras 3.14+) training corrects
    the batch statistics by `(r, d)` from the renorm statistics and updates
    `moving_stddev`, `renorm_mean`, `renorm_stddev` too (see
    `onnxbn/layers/renormalization.py`); inference is unchanged.

    Float16 and bfloat16 inputs are computed in float32 (as Keras does) and
    returned in the compute dtype; integer and bool inputs are computed in
    float32; a `float64` layer computes in float64. Statistics are
    accumulated in float64 by a two-pass algorithm.

    Args:
        axis: integer, the channel axis (negative allowed).
        momentum: momentum of the moving averages, in [0, 1].
        epsilon: non-negative float added to the variance.
        center: if True, add the offset `beta`.
        scale: if True, multiply by `gamma`.
        beta_initializer, gamma_initializer, moving_mean_initializer,
            moving_variance_initializer: initializers (name, config or object).
        beta_regularizer, gamma_regularizer: optional regularizers.
        beta_constraint, gamma_constraint: optional constraints.
        synchronized: use the global batch statistics across processes in a
            distributed run; identical to False in a single process.
        renorm: use batch renormalization; adds the non-trainable weights
            `moving_stddev`, `renorm_mean`, `renorm_stddev`.
        renorm_clipping: None or a dict with optional keys `"rmin"`,
            `"rmax"`, `"dmax"`: `r` is clipped to `[rmin, rmax]`, `d` to
            `[-dmax, dmax]`; a missing key (or None) does not clip. Checked
            only with `renorm=True`, as Keras does.
        renorm_momentum: momentum of `renorm_mean` and `renorm_stddev`, in
            [0, 1]; `momentum` still drives the inference statistics.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: input array of any rank >= 1.
        training: Python bool; batch statistics when True (and trainable).
        mask: optional array of rank `inputs.ndim - 1`, broadcast to the inputs
            after expansion at the last axis; non-zero entries are the positions
            used for the batch statistics. Ignored in inference.

    Returns:
        The normalized array, same shape as `inputs`, in the compute dtype.

    Raises:
        TypeError: `axis` not an int, non-numeric hyper-parameters or inputs.
        ValueError: NaN/Inf or out-of-range hyper-parameters, an axis out of
            range, a mask of the wrong rank or shape, with `renorm=True` a
            `renorm_clipping` with an unknown key, `rmax < rmin` or `dmax < 0`.
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        synchronized: bool = False,
        renorm: bool = False,
        renorm_clipping: Any = None,
        renorm_momentum: float = 0.99,
        **kwargs: Any,
    ) -> None:
        from onnxbn import constraints, initializers, regularizers

        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(
                f"axis must be a single int (Keras 3), received {axis!r} "
                f"of type {type(axis).__name__}."
            )
        self.axis = int(axis)
        self.momentum = check_real(momentum, "momentum")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], received {momentum!r}.")
        self.epsilon = check_real(epsilon, "epsilon")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, received {epsilon!r}.")
        self.center = check_bool(center, "center")
        self.scale = check_bool(scale, "scale")
        self.synchronized = check_bool(synchronized, "synchronized")
        self.renorm = check_bool(renorm, "renorm")
        self.renorm_clipping = check_renorm_clipping(renorm_clipping, renorm=self.renorm)
        self.renorm_momentum = check_renorm_momentum(renorm_momentum)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        super().__init__(**kwargs)
        self.supports_masking = True
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.moving_stddev = self.renorm_mean = self.renorm_stddev = None

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        ndim = len(input_shape)
        axis = normalize_axis(self.axis, ndim, self.name)
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                f"Layer {self.name!r}: the channel axis {self.axis} of input shape "
                f"{tuple(input_shape)} is not defined; the weights need a fixed size."
            )
        shape = (channels,)
        if self.scale:
            self.gamma = self.add_weight(
                shape,
                self.gamma_initializer,
                name="gamma",
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
            )
        if self.center:
            self.beta = self.add_weight(
                shape,
                self.beta_initializer,
                name="beta",
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
            )
        self.moving_mean = self.add_weight(
            shape, self.moving_mean_initializer, name="moving_mean", trainable=False
        )
        self.moving_variance = self.add_weight(
            shape, self.moving_variance_initializer, name="moving_variance", trainable=False
        )
        if self.renorm:
            initial = renorm_initializers(
                self.moving_mean_initializer, self.moving_variance_initializer
            )
            for name, initializer in initial.items():
                setattr(self, name, self.add_weight(shape, initializer, name=name, trainable=False))
        # A negative variance (or stddev) is an error at build/assign time, not a NaN model.
        for name in ("moving_variance", "moving_stddev", "renorm_stddev"):
            if getattr(self, name, None) is not None:
                getattr(self, name).require_nonnegative()
        self.input_spec = InputSpec(ndim=ndim, axes={self.axis: channels})
        self.built = True

    def set_weights(self, weights: list[Any]) -> None:
        """`Layer.set_weights`; a negative variance is refused before anything is assigned."""
        if isinstance(weights, (list, tuple)) and len(weights) == len(self.weights):
            for variable, value in zip(self.weights, weights):
                variable.check(value)
        super().set_weights(weights)

    def compute_output_spec(
        self, inputs: SymbolicTensor, training: Any = None, mask: Any = None
    ) -> SymbolicTensor:
        normalize_axis(self.axis, inputs.ndim, self.name)
        if mask is not None:
            if not isinstance(mask, SymbolicTensor):
                raise TypeError(
                    f"Layer {self.name!r}: in a symbolic call the mask must be a "
                    f"SymbolicTensor, received {type(mask).__name__}."
                )
            check_mask_rank(mask.ndim, mask.shape, inputs.ndim, inputs.shape)
            check_mask_broadcast(mask.shape, inputs.shape)
        if training is not None and not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be a bool or None, received {training!r}.")
        return SymbolicTensor(inputs.shape, self.compute_dtype)

    def uses_batch_statistics(self, training: Any) -> bool:
        """True iff a call with `training` normalizes with batch statistics."""
        return bool(training) and self.trainable

    def call(self, inputs: np.ndarray, training: Any = None, mask: Any = None) -> np.ndarray:
        return self._forward(inputs, training, mask)

    def vjp(self, inputs: np.ndarray, training: Any = None, mask: Any = None) -> tuple:
        """`call` and its pullback (synchronized: every process calls it; it exchanges sums)."""
        saved: dict[str, Any] = {}
        return self._forward(inputs, training, mask, saved), layer_pullback(self, inputs, saved)

    def _forward(self, inputs: np.ndarray, training: Any, mask: Any, saved: Any = None) -> Any:
        if training is not None and not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be a bool or None, received {training!r}.")
        x = inputs
        training = self.uses_batch_statistics(training)
        # Keras: result_type(inputs, float32): float64 stays, everything else is float32.
        compute = "float64" if x.dtype == np.float64 else "float32"
        comm = self._communicator() if training else None
        try:
            normalize_axis(self.axis, x.ndim, self.name)
            if mask is not None:
                mask = to_array(mask, f"Mask of layer {self.name!r}")
                check_mask_rank(mask.ndim, mask.shape, x.ndim, x.shape)
                if training:  # Keras ignores the mask in inference beyond its rank.
                    check_mask_broadcast(mask.shape, x.shape)
        except (TypeError, ValueError) as error:
            if comm is not None:  # every process raises, none is left waiting
                self._agree(comm, compute, error)
            raise
        reduce_partial = None
        if comm is not None:
            from onnxbn import distributed

            self._agree(comm, compute, None)
            what = f"BatchNormalization {self.name!r}"
            reduce_partial = functools.partial(distributed.allreduce_moments, comm, what=what)
        arguments = dict(
            axis=self.axis,
            moving_mean=self.moving_mean.value,
            moving_variance=self.moving_variance.value,
            gamma=None if self.gamma is None else self.gamma.value,
            beta=None if self.beta is None else self.beta.value,
            momentum=self.momentum,
            epsilon=self.epsilon,
            training=training,
            mask=mask if training else None,
            compute_dtype=compute,
            reduce_partial=reduce_partial,
            saved=saved,
        )
        if saved is not None:  # for the pullback, with the statistics the function adds
            saved.update(
                training=training, comm=comm, mask=arguments["mask"], gamma=arguments["gamma"]
            )
        if self.renorm:
            y, *new_states = batch_renormalization(
                x,
                **arguments,
                **{name: getattr(self, name).value for name in RENORM_WEIGHTS},
                renorm_momentum=self.renorm_momentum,
                renorm_clipping=self.renorm_clipping,
            )
        else:
            y, *new_states = batch_normalization(x, **arguments)
        if training:
            for variable, value in zip(self.state_variables, new_states):
                variable.assign(value)
        return y.astype(to_numpy_dtype(self.compute_dtype))

    @property
    def state_variables(self) -> list:
        """The variables a training call updates, in Keras's weight order.

        `moving_mean`, `moving_variance`, and with renorm `moving_stddev`,
        `renorm_mean`, `renorm_stddev`: the state set of a training export.
        """
        names = ("moving_mean", "moving_variance") + (RENORM_WEIGHTS if self.renorm else ())
        return [getattr(self, name) for name in names]

    def _communicator(self) -> Any:
        """The communicator of a multi-process synchronized layer, or None (local statistics)."""
        if not self.synchronized:
            return None
        from onnxbn import distributed

        comm = distributed.active_communicator()
        if comm is None or comm.Get_size() == 1:
            return None
        return comm

    def _agree(self, comm: Any, compute_dtype: str, error: Exception | None) -> None:
        from onnxbn import distributed

        distributed.agree(comm, compute_dtype, error, f"BatchNormalization {self.name!r}")

    def get_config(self) -> dict:
        from onnxbn import constraints, initializers, regularizers

        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": initializers.serialize(self.beta_initializer),
                "gamma_initializer": initializers.serialize(self.gamma_initializer),
                "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
                "moving_variance_initializer": initializers.serialize(
                    self.moving_variance_initializer
                ),
                "beta_regularizer": regularizers.serialize(self.beta_regularizer),
                "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
                "beta_constraint": constraints.serialize(self.beta_constraint),
                "gamma_constraint": constraints.serialize(self.gamma_constraint),
                "synchronized": self.synchronized,
                "renorm": self.renorm,
                "renorm_clipping": (
                    None if self.renorm_clipping is None else dict(self.renorm_clipping)
                ),
                "renorm_momentum": self.renorm_momentum,
            }
        )
        return config
