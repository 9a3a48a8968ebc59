"""A tap on a Keras model's compiled training step, for :class:`reludoctor.keras.DoctorCallback`.

Keras gives callbacks no batch and no weights from inside the step. For one ``fit`` the tap
wraps ``model.train_step``: on a step the callback arms (from the main thread, before the
step), the wrapped step keeps each watched kernel's update-to-weight ratio
``|W' - W| / |W|`` and, optionally, the training batch ``(x, y)`` in TensorFlow variables.
On every other step it only tests a flag. The callback reads the variables after the step
(:meth:`TrainStepTap.take`); the next arm waits until then, so a reading is never overwritten
while it is read, even when Keras runs the callback on a worker thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from reludoctor.probe.tracker import UPDATE_ROWS

#: Seconds :meth:`TrainStepTap.arm` waits for the last armed step to be read.
TAKE_TIMEOUT = 300.0


@dataclass
class TapReading:
    """What one armed step left: its batch (None unless batches are kept) and update ratios."""

    x: Any
    y: Any
    update_ratios: dict[str, float]


class TrainStepTap:
    """Wraps ``model.train_step`` from :meth:`install` to :meth:`remove`.

    ``kernels`` maps a watched layer's name to the kernel variable feeding it; with
    ``keep_batches`` the armed step's ``(x, y)`` is kept too (not possible under XLA, where a
    variable cannot change shape).
    """

    def __init__(self, model: Any, kernels: dict[str, Any], *, keep_batches: bool) -> None:
        import tensorflow as tf

        self.model = model
        self.kernels = kernels
        self.keep_batches = keep_batches
        self._armed = tf.Variable(False, trainable=False, name="reludoctor_armed")
        # the first rows of each kernel's units (channels last), as before the armed step
        self._before = {
            name: tf.Variable(_rows(kernel), trainable=False) for name, kernel in kernels.items()
        }
        self._ratios = {
            name: tf.Variable(0.0, trainable=False, dtype=tf.float32) for name in kernels
        }
        self._x: list[Any] | None = None  # one variable per input tensor, made on first trace
        self._y: list[Any] | None = None
        self._structure: tuple[Any, Any] = (None, None)
        self._read = threading.Event()
        self._read.set()
        self._traced: Any = None  # the model's train function with the tap, kept across fits
        self._own: Any = None  # the model's train function without it

    # -- the wrapped step (traced by tf.function) ------------------------------------------
    def _step(self, original: Any) -> Any:
        import tensorflow as tf

        def keep_before() -> Any:
            for name, kernel in self.kernels.items():
                self._before[name].assign(_rows(kernel))
            return tf.constant(True)

        def step(data: Any) -> Any:
            import keras

            tf.cond(self._armed, keep_before, lambda: tf.constant(False))
            logs = original(self.model, data)
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)

            def keep_after() -> Any:
                for name, kernel in self.kernels.items():
                    before = self._before[name]
                    change = tf.norm(tf.cast(_rows(kernel) - before, tf.float32))
                    size = tf.norm(tf.cast(before, tf.float32))
                    self._ratios[name].assign(change / (size + 1e-12))
                if self.keep_batches:
                    self._keep_batch(x, y)
                self._armed.assign(False)
                return tf.constant(True)

            tf.cond(self._armed, keep_after, lambda: tf.constant(False))
            return logs

        return step

    def _keep_batch(self, x: Any, y: Any) -> None:
        import tensorflow as tf

        if self._x is None:
            self._structure = (x, y)
            with tf.init_scope():  # made once, outside the traced step
                self._x = [_shapeless(t) for t in tf.nest.flatten(x)]
                self._y = [_shapeless(t) for t in tf.nest.flatten(y)] if y is not None else []
        for variable, value in zip(self._x, tf.nest.flatten(x), strict=True):
            variable.assign(value)
        if y is not None and self._y:
            for variable, value in zip(self._y, tf.nest.flatten(y), strict=True):
                variable.assign(value)

    # -- the callback's side ---------------------------------------------------------------
    def install(self) -> None:
        """Wrap the model's training step and put the model's train function with the tap in
        place: traced on this tap's first fit, reused on later ones while the model keeps the
        train function it had then (``compile`` makes it a new one)."""
        self._read.set()  # a fit that raised may have left an armed step unread
        self._armed.assign(False)
        own = self.model.train_function
        object.__setattr__(self.model, "train_step", self._step(type(self.model).train_step))
        if self._traced is None or own is not self._own:
            self.model.make_train_function(force=True)
            self._traced = self.model.train_function
        else:
            self.model.train_function = self._traced
        self._own = own

    def remove(self) -> None:
        """Give the model back its own training step and train function."""
        if "train_step" in vars(self.model):
            object.__delattr__(self.model, "train_step")
        self.model.train_function = self._own
        self._read.set()

    def arm(self) -> None:
        """Keep the next step's readings (main thread, before the step); waits until the last
        armed step's readings have been taken."""
        if not self._read.wait(TAKE_TIMEOUT):
            raise RuntimeError(
                f"reludoctor: the readings of the last sampled training step were not taken "
                f"within {TAKE_TIMEOUT:.0f} s; the callback's on_train_batch_end did not run"
            )
        self._read.clear()
        self._armed.assign(True)

    def take(self) -> TapReading:
        """The armed step's readings (after the step)."""
        import tensorflow as tf

        try:
            ratios = {name: float(v.numpy()) for name, v in self._ratios.items()}
            x = y = None
            if self.keep_batches and self._x is not None:
                x_like, y_like = self._structure
                x = tf.nest.pack_sequence_as(x_like, [v.numpy() for v in self._x])
                if y_like is not None and self._y:
                    y = tf.nest.pack_sequence_as(y_like, [v.numpy() for v in self._y])
            return TapReading(x, y, ratios)
        finally:
            self._read.set()


def _rows(kernel: Any) -> Any:
    """The first :data:`~reludoctor.probe.tracker.UPDATE_ROWS` units of a kernel (units last)."""
    return kernel[..., :UPDATE_ROWS]


def _shapeless(tensor: Any) -> Any:
    import tensorflow as tf

    return tf.Variable(
        np.zeros([0] * tensor.shape.rank, dtype=tensor.dtype.as_numpy_dtype),
        shape=tf.TensorShape(None),
        trainable=False,
    )
