"""Measuring a `kvtc` profile on a model (transformers), from training texts only.

1. Prefill windows of each training text, recording every layer's cache and its queries.
2. Per (layer, key/value), over the tokens after the sinks: keys rotated back to before their
   rotary embedding, the channels' mean and covariance, heads together. The error metric `M`
   says what an error costs the model: for keys, the covariance of the queries that meet them
   (rotated back too, summed over the query heads of each KV head) averaged over the relative
   rotations between a query and an earlier key (attention logits are q . k); for values, the
   output projection's columns (W_o^T W_o per KV head). The transform is the principal axes of
   the covariance whitened by `M`: equal steps then spend bits where the model is sensitive.
3. Sensitivity per (layer, key/value): noise on every component of that tensor alone; the
   next-token divergence on a continuation per unit noise variance per element, times the
   calibration's coded elements over all tensors (so that `step = sqrt(12 target / sensitivity)`
   puts a divergence near `target` on the whole cache, spread where bits buy most).
4. `kl_scale`: the real divergence of the profile's own codec at its default target over that
   target (quantization is not Gaussian noise, and tensors interact).

The design and its measured alternatives (RoPE kept, plain PCA, per-channel steps, a recent
window kept exact) are compared in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from kvcodec.cache import TENSORS, KVCache, LayerKV
from kvcodec.eval import attention, capture, models, texts
from kvcodec.eval.fidelity import continue_logits
from kvcodec.transform import rope
from kvcodec.transform.profile import DEFAULT_TARGET_KL, Profile, Rope, Transform

NOISE = 0.1  # noise RMS per component, as a fraction of the tensor's mean component spread
SINKS = 4  # positions left out of the statistics (the codec keeps them exact)
FLOOR = 1e-4  # eigenvalues of a metric below this fraction of their mean are raised to it


def rope_of(model) -> list[Rope | None]:
    """Each layer's rotary embedding: (frequencies, scale) from the model's rotary module, per
    layer type where layers differ (Gemma-3's sliding and global layers)."""
    config = _text_config(model)
    rotary = model.model.rotary_emb
    out = []
    for i in range(config.num_hidden_layers):
        if hasattr(rotary, "inv_freq"):
            inv, scale = rotary.inv_freq, rotary.attention_scaling
        else:
            kind = config.layer_types[i]
            inv, scale = getattr(rotary, f"{kind}_inv_freq"), getattr(rotary, f"{kind}_attention_scaling")
        out.append(Rope(inv.detach().float().cpu().numpy(), float(scale)))
    return out


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


class QueryCovariance(attention.Hook):
    """Per layer, the summed outer products of every query head's queries rotated back to before
    their rotary embedding [query heads, D, D], and how many queries."""

    def __init__(self, ropes: list[Rope | None]):
        self.ropes = ropes
        self.sums: dict[int, torch.Tensor] = {}
        self.count: dict[int, int] = {}

    def queries(self, layer, query):
        q = query.detach().double()[:, :, SINKS:]
        r = self.ropes[layer]
        if r is not None:
            q = rope.unrotate(q, r.inv_freq, r.scale, torch.arange(SINKS, SINKS + q.shape[2])[None])
        self.sums[layer] = self.sums.get(layer, 0) + torch.einsum("bhtd,bhte->hde", q, q)
        self.count[layer] = self.count.get(layer, 0) + q.shape[0] * q.shape[2]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, n, D] -> [B * n, H * D] float64: every token's channels, heads together."""
    b, h, n, d = x.shape
    return x.double().permute(0, 2, 1, 3).reshape(b * n, h * d)


def _positions(lay: LayerKV) -> torch.Tensor:
    return lay.positions if lay.positions is not None else torch.arange(lay.key.shape[2])[None]


def _pre_rotary(lay: LayerKV, r: Rope | None) -> torch.Tensor:
    if r is None:
        return lay.key.double()
    return rope.unrotate(lay.key.double(), r.inv_freq, r.scale, _positions(lay))


def _rotate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, D, D] with each row turned by the n-th angles (cos, sin [n, P]): X R(n)^T."""
    p = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = x.clone()
    out[..., :p] = x[..., :p] * c - x[..., p:2 * p] * s
    out[..., p:2 * p] = x[..., p:2 * p] * c + x[..., :p] * s
    return out


def rotation_average(m: torch.Tensor, inv_freq: np.ndarray, distances: int) -> torch.Tensor:
    """The mean of R(d) m R(d)^T over distances d = 1 ..= `distances` (m [D, D] symmetric): a
    query's metric as seen from a key d positions before it."""
    acc = torch.zeros_like(m)
    for chunk in torch.arange(1, distances + 1).split(128):
        cos, sin = rope.cos_sin(inv_freq, chunk[None])
        x = _rotate_rows(m.expand(len(chunk), -1, -1), cos[0], sin[0])
        acc += _rotate_rows(x.transpose(1, 2), cos[0], sin[0]).sum(0)
    return acc / distances


def metrics(model, queries: QueryCovariance, layer: int, heads: int, dims: dict, rotary: Rope | None,
            distances: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key metric, value metric) [C, C] of a layer, block-diagonal over KV heads."""
    attn = model.model.layers[layer].self_attn
    qcov = queries.sums[layer] / queries.count[layer]  # [query heads, D, D]
    groups = qcov.shape[0] // heads
    w = attn.o_proj.weight.detach().double()  # [hidden, query heads * Dv]
    dk, dv = dims["key"], dims["value"]
    key, value = torch.zeros(heads * dk, heads * dk, dtype=torch.float64), torch.zeros(heads * dv, heads * dv,
                                                                                        dtype=torch.float64)
    for g in range(heads):
        m = qcov[g * groups:(g + 1) * groups].sum(0)
        key[g * dk:(g + 1) * dk, g * dk:(g + 1) * dk] = (rotation_average(m, rotary.inv_freq, distances)
                                                         if rotary is not None else m)
        for h in range(g * groups, (g + 1) * groups):
            part = w[:, h * dv:(h + 1) * dv]
            value[g * dv:(g + 1) * dv, g * dv:(g + 1) * dv] += part.T @ part
    return key, value


def _root(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m^1/2, m^-1/2) of a symmetric PSD metric, its small eigenvalues raised to FLOOR x mean."""
    e, u = torch.linalg.eigh(m)
    e = e.clamp_min(FLOOR * float(e.clamp_min(0).mean()) or 1.0)
    return (u * e.sqrt()) @ u.T, (u * e.rsqrt()) @ u.T


def weighted_transform(mean: torch.Tensor, cov: torch.Tensor, metric: torch.Tensor) -> Transform:
    """The principal axes of the covariance whitened by the metric: components c = U^T A (z - mean)
    with A = metric^1/2, back z = mean + A^-1 U c."""
    a, a_inv = _root(metric)
    values, vectors = torch.linalg.eigh(a @ cov @ a)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order].clamp_min(0), vectors[:, order]
    return Transform(mean.float().numpy(), (vectors.T @ a).float().numpy(), (a_inv @ vectors).float().numpy(),
                     values.sqrt().float().numpy(), 1.0)


def from_caches(caches: list[KVCache], ropes: list[Rope | None], model: str = "", metric_of: dict | None = None,
                sensitivity: dict | None = None) -> Profile:
    """A profile from caches alone: each tensor's statistics over their tokens, an error metric
    per (layer, key/value) (default the identity) and a sensitivity per (layer, key/value)
    (default 1). For models without a harness here, and for tests; `calibrate` measures both."""
    first = caches[0].layers[0]
    heads, dims = first.key.shape[1], {"key": first.key.shape[3], "value": first.value.shape[3]}
    transforms = {}
    for i in range(len(caches[0].layers)):
        for tensor in TENSORS:
            z = torch.cat([_flat(_pre_rotary(c.layers[i], ropes[i]) if tensor == "key" else c.layers[i].value)
                           for c in caches])
            mean = z.mean(0)
            cov = (z - mean).T @ (z - mean) / max(len(z), 1)
            m = (metric_of or {}).get((i, tensor), torch.eye(z.shape[1], dtype=torch.float64))
            t = weighted_transform(mean, cov, m)
            transforms[(i, tensor)] = replace(t, sensitivity=float((sensitivity or {}).get((i, tensor), 1.0)))
    return Profile(model, heads, dims, tuple(ropes), transforms, {"from": "caches"})


def windows(name: str, tokens: int, per_text: int, continuation: int):
    """(text, ids) of up to `per_text` windows of `tokens` tokens from each training text (the
    first window of the first text followed by `continuation` more, for the sensitivities)."""
    out = []
    for text_name, path in texts.training_texts().items():
        ids = capture.tokenize(path.read_text(encoding="utf-8"), None, name)
        for w in range(max(1, min(per_text, (ids.shape[1] - continuation) // tokens))):
            out.append((text_name, ids[:, w * tokens:(w + 1) * tokens + (continuation if not out else 0)]))
    return out


@torch.no_grad()
def calibrate(model_name: str | None = None, tokens: int = 1024, continuation: int = 256, per_text: int = 2,
              progress=None) -> Profile:
    """A profile of the development model `model_name` from windows of the shipped training
    texts; `progress(percent)` is called as the work advances."""
    name = models.model_named(model_name).name
    lm, _ = capture.load_model(name)
    config = _text_config(lm)
    layers = config.num_hidden_layers
    ropes = rope_of(lm)
    queries = QueryCovariance(ropes)
    sums: dict = {}
    used, first = [], None
    todo = windows(name, tokens, per_text, continuation)
    for k, (text_name, ids) in enumerate(todo):
        prefix = ids.shape[1] - (continuation if k == 0 else 0)
        with attention.hooked(lm, queries):
            out = lm(ids[:, :prefix], use_cache=True)
        cache = KVCache.from_hf(out.past_key_values)
        for i, lay in enumerate(cache.layers):
            keep = (_positions(lay) >= SINKS).all(0)
            for tensor, x in (("key", _pre_rotary(lay, ropes[i])), ("value", lay.value.double())):
                z = _flat(x[:, :, keep])
                s = sums.setdefault((i, tensor), [0, 0, 0])
                s[0] += z.shape[0]
                s[1] = s[1] + z.sum(0)
                s[2] = s[2] + z.T @ z
        if k == 0:
            first = (cache, ids, prefix)
        used.append({"text": text_name, "tokens": prefix})
        if progress:
            progress(20 * (k + 1) // len(todo))
    lay0 = first[0].layers[0]
    heads, dims = lay0.key.shape[1], {"key": lay0.key.shape[3], "value": lay0.value.shape[3]}
    transforms = {}
    for i in range(layers):
        window = first[0].layers[i].window
        distances = min(tokens + continuation, window) if window else tokens + continuation
        key_m, value_m = metrics(lm, queries, i, heads, dims, ropes[i], distances)
        for tensor, metric in (("key", key_m), ("value", value_m)):
            n, total, outer = sums[(i, tensor)]
            mean = total / n
            cov = outer / n - mean[:, None] * mean[None, :]
            transforms[(i, tensor)] = weighted_transform(mean, cov, metric)
    profile = Profile(models.MODELS[name].title, heads, dims, tuple(ropes), transforms,
                      {"texts": used, "continuation": continuation, "sinks": SINKS})
    profile = measure_sensitivity(profile, first, name, progress)
    profile = measure_kl_scale(profile, first, name)
    if progress:
        progress(100)
    return profile


def _kl(ref_logprobs: torch.Tensor, logits: torch.Tensor) -> float:
    lp = logits.log_softmax(-1)
    return float((ref_logprobs.exp() * (ref_logprobs - lp)).sum(-1).mean())


def _noisy(cache: KVCache, profile: Profile, layer: int, tensor: str, sigma: float, seed: int) -> KVCache:
    """`cache` with Gaussian noise of RMS `sigma` on every component of one tensor (sinks spared)."""
    lay = cache.layers[layer]
    t = profile.transforms[(layer, tensor)]
    r = profile.ropes[layer] if tensor == "key" else None
    x = _pre_rotary(lay, r) if tensor == "key" else lay.value.double()
    b, h, n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(b * n, h * d, generator=g, dtype=torch.float64) * sigma @ torch.from_numpy(
        t.decoder.astype(np.float64)).T
    noise = noise.reshape(b, n, h, d).permute(0, 2, 1, 3) * (_positions(lay) >= SINKS)[None, :, :, None]
    y = x + noise
    if r is not None:
        y = rope.rotate(y, r.inv_freq, r.scale, _positions(lay))
    y = y.to(lay.key.dtype)
    layers = list(cache.layers)
    layers[layer] = LayerKV(y if tensor == "key" else lay.key, y if tensor == "value" else lay.value,
                            lay.positions, lay.window)
    return KVCache(layers, cache.token_ids, dict(cache.metadata), cache.length, cache.selection)


def _coded_elements(lay: LayerKV, tensor: str) -> int:
    b, h, _, d = getattr(lay, tensor).shape
    return int(b * h * d * int((_positions(lay) >= SINKS).all(0).sum()))


def measure_sensitivity(profile: Profile, first, model: str, progress=None) -> Profile:
    """Each tensor's divergence per unit noise variance per coded element on the first window,
    times the coded elements of all tensors (see the module's docstring)."""
    cache, ids, prefix = first
    ref = continue_logits(cache, ids[:, prefix:], prefix, model).log_softmax(-1)
    total = sum(_coded_elements(lay, tensor) for lay in cache.layers for tensor in TENSORS)
    transforms = {}
    for k, ((layer, tensor), t) in enumerate(profile.transforms.items()):
        sigma = NOISE * float(np.sqrt(np.mean(t.spread.astype(np.float64) ** 2)))
        kl = _kl(ref, continue_logits(_noisy(cache, profile, layer, tensor, sigma, k), ids[:, prefix:], prefix, model))
        per_element = max(kl, 1e-12) / (sigma ** 2 * _coded_elements(cache.layers[layer], tensor))
        transforms[(layer, tensor)] = replace(t, sensitivity=per_element * total)
        if progress:
            progress(20 + 70 * (k + 1) // len(profile.transforms))
    return replace(profile, transforms=transforms)


def measure_kl_scale(profile: Profile, first, model: str, rounds: int = 2) -> Profile:
    """The profile with `kl_scale` set so that its codec at the default target gives about that
    divergence on the first window (measured through a real encode and decode)."""
    import tempfile
    from pathlib import Path

    from kvcodec import api

    cache, ids, prefix = first
    ref = continue_logits(cache, ids[:, prefix:], prefix, model).log_softmax(-1)
    scale = 1.0
    with tempfile.TemporaryDirectory() as folder:
        for k in range(rounds):
            profile = replace(profile, kl_scale=scale)
            path = Path(folder) / f"profile{k}.safetensors"
            path.write_bytes(profile.to_bytes())
            restored = api.decode(api.encode(cache.to(dtype=torch.float16), "kvtc", profile=str(path)))
            kl = _kl(ref, continue_logits(restored, ids[:, prefix:], prefix, model))
            scale *= max(kl, 1e-9) / DEFAULT_TARGET_KL
    return replace(profile, kl_scale=scale)
