"""Remedies for Keras models: He or LeCun re-initialisation and activation swaps in place, and
batch norm insertion for ``keras.Sequential`` (a new model: Keras cannot insert layers into a
built one). Each returns a :class:`~reludoctor.fix.remedies.RemedyRecord` that can be undone.

After an in-place change the model's compiled functions are dropped, so the next ``fit``
traces the changed model.

    >>> import keras
    >>> from reludoctor.keras.remedies import kaiming_init
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
    ...                           keras.layers.Dense(1)])
    >>> kaiming_init(model).changed  # doctest: +ELLIPSIS
    ['dense...: He normal, fan_in, relu']
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reludoctor.catalogue.activations import KERAS_SWAP_KINDS, can_die
from reludoctor.fix.remedies import RemedyError, RemedyRecord
from reludoctor.keras.watch import activation_kind, flat_layers, keras_module

#: Activations :func:`swap_activation` can put in, by their Keras names (from
#: :mod:`reludoctor.catalogue.activations`).
KERAS_SWAP_TARGETS: tuple[str, ...] = KERAS_SWAP_KINDS


def _require_keras_model(model: Any, remedy: str) -> Any:
    keras = keras_module()
    if not isinstance(model, keras.Model):
        raise RemedyError(f"{remedy}: expected a Keras model, got {type(model).__name__}")
    if not model.built:
        raise RemedyError(f"{remedy}: the Keras model {model.name!r} is not built yet")
    return keras


def _save_weights(record: RemedyRecord, layer: Any) -> None:
    saved = [w.numpy().copy() for w in layer.weights]

    def restore() -> None:
        for variable, value in zip(layer.weights, saved, strict=True):
            variable.assign(value)

    record.on_undo(restore)


def _set_attribute(record: RemedyRecord, target: Any, name: str, value: Any) -> None:
    old = getattr(target, name)
    setattr(target, name, value)
    record.on_undo(lambda: setattr(target, name, old))


def _retrace(model: Any) -> None:
    """Drop the compiled train/test/predict functions: the next call traces the model anew."""
    for name in ("train_function", "test_function", "predict_function"):
        if hasattr(model, name):
            setattr(model, name, None)


def _weighted_with_activation(model: Any, keras: Any) -> list[tuple[Any, str, float]]:
    """(layer with a kernel, the activation kind after it, its negative slope)."""
    layers = list(flat_layers(model))
    found = []
    for i, layer in enumerate(layers):
        if getattr(layer, "kernel", None) is None:
            continue
        kind = activation_kind(layer, keras)
        following = layer
        if kind is None and i + 1 < len(layers):
            following = layers[i + 1]
            kind = activation_kind(following, keras)
        if kind is not None:
            slope = float(getattr(following, "negative_slope", 0.0) or 0.0)
            found.append((layer, kind[0], slope))
    return found


def kaiming_init(model: Any, *, mode: str = "fan_in", distribution: str = "normal") -> RemedyRecord:
    """He initialisation of every Dense/Conv layer followed by a ReLU-family activation (gain
    for a leaky slope included), biases set to 0; output layers are left alone."""
    keras = _require_keras_model(model, "kaiming_init")
    if mode not in ("fan_in", "fan_out") or distribution not in ("normal", "uniform"):
        raise RemedyError("kaiming_init: mode 'fan_in'/'fan_out', distribution 'normal'/'uniform'")
    record = RemedyRecord("kaiming_init", details={"mode": mode, "distribution": distribution})
    targets = _weighted_with_activation(model, keras)
    chosen = {id(layer) for layer, _, _ in targets}
    for layer, kind, slope in targets:
        _save_weights(record, layer)
        scale = 2.0 / (1.0 + slope**2)
        init = keras.initializers.VarianceScaling(
            scale=scale,
            mode=mode,
            distribution="untruncated_normal" if distribution == "normal" else "uniform",
        )
        layer.kernel.assign(init(layer.kernel.shape))
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(np.zeros(layer.bias.shape, "float32"))
        described = f"leaky_relu slope {slope:g}" if slope else kind
        record.changed.append(f"{layer.name}: He {distribution}, {mode}, {described}")
    for layer in flat_layers(model):
        if getattr(layer, "kernel", None) is not None and id(layer) not in chosen:
            record.skipped.append(f"{layer.name}: no ReLU-family activation follows it")
    if not record.changed:
        raise RemedyError("kaiming_init: no Dense/Conv layer is followed by a ReLU-family one")
    return record


def swap_activation(
    model: Any, to: str = "leaky_relu", *, negative_slope: float = 0.01
) -> RemedyRecord:
    """Replace every ReLU (a Dense/Conv ``activation=``, a ``ReLU`` or ``Activation`` layer) by
    ``to``, in place (``negative_slope`` for ``leaky_relu``, 0.01 as in the brief and PyTorch;
    a model saved afterwards needs it as a custom object). ``to="selu"`` also re-initialises
    the layers it now feeds with LeCun normal; a
    ``Dropout`` cannot be turned into ``AlphaDropout`` in place and is listed in ``skipped``
    (for a ``keras.Sequential``, :func:`selu_sequential` rebuilds it with both)."""
    keras = _require_keras_model(model, "swap_activation")
    if to not in KERAS_SWAP_TARGETS:
        raise RemedyError(
            f"swap_activation: unknown activation {to!r}; choose from "
            + ", ".join(KERAS_SWAP_TARGETS)
        )
    new = keras.activations.get(to)
    if to == "leaky_relu":

        def leaky_relu(x: Any) -> Any:
            return keras.activations.leaky_relu(x, negative_slope=negative_slope)

        new = leaky_relu
    record = RemedyRecord("swap_activation", details={"to": to})
    for layer in flat_layers(model):
        kind = activation_kind(layer, keras)
        if kind is None or not can_die(kind[0]):
            if to == "selu" and isinstance(layer, keras.layers.Dropout):
                record.skipped.append(
                    f"{layer.name}: Dropout stays (SELU wants AlphaDropout({layer.rate}); "
                    "rebuild the model with it)"
                )
            continue
        if isinstance(layer, keras.layers.ReLU):
            if to != "leaky_relu":
                record.skipped.append(f"{layer.name}: a ReLU layer can only become leaky in place")
                continue
            _set_attribute(record, layer, "negative_slope", negative_slope)
            _set_attribute(record, layer, "max_value", None)
        else:
            _set_attribute(record, layer, "activation", new)
        record.changed.append(f"{layer.name}: {kind[0]} -> {to}")
    if to == "selu":
        weighted = _weighted_with_activation(model, keras)
        for layer in (layer for layer, kind, _ in weighted if kind == "selu"):
            _save_weights(record, layer)
            layer.kernel.assign(keras.initializers.LecunNormal()(layer.kernel.shape))
            if getattr(layer, "bias", None) is not None:
                layer.bias.assign(np.zeros(layer.bias.shape, "float32"))
            record.changed.append(f"{layer.name}: LeCun normal weights")
    if not record.changed:
        raise RemedyError("swap_activation: no ReLU activation to swap in this model")
    _retrace(model)
    record.on_undo(lambda: _retrace(model), last=True)
    return record


def _compiled_like(new: Any, model: Any) -> Any:
    """``new`` compiled with ``model``'s loss and a fresh optimizer of the same settings."""
    if getattr(model, "optimizer", None) is not None and getattr(model, "loss", None):
        optimizer = type(model.optimizer).from_config(model.optimizer.get_config())
        new.compile(optimizer=optimizer, loss=model.loss)
    return new


def _require_sequential(model: Any, remedy: str, advice: str) -> Any:
    keras = _require_keras_model(model, remedy)
    if not isinstance(model, keras.Sequential):
        raise RemedyError(f"{remedy}: {model.name!r} is not a keras.Sequential; {advice}")
    return keras


def selu_sequential(model: Any) -> tuple[Any, RemedyRecord]:
    """A new ``keras.Sequential`` made for SELU, as the brief prescribes: every ReLU (fused or
    a layer) becomes SELU, the Dense/Conv layers feeding them get LeCun-normal weights and zero
    biases, and every ``Dropout`` becomes ``AlphaDropout`` of the same rate. The other layers
    are shared with ``model``; compiled like it, with a fresh optimizer."""
    keras = _require_sequential(
        model, "selu_sequential", "use swap_activation(model, 'selu') and AlphaDropout in its code"
    )
    record = RemedyRecord("selu_sequential")
    originals = list(model.layers)
    layers: list[Any] = [keras.Input(model.input_shape[1:])]
    for i, layer in enumerate(originals):
        kind = activation_kind(layer, keras)
        has_kernel = getattr(layer, "kernel", None) is not None
        followed = i + 1 < len(originals) and activation_kind(originals[i + 1], keras) is not None
        if isinstance(layer, keras.layers.Dropout):
            layers.append(keras.layers.AlphaDropout(layer.rate, name=f"{layer.name}_alpha"))
            record.changed.append(f"{layer.name}: Dropout({layer.rate}) -> AlphaDropout")
        elif has_kernel and (kind is not None or followed):
            config = layer.get_config() | {
                "name": f"{layer.name}_selu",
                "kernel_initializer": "lecun_normal",
                "bias_initializer": "zeros",
            }
            if kind is not None:
                config["activation"] = "selu"
            layers.append(type(layer).from_config(config))
            fused = ", selu" if kind is not None else ""
            record.changed.append(f"{layer.name}: LeCun normal weights{fused}")
        elif kind is not None:
            layers.append(keras.layers.Activation("selu", name=f"{layer.name}_selu"))
            record.changed.append(f"{layer.name}: {kind[0]} -> selu")
        else:
            layers.append(layer)
    if not any("selu" in change for change in record.changed):
        raise RemedyError("selu_sequential: no ReLU-family activation to turn into SELU")
    new = keras.Sequential(layers, name=f"{model.name}_selu")
    record.details["model"] = new.name
    return _compiled_like(new, model), record


def add_batch_norm(model: Any) -> tuple[Any, RemedyRecord]:
    """A new ``keras.Sequential`` with ``BatchNormalization`` between each Dense/Conv layer and
    its ReLU (fused activations are split out into an ``Activation`` layer); the other layers
    are shared with ``model`` (same weights). Compiled like ``model``, with a fresh optimizer
    of the same settings. A model that is not Sequential gets a clear error."""
    keras = _require_sequential(
        model,
        "add_batch_norm",
        "add keras.layers.BatchNormalization() before each activation in its code",
    )
    record = RemedyRecord("add_batch_norm")
    layers: list[Any] = [keras.Input(model.input_shape[1:])]
    originals = list(model.layers)
    for i, layer in enumerate(originals):
        kind = activation_kind(layer, keras)
        fused = kind is not None and getattr(layer, "kernel", None) is not None
        followed = i + 1 < len(originals) and activation_kind(originals[i + 1], keras) is not None
        if fused:
            config = layer.get_config() | {"activation": None, "name": f"{layer.name}_linear"}
            linear = type(layer).from_config(config)
            linear.build(layer.input.shape)
            linear.set_weights(layer.get_weights())
            layers += [
                linear,
                keras.layers.BatchNormalization(name=f"{layer.name}_batch_norm"),
                keras.layers.Activation(layer.activation, name=f"{layer.name}_activation"),
            ]
            record.changed.append(f"{layer.name}: Dense/Conv -> BatchNormalization -> activation")
        elif getattr(layer, "kernel", None) is not None and followed:
            layers += [layer, keras.layers.BatchNormalization(name=f"{layer.name}_batch_norm")]
            record.changed.append(f"{layer.name}: BatchNormalization after it")
        else:
            layers.append(layer)
    if not record.changed:
        raise RemedyError("add_batch_norm: no Dense/Conv layer is followed by a ReLU-family one")
    new = keras.Sequential(layers, name=f"{model.name}_batch_norm")
    record.details["model"] = new.name
    return _compiled_like(new, model), record
