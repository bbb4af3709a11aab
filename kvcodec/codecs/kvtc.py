"""`kvtc`: transform coding calibrated per model (the KVTC / KVQuant line). A profile measured
once on a model (`kvc calibrate`, `kvcodec.calibration`) says how to turn each layer's keys and
values into components worth coding separately; this module is the codec.

- Keys are coded before their rotary embedding (undone at each token's position, redone on
  decoding): a channel then varies far less from token to token.
- A token's channels, all heads together, go through the profile's transform for its (layer,
  key/value): components decorrelated and scaled by the model's sensitivity to each, so one
  uniform step for all of them spends bits where errors would cost most.
- The step of each (layer, key/value) follows its measured sensitivity (divergence per unit
  noise variance per element, scaled by all tensors' elements): `sqrt(12 target_kl /
  (kl_scale * sensitivity))` spends bits where they buy the most divergence, for a predicted
  total of `target_kl` (`kl_scale`: the profile's measured ratio of real to predicted).
- The first `sinks` positions are stored exactly, as in `cachegen`.
- Components' integer symbols are entropy-coded in lane format 2 (`entropy.shared_tables`,
  `entropy.shared_lanes`): one lane per (batch entry, component), tables fitted on the cache.
- Decoding is exact integer arithmetic in float64 up to the final rounding (spec 8.7), so every
  device gives the same bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from kvcodec.artifacts import HASH
from kvcodec.cache import TENSORS
from kvcodec.codecs.base import ChunkInfo, Chunks, Codec, check_finite
from kvcodec.dtypes import to_dtype
from kvcodec.entropy import shared_lanes, shared_tables
from kvcodec.entropy.quantizer import span_floor
from kvcodec.entropy.shared_tables import SharedTables
from kvcodec.entropy.tables import MAX_SYMBOL
from kvcodec.errors import CodecError
from kvcodec.transform import profile as profiles
from kvcodec.transform import rope
from kvcodec.transform.profile import (  # noqa: F401 (SEARCH_ENV: public here)
    DEFAULT_TARGET_KL,
    PROFILES,
    SEARCH_ENV,
    Profile,
    Transform,
)



def sink_count(sinks: int, info: ChunkInfo) -> int:
    """Leading tokens of the chunk at positions below `sinks` in every row: stored exactly."""
    top = info.token_positions.max(0).values
    return int((top < sinks).to(torch.int64).cumprod(0).sum()) if len(top) else 0


def integer_decoder(transform: Transform, steps: np.ndarray) -> tuple[np.ndarray, int]:
    """(W, F) of spec 8.7: W [C, C] float64 integers, W[c, j] = round(decoder[c, j] * step[j] * 2**F),
    with F the largest exponent keeping every product sum below 2**53 for symbols below 2**20."""
    scaled = transform.decoder.astype(np.float64) * steps.astype(np.float64)[None, :]  # exact products
    bound = float(np.abs(scaled).cumsum(1)[:, -1].max(initial=0.0))  # each row summed left to right (spec)
    exponent = math.frexp(bound)[1] if bound > 0 else 0
    f = 32 - exponent
    return np.rint(np.ldexp(scaled, f)), f


@dataclass
class Context:
    """A file's `kvtc` context: its tables (steps inside), its profile, and each tensor's
    integer decoder, made on first use per device."""

    tables: SharedTables
    profile: Profile
    decoders: dict = field(default_factory=dict)

    def decoder(self, layer: int, tensor: str, device) -> tuple[torch.Tensor, int, torch.Tensor]:
        key = (layer, tensor, str(device))
        if key not in self.decoders:
            t = self.profile.transforms[(layer, tensor)]
            w, f = integer_decoder(t, self.tables.tensors[(layer, tensor)].steps)
            self.decoders[key] = (torch.from_numpy(w).to(device), f,
                                  torch.from_numpy(t.mean.astype(np.float64)).to(device))
        return self.decoders[key]


class KVTCCodec(Codec):
    codec_id = 7
    name = "kvtc"
    lossless = False
    description = "calibrated transform coding: keys before RoPE, sensitivity-weighted PCA across heads, rANS"
    max_expansion = 4096.0

    def __init__(self, profile: str = "", target_kl: float = DEFAULT_TARGET_KL, sinks: int = 4, tables: int = 16,
                 embed: bool = False):
        if not isinstance(profile, str) or HASH.fullmatch(profile) is None:
            raise ValueError("profile must name a profile from `kvc calibrate` (a path, or sha256:<hex>)")
        if not isinstance(target_kl, (int, float)) or isinstance(target_kl, bool) or not 1e-7 <= target_kl <= 10:
            raise ValueError(f"target_kl must be a number from 1e-07 to 10, not {target_kl!r}")
        for name, v, lo, hi in (("sinks", sinks, 0, 1024), ("tables", tables, 1, 256)):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {v!r}")
        if not isinstance(embed, bool):
            raise ValueError(f"embed must be true or false, not {embed!r}")
        self.profile, self.target_kl, self.sinks, self.tables, self.embed = profile, target_kl, sinks, tables, embed

    @classmethod
    def from_config(cls, config):
        """As the base's, but `profile` may be a path: files record only its hash."""
        return super().from_config(profiles.named_by_hash(config, cls.name))

    @classmethod
    def from_header(cls, config):
        if not isinstance(config.get("profile"), str) or HASH.fullmatch(config["profile"]) is None:
            raise CodecError("kvtc: the header must name its profile as sha256:<64 hex digits>")
        return super().from_header(config)

    @classmethod
    def presets(cls, options: dict | None = None) -> list[dict]:
        """Divergence targets, finest first, for `--target-ratio` and `--max-error`."""
        return [{"target_kl": t} for t in profiles.TARGET_LADDER]

    @property
    def digest(self) -> str:
        return self.profile.removeprefix("sha256:")

    # -- policy ------------------------------------------------------------------------------
    def step(self, profile: Profile, layer: int, tensor: str) -> float:
        """The uniform step of a (layer, key/value)'s components (see the module's docstring)."""
        return math.sqrt(12 * self.target_kl / (profile.kl_scale * profile.transforms[(layer, tensor)].sensitivity))

    # -- transform ---------------------------------------------------------------------------
    def components(self, profile: Profile, chunk: torch.Tensor, info: ChunkInfo) -> torch.Tensor:
        """float32 [B, 1, n, C]: the components of the chunk's coded tokens (after its sinks)."""
        s = sink_count(self.sinks, info)
        x = chunk.detach()[:, :, s:].to("cpu", torch.float64)
        lay = profile.ropes[info.layer]
        if info.tensor == "key" and lay is not None:
            x = rope.unrotate(x, lay.inv_freq, lay.scale, info.token_positions[:, s:])
        b, h, n, d = x.shape
        t = profile.transforms[(info.layer, info.tensor)]
        z = x.permute(0, 2, 1, 3).reshape(b, n, h * d) - torch.from_numpy(t.mean.astype(np.float64))
        c = z @ torch.from_numpy(t.encoder.astype(np.float64)).T
        return c.to(torch.float32).reshape(b, 1, n, h * d)

    def channels(self, context: Context, q: np.ndarray, info: ChunkInfo, device="cpu") -> torch.Tensor:
        """The chunk's coded tokens [B, H, n, D] in its dtype from their components' symbols
        `q` [n, B*C] (spec 8.7: exact in float64 up to the last roundings)."""
        b, h, t, d = info.shape
        s = sink_count(self.sinks, info)
        n = t - s
        w, f, mean = context.decoder(info.layer, info.tensor, device)
        symbols = torch.as_tensor(q).to(device, torch.float64).reshape(n, b, h * d).transpose(0, 1)
        y = (symbols @ w.T) * math.ldexp(1.0, -f) + mean  # an exact power of two (torch.ldexp goes through pow)
        y = y.reshape(b, n, h, d).permute(0, 2, 1, 3)
        lay = context.profile.ropes[info.layer]
        if info.tensor == "key" and lay is not None:
            y = rope.rotate(y, lay.inv_freq, lay.scale, info.token_positions[:, s:])
        return to_dtype(y.to(torch.float32), info.dtype)

    # -- shared context ----------------------------------------------------------------------
    def fit(self, chunks: Chunks) -> list[bytes]:
        """The tables blob of every (layer, key/value)'s components (spec 8.7), and the profile
        when it is embedded."""
        data = PROFILES.named(self.digest)
        profile = profiles.load(self.digest, data)
        fitted = {}
        for i in range(chunks.num_layers):
            for name in TENSORS:
                shape = chunks.shape(i, name)
                profile.check_fits(chunks.num_layers, shape, i, name, self.name)
                bodies = []
                for info, chunk in chunks.of(i, name):
                    check_finite(chunk, info, self.name)
                    bodies.append(self.components(profile, chunk, info))
                c = profile.channels(name)
                bodies = bodies or [torch.zeros(shape[0], 1, 0, c)]
                joined = torch.cat(bodies, 2)
                step = np.float32(self.step(profile, i, name))
                if not (torch.isfinite(joined).all() and np.isfinite(step) and step > 0):
                    raise CodecError(f"kvtc: the profile gives layer {i} {name} components or a step out of "
                                     "float32's range (a damaged profile)")
                steps = span_floor(np.full(c, step, np.float32), joined)
                fitted[(i, name)] = shared_tables.fit(bodies, steps, 1, 0, self.tables, f"kvtc: layer {i} {name}")
        return [SharedTables(fitted).to_blob(chunks.num_layers)] + ([data] if self.embed else [])

    def narrow_context(self, blobs, used) -> list[bytes]:
        """The tables of `used` tensors and placeholders for the others (as cachegen's, 8.5); an
        embedded profile stays whole."""
        return [SharedTables.narrowed_blob(blobs[0], used, self.name)] + list(blobs[1:])

    def load_context(self, blobs) -> Context:
        if len(blobs) != 1 + int(self.embed):
            raise CodecError(f"kvtc with embed={self.embed} needs {1 + int(self.embed)} context blob(s); "
                             f"the file has {len(blobs)}")
        tables = SharedTables.from_blob(blobs[0], self.name)
        profile = profiles.load(self.digest, bytes(blobs[1]) if self.embed else None)
        if len(tables.tensors) != 2 * profile.num_layers:
            raise CodecError(f"kvtc tables cover {len(tables.tensors) // 2} layers; the profile has {profile.num_layers}")
        for (layer, tensor), t in tables.tensors.items():
            if layer >= profile.num_layers or (t.heads, t.head_dim) != (1, profile.channels(tensor)):
                raise CodecError(f"kvtc tables of layer {layer} {tensor} do not fit the profile")
        return Context(tables, profile)

    # -- chunks ------------------------------------------------------------------------------
    def coded(self, info: ChunkInfo, context: Context) -> shared_lanes.Coded:
        b, h, t, d = info.shape
        tt = context.tables.tensors.get((info.layer, info.tensor))
        if tt is None or tt.head_dim != h * d or context.profile.head_dims[info.tensor] != d:
            raise CodecError(f"kvtc tables do not cover layer {info.layer} {info.tensor} of shape {info.shape}")
        return shared_lanes.Coded(tt, context.tables.first_table[(info.layer, info.tensor)],
                                  (b, 1, t - sink_count(self.sinks, info), h * d), f"kvtc payload of {info.where}")

    def encode(self, chunk, info, context):
        return self.encode_many([chunk], [info], context)[0]

    def encode_many(self, chunks, infos, context: Context) -> list[bytes]:
        chunks = [chunk.detach().to("cpu") for chunk in chunks]
        items = [self.coded(info, context) for info in infos]
        bodies = shared_lanes.encode_many([self.components(context.profile, chunk, info)
                                           for chunk, info in zip(chunks, infos)], items, context.tables.flat())
        return [chunk[:, :, :sink_count(self.sinks, info)].contiguous().view(torch.uint8).numpy().tobytes() + body
                for chunk, info, body in zip(chunks, infos, bodies)]

    def decode(self, payload, info, context):
        return self.decode_many([payload], [info], context)[0]

    def decode_many(self, payloads, infos, context: Context, device="cpu") -> list[torch.Tensor]:
        sink_bytes = []
        for payload, info in zip(payloads, infos):
            b, h, t, d = info.shape
            sink_bytes.append(b * h * sink_count(self.sinks, info) * d * info.dtype.itemsize)
            if len(payload) < sink_bytes[-1]:
                raise CodecError(f"kvtc payload of {info.where} is truncated")
        items = [self.coded(info, context) for info in infos]
        values = shared_lanes.decode_values_many([memoryview(p)[n:] for p, n in zip(payloads, sink_bytes)], items,
                                                 context.tables.lookup())
        out = []
        for payload, info, n_sink, q in zip(payloads, infos, sink_bytes, values):
            b, h, t, d = info.shape
            s = sink_count(self.sinks, info)
            x = torch.empty(info.shape, dtype=info.dtype, device=device)
            x[:, :, s:] = self.channels(context, q, info, device)
            if s:
                sink = np.frombuffer(payload, dtype=np.uint8, count=n_sink).copy()
                x[:, :, :s] = torch.from_numpy(sink).view(info.dtype).reshape(b, h, s, d).to(device)
            out.append(x)
        return out

    def decode_to(self, payload, info, context: Context, device) -> torch.Tensor:
        """Symbols are decoded on the host; the transform back (a float64 product of integers, exact
        on any device) and the rotation run on `device`."""
        return self.decode_many([payload], [info], context, device)[0]


assert MAX_SYMBOL <= 1 << 20  # integer_decoder's bound on symbols
