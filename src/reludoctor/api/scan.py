"""``rd.scan``: dead units of a saved or trained model, measured on probe data."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from reludoctor.api.monitor import Monitor
from reludoctor.checks import positive_int, require_module
from reludoctor.diagnose.thresholds import Thresholds
from reludoctor.errors import InputError, first_line
from reludoctor.report.report import Report

DEFAULT_BATCH_SIZE = 256


def scan(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    thresholds: Thresholds | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Report:
    """Run ``model`` over ``data`` in eval mode under ``no_grad`` and report its dead units.

    Args:
        model: the model to examine (a torch ``nn.Module``, or a built Keras model: see
            :mod:`reludoctor.keras`); its training mode is restored afterwards.
        data: a tensor or numpy array (split into batches of ``batch_size``), a ``DataLoader``
            or any iterable of batches. A batch that is a tuple or list contributes its first
            element (``(inputs, targets)``); a dict is passed as keyword arguments.
        batch_size: batch size used to split a tensor or array.
        thresholds: overrides for the rules' thresholds.
        on_batch: called with the number of samples in each batch once it has run
            (e.g. to advance a progress bar).

    Example:
        >>> import torch, reludoctor as rd
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = model[0].bias.fill_(-1e4)
        >>> rd.scan(model, torch.randn(100, 4)).layers[0].dead
        3
    """
    if "keras" in sys.modules:  # a Keras model can only exist once Keras is imported
        from reludoctor.keras.watch import is_keras_model, scan_keras

        if is_keras_model(model):
            return scan_keras(model, data, batch_size=batch_size, thresholds=thresholds)
    model = require_module(model, "rd.scan")
    batch_size = positive_int(batch_size, "batch_size")
    device, dtype = _model_device_and_dtype(model)
    was_training = model.training
    _set_training(model, False)
    doc = Monitor(model, window=sys.maxsize, sample_every=1, count_eval=True, thresholds=thresholds)
    batches = samples = first_size = 0
    try:
        with torch.no_grad():
            for batch in _batches(data, batch_size):
                args, kwargs = _to_model(batch, device, dtype)
                size = _batch_len(args, kwargs)
                if size == 0:
                    continue
                try:
                    model(*args, **kwargs)
                except (
                    RuntimeError,
                    ValueError,
                    TypeError,
                    IndexError,
                    AssertionError,
                    NotImplementedError,
                ) as error:
                    if batches == 0:
                        raise InputError(_shape_message(model, args, kwargs, error)) from error
                    raise InputError(
                        _later_batch_message(model, batches + 1, first_size, size, error)
                    ) from error
                first_size = first_size or size
                doc.step()  # each batch is a step: a finding can name the batch it saw
                batches += 1
                samples += size
                if on_batch is not None:
                    on_batch(size)
        if samples == 0:
            raise InputError("the probe data is empty: give at least one batch of inputs")
        report = doc.report()
    finally:
        doc.close()
        _set_training(model, was_training)
    report.meta.update({"mode": "scan", "batches": batches, "samples": samples})
    return report


def _set_training(model: nn.Module, training: bool) -> None:
    # a torch.export graph keeps the mode it was exported in
    with contextlib.suppress(NotImplementedError):
        model.train(training)


def _model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device, None
    return torch.device("cpu"), None


def _batches(data: Any, batch_size: int) -> Iterator[Any]:
    if isinstance(data, np.ndarray):
        if data.dtype == object:
            raise InputError("the probe data is a numpy array of Python objects; give numbers")
        data = torch.from_numpy(np.ascontiguousarray(data))
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise InputError("the probe data is a single number; give a batch of inputs")
        if data.layout != torch.strided:
            raise InputError(
                f"the probe data is a {data.layout} tensor; give a dense one (tensor.to_dense())"
            )
        # a batch size beyond the data means one batch (and beyond int64 torch cannot split)
        yield from data.split(min(batch_size, max(len(data), 1)))
        return
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise InputError(
            f"cannot read probe data of type {type(data).__name__}: give a tensor, a numpy "
            "array, a DataLoader or an iterable of batches"
        )
    yield from data


def _to_model(batch: Any, device: torch.device, dtype: torch.dtype | None) -> tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), {k: _convert(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputError("a batch of the probe data is empty")
        batch = batch[0]
    return (_convert(batch, device, dtype),), {}


def _convert(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and dtype is not None and value.dtype != dtype:
            value = value.to(dtype)
        return value.to(device)
    return value


def _batch_len(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    return 1


def _expected_input(model: nn.Module) -> str | None:
    """What the first weighted layer expects, in words, for error messages."""
    for name, module in model.named_modules():
        label = f"its first layer `{name}` ({type(module).__name__})"
        if isinstance(module, nn.Linear):
            return f"{label} expects inputs of shape (batch, ..., {module.in_features})"
        if isinstance(module, nn.modules.conv._ConvNd):
            dims = {1: "L", 2: "H, W", 3: "D, H, W"}[len(module.kernel_size)]
            return f"{label} expects inputs of shape (batch, {module.in_channels}, {dims})"
        if isinstance(module, nn.Embedding):
            return f"{label} expects integer indices below {module.num_embeddings}"
    return None


def _shape_message(model: nn.Module, args: tuple, kwargs: dict, error: Exception) -> str:
    given = [
        f"{tuple(v.shape)} ({str(v.dtype).removeprefix('torch.')})"
        for v in (*args, *kwargs.values())
        if isinstance(v, torch.Tensor)
    ]
    said = first_line(error)
    expected = _expected_input(model)
    parts = [
        f"{type(model).__name__} cannot run on the probe data: a batch has shape "
        f"{', '.join(given) or 'of no tensor'}",
    ]
    if expected:
        parts.append(f"but {expected}")
    return "; ".join(parts) + f" (PyTorch said: {said})"


def _later_batch_message(
    model: nn.Module, number: int, first_size: int, size: int, error: Exception
) -> str:
    """Why batch ``number`` failed after the first ran, and what to do."""
    said = f"(PyTorch said: {first_line(error)})"
    name = type(model).__name__
    if size != first_size:
        return (
            f"{name} ran on batches of {first_size} samples but not on batch {number}, of "
            f"{size} {said}; a model exported with a fixed batch size takes only that size: "
            f"give a number of samples that is a multiple of --batch-size {first_size}, or "
            "export it with a dynamic batch dimension"
        )
    return f"{name} cannot run on batch {number} of the probe data {said}"
