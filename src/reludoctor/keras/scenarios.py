"""The brief's Keras programs as scenarios, watched by :class:`reludoctor.keras.DoctorCallback`.

* :class:`KerasIsReluDead` - seed 001 ("Is ReLU Dead?"): inputs uniform in (-1, 0), one dense
  ReLU unit (``hidden`` adds the three-layer network), weights uniform in (0, 1), Adam. The
  data are those of the PyTorch scenario E1, so both diagnoses can be compared.
* :class:`KerasRandomMLP` - seed 000: Dense 784-128-64-10 on standard-normal inputs with
  random labels, as written (``variant`` "plain"), with ``he_normal``, or with LeakyReLU layers.

    >>> from reludoctor.keras.scenarios import KerasIsReluDead
    >>> report = KerasIsReluDead(samples=5_000, epochs=1).run()
    >>> [f.code for f in report.causes()]
    ['unnormalized_inputs']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from reludoctor.keras import DoctorCallback, keras_module
from reludoctor.report.report import Report
from reludoctor.scenarios import IsReluDead


@dataclass
class KerasIsReluDead:
    """Seed 001 in Keras; see the module docstring."""

    samples: int = 200_000
    epochs: int = 25
    batch_size: int = 256
    hidden: tuple[int, ...] = ()
    seed: int = 0
    every: int = 10
    window: int = 100

    name: ClassVar[str] = "E1 in Keras: Is ReLU Dead? (inputs uniform in (-1, 0), one ReLU layer)"
    expected_causes: ClassVar[tuple[str, ...]] = IsReluDead.expected_causes

    def build(self) -> tuple[Any, tuple[np.ndarray, ...]]:
        keras = keras_module()
        keras.utils.set_random_seed(self.seed)
        torch_twin = IsReluDead(samples=self.samples, seed=self.seed)
        x, y = (t.numpy() for t in torch_twin.make_data())
        cut = int(len(x) * torch_twin.train_fraction)
        layers = [keras.Input((4,))]
        for i, units in enumerate([*self.hidden, 1], start=1):
            layers.append(
                keras.layers.Dense(
                    units,
                    activation="relu",
                    kernel_initializer=keras.initializers.RandomUniform(0.0, 1.0),
                    bias_initializer="zeros",
                    name=f"dense{i}",
                )
            )
        model = keras.Sequential(layers)
        model.compile(keras.optimizers.Adam(1e-3), "mse")
        return model, (x[:cut], y[:cut], x[cut:], y[cut:])

    def run(self, log_dir: str | None = None) -> Report:
        """Fit under the callback; the report, with the losses per epoch in its meta."""
        model, (x, y, x_val, y_val) = self.build()
        doctor = DoctorCallback(every=self.every, window=self.window, log_dir=log_dir)
        history = model.fit(
            x,
            y,
            validation_data=(x_val, y_val),
            epochs=self.epochs,
            batch_size=self.batch_size,
            verbose=0,
            callbacks=[doctor],
        )
        report = doctor.report()
        report.meta["train_loss"] = [float(v) for v in history.history["loss"]]
        report.meta["val_loss"] = [float(v) for v in history.history["val_loss"]]
        return report


@dataclass
class KerasRandomMLP:
    """Seed 000 in Keras; see the module docstring."""

    variant: str = "plain"
    samples: int = 1000
    epochs: int = 5
    seed: int = 0

    name: ClassVar[str] = "E2 in Keras: MLP 784-128-64-10, random inputs and labels"
    expected_causes: ClassVar[tuple[str, ...]] = ()
    VARIANTS: ClassVar[tuple[str, ...]] = ("plain", "he_normal", "leaky_relu")

    def build(self) -> tuple[Any, np.ndarray, np.ndarray]:
        if self.variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(self.VARIANTS)}")
        keras = keras_module()
        keras.utils.set_random_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal((self.samples, 784)).astype("float32")
        y = rng.integers(0, 10, self.samples)
        dense = keras.layers.Dense
        if self.variant == "leaky_relu":
            body = [
                dense(128),
                keras.layers.LeakyReLU(0.01),
                dense(64),
                keras.layers.LeakyReLU(0.01),
            ]
        else:
            init = "he_normal" if self.variant == "he_normal" else "glorot_uniform"
            body = [
                dense(128, "relu", kernel_initializer=init),
                dense(64, "relu", kernel_initializer=init),
            ]
        model = keras.Sequential([keras.Input((784,)), *body, dense(10, "softmax")])
        model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
        return model, x, y

    def run(self) -> Report:
        model, x, y = self.build()
        doctor = DoctorCallback(every=5, window=32)
        model.fit(x, y, epochs=self.epochs, batch_size=32, verbose=0, callbacks=[doctor])
        return doctor.report()
