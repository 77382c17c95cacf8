"""The models: forward pass, loss, and a backward pass that hands each gradient over as soon as it
is computed (last layer first), which is what lets communication start during backward.

Parameters live in one flat array (so replicas are compared and broadcast in one piece); each
parameter is a view into it. Gradients are written straight into the buffers a `sink` provides:
    sink.grad(i) -> array of parameter i's shape to write into
    sink.ready(i) -> called once parameter i's gradient is complete
"""

import math

import numpy as np


class Model:
    def __init__(self, shapes: list, xp=np):
        self.shapes = shapes  # [(name, shape)] in forward order
        self.xp = xp
        sizes = [math.prod(shape) for _, shape in shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = sizes
        self.count = sum(sizes)

    def views(self, flat) -> list:
        return [flat[o : o + n].reshape(s) for o, n, (_, s) in zip(self.offsets, self.sizes, self.shapes)]


class MLP(Model):
    """A classifier: `layers` hidden layers of `width` ReLU units, softmax cross-entropy loss."""

    def __init__(self, inputs: int, classes: int, width: int, layers: int, xp=np):
        self.widths = [inputs] + [width] * layers + [classes]
        shapes = []
        for i, (fan_in, fan_out) in enumerate(zip(self.widths, self.widths[1:])):
            shapes += [(f"w{i}", (fan_in, fan_out)), (f"b{i}", (fan_out,))]
        super().__init__(shapes, xp)

    def describe(self) -> str:
        return "mlp " + "-".join(map(str, self.widths))

    def initial(self, rng: np.random.Generator, dtype) -> np.ndarray:
        flat = np.zeros(self.count, dtype)
        for (name, shape), view in zip(self.shapes, self.views(flat)):
            if name.startswith("w"):  # He initialisation for ReLU layers
                view[...] = rng.standard_normal(shape) * math.sqrt(2.0 / shape[0])
        return flat

    def _forward(self, params: list, x) -> tuple:
        """The logits, and the input of every layer (what backward needs)."""
        inputs, h = [x], x
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            if i + 2 < len(params):
                h = self.xp.maximum(h, 0)
                inputs.append(h)
        return h, inputs

    def _log_softmax(self, z):
        z = z - z.max(axis=1, keepdims=True)
        return z - self.xp.log(self.xp.exp(z).sum(axis=1, keepdims=True))

    def loss_and_backward(self, params: list, x, y, sink) -> float:
        xp = self.xp
        logits, inputs = self._forward(params, x)
        log_probs = self._log_softmax(logits)
        rows = xp.arange(len(y))
        loss = -float(log_probs[rows, y].mean())
        delta = xp.exp(log_probs)
        delta[rows, y] -= 1
        delta /= len(y)
        for layer in reversed(range(len(params) // 2)):
            w, b = 2 * layer, 2 * layer + 1
            xp.matmul(inputs[layer].T, delta, out=sink.grad(w))
            sink.ready(w)
            xp.sum(delta, axis=0, out=sink.grad(b))
            sink.ready(b)
            if layer:
                delta = (delta @ params[w].T) * (inputs[layer] > 0)
        return loss

    def evaluate(self, params: list, x, y) -> tuple:
        """(mean loss, accuracy) on (x, y)."""
        logits, _ = self._forward(params, x)
        log_probs = self._log_softmax(logits)
        loss = -float(log_probs[self.xp.arange(len(y)), y].mean())
        return loss, float((logits.argmax(axis=1) == y).mean())


class Linear(Model):
    """Linear regression by gradient descent on the mean squared error (the project's first model)."""

    def __init__(self, inputs: int, xp=np):
        super().__init__([("w", (inputs,)), ("b", (1,))], xp)

    def describe(self) -> str:
        return f"linear {self.shapes[0][1][0]}-1"

    def initial(self, rng: np.random.Generator, dtype) -> np.ndarray:
        return np.zeros(self.count, dtype)

    def loss_and_backward(self, params: list, x, y, sink) -> float:
        w, b = params
        residual = x @ w + b - y
        loss = 0.5 * float((residual * residual).mean())
        residual /= len(y)
        self.xp.matmul(residual, x, out=sink.grad(0))
        sink.ready(0)
        self.xp.sum(residual, keepdims=True, out=sink.grad(1))
        sink.ready(1)
        return loss

    def evaluate(self, params: list, x, y) -> tuple:
        """(mean loss, R^2) on (x, y)."""
        w, b = params
        residual = x @ w + b - y
        mse = float((residual * residual).mean())
        return 0.5 * mse, 1.0 - mse / float(y.var())


def build(kind: str, inputs: int, classes: int, width: int, layers: int, xp=np) -> Model:
    if kind == "linear":
        return Linear(inputs, xp)
    return MLP(inputs, classes, width, layers, xp)
