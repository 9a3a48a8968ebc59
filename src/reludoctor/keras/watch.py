"""Keras 3 (TensorFlow backend): watch a ``model.fit`` with :class:`DoctorCallback`, or scan a
built model with :func:`scan_keras` (``rd.scan`` does it for Keras models).

Every ReLU-family activation is watched: the ``activation=`` of Dense and Conv layers and the
``ReLU``, ``LeakyReLU``, ``PReLU``, ``ELU`` and ``Activation`` layers. A probe model returns
each watched layer's input on a probe batch; for layers with a fused activation the
pre-activation is the layer's own output with the activation left out. The values go to the
same tracker, rules and :class:`~reludoctor.report.report.Report` as on PyTorch.

    >>> import numpy as np, keras, reludoctor as rd
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu")])
    >>> _ = model.layers[0].bias.assign(np.full(3, -1e4, "float32"))
    >>> rd.scan(model, np.random.rand(64, 4).astype("float32")).layers[0].dead
    3
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reludoctor.catalogue.activations import KERAS_KINDS
from reludoctor.checks import positive_int
from reludoctor.diagnose.facts import LayerFacts, ModelFacts, weight_facts
from reludoctor.diagnose.observe import observe
from reludoctor.diagnose.summarize import Summarizer
from reludoctor.diagnose.thresholds import Thresholds
from reludoctor.errors import InputError
from reludoctor.keras.tap import TrainStepTap
from reludoctor.probe.probes import Site
from reludoctor.probe.tracker import Tracker
from reludoctor.report.build import build_report
from reludoctor.report.report import Report
from reludoctor.report.tensorboard import TensorBoardLog

#: Keras activation functions (by name) that reludoctor watches, and its name for each kind
#: (from :mod:`reludoctor.catalogue.activations`).
ACTIVATION_KINDS: dict[str, str] = KERAS_KINDS


def keras_module() -> Any:
    """The ``keras`` module, on the TensorFlow backend; a clear error otherwise."""
    try:
        import keras
    except ImportError as error:
        raise InputError(
            f"reludoctor's Keras support needs Keras 3 with TensorFlow: pip install "
            f"tensorflow-cpu ({error})"
        ) from error
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise InputError(
            f"reludoctor supports Keras on the TensorFlow backend only; this Keras runs on "
            f"{backend!r}: set KERAS_BACKEND=tensorflow before importing keras"
        )
    return keras


def is_keras_model(model: Any) -> bool:
    """Whether ``model`` is a Keras model (without importing Keras when it is not loaded)."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.Model)


@dataclass
class Watched:
    """One watched activation: the layer, its kind, and whether it is fused (``activation=``)."""

    layer: Any
    kind: str
    fused: bool
    site: Site


def activation_kind(layer: Any, keras: Any) -> tuple[str, bool] | None:
    """(kind, fused) for a layer that is or holds a ReLU-family activation, else None."""
    layers = keras.layers
    if isinstance(layer, layers.ReLU):
        if getattr(layer, "negative_slope", 0.0):
            return "leaky_relu", False
        return ("relu6" if getattr(layer, "max_value", None) == 6 else "relu"), False
    if isinstance(layer, layers.LeakyReLU):
        return "leaky_relu", False
    if isinstance(layer, layers.PReLU):
        return "prelu", False
    if isinstance(layer, layers.ELU):
        return "elu", False
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None)
    if name in ACTIVATION_KINDS:
        return ACTIVATION_KINDS[name], not isinstance(layer, layers.Activation)
    return None


def watched_layers(model: Any) -> list[Watched]:
    """Every layer of ``model`` (nested models included) with a ReLU-family activation."""
    keras = keras_module()
    found = []
    for layer in flat_layers(model):
        kind = activation_kind(layer, keras)
        if kind is None:
            continue
        channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
        site = Site(
            name=layer.name,
            kind=kind[0],
            via="keras",
            source=type(layer).__name__,
            producer=layer.name if kind[1] else None,
            unit_dim=1 if channels_first else -1,  # made non-negative at the first batch
            weight=None,
        )
        found.append(Watched(layer, kind[0], kind[1], site))
    return found


def flat_layers(model: Any) -> Iterator[Any]:
    """The model's layers, nested models' layers in their place (depth first)."""
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from flat_layers(layer)
        else:
            yield layer


@contextlib.contextmanager
def _without_activation(layer: Any) -> Iterator[None]:
    """The layer computes its pre-activation inside (an eager call: the compiled training
    function keeps the activation it was traced with)."""
    keras = keras_module()
    activation = layer.activation
    layer.activation = keras.activations.linear
    try:
        yield
    finally:
        layer.activation = activation


class KerasProbe:
    """Pre-activations and outputs of every watched layer on a batch of model inputs."""

    def __init__(self, model: Any) -> None:
        keras = keras_module()
        if not model.built:
            raise InputError(
                f"the Keras model {model.name!r} is not built yet: call it on data, fit it, or "
                "give it a keras.Input, then watch it"
            )
        self.model = model
        self.watched = watched_layers(model)
        #: Watched layers that cannot be probed, and why.
        self.skipped: dict[str, str] = {}
        model_inputs = getattr(model, "inputs", None)
        #: A subclassed model has no graph to probe: its layers' calls are intercepted during
        #: an eager forward instead (slower; layers that do not run in it are skipped).
        self.intercepting = not model_inputs
        self._probe = None
        self._compiled: Any = None
        if self.intercepting:
            return
        inputs = []
        kept = []
        for watched in self.watched:
            try:
                inputs.append(watched.layer.input)
                kept.append(watched)
            except (AttributeError, ValueError) as error:
                self.skipped[watched.layer.name] = f"its input cannot be probed ({error})"
        self.watched = kept
        self._warn_skipped()
        if kept:
            source = model_inputs[0] if len(model_inputs) == 1 else model_inputs
            # the model's first output comes last: how much it varies across the batch
            self._probe = keras.Model(source, [*inputs, model.outputs[0]])

    def _warn_skipped(self) -> None:
        if self.skipped:
            warnings.warn(
                f"reludoctor cannot watch {len(self.skipped)} activation layer(s) of "
                f"{self.model.name!r}: " + "; ".join(f"{n}: {r}" for n, r in self.skipped.items()),
                RuntimeWarning,
                stacklevel=4,
            )

    def run(self, batch: Any) -> tuple[list[tuple[np.ndarray, np.ndarray]], Any]:
        """(pre-activation, output) of every watched layer as float32 arrays, and the model's
        first output on the batch (None when nothing is watched)."""
        if self.intercepting:
            return self._run_intercepted(batch)
        if self._probe is None:
            return [], None
        if self._compiled is None:
            import tensorflow as tf

            self._compiled = tf.function(self._pre_and_post, reduce_retracing=True)
        try:
            results, output = self._compiled(batch)
        except (ValueError, TypeError) as error:
            shape = getattr(batch, "shape", None)
            raise InputError(
                f"the probe data does not fit {self.model.name!r}: {error} (probe batch shape "
                f"{shape}, model input shape {self.model.input_shape})"
            ) from None
        return [(_array(pre), _array(out)) for pre, out in results], _array(output)

    def _run_intercepted(self, batch: Any) -> tuple[list[tuple[np.ndarray, np.ndarray]], Any]:
        """One eager forward with each watched layer's ``call`` wrapped to keep its input."""
        seen: dict[int, Any] = {}

        def keeping(layer: Any, call: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                seen.setdefault(id(layer), args[0] if args else next(iter(kwargs.values())))
                return call(*args, **kwargs)

            return wrapped

        for watched in self.watched:
            object.__setattr__(watched.layer, "call", keeping(watched.layer, watched.layer.call))
        try:
            output = self.model(batch, training=False)
        except (ValueError, TypeError) as error:
            raise InputError(f"the probe data does not fit {self.model.name!r}: {error}") from None
        finally:
            for watched in self.watched:
                object.__delattr__(watched.layer, "call")
        ran = [w for w in self.watched if id(w.layer) in seen]
        if len(ran) < len(self.watched):
            reason = "it did not run in a forward of the model"
            self.skipped.update({w.layer.name: reason for w in self.watched if w not in ran})
            self.watched = ran
            self._warn_skipped()
        results = []
        for watched in ran:
            pre, out = _pre_and_out(watched, seen[id(watched.layer)])
            results.append((_array(pre), _array(out)))
        if isinstance(output, (list, tuple)):
            output = output[0]
        return results, _array(output)

    def _pre_and_post(self, batch: Any) -> tuple[list[tuple[Any, Any]], Any]:
        """Traced once per input signature by tf.function: fused activations are left out
        only while tracing, so the traced graph computes pre-activations and the live layers
        (and the compiled training step) keep their activation."""
        *layer_inputs, output = self._probe(batch, training=False)
        results = [
            _pre_and_out(watched, x) for watched, x in zip(self.watched, layer_inputs, strict=True)
        ]
        return results, output


def _pre_and_out(watched: Watched, x: Any) -> tuple[Any, Any]:
    """The watched activation's pre-activation and output, from the layer's input ``x``."""
    if not watched.fused:
        return x, watched.layer(x, training=False)
    with _without_activation(watched.layer):
        pre = watched.layer(x, training=False)
    return pre, watched.layer.activation(pre)


def _producer(watched: Watched) -> Any:
    """The layer whose kernel feeds the watched activation (itself when fused), or None."""
    layer = watched.layer
    if not watched.fused:
        try:
            history = getattr(layer.input, "_keras_history", None)
        except (AttributeError, ValueError):  # a subclassed model's layer: no graph to follow
            return None
        layer = history[0] if history else None
    return layer if getattr(layer, "kernel", None) is not None else None


def _ids(variables: dict[str, Any]) -> dict[str, int]:
    return {name: id(variable) for name, variable in variables.items()}


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "numpy"):  # a tensor or variable
        x = x.numpy()
    return np.array(x, dtype=np.float32)  # a writable copy, as torch.from_numpy wants


def units_first(kernel: Any) -> torch.Tensor:
    """A Keras kernel (units last) as a torch weight with one unit per row."""
    array = _array(kernel)
    return torch.from_numpy(np.moveaxis(array, -1, 0).reshape(array.shape[-1], -1).copy())


def _weighted_layers(model: Any) -> Iterator[Any]:
    """Dense and (not transposed) convolution layers, whose kernels keep units last."""
    layers = keras_module().layers
    weighted = (layers.Dense, layers.Conv1D, layers.Conv2D, layers.Conv3D)
    for layer in flat_layers(model):
        if isinstance(layer, weighted) and getattr(layer, "kernel", None) is not None:
            yield layer


def _bias(layer: Any) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return None if bias is None else torch.from_numpy(_array(bias))


def _facts(model: Any, tracker: Tracker, layers: list[LayerFacts]) -> ModelFacts:
    keras = keras_module()
    norm = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
    every_layer = list(flat_layers(model))
    return ModelFacts(
        layers=layers,
        norm_layers=sum(isinstance(layer, norm) for layer in every_layer),
        residual_adds=sum(isinstance(layer, keras.layers.Add) for layer in every_layer),
        inputs=tracker.inputs.facts(),
    )


class KerasWatch:
    """The tracker side of a Keras run: feed probe batches, close windows, make the report."""

    def __init__(self, model: Any, *, window: int, thresholds: Thresholds | None = None) -> None:
        self.probe = KerasProbe(model)
        self.model = model
        self.thresholds = thresholds or Thresholds()
        self.summarizer = Summarizer()
        self.tracker = Tracker(window, 1, summarize=self.summarizer.window)
        self._states: dict[str, Any] = {}
        #: The layer whose kernel feeds each watched layer, by the watched layer's name.
        self.producers = {w.site.name: p for w in self.probe.watched if (p := _producer(w))}
        for watched in self.probe.watched:
            if watched.site.name in self.producers:
                producer = self.producers[watched.site.name].name
                watched.site = dataclasses.replace(watched.site, producer=producer)
        #: The weights' facts when watching started (init scale, zero weights, bias signs).
        self.layer_facts = [
            weight_facts(layer.name, type(layer).__name__, units_first(layer.kernel), _bias(layer))
            for layer in _weighted_layers(model)
        ]
        self._gradients: Any = None

    def _kernel_gradients(self, batch: Any, targets: Any) -> list[Any]:
        """Gradient of the compiled loss on one batch for each producer's kernel (traced)."""
        import tensorflow as tf

        kernels = [layer.kernel for layer in self.producers.values()]
        with tf.GradientTape() as tape:
            predictions = self.model(batch, training=False)
            loss = self.model.compute_loss(x=batch, y=targets, y_pred=predictions, training=False)
        return tape.gradient(loss, kernels)

    def observe(self, batch: Any, targets: Any = None) -> None:
        """Count one probe batch (pre-activations and outputs of every watched layer); with
        ``targets``, also the gradient of the compiled loss on it for each layer's weights."""
        if self.tracker.wants_model_input():
            inputs = torch.from_numpy(_array(batch))
            if inputs.dim() >= 4:  # channels last -> channels first, as the input facts read it
                inputs = inputs.movedim(-1, 1)
            self.tracker.observe_model_input(inputs)
        results, output = self.probe.run(batch)
        if output is not None:
            self.tracker.observe_model_output(torch.from_numpy(output))
        for watched, (pre, out) in zip(self.probe.watched, results, strict=True):
            name = watched.site.name
            pre_t, out_t = torch.from_numpy(pre), torch.from_numpy(out)
            if name not in self._states:
                site = watched.site
                if site.unit_dim < 0:
                    site = dataclasses.replace(site, unit_dim=max(pre.ndim - 1, 0))
                self._states[name] = self.tracker.new_layer(site, pre_t)
            state = self._states[name]
            if state is None:
                continue
            self.tracker.observe_input(state, pre_t)
            self.tracker.observe_output(state, out_t)
        if targets is not None:
            self._observe_gradients(batch, targets)

    def _observe_gradients(self, batch: Any, targets: Any) -> None:
        import tensorflow as tf

        if not self.producers:
            return
        if self._gradients is None:
            self._gradients = tf.function(self._kernel_gradients, reduce_retracing=True)
        for name, grad in zip(self.producers, self._gradients(batch, targets), strict=True):
            state = self._states.get(name)
            if grad is None or state is None:
                continue
            self.tracker.observe_weight_gradient(state, units_first(grad))

    def observe_updates(self, ratios: dict[str, float]) -> None:
        """Count one step's update-to-weight ratio of each watched layer's kernel."""
        for name, ratio in ratios.items():
            state = self._states.get(name)
            if state is not None:
                self.tracker.observe_update_ratio(state, ratio)

    def _read_biases(self) -> None:
        """Give each watched layer fed directly by a biased kernel that kernel and bias, as
        they are now, so its dead units held below 0 by the bias can be told apart."""
        for name, producer in self.producers.items():
            state = self._states.get(name)
            bias = _bias(producer)
            if state is not None and bias is not None:
                self.tracker.read_producer(state, units_first(producer.kernel), bias)

    def report(self) -> Report:
        meta: dict[str, Any] = {"model": self.model.name, "framework": "keras"}
        keras = keras_module()
        meta["keras"] = keras.__version__
        if self.probe.skipped:
            meta["not_watched"] = dict(self.probe.skipped)
        self._read_biases()
        facts = _facts(self.model, self.tracker, self.layer_facts)
        observations = observe(self.tracker, self.summarizer, facts)
        settings = {**self.tracker.settings(), **self.summarizer.settings()}
        return build_report(observations, self.thresholds, {**meta, **settings})


def scan_keras(
    model: Any, data: Any, *, batch_size: int = 256, thresholds: Thresholds | None = None
) -> Report:
    """Run ``model`` over ``data`` (an array, or an iterable of batches or (x, y) pairs) and
    report its dead units; ``rd.scan`` calls this for Keras models."""
    watch = KerasWatch(model, window=sys.maxsize, thresholds=thresholds)
    if isinstance(data, np.ndarray) or hasattr(data, "numpy"):
        data = np.asarray(data)
        batches: Any = (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    else:
        batches = data
    seen = 0
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        watch.observe(batch)
        seen += 1
    if not seen:
        raise InputError("rd.scan got no batch of data for the Keras model")
    watch.tracker.step()
    report = watch.report()
    report.meta["source"] = "scan"
    return report


@functools.cache
def doctor_callback_class() -> type:
    keras = keras_module()

    class DoctorCallback(keras.callbacks.Callback):
        """Watch a Keras ``model.fit``: at the first training batch and every ``every``
        batches after it, count each watched unit on that training batch (or, with
        ``probe_data``, on the probe set), measure the compiled loss's gradient for the
        weights feeding each watched layer (on the training batch, or on the probe set when
        ``probe_targets`` are given) and each step's update-to-weight ratio; windows of
        ``window`` batches. With ``log_dir`` (it may be the one given to
        ``keras.callbacks.TensorBoard``), the windows are written there as TensorBoard
        scalars, histograms and findings, as ``rd.watch(log_dir=...)`` does.

        During ``fit`` the model's ``train_step`` is wrapped to keep the sampled batches and
        update ratios (see :mod:`reludoctor.keras.tap`); it is restored when ``fit`` ends.
        ``callback.report()`` gives the :class:`~reludoctor.report.report.Report`.

        Example:
            >>> import numpy as np, keras
            >>> from reludoctor.keras import DoctorCallback
            >>> x = np.random.rand(256, 4).astype("float32")
            >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "relu"),
            ...                           keras.layers.Dense(1)])
            >>> model.compile("adam", "mse")
            >>> doctor = DoctorCallback(every=2, window=4)
            >>> _ = model.fit(x, x[:, :1], epochs=1, batch_size=32, verbose=0,
            ...               callbacks=[doctor])
            >>> doctor.report().layers[0].units
            8
        """

        def __init__(
            self,
            probe_data: Any = None,
            probe_targets: Any = None,
            *,
            every: int = 50,
            window: int = 100,
            thresholds: Thresholds | None = None,
            log_dir: str | os.PathLike[str] | None = None,
        ) -> None:
            super().__init__()
            # Keras may then run on_train_batch_end on a worker thread, beside the next steps
            # (no sync of the loss each step); the lock keeps the tracker to one caller.
            self.async_safe = True
            self._lock = threading.Lock()
            every, window = positive_int(every, "every"), positive_int(window, "window")
            if probe_data is None and probe_targets is not None:
                raise ValueError(
                    "DoctorCallback got probe_targets without probe_data: pass both, or neither "
                    "to watch the training batches"
                )
            self.probe_data = None if probe_data is None else _array(probe_data)
            self.probe_targets = None if probe_targets is None else np.asarray(probe_targets)
            self.every = every
            self.window = window
            self.thresholds = thresholds
            self.log_dir = log_dir
            self.tensorboard: TensorBoardLog | None = None
            self.watch: KerasWatch | None = None
            self._tap: TrainStepTap | None = None
            self._begun = 0

        def _sampled(self, step: int) -> bool:
            return step == 1 or step % self.every == 0

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            on_batches = self.probe_data is None
            if on_batches and getattr(self.model, "jit_compile", False) is True:
                raise InputError(
                    f"DoctorCallback cannot keep training batches of {self.model.name!r}: it is "
                    "compiled with XLA (jit_compile=True), where a kept batch cannot change "
                    "shape; compile with jit_compile=False, or pass probe_data="
                )
            self.watch = KerasWatch(self.model, window=self.window, thresholds=self.thresholds)
            self.watch.tracker.learning_rate = self._learning_rate
            if self.log_dir is not None:
                self.tensorboard = TensorBoardLog(self.log_dir)
                self.watch.tracker.on_window.append(self.tensorboard.write_window)
            kernels = {name: layer.kernel for name, layer in self.watch.producers.items()}
            tap = self._tap
            same = tap is not None and tap.model is self.model
            if not (same and _ids(tap.kernels) == _ids(kernels)):
                self._tap = tap = TrainStepTap(self.model, kernels, keep_batches=on_batches)
            tap.install()
            self._begun = 0
            if not on_batches:
                self.watch.observe(self.probe_data, self.probe_targets)

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            if self._tap is not None:
                self._tap.remove()
            if self.tensorboard is not None:
                self.tensorboard.close(self.report())

        def _learning_rate(self) -> float | None:
            rate = getattr(getattr(self.model, "optimizer", None), "learning_rate", None)
            try:
                return float(rate) if rate is not None else None
            except (TypeError, ValueError):  # a schedule object
                return None

        def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            assert self._tap is not None
            self._begun += 1
            if self._sampled(self._begun):
                self._tap.arm()

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            assert self.watch is not None and self._tap is not None
            loss = (logs or {}).get("loss")
            with self._lock:
                tracker = self.watch.tracker
                # the n-th call to get here takes the n-th step's reading: Keras may run these
                # calls out of order, but step n has finished before n calls have started
                sampled = self._sampled(tracker.steps + 1)
                if sampled:  # counted in the step's window, as a forward is on PyTorch
                    reading = self._tap.take()
                    if self.probe_data is None:
                        self.watch.observe(reading.x, reading.y)
                    else:
                        self.watch.observe(self.probe_data, self.probe_targets)
                    self.watch.observe_updates(reading.update_ratios)
                tracker.step(float(loss) if loss is not None else None)

        def report(self) -> Report:
            """The report so far (the last window and the open one, and the history)."""
            if self.watch is None:
                raise RuntimeError("DoctorCallback.report(): the model has not been fit yet")
            return self.watch.report()

    return DoctorCallback
