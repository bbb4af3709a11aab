"""`ae`: a learned autoencoder (`kvc train-ae`) maps every key and value vector to a short
latent; the latents are stored with `quant`'s grouped integer quantization (its value layout:
groups along a vector's latent channels), or (`entropy=True`) entropy-coded with
`kvcodec.entropy`: a uniform step of `step` times the spread of a layer's latents, and
per-channel rANS tables fitted on the whole file's latents.

The weights are named by the sha256 of their file. They travel in the container's shared
context (`embed=True`), or stay outside it and are looked up by that hash in the folders of
`KVCODEC_AE_PATH` and `~/.cache/kvcodec/ae` when the file is decoded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcodec.artifacts import HASH, Artifacts, sha256
from kvcodec.cache import TENSORS
from kvcodec.codecs.autoencoder import CacheAutoencoder
from kvcodec.codecs.base import ChunkInfo, Chunks, Codec, check_finite
from kvcodec.codecs.quant import QuantCodec
from kvcodec.dtypes import to_dtype
from kvcodec.entropy import lanes, tables
from kvcodec.entropy.quantizer import channel_steps
from kvcodec.entropy.tables import FileTables
from kvcodec.errors import CodecError

SEARCH_ENV = "KVCODEC_AE_PATH"
WEIGHTS = Artifacts("ae weights", SEARCH_ENV, Path.home() / ".cache" / "kvcodec" / "ae", "weights")
# Networks already built, by (sha256, device): weights named by their hash never change, so a
# process restoring many files loads each network once.
_NETWORKS: OrderedDict[tuple[str, str], CacheAutoencoder] = OrderedDict()
MAX_NETWORKS = 8


@dataclass(frozen=True)
class AEContext:
    """A file's context for `ae`: its weights' hash, the weights when embedded, and the latents'
    tables when they are entropy-coded."""

    digest: str
    embedded: bytes | None
    latent_tables: FileTables | None


class AECodec(Codec):
    codec_id = 6
    name = "ae"
    lossless = False
    description = "learned autoencoder latents, quantized (weights from kvc train-ae)"
    # A vector of head_dim float32 values from a few latent bytes: far above quant's bound, so
    # the reader's bound is the generic one; the payload length checks do the rest.
    max_expansion = 32768.0
    device_decoder = "kvcodec.kernels.ae"
    device_encoder = "kvcodec.kernels.ae"
    optional_in_header = frozenset({"entropy", "step"})  # files from before entropy coding lack them

    def __init__(self, weights: str = "", embed: bool = True, bits: int = 8, group_size: int = 16,
                 entropy: bool = False, step: float = 0.25):
        if not isinstance(weights, str) or HASH.fullmatch(weights) is None:
            raise ValueError("weights must name a weights file from `kvc train-ae` (or sha256:<hex>)")
        for name, v in (("embed", embed), ("entropy", entropy)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, not {v!r}")
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not 1e-4 <= step <= 100:
            raise ValueError(f"step must be a number from 0.0001 to 100, not {step!r}")
        self.latents = QuantCodec(bits, group_size)  # validates bits and group_size
        self.weights, self.embed, self.bits, self.group_size = weights, embed, bits, group_size
        self.entropy, self.step = entropy, step

    @classmethod
    def from_config(cls, config):
        """As the base's, but `weights` may be a path: it is read once here, and the codec
        names the weights by their hash (files record only that)."""
        weights = config.get("weights")
        if isinstance(weights, str) and weights and HASH.fullmatch(weights) is None:
            try:
                config = dict(config, weights=WEIGHTS.remember(weights))
            except CodecError as exc:
                raise CodecError(f"codec 'ae': {exc}") from None
        return super().from_config(config)

    @classmethod
    def from_header(cls, config):
        """A file names its weights by hash only; a path in a header is refused, never opened."""
        if not isinstance(config.get("weights"), str) or HASH.fullmatch(config["weights"]) is None:
            raise CodecError("ae: the header must name its weights as sha256:<64 hex digits>")
        return super().from_header(config)

    @property
    def digest(self) -> str:
        return self.weights.removeprefix("sha256:")

    def network(self, context: AEContext, device, encoding: bool = False) -> CacheAutoencoder:
        """The autoencoder on `device`, from the embedded weights or found by hash (when
        `encoding`, also the file this process was given by path); built once per process and
        device."""
        key = (self.digest, str(device))
        if key not in _NETWORKS:
            if context.embedded is not None:
                data = context.embedded
            else:
                data = WEIGHTS.named(self.digest) if encoding else WEIGHTS.find(self.digest)
            _NETWORKS[key] = CacheAutoencoder.from_bytes(data).to(device)
            while len(_NETWORKS) > MAX_NETWORKS:
                _NETWORKS.popitem(last=False)
        _NETWORKS.move_to_end(key)
        return _NETWORKS[key]

    def load_context(self, blobs) -> AEContext:
        """Blobs: the weights when embedded, then the latents' tables when entropy-coded.
        Embedded weights are checked against the hash the header names, once per file."""
        expected = int(self.embed) + int(self.entropy)
        if len(blobs) != expected:
            raise CodecError(f"ae with embed={self.embed} and entropy={self.entropy} needs {expected} context "
                             f"blob(s); the file has {len(blobs)}")
        embedded = bytes(blobs[0]) if self.embed else None
        if embedded is not None and sha256(embedded) != self.digest:
            raise CodecError("ae: the embedded weights do not match the sha256 the header names")
        latent_tables = FileTables.from_blob(blobs[-1], self.name) if self.entropy else None
        return AEContext(self.digest, embedded, latent_tables)

    def latent_info(self, ae: CacheAutoencoder, info: ChunkInfo) -> ChunkInfo:
        """The chunk of latents `info`'s vectors encode to (float32, latent_dim channels)."""
        c = ae.config
        b, h, t, d = info.shape
        if info.layer >= c.layers or h != c.heads or d != c.head_dim[info.tensor]:
            raise CodecError(f"ae: layer {info.layer} {info.tensor} of {h} heads x {d} does not fit the weights "
                             f"({c.layers} layers of {c.heads} heads x {c.head_dim[info.tensor]})")
        return ChunkInfo(info.layer, info.tensor, info.token_start, (b, h, t, c.latent_dim), torch.float32)

    def quant_info(self, latent_info: ChunkInfo) -> ChunkInfo:
        """Latents are stored in quant's value layout, whichever tensor they come from."""
        return ChunkInfo(latent_info.layer, "value", latent_info.token_start, latent_info.shape, latent_info.dtype)

    @torch.no_grad()
    def fit(self, chunks: Chunks):
        weights = WEIGHTS.named(self.digest)
        context = AEContext(self.digest, weights, None)
        ae = self.network(context, "cpu", encoding=True)
        ae.config.check_fits(chunks.num_layers, chunks)
        for info, chunk in chunks:
            check_finite(chunk, info, self.name)
        blobs = [weights] if self.embed else []
        if not self.entropy:
            return blobs
        fitted = {}  # every chunk's latents computed exactly as `encode` will, so they fall in the tables
        for i in range(chunks.num_layers):
            for name in TENSORS:
                b, h, _, _ = chunks.shape(i, name)
                bodies = [self.network(context, chunk.device, encoding=True).encode(name, i, chunk)
                          for _, chunk in chunks.of(i, name)] or [torch.zeros(b, h, 0, ae.config.latent_dim)]
                steps = channel_steps(torch.cat(bodies, 2), self.step, 0.0)  # latents have no query partner to weigh
                fitted[(i, name)] = tables.fit(bodies, steps, 10, 1, f"ae: layer {i} {name} latents")
        return blobs + [FileTables(fitted).to_blob(chunks.num_layers)]

    @torch.no_grad()
    def encode(self, chunk, info, context: AEContext):
        ae = self.network(context, chunk.device, encoding=True)
        latent = ae.encode(info.tensor, info.layer, chunk)
        latent_info = self.latent_info(ae, info)
        if self.entropy:
            tt = context.latent_tables.for_chunk(latent_info, self.name)
            return lanes.encode(latent.cpu(), tt, f"ae: layer {info.layer} {info.tensor} latents")
        return self.latents.encode(latent, self.quant_info(latent_info), ())

    def decode(self, payload, info, context: AEContext):
        return self.decode_to(payload, info, context, "cpu")

    @torch.no_grad()
    def decode_to(self, payload, info, context: AEContext, device):
        """The payload moves to `device` as it is (a few bytes per vector); 8-bit latents are
        dequantized and the network run there."""
        device = torch.device(device)
        ae = self.network(context, device)
        latent_info = self.latent_info(ae, info)
        if self.entropy:
            tt = context.latent_tables.for_chunk(latent_info, self.name)
            b, h, t, latent_dim = latent_info.shape
            u = lanes.decode(payload, tt, latent_info.shape, f"ae payload of layer {info.layer} {info.tensor}")
            latent = torch.from_numpy(u).reshape(b, h, latent_dim, t).permute(0, 1, 3, 2).to(device)
        elif self.bits == 8 and device.type != "cpu":
            latent = self.latents.dequantize_8bit(payload, self.quant_info(latent_info), device)
        else:
            latent = self.latents.decode(payload, self.quant_info(latent_info), ()).to(device)
        return to_dtype(ae.decode(info.tensor, info.layer, latent), info.dtype)
