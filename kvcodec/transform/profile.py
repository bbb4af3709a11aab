"""A model's `kvtc` profile: what coding its keys and values needs beyond the cache itself.

Per layer: the rotary embedding of its keys (frequencies and scale; none for a layer without
one), and per key/value, over the layer's channels `C = heads x head_dim` taken together:
- `mean` [C] and a transform: `encoder` [C, C] maps a token's centred channels to components,
  `decoder` [C, C] (column j: component j's channels) maps them back. The components are the
  principal axes of the channels scaled by what the model is sensitive to (for keys the query
  energy each channel meets, for values the output projection's weight on it), so one step for
  every component spends bits where the model's error would grow most;
- `spread` [C]: each component's RMS on the calibration text;
- `sensitivity`: the divergence of the model's next-token distribution per unit of noise
  variance added to every component of this layer's tensor, measured on the calibration text.

Stored as safetensors (float32 tensors, string metadata), named by the sha256 of the bytes as
written (safetensors does not order its metadata the same way twice). Reading checks
every name, shape, dtype and value, so a profile is either whole and sane or refused.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcodec.artifacts import HASH, Artifacts, sha256
from kvcodec.cache import TENSORS
from kvcodec.errors import CodecError

SEARCH_ENV = "KVCODEC_PROFILE_PATH"
PROFILES = Artifacts("kvtc profile", SEARCH_ENV, Path.home() / ".cache" / "kvcodec" / "profiles", "profile")
DEFAULT_TARGET_KL = 0.002  # the divergence a profile's steps aim at unless told (kvtc, cachegen with a profile)
TARGET_LADDER = (1e-4, 3e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)  # per-chunk choices for size or error targets
FORMAT = "kvcodec-kvtc-profile"
VERSION = "1"
MAX_CHANNELS = 1 << 14  # a profile's C at most (its transforms are C x C)
MAX_LAYERS = 4096
FIELDS = ("mean", "encoder", "decoder", "spread", "sensitivity")


@dataclass(frozen=True, eq=False)
class Transform:
    """One (layer, key/value) of a profile; arrays float32."""

    mean: np.ndarray
    encoder: np.ndarray
    decoder: np.ndarray
    spread: np.ndarray
    sensitivity: float


@dataclass(frozen=True, eq=False)
class Rope:
    inv_freq: np.ndarray  # float32 [P]
    scale: float


@dataclass(frozen=True, eq=False)
class Profile:
    model: str
    heads: int
    head_dims: dict[str, int]  # per tensor
    ropes: tuple[Rope | None, ...]  # per layer
    transforms: dict[tuple[int, str], Transform]
    calibration: dict  # how it was measured (texts, tokens): for people, not for decoding
    kl_scale: float = 1.0  # measured divergence over the one the sensitivities predict

    @property
    def num_layers(self) -> int:
        return len(self.ropes)

    def channels(self, tensor: str) -> int:
        return self.heads * self.head_dims[tensor]

    def check_fits(self, num_layers: int, shape, layer: int, tensor: str, codec: str) -> None:
        """CodecError unless a cache of `num_layers` layers whose (layer, tensor) has `shape`
        [B, H, T, D] is of this profile's model: a profile never codes another model's cache."""
        h, d = shape[1], shape[3]
        if num_layers != self.num_layers or (h, d) != (self.heads, self.head_dims[tensor]):
            raise CodecError(f"{codec}: the profile is for a model of {self.num_layers} layers of {self.heads} "
                             f"heads x {self.head_dims[tensor]} ({self.model}); layer {layer} {tensor} is "
                             f"{h} heads x {d} of {num_layers} layers")

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        arrays = {"kl_scale": np.array([self.kl_scale], np.float32)}
        for layer, rope in enumerate(self.ropes):
            if rope is not None:
                arrays[f"{layer}.rope.inv_freq"] = rope.inv_freq.astype(np.float32)
                arrays[f"{layer}.rope.scale"] = np.array([rope.scale], np.float32)
        for (layer, tensor), t in self.transforms.items():
            for name in FIELDS:
                value = getattr(t, name)
                arrays[f"{layer}.{tensor}.{name}"] = np.asarray([value] if name == "sensitivity" else value, np.float32)
        meta = {"format": FORMAT, "version": VERSION, "model": self.model, "layers": str(self.num_layers),
                "heads": str(self.heads), "key_dim": str(self.head_dims["key"]),
                "value_dim": str(self.head_dims["value"]), "calibration": json.dumps(self.calibration, sort_keys=True)}
        return save({k: np.ascontiguousarray(a) for k, a in arrays.items()}, metadata=meta)  # save writes memory as laid out

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "kvtc profile") -> "Profile":
        """The profile in `data`; CodecError naming `where` for anything missing or malformed."""
        try:
            return cls._parse(bytes(data))
        except CodecError as exc:
            raise CodecError(f"{where}: {exc}") from None
        except Exception as exc:  # safetensors' own errors: a damaged file
            raise CodecError(f"{where} is not a readable profile ({type(exc).__name__})") from None

    @classmethod
    def _parse(cls, data: bytes) -> "Profile":
        from safetensors.numpy import load

        if len(data) < 8:
            raise CodecError("too short")
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            raise CodecError("its header runs past the end")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CodecError(f"not a {FORMAT} version {VERSION}")
        try:
            layers, heads = int(meta["layers"]), int(meta["heads"])
            dims = {"key": int(meta["key_dim"]), "value": int(meta["value_dim"])}
            calibration = json.loads(meta.get("calibration", "{}"))
        except (KeyError, ValueError) as exc:
            raise CodecError(f"its metadata is incomplete ({exc})") from None
        if not (1 <= layers <= MAX_LAYERS and heads >= 1 and min(dims.values()) >= 1
                and max(heads * d for d in dims.values()) <= MAX_CHANNELS):
            raise CodecError("its shape is out of range")
        arrays = load(data)
        for name, a in arrays.items():
            if a.dtype != np.float32 or not np.isfinite(a).all():
                raise CodecError(f"{name} is not finite float32")

        def take(name, shape):
            a = arrays.pop(name, None)
            if a is None or a.shape != shape:
                raise CodecError(f"{name} is missing or not of shape {shape}")
            return a

        kl_scale = float(take("kl_scale", (1,))[0])
        ropes = []
        for layer in range(layers):
            if f"{layer}.rope.inv_freq" in arrays:
                inv = arrays[f"{layer}.rope.inv_freq"]
                if inv.ndim != 1 or 2 * len(inv) > dims["key"]:
                    raise CodecError(f"{layer}.rope.inv_freq does not fit head_dim {dims['key']}")
                ropes.append(Rope(take(f"{layer}.rope.inv_freq", inv.shape), float(take(f"{layer}.rope.scale", (1,))[0])))
                if not ropes[-1].scale > 0:
                    raise CodecError(f"{layer}.rope.scale must be positive")
            else:
                ropes.append(None)
        transforms = {}
        for layer in range(layers):
            for tensor in TENSORS:
                c = heads * dims[tensor]
                at = f"{layer}.{tensor}."
                transforms[(layer, tensor)] = Transform(
                    take(at + "mean", (c,)), take(at + "encoder", (c, c)), take(at + "decoder", (c, c)),
                    take(at + "spread", (c,)), float(take(at + "sensitivity", (1,))[0]))
                if not transforms[(layer, tensor)].sensitivity > 0:
                    raise CodecError(f"{at}sensitivity must be positive")
        if arrays:
            raise CodecError(f"unexpected tensor {sorted(arrays)[0]}")
        if not (kl_scale > 0 and math.isfinite(kl_scale)):
            raise CodecError("kl_scale must be positive")
        return cls(meta.get("model", ""), heads, dims, tuple(ropes), transforms, calibration, kl_scale)


def load(digest: str, data: bytes | None = None, codec: str = "kvtc") -> Profile:
    """The profile whose sha256 is `digest` (hex): `data` when given (embedded in a file, checked
    against the hash), else the file given by path or found in the search folders."""
    if data is None:
        data = PROFILES.named(digest)
    elif sha256(data) != digest:
        raise CodecError(f"{codec}: the embedded profile does not match the sha256 the header names")
    return Profile.from_bytes(data, f"kvtc profile sha256:{digest[:16]}...")


def metric_diagonal(t: Transform) -> np.ndarray:
    """float64 [C]: the diagonal of the error metric a transform whitens by (encoder^T encoder)."""
    e = t.encoder.astype(np.float64)
    return (e * e).sum(0)


def named_by_hash(config: dict, codec: str) -> dict:
    """`config` with a `profile` given as a path replaced by `sha256:<hex>` of the file (which
    encoding then finds by that hash): files record only the hash."""
    chosen = config.get("profile")
    if isinstance(chosen, str) and chosen and HASH.fullmatch(chosen) is None:
        try:
            return dict(config, profile=PROFILES.remember(chosen))
        except CodecError as exc:
            raise CodecError(f"codec {codec!r}: {exc}") from None
    return config
