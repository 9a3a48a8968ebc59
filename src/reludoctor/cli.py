"""The ``reludoctor`` command line."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException

from reludoctor.api.monitor import silenced_live_findings
from reludoctor.errors import InputError
from reludoctor.report.console import print_study, print_summary, print_treatment
from reludoctor.report.report import Report
from reludoctor.text import markup_safe

if TYPE_CHECKING:
    import torch

#: Exit codes of ``scan`` (and of every command for bad input or a failure of its own):
#: 1 is kept for "a finding at error severity", so a CI gate can tell it from the rest.
EXIT_HEALTHY, EXIT_FINDINGS, EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR = 0, 1, 2, 3
#: Set to show the traceback of an internal error.
DEBUG_VARIABLE = "RELUDOCTOR_DEBUG"


def error_console() -> Console:
    """Standard error, never hard-wrapped: a message is one line a user can grep, on any
    terminal width."""
    return Console(stderr=True, soft_wrap=True, highlight=False)


class _Commands(TyperGroup):
    """Every command's unexpected exception becomes one line and exit code 3."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (Exit, Abort, TyperException):
            raise
        except InputError as error:  # bad input a command did not catch itself
            raise _fail(str(error)) from None
        except Exception as error:
            if os.environ.get(DEBUG_VARIABLE):
                traceback.print_exc()
            error_console().print(
                f"[bold red]internal error:[/] {markup_safe(type(error).__name__)}: "
                f"{markup_safe(error)} (a bug in reludoctor, exit code {EXIT_INTERNAL_ERROR}; "
                f"set {DEBUG_VARIABLE}=1 for the traceback)"
            )
            raise typer.Exit(EXIT_INTERNAL_ERROR) from None


app = typer.Typer(
    cls=_Commands,
    help="Find, explain and fix dead ReLU units.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=True,
    )


def _fail(message: str) -> typer.Exit:
    """Print ``message`` as one line on standard error; the exit for bad input."""
    error_console().print(f"[bold red]error:[/] {markup_safe(message)}")
    return typer.Exit(EXIT_BAD_INPUT)


def _write_report(report: Report, out: Path) -> list[Path]:
    """report.json and report.html in ``out`` (made if missing)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        return [report.save_json(out / "report.json"), report.save_html(out / "report.html")]
    except OSError as error:
        raise _fail(f"cannot write the report into {out}: {error}") from error


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option(help="Folder for report.json, report.html and TensorBoard logs.")
    ] = Path("reludoctor-demo"),
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 25,
    samples: Annotated[int, typer.Option(min=100, help="Samples of the data set.")] = 200_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the summary.")] = False,
    treat: Annotated[
        bool, typer.Option("--treat", help="Then try the ranked remedies on copies (rd.treat).")
    ] = False,
    treat_steps: Annotated[int, typer.Option(min=1, help="Training steps per remedy.")] = 500,
    framework: Annotated[
        str, typer.Option(help="pytorch, or keras (Keras 3 on TensorFlow, the article's own).")
    ] = "pytorch",
) -> None:
    """Reproduce "Is ReLU Dead?" (inputs uniform in (-1, 0), one ReLU layer) and diagnose it."""
    from reludoctor.scenarios import IsReluDead

    console = Console(stderr=as_json)
    if framework not in ("pytorch", "keras"):
        raise _fail(f"--framework must be pytorch or keras, not {framework!r}")
    if framework == "keras":
        if treat:
            raise _fail("--treat works on the PyTorch demo only (Keras remedies are not built)")
        _keras_demo(out, epochs, samples, as_json, quiet, console)
        return
    scenario = IsReluDead(samples=samples, epochs=epochs)
    if not quiet:
        console.print(f"[bold]{scenario.name}[/]")
    live: list[str] = []  # findings announced while training, printed with the summary
    logs = out / "tensorboard"
    try:
        with _progress(console, quiet or as_json) as progress, silenced_live_findings():
            task = progress.add_task("training", total=epochs)
            result = scenario.run(
                on_epoch=lambda *_: progress.advance(task),
                on_finding=lambda finding: live.append(finding.code),
                log_dir=logs,
            )
    except InputError as error:
        raise _fail(str(error)) from error
    report = result.report
    assert report is not None
    paths = _write_report(report, out)
    if as_json:
        typer.echo(report.to_json())
        return
    if not quiet:
        first, last = result.train_loss[0], result.train_loss[-1]
        console.print(
            f"train loss {first:.4f} -> {last:.4f}, validation loss "
            f"{result.val_loss[0]:.4f} -> {result.val_loss[-1]:.4f} over {epochs} epochs"
        )
        if live:
            console.print(f"seen while training: {', '.join(dict.fromkeys(live))}")
    print_summary(report, console)
    console.print(f"report: {markup_safe(', '.join(str(p) for p in paths))}")
    console.print(f"TensorBoard: tensorboard --logdir {markup_safe(logs)}")
    if treat:
        _demo_treatment(scenario, report, treat_steps, console)


def _keras_demo(
    out: Path, epochs: int, samples: int, as_json: bool, quiet: bool, console: Console
) -> None:
    from reludoctor.keras.scenarios import KerasIsReluDead

    scenario = KerasIsReluDead(samples=samples, epochs=epochs)
    if not quiet:
        console.print(f"[bold]{scenario.name}[/]")
    logs = out / "tensorboard"
    try:
        with _progress(console, quiet or as_json) as progress, silenced_live_findings():
            progress.add_task("training (Keras)", total=None)
            report = scenario.run(log_dir=str(logs))
    except InputError as error:
        raise _fail(str(error)) from error
    paths = _write_report(report, out)
    if as_json:
        typer.echo(report.to_json())
        return
    if not quiet:
        loss = report.meta["train_loss"]
        console.print(f"train loss {loss[0]:.4f} -> {loss[-1]:.4f} over {epochs} epochs")
    print_summary(report, console)
    console.print(f"report: {markup_safe(', '.join(str(p) for p in paths))}")
    console.print(f"TensorBoard: tensorboard --logdir {markup_safe(logs)}")


def _demo_treatment(scenario: Any, report: Report, steps: int, console: Console) -> None:
    """Before/after on a fresh copy of the demo's setup: each remedy the diagnosis ranks."""
    import reludoctor

    setup = scenario.build()
    batches = setup.batches(scenario.batch_size)
    with _progress(console, False) as progress:
        progress.add_task("trying remedies", total=None)
        treatment = reludoctor.treat(
            setup.model, setup.optimizer, batches, setup.loss_fn, steps=steps, report=report
        )
    print_treatment(treatment, console)


@app.command()
def scan(
    checkpoint: Annotated[
        Path, typer.Argument(help="torch.export program (.pt2), TorchScript archive or state dict.")
    ],
    data: Annotated[Path, typer.Option(help="Probe inputs: .npy, .npz or a saved tensor.")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="package.module:function returning the model (state dicts)."),
    ] = None,
    data_key: Annotated[str | None, typer.Option(help="Array to use from an .npz file.")] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=2**63 - 1,
            help="Samples per batch (default 256; a .pt2 exported for a fixed batch size: that).",
        ),
    ] = None,
    trust: Annotated[
        bool, typer.Option(help="Allow pickled files that can run code when loaded.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Folder to write report.json and report.html into.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Scan a saved model with probe data. Exit 0 healthy, 1 error findings, 2 bad input."""
    import reludoctor
    from reludoctor.api.scan import DEFAULT_BATCH_SIZE
    from reludoctor.loading import exported_batch_size, load_model, load_probe_data

    console = Console(stderr=as_json)
    note = None
    try:
        inputs = load_probe_data(data, key=data_key)
        size = batch_size or DEFAULT_BATCH_SIZE
        example = inputs[: min(len(inputs), size)] if inputs.dim() else None
        module = load_model(checkpoint, factory=model, trust=trust, example=example)
        fixed = exported_batch_size(module) if inputs.dim() else None
        if fixed is not None:
            inputs, note = _fit_exported_batch(inputs, fixed, batch_size)
            size = fixed
        # a bar drawn where no terminal shows it leaves a blank line before any error
        with _progress(console, quiet or as_json or not console.is_terminal) as progress:
            task = progress.add_task("scanning", total=len(inputs) if inputs.dim() else None)
            report = reludoctor.scan(
                module,
                inputs,
                batch_size=size,
                on_batch=lambda n: progress.advance(task, n),
            )
    except InputError as error:
        raise _fail(str(error)) from error
    report.meta["checkpoint"] = str(checkpoint)
    if note is not None:
        report.meta["probe_note"] = note
        if not quiet:
            error_console().print(f"note: {note}", markup=False)
    if out is not None:
        _write_report(report, out)
    if as_json:
        typer.echo(report.to_json())
    else:
        print_summary(report, console)
    raise typer.Exit(EXIT_HEALTHY if report.healthy else EXIT_FINDINGS)


def _fit_exported_batch(
    inputs: torch.Tensor, fixed: int, asked: int | None
) -> tuple[torch.Tensor, str | None]:
    """Probe data cut to whole batches of ``fixed`` samples (what a program exported with
    a fixed batch size takes), and a note of what was changed, if anything."""
    samples = len(inputs)
    if samples < fixed:
        raise InputError(
            f"the program was exported for batches of {fixed} samples and the probe data has "
            f"{samples}: give at least {fixed}, or export it with a dynamic batch dimension"
        )
    notes = []
    if asked is not None and asked != fixed:
        notes.append(f"batches of {fixed} samples, the size the program was exported for")
    dropped = samples % fixed
    if dropped:
        notes.append(f"the last {dropped} of {samples} samples left out (not a whole batch)")
    return inputs[: samples - dropped], "; ".join(notes) or None


@app.command()
def study(
    out: Annotated[Path, typer.Option(help="Folder for study.csv and study.json.")] = Path(
        "reludoctor-study"
    ),
    quick: Annotated[
        bool, typer.Option("--quick", help="A smaller grid: 50,000 samples, 1 seed.")
    ] = False,
    samples: Annotated[int | None, typer.Option(min=1000, help="Default 200,000.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Baseline's; default 10.")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="Runs per variant; default 3.")] = None,
    variant: Annotated[
        list[str] | None, typer.Option("--variant", help="Only these variants (repeatable).")
    ] = None,
    treat_steps: Annotated[
        int | None,
        typer.Option(
            min=0, help="Steps per remedy in the treatment column (default 200; 0: none)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the table.")] = False,
) -> None:
    """Measure the "Solution?" list of "Is ReLU Dead?" on its data, beside the article's claims."""
    from reludoctor import study as grid

    defaults = (50_000, 10, 1) if quick else (200_000, 10, 3)
    samples, epochs, seeds = (
        given if given is not None else default
        for given, default in zip((samples, epochs, seeds), defaults, strict=True)
    )
    console = Console(stderr=as_json)
    try:
        variants = grid.select(variant)
        with _progress(console, quiet or as_json) as progress:
            task = progress.add_task("study", total=len(variants) * seeds)

            def advance(v: grid.Variant, seed: int) -> None:
                progress.update(task, description=f"study: {v.key} seed {seed} done")
                progress.advance(task)

            result = grid.run_study(
                samples=samples,
                epochs=epochs,
                seeds=seeds,
                keys=variant,
                on_run=advance,
                **({} if treat_steps is None else {"treat_steps": treat_steps}),
            )
    except InputError as error:
        raise _fail(str(error)) from error
    try:
        csv_path, json_path = result.save(out)
    except OSError as error:
        raise _fail(f"cannot write the study into {out}: {error}") from error
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    print_study(result, console, quiet=quiet)
    console.print(f"results: {csv_path}, {json_path}")


@app.command("report")
def html_report(
    run: Annotated[Path, typer.Argument(help="A report.json written by reludoctor.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="The HTML file to write (default: RUN as .html)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
) -> None:
    """Write the self-contained HTML report (plots inline) of a saved JSON report."""
    output = output or run.with_suffix(".html")
    if _same_file(run, output):
        raise _fail(f"{output} is the input report {run}: pass another --output for the HTML")
    try:
        report = Report.load_json(run)
    except FileNotFoundError:
        raise _fail(f"{run} does not exist: pass the report.json that reludoctor wrote") from None
    except (ValueError, OSError) as error:
        raise _fail(f"cannot read {run}: {error}") from error
    console = Console()
    if not report.windows:
        console.print(
            "[yellow]note:[/] this run recorded no window of steps; the report shows its layers "
            "only"
        )
    try:
        path = report.save_html(output)
    except OSError as error:
        raise _fail(f"cannot write {output}: {error}") from error
    if not quiet:
        print_summary(report, console)
    console.print(f"report: {markup_safe(path)}")


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one existing file (through links, ``.`` or ``..`` too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either one missing
        return False


@app.command(
    "run",
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "allow_interspersed_args": False,
    },
)
def run_script(
    ctx: typer.Context,
    script: Annotated[Path, typer.Argument(help="The PyTorch training script to run.")],
    out: Annotated[
        Path, typer.Option(help="Folder for each trained model's <Model>.json and .html.")
    ] = Path("reludoctor-run"),
    window: Annotated[int, typer.Option(min=1, help="Steps per window.")] = 100,
    sample_every: Annotated[
        int, typer.Option(min=1, help="Take the costlier statistics every this many steps.")
    ] = 10,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No summary, no findings while training.")
    ] = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Repair a run that collapses while it trains (recycle units, rewind with a "
            "lower rate, batch norm, LeakyReLU, re-initialise), undoing what makes it worse.",
        ),
    ] = False,
) -> None:
    """Run SCRIPT [ARGS...] unmodified, watching every model it trains; write the reports
    when it ends (also on an error, Ctrl-C, SIGTERM or SIGHUP) and exit with the script's own
    exit code. OUT holds the last run's reports only. reludoctor's options go before SCRIPT;
    everything after it is the script's."""
    import contextlib

    from reludoctor.run import ScriptRun, prepare_out

    try:
        run = ScriptRun(script, ctx.args, window=window, sample_every=sample_every, repair=repair)
        out = prepare_out(out)
    except InputError as error:
        raise _fail(str(error)) from None
    with silenced_live_findings() if quiet else contextlib.nullcontext():
        code = run.run()
    messages = error_console()
    if not run.watched:
        messages.print(
            f"[yellow]reludoctor:[/] {markup_safe(script)} trained no model that reludoctor "
            "could see (no module ran a forward in training mode with gradients on): no report"
        )
        raise typer.Exit(code)
    try:
        written = run.write(out)
    except OSError as error:
        messages.print(
            f"[bold red]error:[/] cannot write the reports into {markup_safe(out)}: "
            f"{markup_safe(error)}"
        )
        raise typer.Exit(code or EXIT_BAD_INPUT) from None
    if not quiet and written:
        console = Console(stderr=True)
        for report in run.reports:
            print_summary(report, console)
    for path in written:
        messages.print(f"report: {markup_safe(path)}")
    raise typer.Exit(code)


def main() -> None:
    """Entry point of the ``reludoctor`` console script."""
    app(prog_name="reludoctor")


if __name__ == "__main__":
    main()
    sys.exit(0)
