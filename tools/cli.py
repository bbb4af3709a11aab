"""`kvc`: pack, unpack, inspect, verify and capture KV caches from the shell.

Every user error prints one line on stderr and exits non-zero; outputs are written under a
temporary name and renamed only when complete.
"""

from __future__ import annotations

import json
import os

import click

import kvcodec
from kvcodec.constants import DEFAULT_CHUNK_TOKENS, LAYOUTS
from kvcodec.errors import InputError, KVCError
from kvcodec.eval.models import MODELS
from kvcodec.eval.texts import DEFAULT_TOKENS, DEFAULT_WINDOW, shipped_texts
from kvcodec.tools.common import (
    KvcGroup,
    force_option,
    heads_option,
    human,
    layout_option,
    make_console,
    model_option,
    output_path,
    parse_options,
    progress_bar,
    quiet_option,
    status,
)
from kvcodec.tools.harness import bench_command, eval_command
from kvcodec.tools.train import calibrate_command, train_ae_command

DEFAULT_PACK_CODEC = "shuffle-zstd"  # lossless, and the smallest of the lossless codecs on real caches
DEFAULT_TARGET_CODEC = "cachegen"  # the codec whose presets size and error targets choose from


@click.group("kvc", cls=KvcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(kvcodec.__version__, prog_name="kvc")
def cli():
    """Compress, store and restore LLM key-value caches (.kvc files)."""


@cli.command()
@click.argument("input", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file [INPUT with .kvc].")
@click.option("-c", "--codec", default=None,
              help="Codec, or SELECTION+CODEC to prune tokens first, e.g. h2o+cachegen (see `kvc codecs`) "
                   f"[{DEFAULT_PACK_CODEC}, lossless; {DEFAULT_TARGET_CODEC} with --target-ratio or --max-error].")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
              help="Option, repeatable; STAGE.KEY=VALUE names the stage (h2o.keep=0.25).")
@click.option("--scores", "scores_path", type=click.Path(dir_okay=False),
              help="Attention scores from `kvc capture --scores` [INPUT's .scores.safetensors if present].")
@click.option("--chunk-tokens", type=click.IntRange(1), default=DEFAULT_CHUNK_TOKENS, show_default=True,
              help="Tokens per independently decodable chunk.")
@click.option("--target-ratio", type=click.FloatRange(1.0), default=None,
              help="Pick the codec's preset per chunk so the file is at most 1/R of the cache.")
@click.option("--max-error", type=click.FloatRange(0.0), default=None,
              help="Keep every layer's key and value within this relative RMS error (as `kvc verify` "
                   "reports it), in as few bytes as the presets chosen per chunk allow.")
@layout_option
@heads_option
@force_option
@quiet_option
def pack(input, output, codec, opts, scores_path, chunk_tokens, target_ratio, max_error, layout, heads, force, quiet):
    """Compress a cache file (.pt or .safetensors) into a .kvc file."""
    from kvcodec import api, cachefiles
    from kvcodec.encoding import pipeline, presets
    from kvcodec.selection.scores import AttentionScores

    output = output_path(output, input, ".kvc")
    if os.path.abspath(output) == os.path.abspath(input):
        raise InputError("the output would overwrite the input; choose another -o")
    if os.path.exists(output) and not force:
        raise InputError(f"{output} exists (use --force to overwrite)")
    options = parse_options(opts)
    targeted = target_ratio is not None or max_error is not None
    codec = codec or (DEFAULT_TARGET_CODEC if targeted else DEFAULT_PACK_CODEC)
    if target_ratio is not None and max_error is not None:
        raise InputError("give --target-ratio or --max-error, not both")
    # fail on a bad codec, stage or option before reading anything
    pipe = pipeline.parse(codec, options) if targeted else pipeline.checked(codec, options)
    if targeted:
        presets.candidates(pipe.codec, pipe.options)
    scores = None
    if pipe.selector is not None and pipe.selector.needs_scores:
        scores = AttentionScores.load(scores_path or find_scores(input, pipe.selector.name))
    cache = cachefiles.load_cache(input, layout=layout, heads=heads)
    with progress_bar(cache.num_layers, "choosing presets" if targeted else "packing", quiet) as update:
        size = api.pack(cache, output, codec, chunk_tokens=chunk_tokens, overwrite=force, progress=update,
                        target_ratio=target_ratio, max_error=max_error, scores=scores, **options)
    if not quiet:
        click.echo(f"{output}: {human(size)} ({cache.nbytes / size:.2f}x of {human(cache.nbytes)}, "
                   f"{'pipeline' if pipe.selector else 'codec'} {codec})", err=True)


def find_scores(cache_path: str, method: str) -> str:
    from kvcodec.selection import needing_no_scores, scores

    path = scores.path_beside(cache_path)
    if not os.path.exists(path):
        raise InputError(f"{method} needs attention scores: capture them with `kvc capture --scores` (expected "
                         f"{path}) or pass --scores; methods that need none: {needing_no_scores()}")
    return path


@cli.command()
@click.argument("input", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output .pt or .safetensors [INPUT with the extension of the original layout].")
@click.option("--layout", type=click.Choice(LAYOUTS), default=None,
              help="Layout to write [the layout the cache came in].")
@force_option
@quiet_option
def unpack(input, output, layout, force, quiet):
    """Decode a .kvc file back to .pt or .safetensors."""
    from kvcodec import cachefiles

    with kvcodec.open(cachefiles.check_readable(input)) as reader:
        stored = reader.header.layout
        suffix = ".safetensors" if (layout or stored) == "safetensors" else ".pt"
        output = output_path(output, input, suffix)
        if os.path.exists(output) and not force:
            raise InputError(f"{output} exists (use --force to overwrite)")
        reader.check_layout()
        with progress_bar(reader.num_layers, "decoding", quiet) as update:
            cache = reader.read_cache(progress=update)
    written = cachefiles.save_cache(cache, output, layout=layout, overwrite=force)
    if not quiet:
        click.echo(f"{output}: {cache.num_layers} layers, layout {written}", err=True)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check", is_flag=True, help="Also verify every checksum (reads the whole file).")
def inspect(file, as_json, check):
    """Show what a .kvc file holds, layer by layer.

    Reads the header and the index (both checksummed); payloads are not read unless --check
    (`kvc verify` also decodes them)."""
    from kvcodec import cachefiles

    with kvcodec.open(cachefiles.check_readable(file)) as reader:
        info = reader.info()
        if check:
            reader.verify()
        info["payloads_checked"] = check
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    console = make_console()
    several = len(info["codecs"]) > 1
    codecs = ", ".join((f"[{slot}] " if several else "") + describe(c) for slot, c in enumerate(info["codecs"]))
    pruned = info["selection"] is not None or any(lay["kept"] < 1 for lay in info["layers"])
    windows = any(lay["window"] is not None for lay in info["layers"])
    against = (f"{human(info['full_raw_bytes'])} full cache of {info['length']} tokens ({info['full_ratio']:.2f}x)"
               if pruned else f"{human(info['raw_bytes'])} ({info['ratio']:.2f}x)")
    # what the header says is the file's to choose: shown folded and escaped, never as markup
    console.print(f"[bold]{escape(str(file))}[/]: kvc {info['format_version']}, {len(info['layers'])} layers, "
                  f"{human(info['file_bytes'])} for {against}, layout {escape(fold(info['layout']))}, "
                  f"chunks of {info['chunk_tokens']} tokens")
    if info["selection"] is not None:
        console.print(f"pipeline: {escape(fold(describe(info['selection'])))} + {escape(codecs)}")
    else:
        console.print(f"codecs: {escape(codecs)}")
    if info["metadata"]:
        items = sorted(info["metadata"].items())
        shown = ", ".join(fold(f"{k}={v}") for k, v in items[:METADATA_SHOWN])
        more = f" ... and {len(items) - METADATA_SHOWN} more (--json shows all)" if len(items) > METADATA_SHOWN else ""
        console.print("metadata: " + escape(shown) + more)
    table = Table(show_edge=False)
    columns = (["layer", "shape", "dtype"] + (["window"] if windows else []) + (["kept"] if pruned else [])
               + ["codec", "bytes", "ratio", "chunks"])
    for col in columns:
        table.add_column(col, justify="right" if col in ("layer", "window", "kept", "bytes", "ratio", "chunks") else "left")
    for lay in info["layers"]:
        k, v = lay["key"], lay["value"]
        stored = k["bytes"] + v["bytes"]
        raw = k["raw_bytes"] + v["raw_bytes"]
        shape = "x".join(map(str, k["shape"]))
        if v["shape"] != k["shape"]:
            shape = f"K {shape} V {'x'.join(map(str, v['shape']))}"
        table.add_row(str(lay["index"]), shape, k["dtype"] if k["dtype"] == v["dtype"] else f"{k['dtype']}/{v['dtype']}",
                      *([str(lay["window"] or "-")] if windows else []),
                      *([f"{100 * lay['kept']:.1f}%"] if pruned else []),
                      slot_use(k, v) if several else ",".join(sorted(set(k["codecs"] + v["codecs"]))) or "-", human(stored),
                      f"{raw / stored:.2f}x" if stored else "-", str(max(k["chunks"], v["chunks"])))
    console.print(table)
    rest = info["container_blob_bytes"] + info["overhead_bytes"]
    shared = f"{human(info['shared_bytes'])} of tables shared by the layers, " if info["shared_bytes"] else ""
    ids = ", token ids and positions" if info["container_blob_bytes"] else ""
    console.print(f"in no layer: {shared}{human(rest)} of header, index{ids}")
    console.print("payload checksums ok" if check else
                  "payload checksums not read (--check verifies them; kvc verify also decodes)", style="dim")


METADATA_SHOWN = 20  # entries the table view lists
FOLD = 120  # characters of one header string the table view shows


def fold(text: str, limit: int = FOLD) -> str:
    """`text` cut to `limit` characters, saying how much was left out (headers may hold MiBs)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def describe(stage: dict) -> str:
    """`name key=value ...` of a codec or selection entry (each value folded)."""
    return " ".join([fold(stage["name"])] + [f"{fold(str(k))}={fold(str(v))}" for k, v in stage["config"].items()])


def slot_use(key: dict, value: dict) -> str:
    """Chunks per codec slot of one layer, e.g. `[0]x2 [1]x1`, for files with several slots."""
    counts: dict[int, int] = {}
    for t in (key, value):
        for slot, n in t["chunks_per_slot"].items():
            counts[int(slot)] = counts.get(int(slot), 0) + n
    return " ".join(f"[{s}]x{n}" for s, n in sorted(counts.items())) or "-"


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--against", type=click.Path(dir_okay=False), help="Original cache to compare with.")
@layout_option
@heads_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (the errors per layer).")
def verify(file, against, layout, heads, as_json):
    """Check checksums and decode every record; with --against, report errors per layer.

    A pruned file is compared with the original at the positions it kept. Exits non-zero on
    corruption, on a non-finite value where the original is finite, or when a lossless codec
    does not reproduce the original.
    """
    import torch

    from kvcodec import cachefiles

    with kvcodec.open(cachefiles.check_readable(file)) as reader:
        reader.verify()
        cache = reader.read_cache()
        lossless = all(kvcodec.codec_class(c.id).lossless for c in reader.header.codecs)
    report = {"file": file, "checksums_ok": True, "layers": cache.num_layers, "lossless": lossless}
    if not as_json:
        click.echo(f"{file}: checksums ok, {cache.num_layers} layers decode")
    if against:
        original = cachefiles.load_cache(against, layout=layout, heads=heads)
        if original.num_layers != cache.num_layers:
            raise InputError(f"{against} has {original.num_layers} layers, the file {cache.num_layers}")
        worst, broken, errors = 0.0, [], []
        for i, (a, b) in enumerate(zip(original.layers, cache.layers)):
            parts, entry = [], {"layer": i, "at_kept_positions": b.positions is not None and b.window is None}
            kept = a.at(b.positions)
            for name, tensor in (("K", "key"), ("V", "value")):
                x, y = getattr(kept, tensor), getattr(b, tensor)
                if x.shape != y.shape:
                    raise InputError(f"layer {i} {name}: original {tuple(x.shape)}, file {tuple(y.shape)}")
                if bool((torch.isfinite(x) & ~torch.isfinite(y)).any()):
                    broken.append(f"layer {i} {name}")
                diff = (x.double() - y.double()).abs().nan_to_num(nan=float("inf"))
                top = float(diff.max()) if diff.numel() else 0.0
                rel = float(diff.norm() / x.double().norm().clamp_min(1e-30))
                exact = x.dtype == y.dtype and torch.equal(x, y)
                worst = max(worst, 0.0 if exact else top)
                parts.append(f"{name} max {top:.3g} rel {rel:.3g}")
                entry[tensor] = {"max_abs_error": top, "relative_error": rel, "exact": exact}
            errors.append(entry)
            if not as_json:
                click.echo(f"layer {i:3d}: " + ", ".join(parts) + (" (at the kept positions)"
                                                                     if entry["at_kept_positions"] else ""))
        report.update(against=against, per_layer=errors, largest_error=worst)
        if broken:
            raise KVCError(f"non-finite values decoded where the original is finite: {', '.join(broken[:4])}")
        if lossless and worst > 0:
            raise KVCError("a lossless codec did not reproduce the original exactly")
        if not as_json:
            click.echo("identical to the original" if worst == 0 else f"lossy: largest error {worst:.3g}")
    if as_json:
        click.echo(json.dumps(report, indent=2))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def codecs(as_json):
    """List the installed codecs and token-selection stages with their ids and default options."""
    rows = [{"id": c.codec_id, "name": c.name, "lossless": c.lossless,
             "defaults": c.defaults(), "description": c.description}
            for c in kvcodec.available_codecs()]
    stages = [{"id": c.codec_id, "name": c.name, "needs_scores": c.needs_scores,
               "defaults": c.defaults(), "description": c.description}
              for c in kvcodec.available_selectors()]
    if as_json:
        click.echo(json.dumps({"codecs": rows, "selection": stages}, indent=2))
        return
    from rich.table import Table

    console = make_console()
    for title, items, flag, flag_name in (("codecs", rows, "lossless", "lossless"),
                                           ("selection stages (SELECTION+CODEC)", stages, "needs_scores", "scores")):
        table = Table(title=title, show_edge=False, title_justify="left")
        for col in ("id", "name", flag_name, "defaults", "description"):
            table.add_column(col)
        for r in items:
            table.add_row(str(r["id"]), r["name"], "yes" if r[flag] else "no",
                          " ".join(f"{k}={v}" for k, v in r["defaults"].items()), r["description"])
        console.print(table)


@cli.command()
@click.option("--text", default=None,
              help=f"Text file, or a shipped text name ({', '.join(shipped_texts())}) [prose].")
@click.option("--tokens", type=click.IntRange(1), default=None,
              help=f"Prompt tokens: the text's first N [{DEFAULT_TOKENS}, or the whole text if shorter].")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True,
              help="Dtype the cache is saved in (the model runs in float32).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Output .pt or .safetensors.")
@click.option("--scores", "with_scores", is_flag=True,
              help="Also save attention statistics (for h2o, keyformer, snapkv, cam) as OUTPUT's .scores.safetensors.")
@click.option("--window", type=click.IntRange(1), default=None,
              help=f"Observation-window queries kept with --scores [{DEFAULT_WINDOW}; larger lets keyformer "
                   "accumulate over more].")
@model_option()
@force_option
@quiet_option
def capture(text, tokens, dtype, output, with_scores, window, model, force, quiet):
    """Run a development model (SmolLM2-135M, Gemma-3-270M) on a text and save its real KV cache."""
    import torch

    from kvcodec import cachefiles
    from kvcodec.eval import capture as cap
    from kvcodec.selection import scores

    if not output.lower().endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise InputError(f"{output}: output must end in .pt or .safetensors")
    scores_out = scores.path_beside(output) if with_scores else None
    for path in filter(None, (output, scores_out)):
        if os.path.exists(path) and not force:
            raise InputError(f"{path} exists (use --force to overwrite)")
    if window is not None and not with_scores:
        raise InputError("--window goes with --scores")
    with status(quiet) as show:
        show(f"reading the text with {MODELS[model].title}'s tokenizer")
        name, contents = cap.read_text(text)
        available = cap.tokenize(contents, None, model).shape[1]
        if tokens is not None and tokens > available:
            raise InputError(f"{name} has {available} tokens, fewer than the {tokens} asked for")
        tokens = min(DEFAULT_TOKENS, available) if tokens is None else tokens
        show(f"loading {MODELS[model].title}")
        cap.load_model(model)
        show(f"running the model on {tokens} tokens" + (" (recording attention)" if with_scores else ""))
        cache, stats = cap.capture_with_scores(text, tokens, getattr(torch, dtype),
                                               window=(window or DEFAULT_WINDOW) if with_scores else None,
                                               model=model)
    cachefiles.save_cache(cache, output, overwrite=force)
    if stats is not None:
        stats.save(scores_out)
    if not quiet:
        full = [lay for lay in cache.layers if lay.window is None] or cache.layers
        sliding = [lay for lay in cache.layers if lay.window is not None]
        kinds = (f" ({len(sliding)} sliding-window layers of {sliding[0].window} hold {sliding[0].key.shape[2]})"
                 if sliding else "")
        click.echo(f"{output}: {cache.num_layers} layers x {tuple(full[0].key.shape)} {dtype}{kinds}, "
                   f"{human(cache.nbytes)}" + (f"; scores in {scores_out}" if stats is not None else ""), err=True)


@cli.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--rate-mbit", type=click.FloatRange(0.001), default=None,
              help="Cap each response at this many megabits per second (to try restores at a bandwidth).")
def serve(directory, host, port, rate_mbit):
    """Serve the files of DIRECTORY over HTTP with Range support, for trying ranged reads and
    streaming restores locally (`kvc inspect http://127.0.0.1:8000/cache.kvc`)."""
    from kvcodec.storage.serve import FileServer

    try:
        server = FileServer(directory, host, port, rate=None if rate_mbit is None else rate_mbit * 1e6 / 8)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    click.echo(f"serving {directory} at {server.url()}", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def main():
    cli(prog_name="kvc")


cli.add_command(eval_command)
cli.add_command(bench_command)
cli.add_command(train_ae_command)
cli.add_command(calibrate_command)


if __name__ == "__main__":
    main()
