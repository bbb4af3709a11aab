"""`kvc bench`: sweep codecs over real caches and measure rate, distortion, speed and the
time to first token when a context is restored from a `.kvc` instead of recomputed.

Time to first token (TTFT) follows CacheGen and the learned-compression work: restoring costs
fetch (stored bytes / link bandwidth) + read and decode to the model's device + one forward
step for the first new token; recomputing costs the prefill of the prefix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from kvcodec import api
from kvcodec.encoding import pipeline
from kvcodec.encoding.plan import make_codec
from kvcodec.errors import InputError, KVCError
from kvcodec.eval import capture, fidelity, models

SWEEP: dict[str, list[dict]] = {
    "raw": [{}],
    "zstd": [{"level": 3}],
    "shuffle-zstd": [{"level": 3}],
    "quant": [{"bits": 8}, {"bits": 4}, {"bits": 4, "group_size": 32}, {"bits": 3}, {"bits": 2},
              {"bits": 2, "group_size": 32}],
    "cachegen": [{"quality": "high"}, {"quality": "medium"}, {"quality": "low"},
                 {"key_step": 0.7, "value_step": 0.7}, {"key_step": 1.0, "value_step": 1.0}],
}
QUICK_SWEEP: dict[str, list[dict]] = {"raw": [{}], "shuffle-zstd": [{"level": 3}],
                                      "quant": [{"bits": 8}, {"bits": 4}, {"bits": 2}],
                                      "cachegen": [{"quality": "medium"}]}
BANDWIDTHS_GBPS = (1, 10, 100)


def _selection_sweep() -> dict[str, list[dict]]:
    """Every selection stage at 50 % and 25 % kept, alone and before `cachegen`; H2O also at
    90 % and 75 %; `cachegen` alone for comparison."""
    sweep: dict[str, list[dict]] = {}
    for method in ("h2o", "streamingllm", "keyformer", "snapkv", "knorm", "lacache", "cam"):
        keeps = (0.9, 0.75, 0.5, 0.25) if method == "h2o" else (0.5, 0.25)
        for value_codec in ("", "+cachegen"):
            sweep[method + value_codec] = [
                {"cache_size": k} if method == "lacache" else
                {"start_ratio": k / 2, "recent_ratio": k / 2} if method == "cam" else {"keep": k} for k in keeps]
    sweep["cachegen"] = [{}, {"quality": "low"}, {"key_step": 1.0, "value_step": 1.0}]
    return sweep


SELECTION_SWEEP = _selection_sweep()


@dataclass(frozen=True)
class Timing:
    """Seconds of `repeat` runs after a warm-up: their median, and their spread (max - min over
    the median; large when the machine was busy)."""

    median: float
    spread: float


def timed(fn, repeat: int) -> Timing:
    fn()  # warm-up: first-call costs (imports, allocations, kernel builds) are not the codec's
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    runs.sort()
    median = runs[len(runs) // 2] if len(runs) % 2 else (runs[len(runs) // 2 - 1] + runs[len(runs) // 2]) / 2
    return Timing(median, (runs[-1] - runs[0]) / median if median > 0 else 0.0)


def best_time(fn, repeat: int) -> float:
    """The median of `timed`, for figures whose spread is not reported."""
    return timed(fn, repeat).median


def model_device(model: str | None = None) -> torch.device:
    lm, _ = capture.load_model(model)
    return next(lm.parameters()).device


@torch.no_grad()
def time_prefill(ctx: fidelity.Context, repeat: int) -> float:
    lm, _ = capture.load_model(ctx.model)
    ids = ctx.ids[:, :ctx.prefix].to(model_device(ctx.model))
    return best_time(lambda: lm(ids, use_cache=True), repeat)


@torch.no_grad()
def time_first_token(ctx: fidelity.Context, repeat: int) -> float:
    """One forward step of the next token on top of the restored cache."""
    lm, _ = capture.load_model(ctx.model)
    token = ctx.ids[:, ctx.prefix:ctx.prefix + 1].to(model_device(ctx.model))
    pos = torch.tensor([[ctx.prefix]], device=token.device)
    cache = ctx.cache.to(device=token.device, dtype=lm.dtype)
    return best_time(lambda: lm(token, **models.with_cache(lm, cache.to_hf()), position_ids=pos), repeat)


@dataclass
class BenchRow:
    codec: str
    options: dict
    lossless: bool
    bits_per_element: float
    ratio: float  # versus the float16 cache
    encode_MBps: float  # MB of float16 cache per second, CPU
    decode_MBps: float
    gpu_decode_MBps: float | None
    restore_s: float  # read + decode + onto the model's device, first text's cache
    delta_ppl_pct: float
    abs_delta_ppl_pct: float
    top1: float
    kl: float
    greedy_match: float
    ttft_s: dict[str, float] = field(default_factory=dict)
    per_text: list[dict] = field(default_factory=list)
    speed_spread: float = 0.0  # the larger spread of the encode and decode timings (`Timing.spread`)


@dataclass
class BenchResult:
    texts: list[str]
    prefix: int
    continuation: int
    device: str
    prefill_s: float
    first_token_s: float
    rows: list[BenchRow]
    model: str = models.DEFAULT_MODEL
    repeat: int = 1  # timed runs per figure, after a warm-up

    def to_dict(self) -> dict:
        return asdict(self)


def _restore_time(data: bytes, device, repeat: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ctx.kvc")
        with open(path, "wb") as f:
            f.write(data)
        return best_time(lambda: api.unpack(path, device=device).to_hf(), repeat)


def stage_config(pipe: pipeline.Pipeline) -> tuple[str, dict]:
    """A pipeline's name and its options, the selection stage's as `stage.option`."""
    codec_obj = make_codec(pipe.codec, pipe.options)
    if pipe.selector is None:
        return codec_obj.name, codec_obj.get_config()
    options = {f"{pipe.selector.name}.{k}": v for k, v in pipe.selector.get_config().items()}
    return f"{pipe.selector.name}+{codec_obj.name}", {**options, **codec_obj.get_config()}


def bench_codec(contexts: list[fidelity.Context], codec: str, options: dict, chunk_tokens: int, repeat: int,
                first_token_s: float) -> BenchRow:
    pipe = pipeline.parse(codec, options)
    name, config = stage_config(pipe)
    fp16_mb = sum(c.fp16_bytes for c in contexts) / 1e6

    def encode(ctx):
        return api.encode(ctx.cache, codec, chunk_tokens=chunk_tokens, scores=fidelity.scores_for(ctx, pipe), **options)

    datas = [encode(c) for c in contexts]
    encode_t = timed(lambda: [encode(c) for c in contexts], repeat)
    decode_t = timed(lambda: [api.decode(d) for d in datas], repeat)
    encode_s, decode_s = encode_t.median, decode_t.median
    gpu = None
    if torch.cuda.is_available():
        gpu = fp16_mb / best_time(lambda: [api.decode(d, device="cuda") for d in datas], repeat)
    report = fidelity.Report(name, [fidelity.score(c, api.decode(d), len(d)) for c, d in zip(contexts, datas)])
    mean = report.mean
    elements = sum(c.fp16_bytes // fidelity.FP16_BYTES for c in contexts)
    restore_s = _restore_time(datas[0], model_device(contexts[0].model), repeat)
    ttft = {str(bw): len(datas[0]) * 8 / (bw * 1e9) + restore_s + first_token_s for bw in BANDWIDTHS_GBPS}
    return BenchRow(
        codec=name, options=config, lossless=pipe.selector is None and make_codec(pipe.codec, pipe.options).lossless,
        bits_per_element=8 * sum(map(len, datas)) / elements, ratio=sum(c.fp16_bytes for c in contexts) / sum(map(len, datas)),
        encode_MBps=fp16_mb / encode_s, decode_MBps=fp16_mb / decode_s, gpu_decode_MBps=gpu, restore_s=restore_s,
        speed_spread=max(encode_t.spread, decode_t.spread),
        delta_ppl_pct=mean["delta_ppl_pct"], abs_delta_ppl_pct=mean["abs_delta_ppl_pct"], top1=mean["top1"],
        kl=mean["kl"], greedy_match=mean["greedy_match"],
        ttft_s=ttft, per_text=[asdict(r) for r in report.results],
    )


def run(contexts: list[fidelity.Context], sweep: dict[str, list[dict]], chunk_tokens: int = api.DEFAULT_CHUNK_TOKENS,
        repeat: int = 3, progress=None) -> BenchResult:
    prefill_s = time_prefill(contexts[0], repeat)
    first_token_s = time_first_token(contexts[0], repeat)
    rows = []
    for codec, presets in sweep.items():
        for options in presets:
            rows.append(bench_codec(contexts, codec, options, chunk_tokens, repeat, first_token_s))
            if progress:
                progress(len(rows))
    model = contexts[0].model
    if any(c.model != model for c in contexts):
        raise InputError("a benchmark runs on one model; these contexts come from several")
    return BenchResult([c.text for c in contexts], contexts[0].prefix, contexts[0].continuation,
                       str(model_device(model)), prefill_s, first_token_s, rows, model, repeat)


def _shown(v) -> str:
    """An option's value for tables and plots, long ones (a weights hash) shortened."""
    text = str(v)
    return text if len(text) <= 20 else text[:19] + "…"


def short_options(row: BenchRow) -> str:
    """The options that differ from the codec's defaults, e.g. `bits=4 group_size=32`."""
    try:
        defaults = stage_config(pipeline.parse(row.codec))[1]
    except (KVCError, TypeError, ValueError):  # unknown here, or a codec with a required option
        defaults = codec_defaults(row.codec)
    return " ".join(f"{k}={_shown(v)}" for k, v in row.options.items() if defaults.get(k, object()) != v)


def distinguishing_options(row: BenchRow, rows: list[BenchRow]) -> str:
    """The options that tell `row` from the other rows of its codec, defaults included (quant's
    default 4 bits beside its 2 and 8), else those that differ from the codec's defaults."""
    same = [r for r in rows if r.codec == row.codec]
    keys = [k for k in row.options if len({repr(r.options.get(k)) for r in same}) > 1]
    return " ".join(f"{k}={_shown(row.options[k])}" for k in keys) if keys else short_options(row)


def codec_defaults(name: str) -> dict:
    """A registered codec's signature defaults, or none for a name not registered here."""
    from kvcodec.registry import CODECS

    return CODECS.get(name).defaults() if name in CODECS else {}


def label(row: BenchRow, rows: list[BenchRow] | None = None) -> str:
    """A row's name in plots: its codec and what sets it apart from `rows` (else from the defaults)."""
    return " ".join(filter(None, [row.codec, distinguishing_options(row, rows) if rows else short_options(row)]))


def result_from_dict(doc: dict) -> BenchResult:
    """Inverse of `BenchResult.to_dict`, to redraw plots from a saved JSON."""
    rows = [BenchRow(**r) for r in doc["rows"]]
    return BenchResult(**{**doc, "rows": rows})


@contextlib.contextmanager
def _figure(path: str, xlabel: str, ylabel: str, title: str, legend_size: float | None = None, width: float = 7):
    """An axes to draw on; labelled, gridded and saved as a PNG at `path` afterwards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, 4.5))
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if width > 7:  # room for the legend beside the axes
            ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=legend_size)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


DISTORTIONS = {  # what a rate-distortion plot can show against the ratio: (axis label, y scale)
    "abs_delta_ppl_pct": ("mean |ΔPPL| (%) of the continuation", "symlog"),
    "kl": ("mean KL divergence of the next-token distributions", "log"),
}


def plot_rate_distortion(result: BenchResult, path: str, distortion: str = "abs_delta_ppl_pct") -> None:
    """Compression ratio versus a distortion (`DISTORTIONS`), one curve per codec or pipeline.
    Pipelines take their selection stage's colour, dashed when a lossy codec follows it."""
    import matplotlib

    title = (f"{models.model_named(result.model).title}, prefix {result.prefix}, continuation {result.continuation}, "
             f"mean of {', '.join(result.texts)}")
    families = list(dict.fromkeys(r.codec for r in result.rows))
    stages = list(dict.fromkeys(f.split("+")[0] for f in families))
    palette = matplotlib.colormaps["tab20" if len(stages) > 10 else "tab10"]
    width = 9.5 if len(families) > 6 else 7
    ylabel, yscale = DISTORTIONS[distortion]
    with _figure(path, "compression ratio vs float16 cache", ylabel, title, legend_size=7, width=width) as ax:
        for family in families:
            stage, _, value_codec = family.partition("+")
            rows = sorted((r for r in result.rows if r.codec == family), key=lambda r: r.ratio)
            ax.plot([r.ratio for r in rows], [getattr(r, distortion) for r in rows], marker="o", label=family,
                    color=palette(stages.index(stage)), linestyle="--" if value_codec not in ("", "raw") else "-")
            for r in rows:
                if len(rows) > 1 and not value_codec:
                    ax.annotate(distinguishing_options(r, rows), (r.ratio, getattr(r, distortion)),
                                fontsize=6, textcoords="offset points", xytext=(4, 4))
        if yscale == "symlog":
            ax.set_yscale("symlog", linthresh=0.1)
        elif all(getattr(r, distortion) > 0 for r in result.rows):
            ax.set_yscale(yscale)


def plot_ttft(result: BenchResult, path: str) -> None:
    """Time to first token versus link bandwidth, per codec, against recomputing the prefill."""
    title = f"restore {result.prefix}-token context from .kvc vs recompute, {result.device}"
    with _figure(path, "link bandwidth (Gbit/s)", "time to first token (s)", title, legend_size=7) as ax:
        for r in result.rows:
            ax.plot(BANDWIDTHS_GBPS, [r.ttft_s[str(bw)] for bw in BANDWIDTHS_GBPS], marker="o", label=label(r, result.rows))
        ax.axhline(result.prefill_s, color="black", linestyle="--", label=f"recompute prefill ({result.device})")
        ax.set_xscale("log")
        ax.set_yscale("log")
