"""Find rectifier-family activations in a model and route what they see to a tracker.

Activation modules (``nn.ReLU`` ...) and functional calls (``F.relu``, ``torch.relu``,
``Tensor.relu`` ...) are seen the same way: thin wrappers around the functional activations
record the input (the pre-activation) before calling the real function. The wrappers over
``torch.nn.functional`` and ``torch`` are swapped in for the watched model's first counted
forward and stay from then on while it is watched (a compiled graph traces them); they count
only calls from the thread running a watched forward (a per-thread stack of watched
forwards) and pass every other call straight through. ``Tensor.relu``/``relu_`` are swapped
for as long as any model is watched (changing a class costs every tensor method a cache miss,
so it is not done per forward). An
activation module is recognised by its ``forward`` being the caller, so it needs no hook of
its own. Graph modules from ``torch.export`` call ATen operators directly; for those a
``TorchFunctionMode`` is entered around the forward instead.

The watched forward is entered through an instance-level ``forward`` that wraps the class's
(cheaper than a pair of module hooks, and it runs its exit on any exception).

Each call site is one layer: an activation module by module (and which call of it within one
forward), a functional call by the module that made it, its source line and which call of that
line within one forward (so a loop over layers gives one layer per iteration).

Under ``torch.compile`` the same wrappers are traced into the graph: the first counted forward
runs uncompiled and records the order of its activation calls (the *plan*); a compiled forward
knows each call's layer by its place in that order, and its counts (the per-unit maximum,
fused with the activation; sampled statistics in a second variant) are tensor operations in
the graph on counters made beforehand. Nothing in that path reads a Python value that changes
between steps, so the compiler neither breaks the graph nor recompiles for it.
"""

from __future__ import annotations

import logging
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.compiler import is_compiling
from torch.overrides import TorchFunctionMode

from reludoctor.catalogue.activations import body_only
from reludoctor.probe.compiled import compiled_backend, compiled_fullgraph, compiled_module
from reludoctor.probe.targets import (
    ACTIVATION_MODULES,
    ADD_TARGETS,
    ATEN_NAMES,
    ATEN_TARGETS,
    CHANNEL_FIRST,
    FUNCTIONAL_TARGETS,
    PASS_THROUGH,
    TENSOR_TARGETS,
    activation_kind,
    is_activation_type,
)
from reludoctor.text import printable


@dataclass
class Site:
    """Where an activation runs, as found the first time it ran."""

    name: str
    kind: str
    via: str  # "module" or "functional"
    source: str | None
    producer: str | None
    unit_dim: int
    weight: torch.nn.Parameter | None
    bias: torch.nn.Parameter | None = None
    #: A normalisation layer (batch, group or layer norm with a learned shift) producing the
    #: activation's input, and whether it ran in eval mode (BatchNorm: running statistics).
    shift_source: nn.Module | None = None
    shift_in_eval: bool = False
    #: The activation runs on a reshaped view of its producer's output: the units are the
    #: producer's (the tracker counts the viewed tensor).
    follows_base: bool = False


class Sink:
    """What probes report to: a tracker implements these methods.

    ``sampling`` says whether outputs are wanted in the current step. An exception raised by
    reludoctor's own code while the user's forward or backward runs never reaches the user:
    it is passed to :meth:`fail`, and from then on nothing is counted.
    """

    sampling: bool = False
    #: Why watching stopped (an error of reludoctor's own), or None while it goes on.
    failure: str | None = None

    def fail(self, error: BaseException) -> None:
        """Stop counting after ``error`` (warned once); training goes on untouched."""
        if self.failure is not None:
            return
        self.failure = printable(f"{type(error).__name__}: {error}")
        message = (
            f"reludoctor stopped watching after an error of its own ({self.failure}); "
            "training goes on unwatched, and the report names what is missing"
        )
        try:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        except Warning:  # warnings are errors here (python -W error): still never raise
            logging.getLogger("reludoctor").error(message)

    def new_layer(self, site: Site, x: torch.Tensor) -> Any:
        """State for a newly seen call site, or None when it has nothing to measure."""
        raise NotImplementedError

    def observe_input(self, layer: Any, x: torch.Tensor) -> None:
        raise NotImplementedError

    def observe_output(self, layer: Any, out: torch.Tensor) -> None:
        """Called only while ``sampling``."""
        raise NotImplementedError

    def wants_model_input(self) -> bool:
        """Whether :meth:`observe_model_input` should see the next counted forward's input."""
        return False

    def observe_model_input(self, x: Any) -> None:
        """The first argument of a counted forward of the watched model."""

    def observe_model_output(self, out: Any) -> None:
        """What a counted forward returned; called only while ``sampling``."""


class _Swap:
    """A set of attributes swapped for wrappers and put back, reference-counted."""

    def __init__(self, targets: dict[tuple[Any, str], str], wrap: Callable[..., Any]) -> None:
        self.count = 0
        self.originals: dict[Any, dict[str, Any]] = {}
        self.wrappers: dict[Any, dict[str, Any]] = {}
        for (owner, attr), kind in targets.items():
            original = getattr(owner, attr)
            self.originals.setdefault(owner, {})[attr] = original
            self.wrappers.setdefault(owner, {})[attr] = wrap(original, kind)
        # Classes get setattr/delattr; modules a dict update (one C call, no cache flush).
        self.inherited = {
            owner: {a for a in attrs if a not in vars(owner)}
            for owner, attrs in self.originals.items()
        }

    def acquire(self) -> None:
        if self.count == 0:
            for owner, wrappers in self.wrappers.items():
                if isinstance(owner, types.ModuleType):
                    owner.__dict__.update(wrappers)
                else:
                    for attr, wrapper in wrappers.items():
                        setattr(owner, attr, wrapper)
        self.count += 1

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            for owner, originals in self.originals.items():
                if isinstance(owner, types.ModuleType):
                    owner.__dict__.update(originals)
                    continue
                for attr, original in originals.items():
                    if attr in self.inherited[owner]:
                        delattr(owner, attr)
                    else:
                        setattr(owner, attr, original)


class _Patcher:
    """The process-wide wrappers, shared by every monitor."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.local = threading.local()  # .stack: probes running a forward, innermost last
        originals = [getattr(owner, attr) for owner, attr in FUNCTIONAL_TARGETS]
        # Calls made from inside these functions are the same activation seen twice.
        self.internal_codes = frozenset(
            f.__code__ for f in originals if isinstance(f, types.FunctionType)
        )
        # A call from one of these is an activation module's own call.
        self.module_codes = frozenset(
            cls.forward.__code__
            for cls in ACTIVATION_MODULES
            if isinstance(cls.forward, types.FunctionType)
        )
        self.functional = _Swap(FUNCTIONAL_TARGETS, self._wrap)
        self.tensor = _Swap(TENSOR_TARGETS, self._wrap)
        self.adds = _Swap(ADD_TARGETS, self._wrap_add)
        #: Functions whose default arguments were swapped for wrappers: (monitors using
        #: them, the original defaults, the original keyword defaults).
        self.defaults: dict[types.FunctionType, tuple[int, Any, Any]] = {}

    def swap_defaults(self, function: types.FunctionType, wrappers: dict[int, Any]) -> bool:
        """Swap ``function``'s default arguments that are activation functions for their
        wrappers (counted: every monitor that swapped must give back); whether it had any."""
        with self.lock:
            entry = self.defaults.get(function)
            if entry is not None:
                self.defaults[function] = (entry[0] + 1, entry[1], entry[2])
                return True
            defaults, keywords = function.__defaults__, function.__kwdefaults__
            found = [
                d for d in (*(defaults or ()), *(keywords or {}).values()) if id(d) in wrappers
            ]
            if not found:
                return False
            self.defaults[function] = (1, defaults, keywords)
            if defaults:
                function.__defaults__ = tuple(wrappers.get(id(d), d) for d in defaults)
            if keywords:
                function.__kwdefaults__ = {k: wrappers.get(id(d), d) for k, d in keywords.items()}
            return True

    def restore_defaults(self, function: types.FunctionType) -> None:
        with self.lock:
            count, defaults, keywords = self.defaults[function]
            if count > 1:
                self.defaults[function] = (count - 1, defaults, keywords)
                return
            del self.defaults[function]
            function.__defaults__, function.__kwdefaults__ = defaults, keywords

    def stack(self) -> list[Probes]:
        stack = getattr(self.local, "stack", None)
        if stack is None:
            stack = self.local.stack = []
        return stack

    def _wrap(self, original: Any, kind: str) -> Callable[..., Any]:
        local = self.local
        internal_codes = self.internal_codes
        module_codes = self.module_codes
        module_only = body_only(kind)  # hardtanh: only as the body of nn.ReLU6

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if is_compiling():  # traced by torch.compile, or run by it on fake tensors
                compiled = _COMPILED.probes
                x = args[0] if args else kwargs.get("input")
                if compiled is None or isinstance(x, _COMPILER_TENSORS):
                    return original(*args, **kwargs)
                return compiled.traced_activation(original, kind, args, kwargs)
            stack = getattr(local, "stack", None)
            if not stack:
                compiled = _COMPILED.probes  # run between two graphs of a compiled forward
                if compiled is None:
                    return original(*args, **kwargs)
                return compiled.eager_activation(original, kind, args, kwargs)
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor) or isinstance(x, _COMPILER_TENSORS):
                return original(*args, **kwargs)
            frame = sys._getframe(1)
            code = frame.f_code
            if code in internal_codes:
                return original(*args, **kwargs)
            probes = stack[-1]
            sink = probes.sink
            if sink.failure is not None:
                return original(*args, **kwargs)
            try:
                if code in module_codes:  # an activation module calling its function
                    module = frame.f_locals.get("self")
                    base = id(module)
                    occurrences = probes.occurrences
                    n = occurrences.get(base, 0)
                    occurrences[base] = n + 1
                    layer = probes.layers.get((base, n))
                    if layer is None:
                        layer = probes.new_module_layer(module, n, x)
                elif module_only:
                    layer = _SKIP
                else:
                    layer = probes.functional_layer(frame, kind, x)
                if probes.recording is not None:
                    probes.recording.append((kind, layer))
                if layer is not _SKIP:
                    sink.observe_input(layer, x)
            except Exception as error:  # reludoctor's own: never the user's forward's
                sink.fail(error)
                return original(*args, **kwargs)
            out = original(*args, **kwargs)
            if layer is not _SKIP and sink.sampling:
                try:
                    sink.observe_output(layer, out)
                except Exception as error:
                    sink.fail(error)
            return out

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        wrapper.__name__ = getattr(original, "__name__", kind)
        wrapper.__doc__ = getattr(original, "__doc__", None)
        return wrapper

    def _wrap_add(self, original: Any, _kind: str) -> Callable[..., Any]:
        local = self.local

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stack = None if is_compiling() else getattr(local, "stack", None)
            if stack and len(args) >= 2:
                a, b = args[0], args[1]
                if (
                    isinstance(a, torch.Tensor)
                    and isinstance(b, torch.Tensor)
                    and a.dim() >= 2
                    and a.shape == b.shape
                    and a.is_floating_point()
                ):
                    stack[-1].residual_adds += 1
            return original(*args, **kwargs)

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        wrapper.__name__ = getattr(original, "__name__", "add")
        return wrapper


_PATCHER: _Patcher | None = None

#: Tensors the compiler runs functions on while it compiles (shapes only, no values): such
#: a call is not one of the training forward's.
_COMPILER_TENSORS = (FakeTensor, FunctionalTensor)


class _CompiledForward:
    """Which probes' forward runs compiled: set in the graph, read by the activations in it
    (a module-level object, so the compiler finds it by a plain global name)."""

    probes: Probes | None = None


_COMPILED = _CompiledForward()


def _patcher() -> _Patcher:
    global _PATCHER
    if _PATCHER is None:
        _PATCHER = _Patcher()
    return _PATCHER


class _AtenMode(TorchFunctionMode):
    """Catches activation operators called directly, as graphs from ``torch.export`` do."""

    def __init__(self, probes: Probes) -> None:
        super().__init__()
        self.probes = probes

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        kind = ATEN_TARGETS.get(func)
        sink = self.probes.sink
        if (
            kind is None
            or not args
            or not isinstance(args[0], torch.Tensor)
            or sink.failure is not None
        ):
            return func(*args, **kwargs)
        x = args[0]
        try:
            layer = self.probes.aten_layer(kind, x)
            if layer is not _SKIP:
                sink.observe_input(layer, x)
        except Exception as error:  # reludoctor's own: never the user's forward's
            sink.fail(error)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if layer is not _SKIP and sink.sampling:
            try:
                sink.observe_output(layer, out)
            except Exception as error:
                sink.fail(error)
        return out


_WATCHED: weakref.WeakKeyDictionary[nn.Module, Probes] = weakref.WeakKeyDictionary()
_SKIP = object()  # a call site seen before that has nothing to measure

#: Why a compiled model's activations are not counted, when they are not.
FULLGRAPH_REASON = (
    "it was compiled with fullgraph=True, and reludoctor runs a watched model's first forward "
    "uncompiled (to find its activations, a graph break the compiler refuses there); watch "
    "the model before torch.compile and run one forward (or training step) before compiling "
    "with fullgraph=True, or compile without it"
)
FIRST_FORWARD_REASON = (
    "reludoctor runs a watched model's first training forward uncompiled, to find its "
    "activations, and fullgraph=True forbids that: run one training step before "
    "torch.compile(..., fullgraph=True), or compile without fullgraph"
)
PLAN_GAP_REASON = (
    "its compiled forwards ran activations in another order than its first forward (a "
    "different path through the model): from there on its compiled forwards were not counted"
)
BACKEND_REASON = (
    "it ran compiled, and the compiler's backend{backend} dropped the counts reludoctor puts "
    "in the graph: its compiled forwards were not counted; watch it with the inductor "
    "(default), aot_eager or eager backend"
)
EXPORTED_REASON = (
    "it is a torch.export graph run under torch.compile, whose activations reludoctor does "
    "not count; watch it uncompiled"
)


class Probes:
    """Installs and removes everything that watches one model; refuses to attach twice.

    Forwards are observed in training mode, and in eval mode too with ``count_eval``.
    """

    def __init__(self, model: nn.Module, sink: Sink, count_eval: bool = False) -> None:
        wrapper = model
        model = compiled_module(model)
        if model in _WATCHED:
            raise RuntimeError(
                f"this {type(model).__name__} is already watched by reludoctor; close the first "
                "monitor (doc.close() or leave its `with` block) before watching it again"
            )
        self.model = model
        self.sink = sink
        self.count_eval = count_eval
        self.module_names = {id(m): n for n, m in model.named_modules()}
        self.root_name = model_name(model)
        self.patcher = patcher = _patcher()
        self.layers: dict[Any, Any] = {}
        self.depth = 0
        self.counting = False
        self.occurrences: dict[Any, int] = {}
        self.discovering = True
        self._produced: dict[int, tuple[weakref.ref[torch.Tensor], nn.Module]] = {}
        self._input_producer: dict[int, nn.Module] = {}
        self._discovery_handles: list[Any] = []
        self._counting_adds = False
        #: Same-shaped activations added in the first counted forward (None: not seen yet).
        self.residual_adds: int | None = None
        self._names: set[str] = set()
        self._aten_mode: _AtenMode | None = None
        self._holds_functional = False
        #: Whether a forward of the model was traced by ``torch.compile``.
        self.ran_compiled = False
        #: The activation calls of the first counted forward, in order: (wrapped function's
        #: kind, layer). A compiled forward finds each call's layer by its place in this
        #: list (no Python frame to look at while tracing). ``recording`` is it being made.
        self.plan: list[tuple[str, Any]] | None = None
        self.recording: list[tuple[str, Any]] | None = None
        #: In a compiled forward: calls of the plan seen so far, and whether an activation's
        #: own function runs (its inner calls are the same activation).
        self.ordinal = 0
        self.inside = False
        #: Why some of the compiled forwards' activations are not counted, or None.
        self.compiled_gap: str | None = None
        #: Whether a compiled forward ran with its activations' counts in its graph.
        self.counted_compiled = False
        self._holds_for_compile = False
        #: Modules whose activations cannot be seen, and why: (qualified name, reason).
        self.unwatched: list[tuple[str, str]] = _scripted_activations(model)
        #: The backend the model is compiled with already (None: not compiled, or unknown).
        self.backend = compiled_backend(wrapper) or compiled_backend(model)
        self._aten_nodes: list[Any] | None = None
        #: Activation functions modules keep a reference to, swapped while watched:
        #: (module, attribute, original, wrapper).
        self._held: list[tuple[nn.Module, str, Any, Any]] = []
        #: Methods whose default arguments were swapped (given back at removal).
        self._default_swaps: list[types.FunctionType] = []
        #: PyTorch's attention/transformer modules take a fused path in inference that runs
        #: no Python activation: turned off while a forward is counted (saved setting).
        self._fast_path = _has_fast_path(model)
        self._fast_path_setting: bool | None = None
        self._installed = False
        if isinstance(model, torch.jit.ScriptModule):
            warnings.warn(
                f"reludoctor cannot watch {printable(self.root_name)}: it is a TorchScript "
                "module, whose activations run outside Python; watch the module before "
                "torch.jit.script. It runs unwatched and its report says so",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        if compiled_fullgraph(wrapper) or compiled_fullgraph(model):  # no uncompiled forward
            self.ran_compiled = True
            self.compiled_gap = FULLGRAPH_REASON
            warnings.warn(
                f"reludoctor cannot watch {printable(self.root_name)}: {FULLGRAPH_REASON}. It "
                "trains untouched and its report says so",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        if isinstance(model, torch.fx.GraphModule):
            self._aten_nodes = [
                n for n in model.graph.nodes if n.op == "call_function" and n.target in ATEN_TARGETS
            ]
        self._own_forward = model.__dict__.get("forward")
        inner = self._own_forward or types.MethodType(type(model).forward, model)
        probes = self

        def watched_forward(self_model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if self_model is not probes.model:  # a copy of the watched model: run its own
                return type(self_model).forward(self_model, *args, **kwargs)
            if is_compiling():
                return probes.traced_forward(inner, args, kwargs)
            return probes.eager_forward(inner, args, kwargs)

        _prepare_first_forward()
        with patcher.lock:
            patcher.tensor.acquire()
        self._swap_held_activations()
        # torch.compile keeps its variants of a function per code object (8 at most by
        # default): each watched model gets code of its own, so several compiled models never
        # crowd each other out.
        self.traced_forward = types.MethodType(_own_code(Probes.traced_forward), self)  # type: ignore[method-assign]
        model.forward = types.MethodType(_own_code(watched_forward), model)  # type: ignore[method-assign]
        _WATCHED[model] = self
        self._installed = True

    # -- the forward, uncompiled and compiled ---------------------------------------------
    def eager_forward(self, inner: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """The watched forward run by Python: probes find and count each activation."""
        sink = self.sink
        self.enter()
        try:
            outermost = self.counting and self.depth == 1
            if outermost:
                try:
                    if sink.wants_model_input():
                        first = args[0] if args else next(iter(kwargs.values()), None)
                        sink.observe_model_input(first)
                except Exception as error:  # reludoctor's own: never the user's
                    sink.fail(error)
            out = inner(*args, **kwargs)
            if outermost and self.recording is not None:
                self.plan, self.recording = self.recording, None
                self.hold_functional()
            if outermost and sink.sampling and sink.failure is None:
                try:
                    sink.observe_model_output(out)
                except Exception as error:
                    sink.fail(error)
            return out
        finally:
            self.leave()

    def traced_forward(self, inner: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """The watched forward as ``torch.compile`` traces it: each activation's counts
        become part of the graph (see :meth:`traced_activation`).

        The first counted forward runs uncompiled (a graph break in this model's own code,
        once): it finds the activations, their names and producers, which tracing cannot.
        What is read here is guarded by the compiler: a change (the first forward done, a
        sampled step) selects another compiled variant, two while counting.
        """
        self.ran_compiled = True
        sink = self.sink
        if self._aten_nodes:
            self.compiled_gap = EXPORTED_REASON
        if (
            not (self.model.training or self.count_eval)
            or sink.failure is not None
            or self.compiled_gap is not None
        ):
            return inner(*args, **kwargs)
        if self.plan is None:
            assert _first_forward_uncompiled is not None  # made when the model was watched
            return _first_forward_uncompiled(self, inner, args, kwargs)
        _COMPILED.probes = self
        self.counted_compiled = True
        self.ordinal = 0
        self.inside = False
        out = inner(*args, **kwargs)
        _COMPILED.probes = None
        if sink.sampling:
            sink.observe_traced_model_output(out)
        return out

    def _planned(self, kind: str, x: Any) -> Any:
        """The layer of the next activation call of a compiled forward (``_SKIP``: not one to
        count, None: not the call the plan expects)."""
        if self.inside or not isinstance(x, torch.Tensor):
            return _SKIP
        plan = self.plan or []
        n = self.ordinal
        self.ordinal = n + 1
        if n >= len(plan) or plan[n][0] != kind:
            self.compiled_gap = PLAN_GAP_REASON
            return None
        return plan[n][1]

    def traced_activation(
        self, original: Callable[..., Any], kind: str, args: Any, kwargs: Any
    ) -> Any:
        """An activation call as ``torch.compile`` traces it: the counts of its plan entry
        computed in the graph, beside the activation itself."""
        x = args[0] if args else kwargs.get("input")
        layer = self._planned(kind, x)
        if layer is None or layer is _SKIP:
            return original(*args, **kwargs)
        sink = self.sink
        self.inside = True
        sink.observe_traced_input(layer, x)
        out = original(*args, **kwargs)
        if sink.sampling:
            sink.observe_traced_output(layer, out)
        self.inside = False
        return out

    def eager_activation(
        self, original: Callable[..., Any], kind: str, args: Any, kwargs: Any
    ) -> Any:
        """An activation call run by Python inside a compiled forward (where the user's code
        breaks the graph): counted as in an uncompiled forward, found by its place."""
        x = args[0] if args else kwargs.get("input")
        sink = self.sink
        if sink.failure is not None or isinstance(x, _COMPILER_TENSORS):
            return original(*args, **kwargs)
        try:
            layer = self._planned(kind, x)
            if layer is not None and layer is not _SKIP:
                sink.observe_input(layer, x)
        except Exception as error:  # reludoctor's own: never the user's forward's
            sink.fail(error)
            return original(*args, **kwargs)
        if layer is None or layer is _SKIP:
            return original(*args, **kwargs)
        self.inside = True
        try:
            out = original(*args, **kwargs)
        finally:
            self.inside = False
        if sink.sampling:
            try:
                sink.observe_output(layer, out)
            except Exception as error:
                sink.fail(error)
        return out

    def hold_functional(self) -> None:
        """Keep the functional wrappers in place from the first counted forward on, while
        the model is watched: a compiled graph traces them (compiled after this forward, or
        with ``fullgraph=True`` after an uncompiled step) and checks at each call that they
        are still there. Outside a watched forward they pass each call straight through."""
        if not self._holds_for_compile:
            with self.patcher.lock:
                self.patcher.functional.acquire()
            self._holds_for_compile = True

    # -- lifetime -------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every wrapper and mode this object installed. Safe to call twice."""
        self._end_discovery()
        if self.counting:
            self.depth = 0
            self._stop_counting()
        if self._holds_for_compile:
            self._holds_for_compile = False
            with self.patcher.lock:
                self.patcher.functional.release()
        if _COMPILED.probes is self:
            _COMPILED.probes = None
        if not self._installed:
            return
        self._installed = False
        if self._own_forward is not None:
            self.model.forward = self._own_forward  # type: ignore[method-assign]
        else:
            self.model.__dict__.pop("forward", None)
        if _WATCHED.get(self.model) is self:
            del _WATCHED[self.model]
        for module, attr, original, wrapper in self._held:
            if module.__dict__.get(attr) is wrapper:
                module.__dict__[attr] = original
        self._held.clear()
        for function in self._default_swaps:
            self.patcher.restore_defaults(function)
        self._default_swaps.clear()
        with self.patcher.lock:
            self.patcher.tensor.release()

    def _swap_held_activations(self) -> None:
        """A module that keeps a reference to an activation function (``self.activation =
        F.relu``, as nn.TransformerEncoderLayer does, or an ``activation=F.relu`` argument
        it stores), or a method of the model's own classes with one as a default argument
        (``def forward(self, x, act=F.relu)``), took it before reludoctor swapped the
        function: swap it there too, while watched (outside a counted forward the wrapper
        passes calls through)."""
        functional = self.patcher.functional
        wrappers = {
            id(original): functional.wrappers[owner][attr]
            for owner, originals in functional.originals.items()
            for attr, original in originals.items()
        }
        for module in self.model.modules():
            for attr, value in list(vars(module).items()):
                wrapper = wrappers.get(id(value))
                if wrapper is not None and callable(value):
                    module.__dict__[attr] = wrapper
                    self._held.append((module, attr, value, wrapper))
        for function in _own_methods(self.model):
            if self.patcher.swap_defaults(function, wrappers):
                self._default_swaps.append(function)

    # -- the watched forward --------------------------------------------------------------
    def enter(self) -> None:
        """The watched forward starts: count it when it is the outermost one in a counted
        mode. Whatever fails here is undone and ends watching; the forward still runs."""
        self.depth += 1
        if (
            self.depth > 1
            or not (self.model.training or self.count_eval)
            or self.sink.failure is not None
        ):
            return
        self.counting = True
        self.occurrences.clear()
        patcher = self.patcher
        _COMPILED.probes = None  # left set only by a compiled forward that raised
        if self.plan is None:
            self.recording = []
        try:
            if self.discovering:
                self._start_discovery()
            if self._fast_path:
                self._fast_path_setting = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            with patcher.lock:
                patcher.functional.acquire()
            self._holds_functional = True
            patcher.stack().append(self)
            if self._aten_nodes:
                self._aten_mode = _AtenMode(self)
                self._aten_mode.__enter__()
        except Exception as error:
            self._stop_counting()
            self.sink.fail(error)

    def leave(self) -> None:
        """The watched forward ends (also by an exception): undo what :meth:`enter` did."""
        self.depth -= 1
        if self.depth > 0 or not self.counting:
            self.depth = max(self.depth, 0)
            return
        self._stop_counting()

    def _stop_counting(self) -> None:
        """Release exactly what counting holds: every global patch stays balanced."""
        self.counting = False
        self.recording = None  # a forward that raised leaves no plan
        if self._aten_mode is not None:
            mode, self._aten_mode = self._aten_mode, None
            mode.__exit__(None, None, None)
        if self._fast_path_setting is not None:
            torch.backends.mha.set_fastpath_enabled(self._fast_path_setting)
            self._fast_path_setting = None
        patcher = self.patcher
        stack = patcher.stack()
        if self in stack:
            stack.remove(self)
        if self._holds_functional:
            self._holds_functional = False
            with patcher.lock:
                patcher.functional.release()
        if self.discovering:
            self._end_discovery()
            self.discovering = False

    # -- discovery: which module produced each activation's input -------------------------
    def _start_discovery(self) -> None:
        for module in self.model.modules():
            # TorchScript modules take no Python hooks (they are listed in ``unwatched``)
            if module is not self.model and not isinstance(module, torch.jit.ScriptModule):
                handle = module.register_forward_hook(self._record_producer)
                self._discovery_handles.append(handle)
        if self._aten_nodes is None and not self._counting_adds:
            self.residual_adds = 0
            self._counting_adds = True
            with self.patcher.lock:
                self.patcher.adds.acquire()

    def _end_discovery(self) -> None:
        for handle in self._discovery_handles:
            handle.remove()
        self._discovery_handles.clear()
        self._produced.clear()
        if self._counting_adds:
            self._counting_adds = False
            with self.patcher.lock:
                self.patcher.adds.release()

    def _record_producer(self, module: nn.Module, args: Any, output: Any) -> None:
        if args and isinstance(args[0], torch.Tensor):
            source = self._producer_of(args[0])
            if source is not None:
                self._input_producer.setdefault(id(module), source)
        # The innermost module to return a tensor produced it: keep the first live record.
        if isinstance(output, torch.Tensor) and self._producer_of(output) is None:
            self._produced[id(output)] = (weakref.ref(output), module)

    def _producer_of(self, x: torch.Tensor) -> nn.Module | None:
        entry = self._produced.get(id(x))
        if entry is None or entry[0]() is not x:
            return None
        return entry[1]

    # -- layers: a dict lookup per call, the rest only on first sight ----------------------
    def _layer(self, key: Any, describe: Callable[[], Site | None], x: torch.Tensor) -> Any:
        """The layer under ``key`` (``_SKIP`` when it has nothing to measure)."""
        layer = self.layers.get(key)
        if layer is None:
            site = describe()
            layer = self.sink.new_layer(site, x) if site is not None else None
            layer = self.layers[key] = _SKIP if layer is None else layer
        return layer

    def new_module_layer(self, module: Any, n: int, x: torch.Tensor) -> Any:
        """The layer for the ``n``-th call of an activation module in this forward."""

        def describe() -> Site | None:
            kind = activation_kind(type(module))
            if kind is None:
                return None
            name = self.module_names.get(id(module)) or self.root_name
            return self._site(name if n == 0 else f"{name}#{n + 1}", kind, "module", None, x)

        return self._layer((id(module), n), describe, x)

    def functional_layer(self, frame: Any, kind: str, x: torch.Tensor) -> Any:
        """The layer for a functional call made from ``frame``."""
        code = frame.f_code
        lineno = frame.f_lineno
        base = (id(frame.f_locals.get("self")), code, lineno)
        occurrences = self.occurrences
        n = occurrences.get(base, 0)
        occurrences[base] = n + 1

        def describe() -> Site:
            source = f"{code.co_filename}:{lineno}"
            return self._site(self._owner_name(frame), kind, "functional", source, x)

        return self._layer((*base, n), describe, x)

    def aten_layer(self, kind: str, x: torch.Tensor) -> Any:
        """The layer for an ATen activation inside an exported graph."""
        n = self.occurrences.get("aten", 0)
        self.occurrences["aten"] = n + 1

        def describe() -> Site:
            nodes = self._aten_nodes or []
            node = nodes[n] if n < len(nodes) else None
            if node is None:
                return self._site(self.root_name, kind, "functional", None, x)
            owner, via = self.root_name, "functional"
            innermost = _innermost_module(node)
            if innermost is not None:
                path, module_type = innermost
                owner = path or self.root_name
                via = "module" if is_activation_type(module_type) else "functional"
            source = node.args[0] if node.args else None
            producer = source if isinstance(source, torch.fx.Node) else None
            return self._site(owner, kind, via, node.name, x, producer)

        return self._layer(("aten", n), describe, x)

    def _owner_name(self, frame: Any) -> str:
        """Qualified name of the nearest watched module on the call stack."""
        walk = frame
        for _ in range(8):
            if walk is None:
                break
            candidate = walk.f_locals.get("self")
            name = self.module_names.get(id(candidate)) if candidate is not None else None
            if name is not None:
                return name or self.root_name
            walk = walk.f_back
        return self.root_name

    def _site(
        self,
        owner: str,
        kind: str,
        via: str,
        source: str | None,
        x: torch.Tensor,
        graph_producer: torch.fx.Node | None = None,
    ) -> Site:
        """Where an activation runs; ``graph_producer`` is the node that made its input in
        an exported graph, whose modules are not the originals."""
        producer = self._producer_of(x)
        follows_base = False
        if producer is None:
            base = whole_base(x)
            producer = self._producer_of(base) if base is not None else None
            if producer is not None:
                x, follows_base = base, True
        producer_name = self.module_names.get(id(producer)) if producer is not None else None
        fields: dict[str, Any] = {
            "producer": producer_name,
            "unit_dim": _unit_dim(x, producer),
            "weight": self._weight_upstream(producer),
            "bias": _direct_bias(producer),
            "shift_source": producer if _norm_shift(producer) is not None else None,
            "shift_in_eval": producer is not None and not producer.training,
        }
        if producer is None and graph_producer is not None:
            fields.update(self._exported_producer(graph_producer, x))
        producer_name = fields["producer"]
        name = f"{producer_name or owner}:{kind}" if via == "functional" else owner
        unique, n = name, 1
        while unique in self._names:
            n += 1
            unique = f"{name}#{n}"
        self._names.add(unique)
        return Site(
            name=unique,
            kind=kind,
            via=via,
            source=source,
            follows_base=follows_base,
            **fields,
        )

    def _exported_producer(self, node: torch.fx.Node, x: torch.Tensor) -> dict[str, Any]:
        """:class:`Site` fields for an activation of an exported graph whose input ``node``
        made: the producing module's name, unit dim, Linear/Conv weight and bias, and a
        batch/layer norm's shift (read from the program, whose parameters keep their
        original names; its modules are not the original classes)."""
        innermost = _innermost_module(node)
        if innermost is None or not innermost[0]:
            return {}
        path, module_type = innermost
        name = module_type if isinstance(module_type, str) else module_type.__qualname__
        conv = name.endswith(("Conv1d", "Conv2d", "Conv3d"))
        norm = name.endswith(("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"))
        channels = (conv or norm) and x.dim() >= 2
        fields: dict[str, Any] = {
            "producer": path,
            "unit_dim": 1 if channels else max(x.dim() - 1, 0),
        }
        if conv or name.endswith("Linear"):
            fields["weight"] = self._exported(f"{path}.weight", self.model.get_parameter)
            fields["bias"] = self._exported(f"{path}.bias", self.model.get_parameter)
        elif norm or name.endswith("LayerNorm"):
            fields.update(self._exported_norm(path, norm, node))
        return fields

    def _exported_norm(self, path: str, batch: bool, node: torch.fx.Node) -> dict[str, Any]:
        """A stand-in norm module holding the program's own shift, scale and running
        statistics (what :func:`norm_shift` reads), and whether it ran in eval mode."""
        bias = self._exported(f"{path}.bias", self.model.get_parameter)
        if not isinstance(bias, nn.Parameter) or bias.dim() != 1:
            return {}
        weight = self._exported(f"{path}.weight", self.model.get_parameter)
        module: nn.Module
        if batch:
            args = node.args
            eps = args[7] if len(args) > 7 and isinstance(args[7], float) else 1e-5
            module = nn.BatchNorm1d(bias.numel(), eps=eps)
            module.running_mean = self._exported(f"{path}.running_mean", self.model.get_buffer)
            module.running_var = self._exported(f"{path}.running_var", self.model.get_buffer)
            training = len(args) > 5 and args[5] is True
        else:
            module, training = nn.LayerNorm(bias.numel()), False
        module.bias = bias
        module.weight = weight if isinstance(weight, nn.Parameter) else None
        return {"shift_source": module, "shift_in_eval": not training}

    @staticmethod
    def _exported(target: str, get: Callable[[str], Any]) -> Any:
        try:
            return get(target)
        except AttributeError:
            return None

    def _weight_upstream(self, producer: nn.Module | None) -> nn.Parameter | None:
        """The weight whose rows feed this activation's units (Linear/Conv), if found."""
        hops = 0
        while producer is not None and hops < 4:
            if isinstance(producer, (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear)):
                weight = getattr(producer, "weight", None)
                transposed = getattr(producer, "transposed", False)
                if isinstance(weight, nn.Parameter) and not transposed:
                    return weight
                return None
            if not isinstance(producer, PASS_THROUGH):
                return None
            producer = self._input_producer.get(id(producer))
            hops += 1
        return None


def whole_base(x: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``x`` is a reshaped view of, element for element (same values in the same
    order), or None: an activation applied to ``h.view(...)`` acts on ``h``'s units."""
    base = x._base
    if (
        base is None
        or base.numel() != x.numel()
        or base.storage_offset() != x.storage_offset()
        or not x.is_contiguous()
        or not base.is_contiguous()
    ):
        return None
    return base


def model_name(model: nn.Module) -> str:
    """The class name a user knows ``model`` by (a TorchScript module's original class, the
    module a ``torch.compile`` wrapper compiles)."""
    compiled = compiled_module(model)
    if compiled is not model:
        return model_name(compiled)
    if isinstance(model, torch.jit.ScriptModule):
        return str(getattr(model, "original_name", None) or type(model).__name__)
    return type(model).__name__


#: Names of the ATen operators of rectifier-family activations ("aten::relu" ...).


def _first_forward(probes: Probes, inner: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """The first counted forward of a compiled model, run by Python (see
    :meth:`Probes.traced_forward`)."""
    return probes.eager_forward(inner, args, kwargs)


#: :func:`_first_forward` as ``torch.compile`` skips it, made by the first watch (making it
#: imports the compiler, which ``import reludoctor`` leaves out).
_first_forward_uncompiled: Callable[..., Any] | None = None


def _prepare_first_forward() -> None:
    global _first_forward_uncompiled
    if _first_forward_uncompiled is None:
        try:
            _first_forward_uncompiled = torch.compiler.disable(
                _first_forward, reason=FIRST_FORWARD_REASON
            )
        except TypeError:  # torch before 2.6 takes no reason
            _first_forward_uncompiled = torch.compiler.disable(_first_forward)


def _own_code(function: types.FunctionType) -> types.FunctionType:
    """A copy of ``function`` with a code object of its own."""
    copy = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    return copy


def _own_methods(model: nn.Module) -> list[types.FunctionType]:
    """The methods (not dunder) of the classes of ``model``'s modules defined outside torch:
    the user's code, whose default arguments may hold an activation function."""
    methods: dict[types.FunctionType, None] = {}
    for cls in {type(module) for module in model.modules()}:
        for klass in cls.__mro__:
            if klass.__module__.split(".")[0] in ("torch", "builtins"):
                continue
            for name, value in vars(klass).items():
                if isinstance(value, types.FunctionType) and not name.startswith("__"):
                    methods[value] = None
    return list(methods)


def _has_fast_path(model: nn.Module) -> bool:
    """Whether ``model`` holds a module with PyTorch's fused inference path (which runs its
    activation inside one native kernel) and the setting that turns it off exists."""
    fused = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)
    settable = hasattr(getattr(torch.backends, "mha", None), "set_fastpath_enabled")
    return settable and any(isinstance(m, fused) for m in model.modules())


def _scripted_activations(model: nn.Module) -> list[tuple[str, str]]:
    """The outermost TorchScript modules in ``model`` that run a rectifier-family activation
    (which no Python-level probe can see), with why; a module whose graph cannot be read is
    listed too."""
    found: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.jit.ScriptModule):
            continue
        if any(name == outer or name.startswith(f"{outer}.") for outer, _ in found):
            continue
        try:
            ops = {node.kind() for node in module.inlined_graph.nodes()}
        except Exception:  # no forward, or a graph it cannot show: it may run any activation
            ops = set(ATEN_NAMES)
        if ops & ATEN_NAMES:
            found.append(
                (
                    name or model_name(model),
                    "a TorchScript module: its activations run outside Python, where "
                    "reludoctor cannot see them; watch the module before torch.jit.script",
                )
            )
    return found


def _direct_bias(producer: nn.Module | None) -> nn.Parameter | None:
    """The bias added last to this activation's input: a Linear/Conv producing it directly."""
    if isinstance(producer, (nn.Linear, nn.modules.conv._ConvNd)):
        bias = getattr(producer, "bias", None)
        if isinstance(bias, nn.Parameter) and not getattr(producer, "transposed", False):
            return bias
    return None


def _norm_shift(producer: nn.Module | None) -> nn.Parameter | None:
    """The learned shift (beta) of a batch/group/layer norm producing the activation's
    input, one per unit (None for other producers, or a norm without one)."""
    if isinstance(producer, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
        bias = getattr(producer, "bias", None)
        if isinstance(bias, nn.Parameter) and bias.dim() == 1:
            return bias
    return None


def norm_shift(site: Site) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The shift a normalisation layer adds to each unit of ``site``'s input, and its beta.

    In training a batch norm centres each unit's values, so the shift is beta; in eval it
    is beta - gamma * running mean / running std (its running statistics add the rest).
    """
    module = site.shift_source
    beta = _norm_shift(module)
    if beta is None:
        return None
    beta = beta.detach().float()
    running = isinstance(module, nn.modules.batchnorm._NormBase) and site.shift_in_eval
    if not running or module.running_mean is None or module.running_var is None:
        return beta, beta
    gamma = module.weight.detach().float() if module.weight is not None else torch.ones_like(beta)
    std = (module.running_var.float() + module.eps).sqrt()
    return beta - gamma * module.running_mean.float() / std, beta


def _innermost_module(node: torch.fx.Node) -> tuple[str, Any] | None:
    """(path, type) of the innermost module an exported graph's node ran in, if recorded."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1] if stack else None


def _unit_dim(x: torch.Tensor, producer: nn.Module | None) -> int:
    """Which dim holds the units: channels for conv-like producers, else the last dim."""
    if x.dim() <= 2:
        return x.dim() - 1 if x.dim() else 0
    if producer is not None:
        return 1 if isinstance(producer, CHANNEL_FIRST) else x.dim() - 1
    return 1 if x.dim() >= 4 else x.dim() - 1
