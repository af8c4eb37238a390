"""Float64 oracle of Keras 3's train step, written from Keras's formulas (independent of onnxbn).

One `Network.train_step(x, y, sample_weight)` is Keras's step (trainers/trainer.py
and the backend trainers): forward in training mode (BatchNormalization updates
its moving statistics as it runs), loss with reduction `sum_over_batch_size`
plus the regularization losses of the trainable weights, hand-written backward,
the optimizer's `update_step` for every trainable weight, constraints applied
after the update, then `iterations += 1` (optimizers/base_optimizer.py `apply`).

Each layer has `forward(x, training) -> (y, cache)` and
`backward(cache, dy) -> (dx, {weight name: grad})`; the backward passes are
checked against central finite differences in tests/test_training_oracle.py.
Weights are keyed by Keras's variable path `"<layer>/<weight>"`.
"""

from __future__ import annotations

import numpy as np

EPSILON = 1e-7  # keras.config.epsilon(): probability clipping, MaxNorm fuzz


def f64(a):
    return np.asarray(a, dtype=np.float64)


# --- activations: (forward, backward(y, dy)) on the last axis -------------------------------


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


ACTIVATIONS = {
    "linear": (lambda z: z, lambda y, dy: dy),
    "relu": (lambda z: np.maximum(z, 0.0), lambda y, dy: dy * (y > 0)),
    "softmax": (_softmax, lambda y, dy: y * (dy - np.sum(dy * y, axis=-1, keepdims=True))),
}


# --- layers ----------------------------------------------------------------------------------


class Layer:
    """A layer of the oracle: `params` (trainable weights, Keras order), `state`."""

    def __init__(self, name, trainable=True, regularizers=None, constraints=None):
        self.name = name
        self.trainable = trainable
        self.params: dict[str, np.ndarray] = {}
        self.state: dict[str, np.ndarray] = {}
        # weight name -> (l1, l2) factors; weight name -> callable(w) -> w
        self.regularizers = dict(regularizers or {})
        self.constraints = dict(constraints or {})

    def weight_names(self):
        return list(self.params) + list(self.state)


class Dense(Layer):
    def __init__(self, name, kernel, bias=None, activation="linear", **kwargs):
        super().__init__(name, **kwargs)
        self.params["kernel"] = f64(kernel)
        if bias is not None:
            self.params["bias"] = f64(bias)
        self.activation = activation

    def forward(self, x, training):
        z = x @ self.params["kernel"]
        if "bias" in self.params:
            z = z + self.params["bias"]
        y = ACTIVATIONS[self.activation][0](z)
        return y, (x, y)

    def backward(self, cache, dy):
        x, y = cache
        dz = ACTIVATIONS[self.activation][1](y, dy)
        xs, dzs = x.reshape(-1, x.shape[-1]), dz.reshape(-1, dz.shape[-1])
        grads = {"kernel": xs.T @ dzs}
        if "bias" in self.params:
            grads["bias"] = dzs.sum(axis=0)
        return dz @ self.params["kernel"].T, grads


class ReLU(Layer):
    def forward(self, x, training):
        y = np.maximum(x, 0.0)
        return y, y

    def backward(self, y, dy):
        return dy * (y > 0), {}


class GlobalAveragePooling2D(Layer):
    """Channels-last mean over the two spatial axes."""

    def forward(self, x, training):
        return x.mean(axis=(1, 2)), x.shape

    def backward(self, shape, dy):
        n, h, w, c = shape
        return np.broadcast_to(dy[:, None, None, :] / (h * w), shape).copy(), {}


def same_padding(size, kernel, stride):
    """TensorFlow's "same": `ceil(size / stride)` outputs, the odd pad at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2D(Layer):
    """Channels-last 2-D convolution, kernel `(kh, kw, in, out)`, by explicit patches."""

    def __init__(self, name, kernel, bias=None, strides=1, padding="valid", **kwargs):
        super().__init__(name, **kwargs)
        self.params["kernel"] = f64(kernel)
        if bias is not None:
            self.params["bias"] = f64(bias)
        self.strides, self.padding = strides, padding

    def _pads(self, h, w):
        kh, kw = self.params["kernel"].shape[:2]
        if self.padding == "valid":
            return (0, 0), (0, 0)
        return same_padding(h, kh, self.strides), same_padding(w, kw, self.strides)

    def forward(self, x, training):
        kh, kw = self.params["kernel"].shape[:2]
        s = self.strides
        ph, pw = self._pads(x.shape[1], x.shape[2])
        xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
        oh = (xp.shape[1] - kh) // s + 1
        ow = (xp.shape[2] - kw) // s + 1
        patches = np.empty((x.shape[0], oh, ow, kh, kw, x.shape[3]))
        for i in range(kh):
            for j in range(kw):
                patches[:, :, :, i, j, :] = xp[
                    :, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s, :
                ]
        y = np.einsum("nhwijc,ijcf->nhwf", patches, self.params["kernel"])
        if "bias" in self.params:
            y = y + self.params["bias"]
        return y, (x.shape, xp.shape, ph, pw, patches)

    def backward(self, cache, dy):
        shape, padded_shape, ph, pw, patches = cache
        kh, kw = self.params["kernel"].shape[:2]
        s = self.strides
        oh, ow = dy.shape[1:3]
        grads = {"kernel": np.einsum("nhwijc,nhwf->ijcf", patches, dy)}
        if "bias" in self.params:
            grads["bias"] = dy.sum(axis=(0, 1, 2))
        dpatches = np.einsum("nhwf,ijcf->nhwijc", dy, self.params["kernel"])
        dxp = np.zeros(padded_shape)
        for i in range(kh):
            for j in range(kw):
                dxp[:, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s, :] += dpatches[
                    :, :, :, i, j, :
                ]
        return dxp[:, ph[0] : ph[0] + shape[1], pw[0] : pw[0] + shape[2], :], grads


class BatchNormalization(Layer):
    """Last-axis BatchNormalization (center and scale).

    Training (and trainable): batch mean and population variance (two-pass),
    `moving = moving * momentum + batch * (1 - momentum)`; otherwise (inference or
    frozen) the moving statistics normalize and nothing is updated.
    """

    def __init__(
        self, name, gamma, beta, moving_mean, moving_variance, momentum=0.99, epsilon=1e-3, **kwargs
    ):
        super().__init__(name, **kwargs)
        self.params["gamma"], self.params["beta"] = f64(gamma), f64(beta)
        self.state["moving_mean"], self.state["moving_variance"] = (
            f64(moving_mean),
            f64(moving_variance),
        )
        self.momentum, self.epsilon = momentum, epsilon

    def forward(self, x, training):
        axes = tuple(range(x.ndim - 1))
        gamma, beta = self.params["gamma"], self.params["beta"]
        if not (training and self.trainable):
            inv = 1.0 / np.sqrt(self.state["moving_variance"] + self.epsilon)
            return gamma * (x - self.state["moving_mean"]) * inv + beta, ("inference", x, inv)
        count = x.size // x.shape[-1]
        mean = x.sum(axis=axes) / count
        centered = x - mean
        var = (centered**2).sum(axis=axes) / count
        m = self.momentum
        self.state["moving_mean"] = self.state["moving_mean"] * m + mean * (1.0 - m)
        self.state["moving_variance"] = self.state["moving_variance"] * m + var * (1.0 - m)
        inv = 1.0 / np.sqrt(var + self.epsilon)
        xhat = centered * inv
        return gamma * xhat + beta, ("training", x, mean, var, xhat, count)

    def backward(self, cache, dy):
        axes = tuple(range(dy.ndim - 1))
        gamma = self.params["gamma"]
        if cache[0] == "inference":
            _, x, inv = cache
            xhat = (x - self.state["moving_mean"]) * inv
            grads = {"gamma": (dy * xhat).sum(axis=axes), "beta": dy.sum(axis=axes)}
            return dy * gamma * inv, grads
        _, x, mean, var, xhat, count = cache
        grads = {"gamma": (dy * xhat).sum(axis=axes), "beta": dy.sum(axis=axes)}
        dxhat = dy * gamma
        # xhat = (x - mean) * (var + eps)^-1/2, var = sum((x - mean)^2) / count,
        # mean = sum(x) / count: the chain rule through each of them.
        std_inv = 1.0 / np.sqrt(var + self.epsilon)
        dvar = np.sum(dxhat * (x - mean), axis=axes) * -0.5 * std_inv**3
        dmean = (
            np.sum(-dxhat * std_inv, axis=axes)
            + dvar * np.sum(-2.0 * (x - mean), axis=axes) / count
        )
        dx = dxhat * std_inv + dvar * 2.0 * (x - mean) / count + dmean / count
        return dx, grads


# --- losses: (reduced loss, d loss / d y_pred) -----------------------------------------------


def _reduce(values, sample_weight):
    """Keras's `reduce_weighted_values(..., "sum_over_batch_size")`: sum(values * w) / values.size."""
    if sample_weight is not None:
        values = values * f64(sample_weight).reshape(values.shape)
        weights = f64(sample_weight).reshape(values.shape)
    else:
        weights = np.ones_like(values)
    return values.sum() / values.size, weights / values.size


def mean_squared_error(y_true, y_pred, sample_weight=None):
    y_true = f64(y_true).reshape(y_pred.shape)
    loss, w = _reduce(np.mean((y_pred - y_true) ** 2, axis=-1), sample_weight)
    return loss, w[..., None] * 2.0 * (y_pred - y_true) / y_pred.shape[-1]


def categorical_crossentropy(y_true, y_pred, sample_weight=None, from_logits=False):
    """Keras's numpy-backend formula: log-softmax of logits, or normalize, clip to [eps, 1-eps], log."""
    y_true = f64(y_true)
    if from_logits:
        z = y_pred - y_pred.max(axis=-1, keepdims=True)
        log_prob = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    else:
        total = y_pred.sum(axis=-1, keepdims=True)
        p = y_pred / total
        clipped = np.clip(p, EPSILON, 1.0 - EPSILON)
        log_prob = np.log(clipped)
    loss, w = _reduce(-np.sum(y_true * log_prob, axis=-1), sample_weight)
    dlog = -y_true * w[..., None]
    if from_logits:
        return loss, dlog - np.exp(log_prob) * dlog.sum(axis=-1, keepdims=True)
    dp = dlog / clipped * ((p >= EPSILON) & (p <= 1.0 - EPSILON))
    return loss, (dp - np.sum(dp * p, axis=-1, keepdims=True)) / total


def sparse_categorical_crossentropy(y_true, y_pred, sample_weight=None, from_logits=False):
    labels = np.asarray(y_true).astype(np.int64).reshape(y_pred.shape[:-1])
    one_hot = np.eye(y_pred.shape[-1])[labels]
    return categorical_crossentropy(one_hot, y_pred, sample_weight, from_logits)


# --- regularizers and constraints -----------------------------------------------------------


def regularization(w, factors):
    """Keras's L1L2: `l1 * sum(|w|) + l2 * sum(w^2)` and its gradient."""
    l1, l2 = factors
    return l1 * np.abs(w).sum() + l2 * np.square(w).sum(), l1 * np.sign(w) + 2.0 * l2 * w


def non_neg(w):
    return w * (w >= 0.0)


def max_norm(max_value=2.0, axis=0):
    def constrain(w):
        norms = np.sqrt(np.sum(w * w, axis=axis, keepdims=True))
        return w * (np.clip(norms, 0.0, max_value) / (EPSILON + norms))

    return constrain


# --- optimizers -----------------------------------------------------------------------------
# Keras keeps `learning_rate` in a floatx (float32) variable and casts it to each
# weight's dtype, so a float64 weight steps with float32(lr); the other
# hyperparameters are Python floats, exact in float64.


def float32_learning_rate(lr):
    return float(np.float32(lr))


class SGD:
    """Keras 3 SGD: `m = m * momentum - g * lr`; `w += m` (nesterov: `w += m * momentum - g * lr`)."""

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False):
        self.lr = float32_learning_rate(learning_rate)
        self.momentum, self.nesterov = momentum, nesterov
        self.iterations = 0
        self.slots: dict[str, dict[str, np.ndarray]] = {}

    def update_step(self, path, w, g):
        if self.momentum == 0:
            return w - g * self.lr
        m = self.slots.setdefault("momentum", {}).setdefault(path, np.zeros_like(w))
        m = m * self.momentum - g * self.lr
        self.slots["momentum"][path] = m
        if self.nesterov:
            return w + (m * self.momentum - g * self.lr)
        return w + m


class Adam:
    """Keras 3 Adam: `alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)` with `t = iterations + 1`,
    `m += (g - m)(1 - b1)`, `v += (g^2 - v)(1 - b2)`, `w -= m * alpha / (sqrt(v) + epsilon)`."""

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        self.lr = float32_learning_rate(learning_rate)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.iterations = 0
        self.slots: dict[str, dict[str, np.ndarray]] = {"momentum": {}, "velocity": {}}

    def update_step(self, path, w, g):
        t = self.iterations + 1
        alpha = self.lr * np.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)
        m = self.slots["momentum"].get(path, np.zeros_like(w))
        v = self.slots["velocity"].get(path, np.zeros_like(w))
        m = m + (g - m) * (1.0 - self.beta_1)
        v = v + (g * g - v) * (1.0 - self.beta_2)
        self.slots["momentum"][path], self.slots["velocity"][path] = m, v
        return w - m * alpha / (np.sqrt(v) + self.epsilon)


# --- the network ----------------------------------------------------------------------------


class Network:
    """A chain of oracle layers with a loss and an optimizer.

    Args:
        layers: the layers in call order.
        loss: `fn(y_true, y_pred, sample_weight) -> (loss, dy_pred)`.
        optimizer: `SGD` or `Adam` (or None for forward/gradient use only).
        storage_dtype: the dtype Keras stores variables in: after each step every
            weight, slot and moving statistic is rounded to it (as assigning a
            float32 variable does); computation stays float64.
    """

    def __init__(self, layers, loss, optimizer=None, storage_dtype="float64"):
        self.layers, self.loss, self.optimizer = list(layers), loss, optimizer
        self.storage_dtype = np.dtype(storage_dtype)

    def weights(self):
        """`{path: array}` of every weight and moving statistic."""
        return {
            f"{layer.name}/{name}": (layer.params | layer.state)[name]
            for layer in self.layers
            for name in layer.weight_names()
        }

    def trainable(self):
        """`[(layer, weight name)]` of the trainable weights, in Keras order."""
        return [(layer, name) for layer in self.layers if layer.trainable for name in layer.params]

    def forward(self, x, training):
        caches = []
        for layer in self.layers:
            x, cache = layer.forward(x, training)
            caches.append(cache)
        return x, caches

    def loss_and_grads(self, x, y, sample_weight=None):
        """Training-mode loss (with regularization) and `{path: grad}`; updates BN state."""
        y_pred, caches = self.forward(f64(x), training=True)
        loss, dy = self.loss(y, y_pred, sample_weight)
        grads = {}
        for layer, cache in zip(reversed(self.layers), reversed(caches)):
            dy, layer_grads = layer.backward(cache, dy)
            if layer.trainable:
                grads.update({f"{layer.name}/{k}": g for k, g in layer_grads.items()})
        ordered = {}
        for layer, name in self.trainable():
            path = f"{layer.name}/{name}"
            ordered[path] = grads[path]
            if name in layer.regularizers:
                penalty, grad = regularization(layer.params[name], layer.regularizers[name])
                loss += penalty
                ordered[path] = ordered[path] + grad
        return loss, ordered

    def train_step(self, x, y, sample_weight=None):
        """One Keras train step; returns the loss (regularization included)."""
        loss, grads = self.loss_and_grads(x, y, sample_weight)
        opt = self.optimizer
        for layer, name in self.trainable():
            path = f"{layer.name}/{name}"
            layer.params[name] = opt.update_step(path, layer.params[name], grads[path])
        for layer, name in self.trainable():
            if name in layer.constraints:
                layer.params[name] = layer.constraints[name](layer.params[name])
        opt.iterations += 1
        self._round()
        return loss

    def _round(self):
        def r(a):
            return a.astype(self.storage_dtype).astype(np.float64)

        for layer in self.layers:
            layer.params = {k: r(v) for k, v in layer.params.items()}
            layer.state = {k: r(v) for k, v in layer.state.items()}
        for slot in self.optimizer.slots.values():
            for path in slot:
                slot[path] = r(slot[path])
