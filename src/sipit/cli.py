"""The `sipit` command line: a thin Typer layer over library functions, the only place that
prints."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
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
                     help="0 = embeddings, i = block i (pre final norm), -1 = last block, final;"
                     " looped models: u.i = block i of loop step u (e.g. 2.-1, 2.final).")


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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # sipit shows its own bars; keep stderr to one line on errors
    if not verbose:  # the hub client's retry warnings (offline) would bury the one-line error
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


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
        if text is not None:
            raise SipitError("give the prompt once: --text or --text-file, not both")
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
    checkpoint: Path = typer.Option(
        None, help="Checkpoint file (default: the states file with suffix .invert.json)."),
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
    else:
        show_inversion(result)
    if not result.all_accepted:
        rejected = sum(not p.accepted for p in result.positions)
        err_console.print(f"[red]not recovered:[/] {rejected} of {len(result.positions)} "
                          "positions have no candidate within tolerance; these states do not "
                          "come from this model, layer and dtype (or were altered)", soft_wrap=True)
        raise typer.Exit(1)


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
    """Capture three real sentences at a middle layer and invert them (sipit.demo.run)."""
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


precision_app = typer.Typer(help="The sampler/trainer mismatch in fp32, bf16 and fp16.",
                            no_args_is_help=True)
app.add_typer(precision_app, name="precision")


@precision_app.command("mismatch")
def precision_mismatch(
    model: str = MODEL, dtype: str = typer.Option("bf16", help="fp32, bf16 or fp16."),
    sequences: int = typer.Option(32, help="Sampled sequences."),
    max_new: int = typer.Option(256, help="Longest response; others are spread below it."),
    trainer: str = typer.Option("batch", help="batch (teacher-forced) or replay (sampler's)."),
    seed: int = typer.Option(0), device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
):
    """Measure how far the trainer's pi drifts from the sampler's mu (sipit.precision.mismatch)."""
    from sipit.precision.mismatch import MismatchConfig, measure

    cfg = MismatchConfig(model=model, dtype=dtype, sequences=sequences, max_new_tokens=max_new,
                         trainer=trainer, seed=seed, device=device)
    report = measure(cfg)
    if as_json:
        print(json.dumps(report, indent=1))
        return
    table = Table(title=f"sampler vs trainer: {report['model']}, {report['dtype']}, "
                        f"{report['tokens']} tokens")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("kl", "k1", "k2", "k3", "dp_mean", "dp_abs_mean", "dp_max", "dp_min",
                "seq_kl", "seq_log_ratio_mean", "seq_slope_per_1k", "above_cap"):
        table.add_row(key, f"{report[key]:.3e}")
    console.print(table)


@precision_app.command("rl")
def precision_rl(
    dtype: str = typer.Option("bf16", help="fp32, bf16 or fp16 (sampler and trainer autocast)."),
    variant: str = typer.Option("plain", help="plain, tis (token-level) or mis (sequence-level)."),
    steps: int = typer.Option(150), lr: float = typer.Option(1e-4), seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/precision-rl"), "--out", "-o",
                             help="Run folder (the shared start and the history JSON)."),
):
    """Dr. GRPO on digit sorting with a dtype switch (sipit.precision.rl.train)."""
    from sipit.precision.rl import RLConfig, train

    cfg = RLConfig(dtype=dtype, variant=variant, steps=steps, lr=lr, seed=seed, out=str(out))
    bar, update = tracked(f"RL {dtype} {variant}")
    with bar:
        result = train(cfg, progress=update)
    tail = result["history"][-20:]
    first, last = result["evals"][0]["solve_rate"], result["evals"][-1]["solve_rate"]
    console.print(f"solve rate on {result['prompts']} perfectible prompts: "
                  f"{first:.3f} -> {last:.3f}")
    console.print(f"last 20 steps: reward {sum(r['reward'] for r in tail) / len(tail):.3f}, "
                  f"KL[mu||pi] {sum(r['kl'] for r in tail) / len(tail):.2e}, "
                  f"skipped steps {result['skipped']}, loss scale {tail[-1]['loss_scale']:.0f}")
    console.print(f"history: {out / f'rl_{dtype}_{variant}.json'}")


audit_app = typer.Typer(help="Collision tests for injectivity: pairs, continuations, margins.",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")
AUDIT_LAYERS = typer.Option("all", "--layers",
                            help="Comma-separated layers, or 'all' (every block and final).")
AUDIT_OUT = typer.Option(Path("audit"), "--out", "-o", help="Folder for JSON, markdown and plots.")
THRESHOLD = typer.Option(1e-6, help="L2 distance under which two states collide.")


def _check_out(out: Path) -> None:
    """The audit output must be a folder (made if missing), not a file."""
    if out.exists() and not out.is_dir():
        raise SipitError(f"--out {out} is a file; name a folder for the reports")


def _audit_saved(out: Path, name: str, data: dict) -> None:
    from sipit.audit import report

    paths = report.save(out, name, data)
    console.print("wrote " + ", ".join(str(p) for p in paths))


def _audit_table(title: str, layers: list[dict]) -> None:
    table = Table(title=title)
    for column in ("layer", "pairs", "min distance", "under threshold", "under floor"):
        table.add_column(column, justify="right")
    for layer in layers:
        counts = [layer["under_threshold"], layer.get("under_floor", 0)]
        table.add_row(layer["layer"], f"{layer['pairs']:.3g}", f"{layer['min_distance']:.4g}",
                      *(f"[red]{n}[/]" if n else "0" for n in counts))
    console.print(table)


@audit_app.command("pairs")
def audit_pairs_cmd(
    prompts: Path = typer.Option(..., "--prompts", "-p", help="One prompt a line, or .jsonl."),
    model: str = MODEL, layers: str = AUDIT_LAYERS, threshold: float = THRESHOLD,
    floor: float = typer.Option(None, help="Relative noise floor (default 16 roundoffs)."),
    bos: bool = typer.Option(False, help="Put the BOS token in front of every prompt."),
    top: int = typer.Option(10, help="Closest pairs to list per layer."),
    device: str = DEVICE, dtype: str = DTYPE, out: Path = AUDIT_OUT,
    block: int = typer.Option(2048, help="Rows per block (memory: block x tile floats)."),
    tile: int = typer.Option(8192, help="Columns per tile."),
    checkpoint: Path = typer.Option(None, help="Checkpoint folder (default: OUT/checkpoint)."),
):
    """All pairwise distances of last-token states (sipit.audit.pairs.audit_pairs)."""
    import shutil

    from sipit.audit.pairs import audit_pairs, read_prompts

    _check_out(out)
    checkpoint = checkpoint or out / "checkpoint"
    bar, update = tracked("pairs")
    with bar:
        result = audit_pairs(model, read_prompts(prompts), layers=layers, threshold=threshold,
                             floor=floor, bos=bos, k=top, device=device, dtype=dtype,
                             block=block, tile=tile, checkpoint=checkpoint, progress=update)
    shutil.rmtree(checkpoint, ignore_errors=True)
    _audit_table(f"{result.n_prompts} prompts, {result.model} ({result.dtype})", result.layers)
    _audit_saved(out, "pairs", result.to_dict())
    if result.collisions or result.near_collisions:
        raise typer.Exit(1)


@audit_app.command("continuations")
def audit_continuations_cmd(
    prefix: list[str] = typer.Option(None, "--prefix", help="A prefix (repeatable)."),
    prefixes: Path = typer.Option(None, help="File of prefixes, one a line (or .jsonl)."),
    from_pairs: Path = typer.Option(None, help="Take the closest prompts of this pairs JSON."),
    k: int = typer.Option(10, help="Prefixes taken from --from-pairs."),
    candidates: int = typer.Option(None, help="First N tokens only (default: whole vocab)."),
    model: str = MODEL, layers: str = AUDIT_LAYERS, threshold: float = THRESHOLD,
    device: str = DEVICE, dtype: str = DTYPE, out: Path = AUDIT_OUT,
):
    """Extend prefixes by every token, compare all (audit.continuations.audit_continuations)."""
    from sipit.audit import continuations
    from sipit.audit.pairs import read_prompts

    _check_out(out)
    chosen = list(prefix or [])
    if prefixes is not None:
        chosen += read_prompts(prefixes)
    if from_pairs is not None:
        chosen += continuations.closest_prompts(from_pairs, k=k)
    if not chosen:
        raise SipitError("no prefixes: give --prefix, --prefixes or --from-pairs")
    ckpt = out / "continuations.ckpt.json"
    out.mkdir(parents=True, exist_ok=True)
    bar, update = tracked("continuations")
    with bar:
        result = continuations.audit_continuations(
            model, chosen, layers=layers, threshold=threshold, candidates=candidates,
            device=device, dtype=dtype, checkpoint=ckpt, progress=update)
    ckpt.unlink(missing_ok=True)
    _audit_table(f"{len(chosen)} prefixes x {result.candidates} continuations", result.layers)
    _audit_saved(out, "continuations", result.to_dict())
    if result.collisions or result.near_collisions:
        raise typer.Exit(1)


@audit_app.command("margins")
def audit_margins_cmd(
    text: list[str] = typer.Option(None, "--text", "-t", help="A prompt (repeatable)."),
    prompts: Path = typer.Option(None, "--prompts", "-p", help="File of prompts."),
    model: str = MODEL, layers: str = AUDIT_LAYERS,
    device: str = DEVICE, dtype: str = DTYPE, out: Path = AUDIT_OUT,
):
    """Per-position margins against fp32/fp16/bf16 rounding (audit.margins.audit_margins)."""
    from sipit.audit.margins import audit_margins
    from sipit.audit.pairs import read_prompts

    _check_out(out)
    chosen = list(text or []) + (read_prompts(prompts) if prompts is not None else [])
    if not chosen:
        raise SipitError("no prompt: give --text or --prompts")
    ckpt = out / "margins.ckpt.json"
    out.mkdir(parents=True, exist_ok=True)
    bar, update = tracked("margins")
    with bar:
        result = audit_margins(model, chosen, layers=layers, device=device, dtype=dtype,
                               checkpoint=ckpt, progress=update)
    ckpt.unlink(missing_ok=True)
    table = Table(title=f"margins, {result.model} ({result.dtype})")
    for column in ("layer", "positions", "min margin", "safe fp32", "safe fp16", "safe bf16"):
        table.add_column(column, justify="right")
    for layer, s in result.summary().items():
        table.add_row(layer, str(s["positions"]), f"{s['min_margin']:.3g}",
                      *(f"{s[f'safe_{f}']:.0%}" for f in ("fp32", "fp16", "bf16")))
    console.print(table)
    _audit_saved(out, "margins", result.to_dict())


@audit_app.command("minilm")
def audit_minilm_cmd(
    prompts: Path = typer.Option(..., "--prompts", "-p", help="One prompt a line, or .jsonl."),
    threshold: float = THRESHOLD, device: str = DEVICE, dtype: str = DTYPE,
    out: Path = AUDIT_OUT,
):
    """Pairwise audit of the pretrained all-MiniLM-L6-v2 encoder (audit.minilm.audit_minilm)."""
    from sipit.audit.minilm import audit_minilm
    from sipit.audit.pairs import read_prompts

    _check_out(out)
    bar, update = tracked("minilm")
    with bar:
        result = audit_minilm(read_prompts(prompts), threshold=threshold, device=device,
                              dtype=dtype, progress=update)
    _audit_table(f"{result.pairs.n_prompts} prompts, all-MiniLM-L6-v2", result.pairs.layers)
    n_text = sum(len(g) - 1 for g in result.text_collisions)
    console.print(f"{n_text} texts share token ids with another text (tokenizer collisions)")
    _audit_saved(out, "minilm", result.to_dict())
    if result.pairs.collisions or result.pairs.near_collisions:
        raise typer.Exit(1)


INTERRUPTED = 130


def fail(message: str, code: int = 2) -> None:
    """One line on stderr (markup in the message is shown as text), then exit."""
    err_console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)


def run() -> None:
    """Entry point: a SipitError or an OS refusal is one line and exit code 2; Ctrl-C is 130.

    Typer, run with standalone_mode=False, returns the exit code of typer.Exit (and 130 for
    Ctrl-C) instead of raising it.
    """
    import click

    try:
        code = app(standalone_mode=False)
    except SipitError as err:
        fail(str(err))
    except OSError as err:  # a path the system refused (a folder, no permission, no space)
        where = f": {err.filename}" if err.filename else ""
        fail(f"{err.strerror or err}{where}")
    except click.ClickException as err:  # usage errors
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        code = INTERRUPTED
    if code == INTERRUPTED:
        err_console.print("[yellow]interrupted[/]: finished work is kept in the checkpoint; "
                          "run the same command again to resume", soft_wrap=True)
    sys.exit(code if isinstance(code, int) else 0)
