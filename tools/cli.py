"""`kvc`: pack, unpack, inspect, verify and capture KV caches from the shell.

Every user error prints one line on stderr and exits non-zero; outputs are written under a
temporary name and renamed only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click
import torch

import kvcodec
from kvcodec import api, sources
from kvcodec.errors import InputError, KVCError

EXIT_ERROR = 1


class KvcGroup(click.Group):
    """Turns every exception into one line on stderr (KVC_DEBUG=1 shows the traceback)."""

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
    """A rich progress bar on stderr when it is a terminal; yields an `update(done)` callback."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


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


def _output_path(path: str | None, source: str, suffix: str) -> str:
    return path or os.path.splitext(source)[0] + suffix


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


layout_option = click.option("--layout", type=click.Choice(sources.LAYOUTS[:4]), default=None,
                             help="Layout of a .pt input when it cannot be detected.")
heads_option = click.option("--heads", type=click.IntRange(1), default=None,
                            help="KV heads, for the cachegen [layers, tokens, heads*head_dim] layout.")
force_option = click.option("--force", is_flag=True, help="Overwrite an existing output file.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")


@click.group(cls=KvcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(kvcodec.__version__, prog_name="kvc")
def cli():
    """Compress, store and restore LLM key-value caches (.kvc files)."""


@cli.command()
@click.argument("input", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file [INPUT with .kvc].")
@click.option("-c", "--codec", default="raw", show_default=True, help="Codec name (see `kvc codecs`).")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE", help="Codec option, repeatable.")
@click.option("--chunk-tokens", type=click.IntRange(1), default=api.DEFAULT_CHUNK_TOKENS, show_default=True,
              help="Tokens per independently decodable chunk.")
@layout_option
@heads_option
@force_option
@quiet_option
def pack(input, output, codec, opts, chunk_tokens, layout, heads, force, quiet):
    """Compress a cache file (.pt or .safetensors) into a .kvc file."""
    output = _output_path(output, input, ".kvc")
    if os.path.abspath(output) == os.path.abspath(input):
        raise InputError("the output would overwrite the input; choose another -o")
    if os.path.exists(output) and not force:
        raise InputError(f"{output} exists (use --force to overwrite)")
    the_codec = api.make_codec(codec, parse_options(opts))  # fail on a bad codec before reading
    cache = sources.load_cache(input, layout=layout, heads=heads)
    with progress_bar(cache.num_layers, "packing", quiet) as update:
        size = api.pack(cache, output, the_codec, chunk_tokens=chunk_tokens, overwrite=force, progress=update)
    if not quiet:
        click.echo(f"{output}: {_human(size)} ({cache.nbytes / size:.2f}x of {_human(cache.nbytes)}, "
                   f"codec {the_codec.name})", err=True)


@cli.command()
@click.argument("input", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output .pt or .safetensors [INPUT with the extension of the original layout].")
@click.option("--layout", type=click.Choice(sources.LAYOUTS), default=None,
              help="Layout to write [the layout the cache came in].")
@force_option
@quiet_option
def unpack(input, output, layout, force, quiet):
    """Decode a .kvc file back to .pt or .safetensors."""
    with kvcodec.open(_existing(input)) as reader:
        stored = reader.header.layout
        suffix = ".safetensors" if (layout or stored) == "safetensors" else ".pt"
        output = _output_path(output, input, suffix)
        if os.path.exists(output) and not force:
            raise InputError(f"{output} exists (use --force to overwrite)")
        reader.check_layout()
        with progress_bar(reader.num_layers, "decoding", quiet) as update:
            cache = reader.read_cache(progress=update)
    written = sources.save_cache(cache, output, layout=layout, overwrite=force)
    if not quiet:
        click.echo(f"{output}: {cache.num_layers} layers, layout {written}", err=True)


def _existing(path: str) -> str:
    sources._check_readable(path)
    return path


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(file, as_json):
    """Show what a .kvc file holds, layer by layer."""
    with kvcodec.open(_existing(file)) as reader:
        info = reader.info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    codecs = ", ".join(" ".join([c["name"]] + [f"{k}={v}" for k, v in c["config"].items()]) for c in info["codecs"])
    console.print(f"[bold]{file}[/]: kvc {info['format_version']}, {len(info['layers'])} layers, "
                  f"{_human(info['file_bytes'])} for {_human(info['raw_bytes'])} ({info['ratio']:.2f}x), "
                  f"layout {info['layout']}, chunks of {info['chunk_tokens']} tokens")
    console.print(f"codecs: {codecs}")
    if info["metadata"]:
        console.print("metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(info["metadata"].items())))
    table = Table(show_edge=False)
    for col in ("layer", "shape", "dtype", "codec", "bytes", "ratio", "chunks"):
        table.add_column(col, justify="right" if col in ("layer", "bytes", "ratio", "chunks") else "left")
    for lay in info["layers"]:
        k, v = lay["key"], lay["value"]
        stored = k["bytes"] + v["bytes"]
        raw = k["raw_bytes"] + v["raw_bytes"]
        shape = "x".join(map(str, k["shape"]))
        if v["shape"] != k["shape"]:
            shape = f"K {shape} V {'x'.join(map(str, v['shape']))}"
        table.add_row(str(lay["index"]), shape, k["dtype"] if k["dtype"] == v["dtype"] else f"{k['dtype']}/{v['dtype']}",
                      ",".join(sorted(set(k["codecs"] + v["codecs"]))) or "-", _human(stored),
                      f"{raw / stored:.2f}x" if stored else "-", str(k["chunks"] + v["chunks"]))
    console.print(table)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--against", type=click.Path(dir_okay=False), help="Original cache to compare with.")
@layout_option
@heads_option
def verify(file, against, layout, heads):
    """Check checksums and decode every record; with --against, report errors per layer.

    Exits non-zero on corruption, or when a lossless codec does not reproduce the original.
    """
    with kvcodec.open(_existing(file)) as reader:
        reader.verify()
        cache = reader.read_cache()
        lossless = all(kvcodec.codec_class(c.id).lossless for c in reader.header.codecs)
    click.echo(f"{file}: checksums ok, {cache.num_layers} layers decode")
    if not against:
        return
    original = sources.load_cache(against, layout=layout, heads=heads)
    if original.num_layers != cache.num_layers:
        raise InputError(f"{against} has {original.num_layers} layers, the file {cache.num_layers}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(original.layers, cache.layers)):
        parts = []
        for name, x, y in (("K", a.key, b.key), ("V", a.value, b.value)):
            if x.shape != y.shape:
                raise InputError(f"layer {i} {name}: original {tuple(x.shape)}, file {tuple(y.shape)}")
            diff = (x.double() - y.double()).abs()
            rel = float(diff.norm() / x.double().norm().clamp_min(1e-30))
            exact = x.dtype == y.dtype and torch.equal(x, y)
            worst = max(worst, 0.0 if exact else float(diff.max()))
            parts.append(f"{name} max {float(diff.max()):.3g} rel {rel:.3g}")
        click.echo(f"layer {i:3d}: " + ", ".join(parts))
    if lossless and worst > 0:
        raise KVCError("a lossless codec did not reproduce the original exactly")
    click.echo("identical to the original" if worst == 0 else f"lossy: largest error {worst:.3g}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def codecs(as_json):
    """List the installed codecs with their ids and default options."""
    rows = [{"id": c.codec_id, "name": c.name, "lossless": c.lossless,
             "defaults": c.from_config({}).get_config(), "description": c.description}
            for c in kvcodec.available_codecs()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False)
    for col in ("id", "name", "lossless", "defaults", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), r["name"], "yes" if r["lossless"] else "no",
                      " ".join(f"{k}={v}" for k, v in r["defaults"].items()), r["description"])
    Console().print(table)


@cli.command()
@click.option("--text", default=None, help="Text file, or a shipped text name (prose) [prose].")
@click.option("--tokens", type=click.IntRange(1), default=1024, show_default=True, help="Prompt tokens.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Output .pt or .safetensors.")
@force_option
@quiet_option
def capture(text, tokens, dtype, output, force, quiet):
    """Run SmolLM2-135M on a text and save its real KV cache."""
    from kvcodec import capture as cap

    if os.path.exists(output) and not force:
        raise InputError(f"{output} exists (use --force to overwrite)")
    if not output.lower().endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise InputError(f"{output}: output must end in .pt or .safetensors")
    cache = cap.capture(text, tokens, getattr(torch, dtype))
    sources.save_cache(cache, output, overwrite=force)
    if not quiet:
        lay = cache.layers[0]
        click.echo(f"{output}: {cache.num_layers} layers x {tuple(lay.key.shape)} {dtype}, "
                   f"{_human(cache.nbytes)}", err=True)


def main():
    cli(prog_name="kvc")


if __name__ == "__main__":
    main()
