"""``reludoctor run train.py``: watch an unmodified PyTorch training script.

Three process-wide hooks stand in for the lines a user would add:

* a global module forward hook: the first time a module with trainable parameters runs a
  forward as the outermost module, in training mode and with gradients on, it is a model
  being trained and gets ``rd.watch`` (its ReLU modules and functional calls alike), counted
  from its next forward on (this one had started before the watch);
* a global optimizer step hook: each ``optimizer.step()`` ends a step of the watched models
  whose parameters that optimizer updates (``doc.step``, with the optimizer for its facts);
* ``torch.Tensor.backward`` is wrapped to keep the last scalar it was called on: that step's
  loss.

The script runs as ``__main__`` with its own ``sys.argv``. Whatever way it ends - returning,
``sys.exit(n)``, an exception, Ctrl-C, SIGTERM or SIGHUP - the hooks come off and each watched
model's report is written (under ``torch.distributed``, by rank 0 only); :meth:`ScriptRun.run`
returns the exit code Python (or, for a signal, a shell) would have given the script.

The ``--out`` folder holds the reports of the last run only: :func:`prepare_out`, called before
the script starts, checks that the folder can be written and removes the reports the previous
``reludoctor run`` wrote there (listed in its manifest, :data:`MANIFEST`); other files are kept.

    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "train.py").write_text(
    ...     "import torch\\n"
    ...     "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())\\n"
    ...     "opt = torch.optim.SGD(model.parameters(), lr=0.1)\\n"
    ...     "for _ in range(3):\\n"
    ...     "    opt.zero_grad(); model(torch.randn(16, 4)).sum().backward(); opt.step()\\n"
    ... )
    >>> run = ScriptRun(folder / "train.py", [], window=2)
    >>> run.run()
    0
    >>> [report.meta["steps"] for report in run.reports]
    [3]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import runpy
import signal
import sys
import threading
import traceback
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reludoctor.api.monitor import DEFAULT_SAMPLE_EVERY, DEFAULT_WINDOW, Monitor, watch
from reludoctor.errors import InputError
from reludoctor.probe.ranks import is_rank_zero
from reludoctor.report.report import Report
from reludoctor.text import printable

#: The exit code of a script stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130
#: Signals that stop a run as Ctrl-C does (reports written, exit code 128 + the signal's
#: number) where they would have killed the script: a scheduler's or ``docker stop``'s SIGTERM,
#: a closed terminal's SIGHUP.
STOPPING_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)
#: The file in ``--out`` that lists the reports the last ``reludoctor run`` wrote there.
MANIFEST = ".reludoctor-run.json"
#: The files of one report.
_SUFFIXES = (".json", ".html")
#: Most bytes of a report file's stem taken from a model's name (file systems allow 255).
_STEM_BYTES = 100
#: Characters a file name cannot hold on some system (Windows' reserved ones included).
_UNSAFE_IN_NAMES = re.compile(r'[<>:"/\\|?*\s\x00-\x1f\x7f]')
_RESERVED_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{port}{n}" for port in ("COM", "LPT") for n in range(10)]
)


def check_script(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Python script that exists and compiles; :class:`InputError` otherwise."""
    script = Path(path)
    if not script.is_file():
        raise InputError(f"no script at {script}: give the path of a Python training script")
    try:
        compile(script.read_bytes(), str(script), "exec")
    except (SyntaxError, ValueError) as error:
        where = f" (line {error.lineno})" if getattr(error, "lineno", None) else ""
        raise InputError(
            f"{script} is not a Python script: {type(error).__name__}{where}: {error}; "
            "reludoctor run runs Python training scripts"
        ) from None
    return script


def prepare_out(out: str | os.PathLike[str]) -> Path:
    """``out`` as an absolute path (a script may change directory), made if missing, proved
    writable and cleared of the reports the previous ``reludoctor run`` wrote there;
    :class:`InputError` if it cannot be written. Called before the script starts: a bad
    ``--out`` is told before the training, not after it. Under a launcher such as ``torchrun``
    only rank 0 (which writes the reports) touches the folder."""
    folder = Path(out).absolute()
    if not is_rank_zero():
        return folder
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder} is a file: give a folder for the reports")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _replace_manifest(folder, [])  # also the proof that the folder can be written
    except OSError as error:
        reason = f"{error.strerror}: {error.filename}" if error.strerror else str(error)
        raise InputError(
            f"cannot write the reports into {folder} ({reason}): give --out a folder you can write"
        ) from None
    return folder


def _replace_manifest(folder: Path, names: list[str]) -> None:
    """Remove the reports the manifest in ``folder`` lists, then list ``names`` in it."""
    for name in _listed_reports(folder):
        (folder / name).unlink(missing_ok=True)
    text = json.dumps({"written_by": "reludoctor run", "reports": names}, indent=1)
    temporary = folder / f"{MANIFEST}.{os.getpid()}.tmp"
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, folder / MANIFEST)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _listed_reports(folder: Path) -> list[str]:
    """The report files the manifest in ``folder`` lists; only plain ``.json``/``.html`` names
    of files in ``folder`` itself (a name that could reach elsewhere is ignored)."""
    try:
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["reports"]
    except (FileNotFoundError, ValueError, KeyError, TypeError, RecursionError):
        return []  # none, or not a manifest of ours
    if not isinstance(listed, list):
        return []
    return [
        name
        for name in listed
        if isinstance(name, str)
        and name.endswith(_SUFFIXES)
        and not name.startswith(".")
        and not _UNSAFE_IN_NAMES.search(name)
    ]


def _file_stem(name: str) -> str:
    """``name`` (a model's class name) as a readable file name stem that stays inside its
    folder on every system: separators, controls and the characters Windows reserves become
    ``_``; no leading or trailing dot, no device name (``CON``), at most
    :data:`_STEM_BYTES` bytes."""
    text = unicodedata.normalize("NFC", printable(name).encode("utf-8", "replace").decode())
    stem = _UNSAFE_IN_NAMES.sub("_", text)
    stem = stem.encode()[:_STEM_BYTES].decode("utf-8", "ignore").strip(".")
    if stem.split(".")[0].upper() in _RESERVED_NAMES:
        stem = f"_{stem}"
    return stem or "model"


def _file_stems(names: Iterable[str]) -> list[str]:
    """A distinct :func:`_file_stem` for each name, in order: ``-2``, ``-3``... after a stem
    already taken (compared as a case-insensitive file system compares names)."""
    taken: set[str] = set()
    stems: list[str] = []
    for name in names:
        base = stem = _file_stem(name)
        count = 1
        while stem.casefold() in taken:
            count += 1
            stem = f"{base}-{count}"
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


class _Stopped(BaseException):
    """Raised in the script by a stopping signal, as SIGINT raises ``KeyboardInterrupt``."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


#: The report's ``ending`` for a script stopped by each stopping signal.
_SIGNAL_ENDINGS = {"SIGTERM": "terminated", "SIGHUP": "hangup"}


@contextlib.contextmanager
def _stopping_signals() -> Iterator[None]:
    """Inside, each of :data:`STOPPING_SIGNALS` that would have killed the process raises
    :class:`_Stopped` instead; one the caller ignores (``nohup``) or handles is left as it is.
    The previous handlers come back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    pid = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != pid:  # a forked child (a DataLoader worker): dies as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Stopped(signum)

    previous = {signum: signal.getsignal(signum) for signum in STOPPING_SIGNALS}
    installed = [signum for signum, handler in previous.items() if handler is signal.SIG_DFL]
    for signum in installed:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum in installed:
            signal.signal(signum, previous[signum])


@dataclass
class _Watched:
    model: nn.Module
    monitor: Monitor
    params: set[int] = field(default_factory=set)


class ScriptRun:
    """Runs one script with every model it trains watched; see the module docstring."""

    def __init__(
        self,
        script: str | os.PathLike[str],
        args: list[str],
        *,
        window: int = DEFAULT_WINDOW,
        sample_every: int = DEFAULT_SAMPLE_EVERY,
        repair: bool = False,
    ) -> None:
        self.script = check_script(script)
        self.args = list(args)
        self.window = window
        self.sample_every = sample_every
        #: Whether each model is watched with the repair autopilot (``rd.watch(repair=True)``).
        self.repair = repair
        self.watched: list[_Watched] = []
        #: How the script ended: "finished", "exit", "error", "interrupted" (Ctrl-C),
        #: "terminated" (SIGTERM) or "hangup" (SIGHUP).
        self.ending = "finished"
        #: One report per watched model, in the order they started training (after run()).
        self.reports: list[Report] = []
        self._depth = 0
        self._loss: torch.Tensor | None = None
        self._stepped_by: dict[int, int] = {}  # model id -> id of the optimizer that steps it
        self._owned_by: dict[tuple[int, int], set[int]] = {}
        self._seen: set[int] = set()  # ids of the models found (watched or not)

    # -- the hooks ---------------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: Any) -> None:
        self._depth += 1
        outermost = self._depth == 1 and module.training and torch.is_grad_enabled()
        if outermost and id(module) not in self._seen and _trains(module):
            self._seen.add(id(module))
            self._watch(module)

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth = max(self._depth - 1, 0)

    def _watch(self, model: nn.Module) -> None:
        try:
            monitor = watch(
                model, window=self.window, sample_every=self.sample_every, repair=self.repair
            )
        except Exception as error:  # e.g. the script watches this model itself: never raise
            warnings.warn(
                f"reludoctor run: not watching {printable(type(model).__name__)}: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        params = {id(p) for p in model.parameters() if p.requires_grad}
        self.watched.append(_Watched(model, monitor, params))

    def _owned(self, optimizer: Any) -> set[int]:
        """Ids of the parameters ``optimizer`` updates (cached until it gains a group)."""
        key = (id(optimizer), len(optimizer.param_groups))
        owned = self._owned_by.get(key)
        if owned is None:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._owned_by[key] = owned
        return owned

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        owned = self._owned(optimizer)
        for watched in self.watched:
            if not watched.params & owned or watched.monitor.closed:
                continue
            # a model updated by several optimizers steps with the first of them
            if self._stepped_by.setdefault(id(watched.model), id(optimizer)) == id(optimizer):
                watched.monitor.step(loss=self._loss, optimizer=optimizer)
        self._loss = None

    @contextlib.contextmanager
    def _hooks(self) -> Iterator[None]:
        from torch.nn.modules.module import (
            register_module_forward_hook,
            register_module_forward_pre_hook,
        )
        from torch.optim.optimizer import register_optimizer_step_post_hook

        backward = torch.Tensor.backward
        run = self

        def keeping_loss(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.numel() == 1:
                run._loss = self.detach()
            return backward(self, *args, **kwargs)

        handles = [
            register_module_forward_pre_hook(self._before_forward),
            register_module_forward_hook(self._after_forward, always_call=True),
            register_optimizer_step_post_hook(self._after_optimizer_step),
        ]
        torch.Tensor.backward = keeping_loss  # type: ignore[method-assign]
        try:
            with warnings.catch_warnings():
                # torch warns of the global hooks above when a script compiles a module:
                # they are reludoctor's, not the script's
                warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)`")
                yield
        finally:
            torch.Tensor.backward = backward  # type: ignore[method-assign]
            for handle in handles:
                handle.remove()

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> int:
        """Run the script to its end; its exit code (0, its ``sys.exit`` code, 1 for an
        exception, 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
        argv, path = sys.argv, list(sys.path)
        sys.argv = [str(self.script), *self.args]
        sys.path.insert(0, str(self.script.resolve().parent))  # as `python script.py` does
        code = 0
        try:
            with _stopping_signals(), self._hooks():
                runpy.run_path(str(self.script), run_name="__main__")
        except SystemExit as stop:
            self.ending = "exit"
            code = _exit_code(stop.code)
        except KeyboardInterrupt:
            self.ending = "interrupted"
            code = EXIT_INTERRUPTED
        except _Stopped as stop:
            self.ending = _SIGNAL_ENDINGS[stop.name]
            code = 128 + stop.signum
        except BaseException as error:
            self.ending = "error"
            self._print_traceback(error)
            code = 1
        finally:
            sys.argv, sys.path[:] = argv, path
            for watched in self.watched:
                watched.monitor.close()
            self.reports = [self._report(watched) for watched in self.watched]
        return code

    def _print_traceback(self, error: BaseException) -> None:
        """The traceback Python would print for the script: from its own first frame on."""
        tb = error.__traceback__
        script = str(self.script.resolve())
        while tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()) != script:
            tb = tb.tb_next
        traceback.print_exception(type(error), error, tb or error.__traceback__)

    def _report(self, watched: _Watched) -> Report:
        report = watched.monitor.report(warn_if_empty=False)
        report.meta["script"] = str(self.script)
        report.meta["ending"] = self.ending
        return report

    def write(self, out: str | os.PathLike[str]) -> list[Path]:
        """Each report as ``<model>.json`` and ``<model>.html`` in ``out``, named after its
        model's class (made safe as a file name; ``-2``... for a name taken), in place of the
        reports the previous run wrote there (rank 0 only under ``torch.distributed``; other
        ranks write nothing and get [])."""
        if not is_rank_zero():
            return []
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        stems = _file_stems(str(report.meta.get("model", "model")) for report in self.reports)
        # listed before they are written: the next run removes them even if this one is
        # killed while writing them
        _replace_manifest(folder, [f"{stem}{suffix}" for stem in stems for suffix in _SUFFIXES])
        written: list[Path] = []
        for report, stem in zip(self.reports, stems, strict=True):
            written += [
                report.save_json(folder / f"{stem}.json"),
                report.save_html(folder / f"{stem}.html"),
            ]
        return written


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _exit_code(code: Any) -> int:
    """The process exit code Python gives ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
