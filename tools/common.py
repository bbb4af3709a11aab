"""Pieces shared by the `kvc` commands: error handling, progress, option parsing.

The tools import torch and the codecs inside the commands that need them, never at module level:
`kvc --help` and `kvc COMMAND --help` stay fast. Defaults shown in the help come from modules that
import nothing heavy (`kvcodec.constants`, `kvcodec.eval.texts`, `kvcodec.eval.models`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from kvcodec.constants import LAYOUTS
from kvcodec.errors import InputError, KVCError
from kvcodec.eval.models import DEFAULT_MODEL, MODELS

EXIT_ERROR = 1


class KvcGroup(click.Group):
    """Turns every exception into one line on stderr (KVC_DEBUG=1 shows the traceback), click's
    own usage errors included, and exits 1."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" ({ctx.command_path if ctx else 'kvc'} --help)" if isinstance(exc, click.UsageError) else ""
            click.echo(f"kvc: error: {exc.format_message()}{hint}", err=True)
            sys.exit(EXIT_ERROR)
        except click.Abort:
            click.echo("kvc: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("kvc: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the user sees one line, never a traceback
            if os.environ.get("KVC_DEBUG"):
                raise
            click.echo(f"kvc: error: {_message(exc)}", err=True)
            sys.exit(EXIT_ERROR)


def _message(exc: BaseException) -> str:
    if isinstance(exc, KVCError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"{type(exc).__name__}: {exc} (internal error; KVC_DEBUG=1 shows the traceback)"


@contextlib.contextmanager
def progress_bar(total: int, label: str, quiet: bool):
    """A rich progress bar on stderr when it is a terminal; yields an `update(done, label=None)`
    callback (a new label replaces the description, e.g. to show a loss)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        def update(done: int, label: str | None = None) -> None:
            bar.update(task, completed=done, **({"description": label} if label else {}))

        yield update


@contextlib.contextmanager
def status(quiet: bool):
    """A spinner on stderr when it is a terminal, for work without a count (loading a model);
    yields `show(label)`, which names the phase now running."""
    if quiet or not sys.stderr.isatty():
        yield lambda label: None
        return
    from rich.console import Console

    with Console(stderr=True).status("") as spinner:
        yield lambda label: spinner.update(label)


def parse_options(pairs) -> dict:
    """`--opt KEY=VALUE`: values are JSON when they parse (numbers, true/false), else strings."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--opt expects KEY=VALUE, not {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def output_path(path: str | None, source: str, suffix: str) -> str:
    """`path`, or the source's name with `suffix` (in the current folder for a URL)."""
    from kvcodec.container.remote import is_url

    if path:
        return path
    if is_url(source):
        source = os.path.basename(source.split("?")[0].rstrip("/")) or "cache"
    return os.path.splitext(source)[0] + suffix


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


layout_option = click.option("--layout", type=click.Choice(LAYOUTS[:4]), default=None,
                             help="Layout of a .pt input when it cannot be detected.")
heads_option = click.option("--heads", type=click.IntRange(1), default=None,
                            help="KV heads, for the cachegen [layers, tokens, heads*head_dim] layout.")
def model_option(help: str = "Development model to run (its wheels installed)."):
    return click.option("--model", type=click.Choice(list(MODELS)), default=DEFAULT_MODEL, show_default=True,
                        help=help)


force_option = click.option("--force", is_flag=True, help="Overwrite an existing output file.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")


PIPE_WIDTH = 160


class _TrimmedLines:
    """A text stream writing to stdout without the spaces that pad a line's end."""

    def write(self, text: str) -> int:
        sys.stdout.write("\n".join(line.rstrip() for line in text.split("\n")))
        return len(text)

    def flush(self) -> None:
        sys.stdout.flush()


def make_console():
    """A rich console on stdout. When stdout is not a terminal, tables fold at PIPE_WIDTH columns
    (or $COLUMNS) and lines carry no padding."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    width = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else PIPE_WIDTH
    return Console(file=_TrimmedLines(), width=width)
