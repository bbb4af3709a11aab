"""`cachegen`: CacheGen's design (layer-wise quantization, anchors and deltas, entropy coding
with per-channel tables in parallel lanes), adjusted to what measurements on SmolLM2 showed.
The quantizer, tables and lanes are `kvcodec.entropy`'s; this module is the codec's policy.

- The first `sinks` tokens (attention sinks) are stored exactly: the model attends to them
  most, and their error costs several times more divergence than any other token's.
- Steps: each (layer, key/value) has a base step `rel_step * sigma` (sigma: the spread of its
  channels around their means; shallow layers get finer steps), scaled per channel by
  `(rms_c / mean rms) ** -emphasis`. Large channels get finer steps: the query channels that
  meet the large key channels are large too, so their errors move attention the most.
- Anchors: tokens are grouped (`group_size`, restarting at each chunk) and a channel either
  codes every token directly, or codes the group's first token finely and the others as
  deltas to it; `fit` picks per channel whichever costs fewer bits. On SmolLM2 only some key
  channels (slow rotary frequencies) gain from deltas.
- Tables, fitted on the whole cache and stored once per file. Lane format 2 (what new files
  use): per (layer, key/value) a few tables shared by its channels (`tables` of them for main
  symbols, as many for deltas), 32-bit rANS read by direct lookup (`entropy.shared_tables`,
  `entropy.shared_lanes`), one lane per channel; built so that a GPU decodes at memory speed.
  Lane format 1 (files written before it): one table per channel and one per anchored
  channel's deltas, 64-bit rANS, a second lane per anchored channel (`entropy.tables`,
  `entropy.lanes`).
- Payload: the sink tokens' raw bytes, then the lanes of the other tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from kvcodec.artifacts import HASH
from kvcodec.cache import TENSORS
from kvcodec.codecs.base import ChunkInfo, Chunks, Codec, check_finite
from kvcodec.dtypes import to_dtype
from kvcodec.entropy import lanes, shared_lanes, shared_tables, tables
from kvcodec.entropy.quantizer import channel_steps, span_floor
from kvcodec.entropy.shared_tables import SharedTables
from kvcodec.entropy.tables import FileTables
from kvcodec.errors import CodecError
from kvcodec.transform import profile as profiles

PRESETS = {  # relative base step of (shallow, other) layers; finest first
    "high": (0.18, 0.25),
    "medium": (0.25, 0.36),
    "low": (0.35, 0.5),
}
TARGET_STEPS = (0.1, 0.18, 0.25, 0.36, 0.5, 0.7, 1.0, 1.4)  # per-chunk choices for size or error targets


def sink_counts(sinks: int, token_start, tokens):
    """How many of a chunk's tokens are exact sinks: those before `sinks` (ints or arrays)."""
    return np.clip(sinks - np.asarray(token_start), 0, tokens)


class CacheGenCodec(Codec):
    codec_id = 5
    name = "cachegen"
    lossless = False
    description = "layer-wise quantization, anchors and deltas, exact sinks, per-channel rANS tables"
    max_expansion = 4096.0  # float32 output from lanes of at least 1/128 bit per symbol
    device_decoder = "kvcodec.kernels.cachegen"
    device_encoder = "kvcodec.kernels.cachegen"
    # files before lane format 2 lack lanes and tables (format 1); files without a profile name none
    optional_in_header = frozenset({"lanes", "tables", "profile", "target_kl"})

    def __init__(self, quality: str = "medium", key_step: float | None = None, value_step: float | None = None,
                 key_emphasis: float = 1.0, value_emphasis: float = 0.5, shallow_layers: float = 0.1,
                 sinks: int = 4, group_size: int = 10, anchor_bits: int = 1, lanes: int = 2, tables: int = 16,
                 profile: str = "", target_kl: float | None = None):
        if quality not in PRESETS:
            raise ValueError(f"quality must be one of {', '.join(PRESETS)}, not {quality!r}")
        for name, v, lo, hi in (("key_step", key_step, 1e-4, 100), ("value_step", value_step, 1e-4, 100),
                                ("key_emphasis", key_emphasis, 0, 2), ("value_emphasis", value_emphasis, 0, 2),
                                ("shallow_layers", shallow_layers, 0, 1)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi):
                raise ValueError(f"{name} must be a number from {lo:g} to {hi:g}, not {v!r}")
        for name, v, lo, hi in (("sinks", sinks, 0, 1024), ("group_size", group_size, 1, 1024),
                                ("anchor_bits", anchor_bits, 0, 8), ("lanes", lanes, 1, 2), ("tables", tables, 1, 256)):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {v!r}")
        if not isinstance(profile, str) or (profile and HASH.fullmatch(profile) is None):
            raise ValueError("profile must name a profile from `kvc calibrate` (a path, or sha256:<hex>)")
        if target_kl is not None and (not isinstance(target_kl, (int, float)) or isinstance(target_kl, bool)
                                      or not 1e-7 <= target_kl <= 10):
            raise ValueError(f"target_kl must be a number from 1e-07 to 10, not {target_kl!r}")
        self.profile, self.target_kl = profile, target_kl
        self.quality, self.key_step, self.value_step = quality, key_step, value_step
        self.key_emphasis, self.value_emphasis = key_emphasis, value_emphasis
        self.shallow_layers, self.sinks = shallow_layers, sinks
        self.group_size, self.anchor_bits = group_size, anchor_bits
        self.lanes, self.tables = lanes, tables

    @classmethod
    def from_config(cls, config):
        """As the base's, but `profile` may be a path: files record only its hash."""
        return super().from_config(profiles.named_by_hash(config, cls.name))

    @classmethod
    def from_header(cls, config: dict) -> "CacheGenCodec":
        """A header without `lanes` was written in lane format 1."""
        if "profile" in config and HASH.fullmatch(str(config["profile"])) is None:
            raise CodecError("cachegen: the header must name its profile as sha256:<64 hex digits>")
        return super().from_header({"lanes": 1, **config})

    def get_config(self) -> dict:
        """Without a profile, the config names neither it nor a target (as files before them)."""
        config = super().get_config()
        if not self.profile:
            del config["profile"], config["target_kl"]
        return config

    @classmethod
    def presets(cls, options: dict | None = None) -> list[dict]:
        """A ladder of relative steps (finer than `high` to far coarser than `low`) for targets;
        with a profile, its ladder of divergence targets."""
        if (options or {}).get("profile"):
            return [{"target_kl": t} for t in profiles.TARGET_LADDER]
        return [{"key_step": r, "value_step": r} for r in TARGET_STEPS]

    # -- policy ------------------------------------------------------------------------------
    def relative_step(self, layer: int, num_layers: int, tensor: str) -> float:
        shallow, other = PRESETS[self.quality]
        base = {"key": self.key_step, "value": self.value_step}[tensor]
        scale = (shallow / other) if layer < round(self.shallow_layers * num_layers) else 1.0
        return (base if base is not None else other) * scale

    def profile_steps(self, profile, layer: int, tensor: str, coded: torch.Tensor, chunks: Chunks) -> np.ndarray:
        """Channel steps from a model's profile: `sqrt(12 target_kl / (kl_scale * sensitivity *
        metric_c))`, metric_c the error metric's diagonal at channel c (the rule kvtc follows for
        its components, here on channels), never finer than the channel's range over 4000."""
        profile.check_fits(chunks.num_layers, chunks.shape(layer, tensor), layer, tensor, self.name)
        t = profile.transforms[(layer, tensor)]
        target = self.target_kl if self.target_kl is not None else profiles.DEFAULT_TARGET_KL
        metric = np.maximum(profiles.metric_diagonal(t), 1e-30)
        steps = np.sqrt(12 * target / (profile.kl_scale * t.sensitivity * metric)).astype(np.float32)
        if not (np.isfinite(steps).all() and (steps > 0).all()):
            raise CodecError(f"cachegen: the profile gives layer {layer} {tensor} steps out of float32's range "
                             "(a damaged profile)")
        return span_floor(steps, coded)

    def sink_count(self, info: ChunkInfo) -> int:
        return int(sink_counts(self.sinks, info.token_start, info.shape[2]))

    # -- shared context: steps, modes and tables -------------------------------------------
    def fit(self, chunks: Chunks) -> list[bytes]:
        """One blob with every (layer, key/value)'s steps, channel modes and tables (spec 8.5),
        fitted where the cache lies: a GPU fits the same tables."""
        if self.target_kl is not None and not self.profile:  # a header may hold both: they only inform
            raise CodecError("cachegen: target_kl needs a profile (from `kvc calibrate`) to set steps by")
        if self.profile and (self.key_step is not None or self.value_step is not None):
            raise CodecError("cachegen: a profile sets the steps: leave out key_step and value_step")
        fitted = {}
        profile = profiles.load(self.profile.removeprefix("sha256:"), codec=self.name) if self.profile else None
        for i in range(chunks.num_layers):
            for name in TENSORS:
                for info, chunk in chunks.of(i, name):
                    check_finite(chunk, info, self.name)
                bodies = [chunk.detach()[:, :, self.sink_count(info):].to(torch.float32)
                          for info, chunk in chunks.of(i, name)] or [torch.zeros(chunks.shape(i, name))]
                emphasis = self.key_emphasis if name == "key" else self.value_emphasis
                joined = bodies[0] if len(bodies) == 1 else torch.cat(bodies, 2)
                if profile is not None:
                    steps = self.profile_steps(profile, i, name, joined, chunks)
                else:
                    steps = channel_steps(joined, self.relative_step(i, chunks.num_layers, name), emphasis)
                where = f"cachegen: layer {i} {name}"
                fitted[(i, name)] = (tables.fit(bodies, steps, self.group_size, self.anchor_bits, where)
                                     if self.lanes == 1 else
                                     shared_tables.fit(bodies, steps, self.group_size, self.anchor_bits, self.tables,
                                                       where))
        return [(FileTables if self.lanes == 1 else SharedTables)(fitted).to_blob(chunks.num_layers)]

    def load_context(self, blobs) -> FileTables | SharedTables:
        if len(blobs) != 1:
            raise CodecError("cachegen needs exactly one context blob (its tables)")
        return (FileTables if self.lanes == 1 else SharedTables).from_blob(blobs[0], self.name)

    def narrow_context(self, blobs, used) -> list[bytes]:
        """Lane format 2 keeps the tables of `used` tensors and a placeholder for the others."""
        if self.lanes == 1:
            return list(blobs)
        return [SharedTables.narrowed_blob(blobs[0], used, self.name)]

    # -- chunks ------------------------------------------------------------------------------
    def coded(self, info, context: SharedTables) -> shared_lanes.Coded:
        """What lane format 2 codes of a chunk: its coded tokens' shape, tables and name."""
        b, h, t, d = info.shape
        return shared_lanes.Coded(context.for_chunk(info, self.name), context.first_table[(info.layer, info.tensor)],
                                  (b, h, t - self.sink_count(info), d), f"cachegen payload of {info.where}")

    def encode(self, chunk, info, context):
        return self.encode_many([chunk], [info], context)[0]

    def payloads(self, chunks, infos, code_lanes) -> list[bytes]:
        """Each chunk's payload: its sink tokens' raw bytes, then the lanes `code_lanes` makes of
        the coded tokens (float32, where the chunks lie, in order). Every encoder's layout."""
        sinks = [self.sink_count(info) for info in infos]
        bodies = code_lanes([chunk.detach()[:, :, s:].to(torch.float32) for chunk, s in zip(chunks, sinks)])
        return [chunk.detach()[:, :, :s].contiguous().view(torch.uint8).cpu().numpy().tobytes() + body
                for chunk, s, body in zip(chunks, sinks, bodies)]

    def encode_many(self, chunks, infos, context) -> list[bytes]:
        chunks = [chunk.detach().to("cpu") for chunk in chunks]
        if self.lanes == 1:
            return self.payloads(chunks, infos, lambda xs: [
                lanes.encode(x, context.for_chunk(info, self.name), f"cachegen: layer {info.layer} {info.tensor}")
                for x, info in zip(xs, infos)])
        return self.payloads(chunks, infos, lambda xs: shared_lanes.encode_many(
            xs, [self.coded(info, context) for info in infos], context.flat()))

    def decode(self, payload, info, context):
        return self.decode_many([payload], [info], context)[0]

    def decode_many(self, payloads, infos, context) -> list[torch.Tensor]:
        sink_bytes = []
        for payload, info in zip(payloads, infos):
            b, h, t, d = info.shape
            sink_bytes.append(b * h * self.sink_count(info) * d * info.dtype.itemsize)
            if len(payload) < sink_bytes[-1]:
                raise CodecError(f"cachegen payload of {info.where} is truncated")
        bodies = [memoryview(p)[n:] for p, n in zip(payloads, sink_bytes)]
        if self.lanes == 1:
            coded = []
            for body, info in zip(bodies, infos):
                b, h, t, d = info.shape
                n = t - self.sink_count(info)
                u = lanes.decode(body, context.for_chunk(info, self.name), (b, h, n, d),
                                 f"cachegen payload of layer {info.layer} {info.tensor}")
                coded.append(u.reshape(b, h, d, n).transpose(0, 1, 3, 2))
        else:
            coded = shared_lanes.decode_many(bodies, [self.coded(info, context) for info in infos], context.lookup())
        out = []
        for payload, info, n_sink, u in zip(payloads, infos, sink_bytes, coded):
            b, h, t, d = info.shape
            s = self.sink_count(info)
            x = torch.empty(info.shape, dtype=info.dtype)
            x[:, :, s:] = to_dtype(torch.from_numpy(u), info.dtype)
            if s:
                sink = np.frombuffer(payload, dtype=np.uint8, count=n_sink).copy()
                x[:, :, :s] = torch.from_numpy(sink).view(info.dtype).reshape(b, h, s, d)
            out.append(x)
        return out
