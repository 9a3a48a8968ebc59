"""Loading checkpoints and probe data for ``reludoctor scan``, safely by default.

Every pickle-based file is read with ``torch.load(weights_only=True)``. A file that would run
code when loaded is refused unless the caller trusts it: a whole pickled module, or a
torch.export archive with a member ``torch.export.load`` would unpickle in full or a program
holding strings it would evaluate as Python (see :func:`_code_in_export`).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import json
import logging
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reludoctor.errors import InputError, UntrustedFileError, first_line

#: Keys under which training scripts commonly nest a state dict inside a checkpoint.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")

#: What follows the description of a file that could run code when loaded.
_RUNS_CODE = (
    "and loading it could run arbitrary code. If you made it or trust its source, pass --trust"
)


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
        return _from_export(path, trust)
    if _is_torchscript(path):
        return _from_torchscript(path, example)
    if not _is_torch_file(path):
        raise InputError(
            f"{path} is not a PyTorch file (neither a torch.save zip archive nor a pickle): "
            "give a state dict saved with torch.save, a torch.export program (.pt2) or a "
            "TorchScript archive"
        )
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        raise UntrustedFileError(
            f"{path} holds pickled Python objects (a whole saved module, say), {_RUNS_CODE}; "
            "better, save model.state_dict() or a torch.export program (.pt2) instead."
        ) from error
    except Exception as error:
        raise InputError(f"cannot read {path} as a PyTorch file: {first_line(error)}") from error
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
        # torch lists missing keys, unexpected keys and size mismatches one to a line
        details = "; ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip())
        raise InputError(
            f"the state dict in {path} does not fit the model from {factory}: "
            f"{details or first_line(error)}"
        ) from error
    return model


def build_from_factory(spec: str) -> nn.Module:
    """Call ``package.module:function`` and check that it returns a module.

    The current directory is importable while it runs, as under ``python -m``, so the
    ``reludoctor`` command finds a factory in a local file too.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"--model must look like package.module:function, got {spec!r}")
    with _current_directory_importable():
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # ImportError, or anything the module raises on import
            raise InputError(
                f"cannot import {module_name!r} for --model: {type(error).__name__}: "
                f"{first_line(error)}"
            ) from error
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise InputError(f"{module_name!r} has no function {attr!r} for --model")
        try:
            inspect.signature(factory).bind()
        except TypeError:
            raise InputError(
                f"--model {spec} needs arguments {inspect.signature(factory)}: give a function "
                "that takes none and returns the model"
            ) from None
        except ValueError:  # a builtin without a signature: calling it will tell
            pass
        try:
            model = factory()
        except Exception as error:
            raise InputError(
                f"--model {spec} raised {type(error).__name__}: {first_line(error)}"
            ) from error
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
        raise InputError(f"cannot read probe data from {path}: {first_line(error)}") from error
    if isinstance(content, dict):
        content = _pick(content, key, path)
    elif isinstance(content, (tuple, list)) and content and isinstance(content[0], torch.Tensor):
        content = content[0]
    if not isinstance(content, torch.Tensor):
        raise InputError(f"{path} holds {type(content).__name__}, not a tensor of probe inputs")
    if content.layout != torch.strided:
        raise InputError(
            f"the probe data in {path} is a {content.layout} tensor; save a dense one "
            "(tensor.to_dense())"
        )
    return content


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
    """``path`` if it is a non-empty file; else an error saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"the {what} file {path} is a directory: give a file")
    if not path.exists():
        raise InputError(f"the {what} file {path} does not exist")
    if not path.is_file():
        raise InputError(f"the {what} file {path} is not a regular file")
    if path.stat().st_size == 0:
        raise InputError(f"the {what} file {path} is empty")
    return path


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` starts like something ``torch.save`` writes: a zip archive, or a
    pickle (the legacy format)."""
    with path.open("rb") as file:
        return zipfile.is_zipfile(file) or file.read(1) == pickle.PROTO


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise InputError(f"{path} is a damaged zip archive ({error}): save it again") from error
    return any(name.split("/", 2)[1:2] == ["code"] for name in names)


@contextlib.contextmanager
def _current_directory_importable() -> Iterator[None]:
    """Put the current directory first on ``sys.path`` (as ``python -m`` does) for a while."""
    cwd = os.getcwd()
    if "" in sys.path or cwd in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def _from_torchscript(path: Path, example: torch.Tensor | None) -> nn.Module:
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, and we say what to use
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise InputError(
            f"{path} is not a readable TorchScript archive: {first_line(error)}"
        ) from error
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


# -- torch.export archives ---------------------------------------------------------------


def _from_export(path: Path, trust: bool) -> nn.Module:
    """The module of the torch.export program in ``path``, inspected first unless trusted.

    The file is read once, so what is loaded is what was inspected."""
    data = path.read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise InputError(
            f"{path} is not a torch.export program: it is not a zip archive (write one with "
            "torch.export.save)"
        )
    runs_code = _code_in_export(data, path)
    if runs_code and not trust:
        shown = ", ".join(runs_code[:3]) + (
            f" and {len(runs_code) - 3} more" if len(runs_code) > 3 else ""
        )
        raise UntrustedFileError(
            f"{path} holds what torch.export.load would unpickle or run as Python ({shown}), "
            f"{_RUNS_CODE}."
        )
    try:
        with _quiet_export_logs():
            return torch.export.load(io.BytesIO(data)).module()
    except Exception as error:  # torch raises many kinds here
        raise InputError(
            f"{path} is not a readable torch.export program: {first_line(error)}"
        ) from error


@contextlib.contextmanager
def _quiet_export_logs() -> Iterator[None]:
    """Keep ``torch.export.load``'s warnings (whole tracebacks, some of them) from the user:
    a failure is reported as one line by the caller."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _code_in_export(data: bytes, path: Path) -> list[str]:
    """What in a torch.export archive (``data``) would run code when ``torch.export.load``
    reads it and ``.module()`` builds the module, found without unpickling or evaluating
    anything. Mirrors torch 2.13's loader (``torch.export.pt2_archive._package.load_pt2`` and
    its fallback to the older format in ``torch.export.load``):

    - members unpickled in full: weights and constants marked ``use_pickle``, custom and
      opaque objects among the constants, and any ``.pt`` member (sample inputs, weights and
      constants of older archives) that ``torch.load(weights_only=True)`` would refuse, since
      torch then retries with ``weights_only=False``;
    - compiled AOTInductor code, which is loaded as a shared library;
    - strings in a program's JSON that become Python: symbolic expressions (``sympify``
      evaluates them), guards (compiled into the module) and names (placed into its
      generated code). Anything that is not plain arithmetic on shapes or a plain name counts.
    """
    from torch.export.pt2_archive import PT2ArchiveReader
    from torch.export.pt2_archive import constants as c

    found: list[str] = []
    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
    except (RuntimeError, AssertionError):  # no archive_format: perhaps the older format
        reader = None
    if reader is not None:
        names = reader.get_file_names()
        found += [name for name in names if name.startswith(c.AOTINDUCTOR_DIR)][:1]
        prefix, suffix = c.MODELS_FILENAME_FORMAT.split("{}")
        for name in names:
            if not name.startswith(c.MODELS_DIR):
                continue
            found += _code_in_program(reader.read_bytes(name), name)
            model = name[len(prefix) : -len(suffix)]
            for member in (
                c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model),
                f"{c.WEIGHTS_DIR}{model}.pt",
                f"{c.CONSTANTS_DIR}{model}.pt",
            ):
                if member in names and not _only_tensors(reader.read_bytes(member)):
                    found.append(member)
            for config, directory, kind in (
                (c.WEIGHTS_CONFIG_FILENAME_FORMAT, c.WEIGHTS_DIR, ""),
                (
                    c.CONSTANTS_CONFIG_FILENAME_FORMAT,
                    c.CONSTANTS_DIR,
                    c.TENSOR_CONSTANT_FILENAME_PREFIX,
                ),
            ):
                config = config.format(model)
                if config in names:
                    found += _pickled_payloads(reader.read_bytes(config), config, directory, kind)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            older = "version" in archive.namelist()
            for member in archive.infolist() if older else ():
                if member.filename == "serialized_exported_program.json":
                    found += _code_in_program(archive.read(member), member.filename)
                elif member.filename in _OLDER_PICKLED_MEMBERS and not _only_tensors(
                    archive.read(member)
                ):
                    found.append(member.filename)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as error:
        raise InputError(f"{path} is a damaged zip archive ({error}): save it again") from error
    if reader is None and not older:
        raise InputError(
            f"{path} is a zip archive but not a torch.export program (write one with "
            "torch.export.save)"
        )
    return found


#: Members of the older (torch 2.7) export format that torch.export.load passes to torch.load.
_OLDER_PICKLED_MEMBERS = frozenset(
    f"serialized_{name}"
    for name in (
        "state_dict.pt",
        "state_dict.json",
        "constants.pt",
        "constants.json",
        "example_inputs.pt",
    )
)


def _only_tensors(member: bytes) -> bool:
    """Whether ``member`` (written by ``torch.save``) loads with ``weights_only=True``: every
    global its pickle names is allowed there. Read by disassembly, never unpickled."""
    if not member:
        return True  # torch reads an empty member as {}
    try:
        return not torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(member))
    except Exception:  # not a torch.save archive, or opcodes weights_only refuses
        return False


def _pickled_payloads(config: bytes, name: str, directory: str, tensor_prefix: str) -> list[str]:
    """Members named in a weights or constants config that torch unpickles in full."""
    try:
        entries = json.loads(config)["config"]
        return [
            directory + str(entry["path_name"])
            for entry in entries.values()
            if entry.get("use_pickle") or not str(entry["path_name"]).startswith(tensor_prefix)
        ]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return [f"{name}, unreadable"]


#: A plain name: a Python identifier, a dotted path, a number or a version.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.+-]*")
#: Where a program's JSON holds free text that torch never turns into code (node metadata).
_FREE_TEXT_KEYS = frozenset({"metadata"})
#: Strings in a program's JSON that torch evaluates as Python expressions.
_EXPRESSION_KEYS = frozenset({"expr_str", "guards_code", "range_constraints"})
#: Functions a symbolic expression or a guard may call: sympy's constructors and torch's
#: own sympy functions (what ``torch.export.save`` writes), and Python's arithmetic.
_CALLS = frozenset(
    {
        *("Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min"),
        *("Abs", "floor", "ceiling", "sqrt", "Piecewise", "ExprCondPair"),
        *("Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not"),
        *("StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan"),
        *("Equality", "Unequality", "max", "min", "abs", "int", "float"),
        *("FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt"),
        *("FloorToInt", "CeilDiv", "IntTrueDiv", "FloatTrueDiv", "LShift", "RShift"),
        *("IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt"),
        *("RoundDecimal", "ToFloat", "FloatPow", "PowByNatural", "Identity"),
    }
)
#: Other names an expression may use: guards' inputs (``L['x']``), ``math`` and constants.
_NAMES = _CALLS | {"L", "math", "oo", "zoo", "nan", "inf", "true", "false"}
#: A symbol of torch's shape environment: ``s0``, ``u3``, ``ps12``...
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
#: Methods a guard may call on an input.
_SHAPE_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
#: Syntax of arithmetic and comparisons (names, calls and attributes are checked apart).
_ARITHMETIC = (
    ast.Expression,
    ast.BoolOp,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.IfExp,
    ast.Subscript,
    ast.Tuple,
    ast.keyword,
    ast.boolop,
    ast.operator,
    ast.unaryop,
    ast.cmpop,
    ast.expr_context,
)


def _code_in_program(raw: bytes, name: str) -> list[str]:
    """``name`` if the program JSON ``raw`` holds a string that is more than a plain name or
    plain arithmetic where torch turns strings into code."""
    try:
        program = json.loads(raw)
        plain = all(_plain_strings(program))
    except (ValueError, RecursionError):
        return [f"{name}, unreadable"]
    return [] if plain else [f"Python code in {name}"]


def _plain_strings(value: Any, key: str | None = None, free: bool = False) -> Iterator[bool]:
    """For every string in a program's JSON (keys too), whether it is plain. Under ``free``
    (node metadata: stack traces and such) only expressions are checked."""
    if isinstance(value, dict):
        for k, v in value.items():
            if key in _EXPRESSION_KEYS:
                yield _plain_expression(k)
            elif not free:
                yield _plain_text(k)
            yield from _plain_strings(v, k, free or k in _FREE_TEXT_KEYS)
    elif isinstance(value, list):
        for item in value:
            yield from _plain_strings(item, key, free)
    elif isinstance(value, str):
        if key in _EXPRESSION_KEYS:
            yield _plain_expression(value)
        elif not free:
            yield _plain_text(value)


def _plain_text(text: str) -> bool:
    """A plain name, or JSON (a pytree spec) whose strings are all plain names."""
    if _PLAIN_NAME.fullmatch(text):
        return True
    try:
        return all(_plain_strings(json.loads(text)))
    except (ValueError, RecursionError):
        return False


def _plain_expression(text: str) -> bool:
    """Arithmetic on symbols and input shapes, calling only sympy's and torch's shape
    functions, with no attribute but a shape method or ``math``'s, and no string that is not a
    plain name: nothing that reaches Python's internals when evaluated."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if not (isinstance(func, ast.Name) and func.id in _CALLS) and not isinstance(
                func, ast.Attribute
            ):
                return False
        elif isinstance(node, ast.Attribute):
            on_math = isinstance(node.value, ast.Name) and node.value.id == "math"
            if node.attr not in _SHAPE_METHODS and not (on_math and node.attr.isalnum()):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in _NAMES and not _SYMBOL.fullmatch(node.id):
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not _PLAIN_NAME.fullmatch(node.value):
                return False
            if isinstance(node.value, bytes):
                return False
        elif not isinstance(node, _ARITHMETIC):
            return False
    return True


def exported_batch_size(model: nn.Module) -> int | None:
    """The batch size a ``torch.export`` graph was exported for, when its first input's
    leading dimension is fixed (a plain number, not a symbol); None otherwise."""
    if not isinstance(model, torch.fx.GraphModule):
        return None
    for node in model.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            shape = getattr(value, "shape", None)
            if shape and isinstance(shape[0], int):
                return int(shape[0])
            return None
    return None
