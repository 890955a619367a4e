"""The `sipit` command line: a thin Typer layer over library functions; the only place that prints."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sipit.errors import SipitError

app = typer.Typer(help="Do this model's hidden states give away the prompt?", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)

MODEL = typer.Option("shakespeare-llama", "--model", "-m",
                     help="Built-in name, local folder or hub id.")
DEVICE = typer.Option("cpu", help="cpu, cuda, cuda:N or auto.")
DTYPE = typer.Option("fp32", help="fp32, fp16 or bf16.")
LAYER = typer.Option("-1", "--layer", "-l",
                     help="0 = embeddings, i = block i (pre final norm), -1 = last block, final.")


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err_console, transient=True)


def tracked(description: str):
    """A rich progress bar and a progress(done, total) callback feeding it."""
    bar = progress_bar()
    task = bar.add_task(description, total=None)

    def update(done, total, *_):
        bar.update(task, completed=done, total=total)

    return bar, update


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log library progress.")):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def capture(
    out: Path = typer.Option(..., "--out", "-o", help="States file to write (.safetensors)."),
    text: str = typer.Option(None, "--text", "-t", help="The prompt."),
    text_file: Path = typer.Option(None, "--text-file", help="Read the prompt from a file."),
    model: str = MODEL, layer: str = LAYER, device: str = DEVICE, dtype: str = DTYPE,
):
    """Capture the per-position hidden states of a prompt at one layer (sipit.capture)."""
    import sipit

    if text_file is not None:
        if not text_file.is_file():
            raise SipitError(f"text file not found: {text_file}")
        text = text_file.read_text(encoding="utf-8")
    if text is None:
        raise SipitError("no prompt: give --text or --text-file")
    result = sipit.capture(model, text, layer=layer, out=out, device=device, dtype=dtype)
    meta = result.meta
    console.print(f"wrote [bold]{out}[/]: {meta['length']} positions x {meta['hidden_size']} at "
                  f"layer {meta['layer']} of {meta['model']} ({meta['dtype']})")


@app.command()
def invert(
    states: Path = typer.Argument(..., help="States file written by `sipit capture`."),
    model: str = typer.Option(None, "--model", "-m", help="Override the model in the metadata."),
    policy: str = typer.Option("probe", help="probe (default), gradient, random or exhaustive."),
    device: str = DEVICE,
    dtype: str = typer.Option(None, help="Run dtype; defaults to the capture dtype."),
    checkpoint: Path = typer.Option(None, help="Checkpoint file (default: STATES.invert.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    force: bool = typer.Option(False, help="Skip the model/weights provenance check."),
):
    """Recover the prompt behind a states file with SipIt (sipit.invert)."""
    import sipit

    checkpoint = checkpoint or states.with_suffix(".invert.json")
    bar, update = tracked("inverting")
    with bar:
        result = sipit.invert(states, model=model, policy=policy, device=device, dtype=dtype,
                              checkpoint=checkpoint, force=force, progress=update)
    checkpoint.unlink(missing_ok=True)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    show_inversion(result)


def show_inversion(result) -> None:
    table = Table(title=f"SipIt ({result.policy}) at layer {result.layer}, {result.dtype}")
    for column in ("pos", "token", "id", "candidates", "distance", "runner-up", "margin"):
        table.add_column(column, justify="right" if column != "token" else "left")
    for p in result.positions:
        table.add_row(str(p.position), repr(p.token), str(p.token_id), str(p.candidates),
                      f"{p.distance:.2e}", "-" if p.runner_up is None else f"{p.runner_up:.3g}",
                      "-" if p.margin is None else f"{p.margin:.3g}")
    console.print(table)
    verdict = "[green]all accepted[/]" if result.all_accepted else "[red]some not accepted[/]"
    console.print(f"{verdict} in {result.seconds:.2f} s")
    console.print(f"[bold]recovered:[/] {result.text}")


@app.command()
def demo(model: str = MODEL, layer: str = typer.Option("2", "--layer", "-l")):
    """Capture three real sentences at a middle layer, invert them, show the verdict (sipit.demo)."""
    from sipit.demo import run

    bar, update = tracked("demo")
    with bar:
        rows = run(model=model, layer=layer, progress=update)
    table = Table(title=f"sipit demo: {model}, layer {layer}")
    for column in ("prompt", "recovered", "exact", "tokens", "seconds"):
        table.add_column(column)
    for row in rows:
        ok = "[green]yes[/]" if row["exact"] else "[red]NO[/]"
        table.add_row(row["prompt"], row["recovered"], ok, str(row["tokens"]),
                      f"{row['seconds']:.2f}")
    console.print(table)
    if not all(row["exact"] for row in rows):
        raise typer.Exit(1)


@app.command()
def train(
    arch: str = typer.Option("llama", help="Architecture (see sipit.models.archs)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the model to."),
    tokens: int = typer.Option(1_500_000, help="Training token budget."),
    tokenizer: str = typer.Option(None, help="Reuse this model's tokenizer (default: train one)."),
    seed: int = typer.Option(0),
):
    """Train a small model on tiny Shakespeare for the built-in zoo (sipit.train.train)."""
    from sipit.train import TrainConfig
    from sipit.train import train as run_training

    cfg = TrainConfig(arch=arch, out=str(out), tokens=tokens, tokenizer=tokenizer, seed=seed)
    bar, update = tracked(f"training {arch}")
    with bar:
        record = run_training(cfg, progress=update)
    console.print_json(json.dumps({k: v for k, v in record.items() if k != "config"}))


def run() -> None:
    """Entry point that turns SipitError into a one-line message and exit code 2."""
    try:
        app(standalone_mode=False)
    except SipitError as err:
        err_console.print(f"[red]error:[/] {err}")
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: finished work is kept in the checkpoint")
        sys.exit(130)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except Exception as err:  # click's usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
