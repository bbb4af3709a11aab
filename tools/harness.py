"""`kvc eval` and `kvc bench`: judge codecs on the real model."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import click

from kvcodec.constants import DEFAULT_CHUNK_TOKENS
from kvcodec.errors import InputError
from kvcodec.eval import models
from kvcodec.eval.texts import DEFAULT_CONTINUATION, DEFAULT_GREEDY, DEFAULT_PREFIX, shipped_texts
from kvcodec.tools.common import (heads_option, layout_option, make_console, model_option, parse_options, progress_bar,
                                  quiet_option)

if TYPE_CHECKING:
    from kvcodec.eval import bench, fidelity


def texts_option(default: str):
    return click.option("--texts", default=default, show_default=True,
                        help=f"Comma-separated shipped texts ({', '.join(shipped_texts())}).")


def length_options(fn):
    fn = click.option("--greedy", type=click.IntRange(0), default=DEFAULT_GREEDY, show_default=True,
                      help="Greedy tokens generated to compare.")(fn)
    fn = click.option("--continuation", type=click.IntRange(1), default=DEFAULT_CONTINUATION,
                      show_default=True, help="Continuation tokens scored teacher-forced.")(fn)
    fn = click.option("--prefix", type=click.IntRange(1), default=DEFAULT_PREFIX, show_default=True,
                      help="Prefix tokens whose cache is compressed.")(fn)
    return fn


def text_names(texts: str) -> list[str]:
    names = [t.strip() for t in texts.split(",") if t.strip()]
    unknown = [t for t in names if t not in shipped_texts()]
    if unknown or not names:
        raise InputError(f"unknown text {unknown[0] if unknown else '(none)'!r}; "
                         f"shipped: {', '.join(shipped_texts())}")
    return names


def contexts_of(names: list[str], prefix: int, continuation: int, greedy: int, model: str, update=None):
    """The texts' contexts (a prefill and the reference continuation each), reporting progress
    through a `progress_bar` update."""
    from kvcodec.eval import fidelity

    contexts = []
    for i, name in enumerate(names):
        if update:
            update(i, f"reading {name} ({prefix} + {continuation} tokens)" + ("" if i else ", after loading the model"))
        contexts.append(fidelity.Context.from_text(name, prefix, continuation, greedy, model=model))
    if update:
        update(len(names))
    return contexts


def write_json(path: str, doc) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


def print_report(report: fidelity.Report, layers: bool) -> None:
    from rich.table import Table

    table = Table(title=report.label, show_edge=False)
    for col in ("text", "ratio", "PPL ref", "PPL", "ΔPPL %", "top-1", "KL", "greedy", "K err", "V err"):
        table.add_column(col, justify="left" if col == "text" else "right")
    for r in report.results:
        table.add_row(r.text, f"{r.ratio:.2f}", f"{r.ppl_ref:.3f}", f"{r.ppl:.3f}", f"{r.delta_ppl_pct:+.3f}",
                      f"{r.top1:.4f}", f"{r.kl:.2e}", f"{r.greedy_match}/{r.greedy_of}",
                      f"{sum(r.key_rel_err) / len(r.key_rel_err):.4f}",
                      f"{sum(r.value_rel_err) / len(r.value_rel_err):.4f}")
    m = report.mean
    table.add_row("mean", f"{m['ratio']:.2f}", f"{m['ppl_ref']:.3f}", f"{m['ppl']:.3f}", f"{m['delta_ppl_pct']:+.3f}",
                  f"{m['top1']:.4f}", f"{m['kl']:.2e}", f"{m['greedy_match']:.1f}", "", "", style="bold")
    console = make_console()
    console.print(table)
    if layers:
        per = Table(title="relative reconstruction error per layer", show_edge=False)
        per.add_column("layer", justify="right")
        for r in report.results:
            per.add_column(f"{r.text} K", justify="right")
            per.add_column(f"{r.text} V", justify="right")
        for i in range(len(report.results[0].key_rel_err)):
            per.add_row(str(i), *[f"{x:.4f}" for r in report.results for x in (r.key_rel_err[i], r.value_rel_err[i])])
        console.print(per)


@click.command("eval")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--original", type=click.Path(dir_okay=False), help="With FILE: the cache it was packed from.")
@click.option("-c", "--codec", default=None, help="Codec to evaluate (instead of FILE).")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE", help="Codec option, repeatable.")
@click.option("--chunk-tokens", type=click.IntRange(1), default=DEFAULT_CHUNK_TOKENS, show_default=True,
              help="Tokens per chunk (record) of the files the codecs write.")
@texts_option("prose,code,data")
@length_options
@click.option("--layers", is_flag=True, help="Also print the reconstruction error of every layer.")
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable output instead of the tables (every layer's errors included).")
@layout_option
@heads_option
@model_option()
@quiet_option
def eval_command(file, original, codec, opts, chunk_tokens, texts, prefix, continuation, greedy, layers, as_json,
                 layout, heads, model, quiet):
    """Measure how a codec or pipeline (or an existing .kvc FILE) changes a model's predictions.

    With -c: each shipped text is split into a prefix, whose cache is compressed and restored, and
    a continuation scored with the restored versus the original cache. With FILE and --original
    (a cache from `kvc capture`): the file is scored against the original on the text it names.
    """
    if as_json and file is not None and file.lower().endswith(".json"):
        raise InputError(f"--json prints the report on stdout: write it to a file with --json > {file}")
    if (file is None) == (codec is None):
        raise InputError("give either a codec (-c NAME) or a .kvc FILE with --original")
    from kvcodec import api, cachefiles
    from kvcodec.encoding import pipeline
    from kvcodec.eval import fidelity

    if file is not None:
        if not original:
            raise InputError("evaluating a .kvc file needs --original, the cache it was packed from")
        restored = api.unpack(cachefiles.check_readable(file))
        ctx = fidelity.Context.from_captured(cachefiles.load_cache(original, layout=layout, heads=heads),
                                             continuation, greedy)
        report = fidelity.Report(os.path.basename(file), [fidelity.score(ctx, restored, os.path.getsize(file))])
    else:
        options = parse_options(opts)
        pipeline.checked(codec, options)
        names = text_names(texts)
        with progress_bar(2 * len(names), f"loading {models.MODELS[model].title}", quiet) as update:
            report = fidelity.evaluate_codec(contexts_of(names, prefix, continuation, greedy, model, update), codec,
                                             options, chunk_tokens=chunk_tokens,
                                             progress=None if update is None else
                                             lambda done, text: update(len(names) + done, f"scoring {text}"))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, layers)


def parse_sweep(specs) -> dict[str, list[dict]]:
    """`NAME` or `NAME:key=value,key=value`, repeatable, in order."""
    from kvcodec.encoding import pipeline

    sweep: dict[str, list[dict]] = {}
    for spec in specs:
        name, _, opts = spec.partition(":")
        options = parse_options([o for o in opts.split(",") if o]) if opts else {}
        pipeline.checked(name, options)  # fail early on a bad codec, stage or option
        sweep.setdefault(name, []).append(options)
    return sweep


BUSY_SPREAD = 0.25  # timings of one figure further apart than this (over their median) are called busy


def print_bench(result: bench.BenchResult) -> None:
    from rich.table import Table

    from kvcodec.eval import bench

    bws = bench.BANDWIDTHS_GBPS
    table = Table(title=f"{models.model_named(result.model).title}, texts {', '.join(result.texts)}, prefix {result.prefix}, "
                        f"continuation {result.continuation}, device {result.device}", show_edge=False)
    cols = ["codec", "options", "bits/elem", "ratio", "enc MB/s", "dec MB/s", "GPU dec MB/s", "ΔPPL %", "|ΔPPL| %", "top-1",
            "KL", "restore s"] + [f"TTFT {bw}G s" for bw in bws]
    for c in cols:
        table.add_column(c, justify="left" if c in ("codec", "options") else "right")
    for r in result.rows:
        table.add_row(r.codec, " ".join(f"{k}={v}" for k, v in r.options.items()), f"{r.bits_per_element:.2f}",
                      f"{r.ratio:.2f}", f"{r.encode_MBps:.0f}", f"{r.decode_MBps:.0f}",
                      "-" if r.gpu_decode_MBps is None else f"{r.gpu_decode_MBps:.0f}", f"{r.delta_ppl_pct:+.3f}",
                      f"{r.abs_delta_ppl_pct:.3f}",
                      f"{r.top1:.4f}", f"{r.kl:.2e}", f"{r.restore_s:.4f}", *[f"{r.ttft_s[str(bw)]:.4f}" for bw in bws])
    console = make_console()
    console.print(table)
    console.print(f"recompute prefill of {result.prefix} tokens: {result.prefill_s:.3f} s; "
                  f"first-token step on a restored cache: {result.first_token_s:.4f} s; speeds are medians of "
                  f"{result.repeat} runs after a warm-up")
    busy = [r for r in result.rows if r.speed_spread > BUSY_SPREAD]
    if busy:
        console.print(f"[yellow]speeds of {len(busy)} rows varied by more than {BUSY_SPREAD:.0%} between runs "
                      f"(up to {max(r.speed_spread for r in busy):.0%}): the machine was busy; their MB/s are rough[/]")


@click.command("bench")
@click.option("--codec", "codec_specs", multiple=True, metavar="NAME[:K=V,...]",
              help="Codec configuration to sweep, repeatable [a built-in sweep].")
@click.option("--quick", is_flag=True, help="A small sweep on one text with short lengths.")
@click.option("--selection", is_flag=True, help="Sweep the token-selection stages instead of the codecs.")
@click.option("--cache", "caches", multiple=True, type=click.Path(dir_okay=False),
              help="Caches from `kvc capture` to sweep over, repeatable [the shipped texts].")
@texts_option("prose,code,data")
@length_options
@click.option("--chunk-tokens", type=click.IntRange(1), default=DEFAULT_CHUNK_TOKENS, show_default=True,
              help="Tokens per chunk (record) of the files the codecs write.")
@click.option("--repeat", type=click.IntRange(1), default=5, show_default=True,
              help="Timing runs after a warm-up (their median is reported).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="bench_out", show_default=True,
              help="Folder for bench.json, rate_distortion.png (ratio vs ΔPPL), rate_kl.png and ttft.png.")
@quiet_option
@model_option()
def bench_command(codec_specs, quick, selection, caches, texts, prefix, continuation, greedy, chunk_tokens, repeat,
                  out_dir, quiet, model):
    """Sweep codecs: ratio, speed, ΔPPL, top-1 and time to first token; JSON and plots."""
    from kvcodec import cachefiles
    from kvcodec.eval import bench, fidelity

    sweep = (parse_sweep(codec_specs) if codec_specs else bench.SELECTION_SWEEP if selection
             else bench.QUICK_SWEEP if quick else bench.SWEEP)
    if quick:
        texts = texts if texts != "prose,code,data" else "prose"
        prefix, continuation, greedy, repeat = min(prefix, 512), min(continuation, 128), min(greedy, 16), 1
    if caches:
        contexts = [fidelity.Context.from_captured(cachefiles.load_cache(c), continuation, greedy) for c in caches]
    else:
        contexts = [fidelity.Context.from_text(t, prefix, continuation, greedy, model=model) for t in text_names(texts)]
    total = sum(len(v) for v in sweep.values())
    with progress_bar(total, "benchmarking", quiet) as update:
        result = bench.run(contexts, sweep, chunk_tokens, repeat, progress=update)
    print_bench(result)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "bench.json"), result.to_dict())
    bench.plot_rate_distortion(result, os.path.join(out_dir, "rate_distortion.png"))
    bench.plot_rate_distortion(result, os.path.join(out_dir, "rate_kl.png"), "kl")
    bench.plot_ttft(result, os.path.join(out_dir, "ttft.png"))
    if not quiet:
        click.echo(f"wrote {out_dir}/bench.json, rate_distortion.png, rate_kl.png, ttft.png", err=True)
