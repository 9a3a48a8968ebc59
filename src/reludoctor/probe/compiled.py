"""What ``torch.compile`` left on a model: whether it is compiled, how, and the module it
compiles."""

from __future__ import annotations

from typing import Any

from torch import nn


def compiled_module(model: nn.Module) -> nn.Module:
    """The module ``torch.compile``'s wrapper compiles (``model`` itself otherwise)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _compile_contexts(model: nn.Module) -> list[Any]:
    """What ``torch.compile`` keeps of how ``model`` (its wrapper, or compiled in place) is
    compiled: its options, when they can be found."""
    contexts = [getattr(model, "dynamo_ctx", None)]
    call = getattr(model, "_compiled_call_impl", None)
    for cell in getattr(call, "__closure__", None) or ():
        try:
            contexts.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return [c for c in contexts if hasattr(c, "fullgraph")]


def compiled_fullgraph(model: nn.Module) -> bool:
    """Whether ``model`` is compiled (its wrapper, or in place) with ``fullgraph=True``."""
    return any(c.fullgraph is True for c in _compile_contexts(model))


def compiled_backend(model: nn.Module) -> str | None:
    """The name of the backend ``model`` is compiled with, when it can be found."""
    for context in _compile_contexts(model):
        backend = getattr(context, "callback", None)
        while hasattr(backend, "_torchdynamo_orig_backend"):
            backend = backend._torchdynamo_orig_backend
        name = getattr(backend, "compiler_name", None) or getattr(backend, "__name__", None)
        if isinstance(name, str):
            return name
    return None


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile``'s wrapper or was compiled in place
    (``model.compile()``)."""
    return compiled_module(model) is not model or (
        getattr(model, "_compiled_call_impl", None) is not None
    )
