"""DoctorCallback without a probe set: it counts the training batches themselves, and it
measures each step's update-to-weight ratio inside the compiled training step."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest

from reludoctor.errors import InputError
from reludoctor.keras import DoctorCallback

BATCH = 8


def threshold_model() -> keras.Model:
    """fc: unit k = relu(x_k - 0.9) for k < 4 (fires only on an input above 0.9), units 4 and 5
    planted dead (bias -1e4), units 6 and 7 always alive."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu", name="fc"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    kernel = np.zeros((4, 8), "float32")
    kernel[np.arange(4), np.arange(4)] = 1.0
    kernel[:, 6:] = 1.0
    bias = np.array([-0.9] * 4 + [-1e4, -1e4] + [0.1, 0.1], "float32")
    model.get_layer("fc").set_weights([kernel, bias])
    return model


def batches_with_spikes(spikes: dict[int, int], steps: int) -> np.ndarray:
    """``steps`` batches of inputs below 0.5, where input k is 1.0 in one row of the
    (1-based) batch ``spikes[k]``."""
    x = np.random.default_rng(0).uniform(0, 0.5, (steps * BATCH, 4)).astype("float32")
    for unit, step in spikes.items():
        x[(step - 1) * BATCH, unit] = 1.0
    return x


def test_the_sampled_training_batches_are_counted_exactly():
    # every=2 samples steps 1, 2, 4, 6: a unit that fires only in step 3's or 5's batch was
    # never seen alive, one that fires in step 1's, 2's or 4's batch was.
    x = batches_with_spikes({0: 1, 1: 3, 2: 4, 3: 5}, steps=6)
    model = threshold_model()
    model.compile(keras.optimizers.SGD(0.0), "mse")  # the weights stay as planted
    doctor = DoctorCallback(every=2, window=6)
    model.fit(x, x[:, :1], batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[doctor])
    report = doctor.report()
    assert report.layers[0].dead_units == [1, 3, 4, 5]
    assert report.meta["steps"] == 6
    assert [w.end_step for w in report.windows if w.complete] == [6]
    # the gradient is measured on the kept training batch, with its own targets
    assert report.layers[0].grad_norm is not None and report.layers[0].grad_norm > 0
    assert {4, 5} <= set(report.layers[0].zero_grad_units or [])


def test_a_units_death_in_training_is_seen_without_a_probe_set():
    model = threshold_model()
    x = batches_with_spikes({0: 1, 1: 1, 2: 1, 3: 1}, steps=4)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    doctor = DoctorCallback(every=1, window=2)
    model.fit(x, x[:, :1], batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[doctor])
    first, second = (w for w in doctor.report().windows if w.complete)
    fc_first, fc_second = first.layers[0], second.layers[0]
    assert fc_first.dead == 2  # the spikes in step 1 keep units 0-3 alive in window 1
    assert fc_second.dead == 6  # steps 3 and 4 have no spike: only units 6 and 7 fire


def test_update_ratios_are_those_of_the_real_steps():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu", name="fc"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.5), "mse")
    x = np.random.default_rng(1).normal(size=(3 * BATCH, 4)).astype("float32")
    y = x.sum(1, keepdims=True) * 5
    kernels = []

    class Kernels(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            kernels.append(self.model.get_layer("fc").kernel.numpy())

        def on_train_end(self, logs=None):
            kernels.append(self.model.get_layer("fc").kernel.numpy())

    doctor = DoctorCallback(every=1, window=3)
    model.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[Kernels(), doctor]
    )
    ratios = [np.linalg.norm(b - a) / np.linalg.norm(a) for a, b in itertools.pairwise(kernels)]
    window = doctor.report().windows[0]
    assert window.layers[0].update_ratio == pytest.approx(max(ratios), rel=1e-4)
    assert max(ratios) > 0.01


def test_a_learning_rate_too_high_is_judged_on_keras():
    # E4's Keras twin: He initialisation, 50 SGD steps at learning rate 10
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(1600, 10)).astype("float32")
    y = (x[:, :5].sum(1) > 0).astype("int64")
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(64, activation="relu", kernel_initializer="he_normal"),
            keras.layers.Dense(64, activation="relu", kernel_initializer="he_normal"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.SGD(10.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    doctor = DoctorCallback(every=1, window=10)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[doctor])
    report = doctor.report()
    assert "high_learning_rate" in {f.code for f in report.causes()}
    assert max(wl.update_ratio or 0 for w in report.windows for wl in w.layers) >= 0.5


def test_the_training_step_is_restored_after_fit():
    model = threshold_model()
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = batches_with_spikes({}, steps=2)
    for _ in range(2):  # a second callback on the same model wraps the model's own step
        doctor = DoctorCallback(every=1, window=2)
        model.fit(x, x[:, :1], batch_size=BATCH, verbose=0, callbacks=[doctor])
        assert "train_step" not in vars(model)
        assert doctor.report().meta["steps"] == 2
    model.fit(x, x[:, :1], batch_size=BATCH, verbose=0)  # and a plain fit still works


def test_xla_needs_a_probe_set_and_still_gets_update_ratios():
    model = threshold_model()
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)
    x = batches_with_spikes({0: 1}, steps=4)
    with pytest.raises(InputError, match="jit_compile=False, or pass probe_data"):
        model.fit(x, x[:, :1], batch_size=BATCH, verbose=0, callbacks=[DoctorCallback()])
    doctor = DoctorCallback(probe_data=x, every=1, window=2)
    model.fit(x, x[:, :1], batch_size=BATCH, verbose=0, callbacks=[doctor])
    assert doctor.report().windows[0].layers[0].update_ratio > 0


def test_probe_targets_need_probe_data():
    with pytest.raises(ValueError, match="probe_targets without probe_data"):
        DoctorCallback(probe_targets=np.zeros(4))


def test_the_tapped_step_is_traced_once_per_callback_and_again_after_compile():
    model = threshold_model()
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = batches_with_spikes({}, steps=2)
    doctor = DoctorCallback(every=1, window=2)
    model.fit(x, x[:, :1], batch_size=BATCH, verbose=0, callbacks=[doctor])
    traced = doctor._tap._traced
    model.fit(x, x[:, :1], batch_size=BATCH, verbose=0, callbacks=[doctor])
    assert doctor._tap._traced is traced
    model.compile(keras.optimizers.SGD(0.1), "mse")  # a new optimizer: trace again
    model.fit(x, x[:, :1], batch_size=BATCH, verbose=0, callbacks=[doctor])
    assert doctor._tap._traced is not traced
    assert doctor.report().windows[0].layers[0].update_ratio > 0  # the new optimizer's steps


def test_a_fit_that_raised_leaves_the_callback_usable():
    model = threshold_model()
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = batches_with_spikes({}, steps=4)

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise KeyboardInterrupt

    doctor = DoctorCallback(every=1, window=2)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, x[:, :1], batch_size=BATCH, verbose=0, callbacks=[Stop(), doctor])
    model.fit(x, x[:, :1], batch_size=BATCH, verbose=0, callbacks=[doctor])  # no hang
    assert doctor.report().meta["steps"] == 4
