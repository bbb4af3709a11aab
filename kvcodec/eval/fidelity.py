"""Fidelity harness: how much a restored cache changes a model's predictions (SmolLM2 unless
another development model is named).

A text is split into a prefix, whose cache is compressed and restored, and a continuation that
the model reads teacher-forced on top of the original and of the restored cache. Restored caches
that hold fewer tokens (pruned) continue at the original positions: new tokens get position ids
from the original prefix length on, and attend to the tokens that were kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from kvcodec import api
from kvcodec.cache import KVCache, LayerKV
from kvcodec.encoding import pipeline
from kvcodec.encoding.plan import make_codec
from kvcodec.errors import InputError
from kvcodec.eval import capture, models, texts
from kvcodec.eval.texts import DEFAULT_CONTINUATION, DEFAULT_GREEDY, DEFAULT_PREFIX

FP16_BYTES = 2


@torch.no_grad()
def continue_logits(cache: KVCache, input_ids: torch.Tensor, start_position: int,
                    model: str | None = None) -> torch.Tensor:
    """Logits [tokens, vocab] of `input_ids` read after `cache`, at positions from `start_position`."""
    lm, _ = capture.load_model(model)
    n = input_ids.shape[1]
    positions = torch.arange(start_position, start_position + n).unsqueeze(0)
    past = cache.to(dtype=lm.dtype).to_hf()
    return lm(input_ids, **models.with_cache(lm, past), position_ids=positions).logits[0].float()


@torch.no_grad()
def greedy_tokens(cache: KVCache, first_token: int, start_position: int, steps: int,
                  model: str | None = None) -> torch.Tensor:
    """`steps` greedily generated token ids after `cache`, fed `first_token` at `start_position`."""
    lm, _ = capture.load_model(model)
    past = models.with_cache(lm, cache.to(dtype=lm.dtype).to_hf())
    token, out = torch.tensor([[first_token]]), []
    for step in range(steps):
        logits = lm(token, **past, position_ids=torch.tensor([[start_position + step]])).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
    return torch.tensor(out, dtype=torch.int64)


@dataclass
class Context:
    """One text prepared for evaluation: its original cache and the reference predictions."""

    text: str
    ids: torch.Tensor  # [1, prefix + continuation + 1]
    prefix: int
    cache: KVCache  # the original cache, in the dtype it is stored in
    ref_logprobs: torch.Tensor  # [continuation, vocab]
    ref_greedy: torch.Tensor  # [greedy]
    model: str = models.DEFAULT_MODEL
    _scores: object = None

    @property
    def scores(self):
        """Attention statistics of the prefix (AttentionScores), computed on first use."""
        if self._scores is None:
            self._scores = capture.prefill(self.ids[:, :self.prefix], texts.DEFAULT_WINDOW, self.model)[2]
        return self._scores

    @property
    def continuation(self) -> int:
        return self.ids.shape[1] - self.prefix - 1

    @property
    def fp16_bytes(self) -> int:
        return sum(t.numel() * FP16_BYTES for l in self.cache.layers for t in (l.key, l.value))

    @classmethod
    def from_text(cls, text: str, prefix: int = DEFAULT_PREFIX, continuation: int = DEFAULT_CONTINUATION,
                  greedy: int = DEFAULT_GREEDY, dtype: torch.dtype = torch.float16,
                  model: str | None = None) -> "Context":
        model = models.model_named(model).name
        name, contents = texts.read_text(text)
        ids = capture.tokenize(contents, prefix + continuation + 1, model)
        _, past, _ = capture.prefill(ids[:, :prefix], model=model)
        cache = KVCache.from_hf(past, metadata={"model": models.MODELS[model].title, "text": name}).to(dtype=dtype)
        cache.token_ids = ids[:, :prefix]
        return cls.from_cache(name, ids, cache, greedy, model)

    @classmethod
    def from_cache(cls, text: str, ids: torch.Tensor, cache: KVCache, greedy: int = DEFAULT_GREEDY,
                   model: str | None = None) -> "Context":
        model = models.model_named(model).name
        prefix = cache.next_position
        if ids.shape[1] <= prefix + 1:
            raise InputError(f"text {text!r} has no tokens after the cached {prefix} to score")
        logits = continue_logits(cache, ids[:, prefix:-1], prefix, model)
        ref = (greedy_tokens(cache, int(ids[0, prefix]), prefix, greedy, model) if greedy
               else torch.empty(0, dtype=torch.int64))
        return cls(text, ids, prefix, cache, logits.log_softmax(-1), ref, model)

    @classmethod
    def from_captured(cls, cache: KVCache, continuation: int = DEFAULT_CONTINUATION,
                      greedy: int = DEFAULT_GREEDY) -> "Context":
        """For a cache saved by `kvc capture`: its metadata names the text, its token ids the prefix."""
        text = cache.metadata.get("text")
        if text not in texts.shipped_texts() or cache.token_ids is None:
            raise InputError("the original cache must come from `kvc capture` on a shipped text "
                             f"(it names text {text!r} and {'has' if cache.token_ids is not None else 'lacks'} token ids)")
        model = models.of_cache(cache.metadata).name
        prefix = cache.token_ids.shape[1]
        ids = capture.tokenize(texts.read_text(text)[1], None, model)[:, :prefix + continuation + 1]
        if not torch.equal(ids[:, :prefix], cache.token_ids):
            raise InputError(f"the cache's token ids are not the start of the shipped text {text!r}")
        return cls.from_cache(text, ids, cache, greedy, model)


@dataclass
class TextResult:
    text: str
    prefix: int
    continuation: int
    stored_bytes: int
    ratio: float  # versus the float16 cache
    ppl_ref: float
    ppl: float
    delta_ppl_pct: float
    top1: float
    kl: float
    greedy_match: int
    greedy_of: int
    key_rel_err: list[float] = field(default_factory=list)
    value_rel_err: list[float] = field(default_factory=list)


def _rel_err(original: LayerKV, tensor: str, restored: LayerKV) -> float:
    x = getattr(original.at(restored.positions), tensor).double()  # the kept tokens, at their positions
    y = getattr(restored, tensor).double()
    denom = float(x.norm())
    return float((x - y).norm()) / denom if denom else float(x.norm() != y.norm())


def score(ctx: Context, restored: KVCache, stored_bytes: int) -> TextResult:
    """Compare the model's predictions on `restored` with those on the original cache."""
    inputs, targets = ctx.ids[:, ctx.prefix:-1], ctx.ids[0, ctx.prefix + 1:]
    logprobs = continue_logits(restored, inputs, ctx.prefix, ctx.model).log_softmax(-1)
    nll_ref = -ctx.ref_logprobs.gather(1, targets[:, None]).mean()
    nll = -logprobs.gather(1, targets[:, None]).mean()
    ppl_ref, ppl = math.exp(float(nll_ref)), math.exp(float(nll))
    kl = float((ctx.ref_logprobs.exp() * (ctx.ref_logprobs - logprobs)).sum(-1).mean())
    top1 = float((logprobs.argmax(-1) == ctx.ref_logprobs.argmax(-1)).double().mean())
    greedy = greedy_tokens(restored, int(ctx.ids[0, ctx.prefix]), ctx.prefix, len(ctx.ref_greedy), ctx.model)
    same = (greedy == ctx.ref_greedy).long()
    match = int(same.cumprod(0).sum()) if len(same) else 0
    return TextResult(
        text=ctx.text, prefix=ctx.prefix, continuation=ctx.continuation, stored_bytes=stored_bytes,
        ratio=ctx.fp16_bytes / stored_bytes, ppl_ref=ppl_ref, ppl=ppl,
        delta_ppl_pct=100.0 * (ppl - ppl_ref) / ppl_ref, top1=top1, kl=kl,
        greedy_match=match, greedy_of=len(ctx.ref_greedy),
        key_rel_err=[_rel_err(o, "key", r) for o, r in zip(ctx.cache.layers, restored.layers)],
        value_rel_err=[_rel_err(o, "value", r) for o, r in zip(ctx.cache.layers, restored.layers)],
    )


MEAN_FIELDS = ("ratio", "ppl_ref", "ppl", "delta_ppl_pct", "top1", "kl", "greedy_match")


@dataclass
class Report:
    label: str
    results: list[TextResult]

    @property
    def mean(self) -> dict[str, float]:
        """Means over texts; `abs_delta_ppl_pct` too, since signed changes of texts can cancel."""
        n = len(self.results)
        mean = {f: sum(getattr(r, f) for r in self.results) / n for f in MEAN_FIELDS}
        mean["abs_delta_ppl_pct"] = sum(abs(r.delta_ppl_pct) for r in self.results) / n
        return mean

    def to_dict(self) -> dict:
        return {"label": self.label, "texts": [asdict(r) for r in self.results], "mean": self.mean}


def scores_for(ctx: Context, pipe: pipeline.Pipeline):
    """The context's attention statistics if the pipeline's selection stage needs them."""
    return ctx.scores if pipe.selector is not None and pipe.selector.needs_scores else None


def evaluate_codec(contexts: list[Context], codec, options: dict | None = None,
                   chunk_tokens: int = api.DEFAULT_CHUNK_TOKENS, progress=None) -> Report:
    """Encode each context's cache with the codec or pipeline (`h2o+cachegen`), restore it,
    and score it; `progress(done, text)` is called before each text and once at the end."""
    pipe = pipeline.parse(codec, options)
    codec_obj = make_codec(pipe.codec, pipe.options)
    results = []
    for i, ctx in enumerate(contexts):
        if progress:
            progress(i, ctx.text)
        data = api.encode(ctx.cache, codec, chunk_tokens=chunk_tokens, scores=scores_for(ctx, pipe), **dict(options or {}))
        results.append(score(ctx, api.decode(data), len(data)))
    if progress:
        progress(len(contexts), "")
    return Report(pipeline.label(pipe.selector, codec_obj), results)


@torch.no_grad()
def masked_reference_logits(ctx: Context, restored: KVCache) -> torch.Tensor:
    """Continuation logits [tokens, vocab] of the full cache with every token the restored cache
    dropped hidden from attention, per (layer, KV head), and the kept tokens holding the restored
    keys and values. A pruned cache must continue exactly like this reference."""
    from kvcodec.eval.attention import HideTokens, hooked

    layers, hidden = [], {}
    for i, (full, lay) in enumerate(zip(ctx.cache.layers, restored.layers)):
        b, h, n, _ = full.key.shape
        kept = lay.positions if lay.positions is not None else full.positions
        index = torch.arange(n).expand(h, -1) if kept is None else full.index_of(kept)
        key, value = full.key.clone(), full.value.clone()
        key.scatter_(2, index[None, :, :, None].expand(b, -1, -1, key.shape[3]), lay.key.to(key.dtype))
        value.scatter_(2, index[None, :, :, None].expand(b, -1, -1, value.shape[3]), lay.value.to(value.dtype))
        keep = torch.zeros(h, n, dtype=torch.bool).scatter_(1, index, True)
        layers.append(LayerKV(key, value, full.positions, full.window))
        hidden[i] = ~keep
    lm, _ = capture.load_model(ctx.model)
    with hooked(lm, HideTokens(hidden)):
        return continue_logits(KVCache(layers, length=ctx.cache.length), ctx.ids[:, ctx.prefix:-1], ctx.prefix,
                               ctx.model)
