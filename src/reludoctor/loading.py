"""Loading checkpoints and probe data for ``reludoctor scan``, safely by default.

Every pickle-based file is read with ``torch.load(weights_only=True)``; a file that would run
code when unpickled (e.g. a whole pickled module) is refused unless the caller trusts it.
"""

from __future__ import annotations

import importlib
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reludoctor.errors import InputError, UntrustedFileError

#: Keys under which training scripts commonly nest a state dict inside a checkpoint.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def load_model(
    path: str | Path,
    *,
    factory: str | None = None,
    trust: bool = False,
    example: torch.Tensor | None = None,
) -> nn.Module:
    """A module from a ``torch.export`` program (.pt2), a TorchScript archive, or a state dict.

    A state dict needs ``factory`` ("package.module:function", called with no arguments, that
    returns the model to load it into). A TorchScript archive is converted to an exported
    program so its activations can be watched; that needs ``example`` inputs.
    """
    path = _existing(path, "model")
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module()
        except Exception as error:  # torch raises many kinds here
            raise InputError(f"{path} is not a readable torch.export program: {error}") from error
    if _is_torchscript(path):
        return _from_torchscript(path, example)
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        raise UntrustedFileError(
            f"{path} holds pickled Python objects (a whole saved module, say), and loading it "
            "could run arbitrary code. If you made it or trust its source, pass --trust; "
            "better, save model.state_dict() or a torch.export program (.pt2) instead."
        ) from error
    except Exception as error:
        raise InputError(f"cannot read {path} as a PyTorch file: {error}") from error
    if isinstance(content, nn.Module):
        return content
    state = _state_dict_of(content, path)
    if factory is None:
        raise InputError(
            f"{path} is a state dict (weights only); say which model to load it into with "
            "--model package.module:function, a function that returns the model"
        )
    model = build_from_factory(factory)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(
            f"the state dict in {path} does not fit the model from {factory}: {first}"
        ) from error
    return model


def build_from_factory(spec: str) -> nn.Module:
    """Call ``package.module:function`` and check that it returns a module."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"--model must look like package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"cannot import {module_name!r} for --model: {error}") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"{module_name!r} has no function {attr!r} for --model")
    model = factory()
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_probe_data(path: str | Path, *, key: str | None = None) -> torch.Tensor:
    """Probe inputs from a .npy or .npz file, or a tensor saved with ``torch.save``."""
    path = _existing(path, "probe data")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return torch.from_numpy(_pick(dict(archive), key, path))
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UntrustedFileError(
            f"{path} holds pickled Python objects; probe data must be plain arrays or tensors "
            "(.npy, .npz, or a tensor saved with torch.save)"
        ) from error
    except ValueError as error:
        raise InputError(f"cannot read probe data from {path}: {error}") from error
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"cannot read probe data from {path}: {error}") from error
    if isinstance(content, torch.Tensor):
        return content
    if isinstance(content, dict):
        return _pick(content, key, path)
    if isinstance(content, (tuple, list)) and content and isinstance(content[0], torch.Tensor):
        return content[0]
    raise InputError(f"{path} holds {type(content).__name__}, not a tensor of probe inputs")


def _pick(arrays: dict[str, Any], key: str | None, path: Path) -> Any:
    if key is not None:
        if key not in arrays:
            raise InputError(f"{path} has no array {key!r}; it has {sorted(arrays)}")
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    for candidate in ("x", "inputs", "data"):
        if candidate in arrays:
            return arrays[candidate]
    raise InputError(f"{path} holds several arrays {sorted(arrays)}; choose one with --data-key")


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"the {what} file {path} does not exist")
    return path


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 2)[1:2] == ["code"] for name in archive.namelist())


def _from_torchscript(path: Path, example: torch.Tensor | None) -> nn.Module:
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, and we say what to use
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise InputError(f"{path} is not a readable TorchScript archive: {error}") from error
    if example is None:
        raise InputError("a TorchScript model needs probe data to be converted for watching")
    try:
        from torch._export.converter import TS2EPConverter

        return TS2EPConverter(scripted, (example,)).convert().module()
    except Exception as error:
        raise InputError(
            f"could not turn the TorchScript model in {path} into a graph whose activations can "
            f"be watched ({type(error).__name__}: {error}); save a state dict or a torch.export "
            "program (.pt2) instead"
        ) from error


def _state_dict_of(content: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(content, dict):
        for key in STATE_DICT_KEYS:
            nested = content.get(key)
            if isinstance(nested, dict) and nested:
                content = nested
                break
        if content and all(isinstance(v, torch.Tensor) for v in content.values()):
            return content
    raise InputError(
        f"{path} holds {type(content).__name__}, neither a model nor a state dict of tensors"
    )
