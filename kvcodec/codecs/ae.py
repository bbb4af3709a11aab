"""`ae`: a learned autoencoder (`kvc train-ae`) maps every key and value vector to a short
latent; the latents are stored with `quant`'s grouped integer quantization, or (`entropy=True`)
with the `cachegen` coder: a uniform step of `step` times the spread of a layer's latents, and
per-channel rANS tables fitted on the whole cache's latents.

The weights are named by the sha256 of their file. They travel in the container's shared
context (`embed=True`), or stay outside it and are looked up by that hash in the folders of
`KVCODEC_AE_PATH` and `~/.cache/kvcodec/ae` when the file is decoded.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch

from kvcodec.codecs.autoencoder import CacheAutoencoder, sha256
from kvcodec.codecs.base import ChunkInfo, Codec, check_payload_length
from kvcodec.errors import CodecError
from kvcodec.codecs.cachegen import CacheGenCodec
from kvcodec.codecs.quant import QuantCodec

SEARCH_ENV = "KVCODEC_AE_PATH"
DEFAULT_FOLDER = Path.home() / ".cache" / "kvcodec" / "ae"
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
# Networks already built, by (sha256, device): weights named by their hash never change, so a
# process restoring many files loads each network once.
_NETWORKS: OrderedDict[tuple[str, str], CacheAutoencoder] = OrderedDict()
MAX_NETWORKS = 8


def search_folders() -> list[Path]:
    folders = [Path(p) for p in os.environ.get(SEARCH_ENV, "").split(os.pathsep) if p]
    return folders + [DEFAULT_FOLDER]


def find_weights(digest: str) -> bytes:
    """The weights file whose sha256 is `digest`, from the search folders."""
    for folder in search_folders():
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            data = path.read_bytes()
            if sha256(data) == digest:
                return data
    where = ", ".join(str(f) for f in search_folders())
    raise CodecError(f"ae weights sha256:{digest[:16]}... are not embedded in the file and not found in {where} "
                     f"(set {SEARCH_ENV} to the folder holding them)")


class AECodec(Codec):
    codec_id = 6
    name = "ae"
    lossless = False
    description = "learned autoencoder latents, quantized (weights from kvc train-ae)"

    def __init__(self, weights: str = "", embed: bool = True, bits: int = 8, group_size: int = 16,
                 entropy: bool = False, step: float = 0.25):
        if not isinstance(weights, str) or not weights:
            raise ValueError("weights must name a weights file from `kvc train-ae` (or sha256:<hex>)")
        for name, v in (("embed", embed), ("entropy", entropy)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, not {v!r}")
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not 1e-4 <= step <= 100:
            raise ValueError(f"step must be a number from 0.0001 to 100, not {step!r}")
        self._latents = QuantCodec(bits, group_size)
        # latent channels have no query partner to weigh them, and no sinks: plain steps
        self._coder = CacheGenCodec(key_step=step, value_step=step, key_emphasis=0, value_emphasis=0,
                                    shallow_layers=0, sinks=0)
        self._data: bytes | None = None
        self._embedded_checked = False
        if _HASH.fullmatch(weights) is None:  # a path: read it now, and record only its hash
            if not os.path.isfile(weights):
                raise ValueError(f"{weights}: no such weights file")
            self._data = Path(weights).read_bytes()
            weights = "sha256:" + sha256(self._data)
        self.weights, self.embed, self.bits, self.group_size = weights, embed, bits, group_size
        self.entropy, self.step = entropy, step

    @classmethod
    def from_header(cls, config):
        """A file names its weights by hash only; a path in a header is refused, never opened."""
        if not isinstance(config.get("weights"), str) or _HASH.fullmatch(config["weights"]) is None:
            raise CodecError("ae: the header must name its weights as sha256:<64 hex digits>")
        return cls.from_config(config)

    @property
    def digest(self) -> str:
        return self.weights.removeprefix("sha256:")

    def _weights(self) -> bytes:
        """The weights file's bytes: read when the codec was given a path, else found by hash once."""
        if self._data is None:
            self._data = find_weights(self.digest)
        return self._data

    def _check_context(self, context) -> None:
        expected = int(self.embed) + int(self.entropy)
        if len(context) != expected:
            raise CodecError(f"ae with embed={self.embed} and entropy={self.entropy} needs {expected} context "
                             f"blob(s); the file has {len(context)}")

    def network(self, context, device) -> CacheAutoencoder:
        """The autoencoder on `device`, from the embedded weights (checked against the hash once
        per codec) or found by hash; built once per process and device."""
        if self.embed and not self._embedded_checked:
            if not context:
                raise CodecError("ae: the file has no embedded weights though its header says embed=true")
            if sha256(bytes(context[0])) != self.digest:
                raise CodecError("ae: the embedded weights do not match the sha256 the header names")
            self._embedded_checked = True
        key = (self.digest, str(device))
        if key not in _NETWORKS:
            data = bytes(context[0]) if self.embed else self._weights()
            _NETWORKS[key] = CacheAutoencoder.from_bytes(data).to(device)
            while len(_NETWORKS) > MAX_NETWORKS:
                _NETWORKS.popitem(last=False)
        _NETWORKS.move_to_end(key)
        return _NETWORKS[key]

    @torch.no_grad()
    def fit(self, cache, chunk_tokens):
        weights = [self._weights()] if self.embed else []
        ae = self.network(weights, "cpu")
        ae.config.check_fits(cache)
        if not self.entropy:
            return weights
        from kvcodec.api import layer_chunks
        from kvcodec.cache import KVCache, LayerKV

        layers = []  # every chunk's latents computed exactly as `encode` will, so they fall in the tables
        for i, lay in enumerate(cache.layers):
            device_ae = self.network(weights, lay.key.device)
            latents = {name: [] for name in ("key", "value")}
            for info, chunk in layer_chunks(i, lay, chunk_tokens):
                latents[info.tensor].append(device_ae.encode(info.tensor, i, chunk))
            layers.append(LayerKV(*(torch.cat(latents[name], 2) for name in ("key", "value"))))
        return weights + self._coder.fit(KVCache(layers), chunk_tokens)

    def _latent_info(self, ae: CacheAutoencoder, info: ChunkInfo) -> ChunkInfo:
        """The latents' chunk: quant codes them in its value layout (groups along a vector's
        latent channels), cachegen with the tables of the chunk's own layer and tensor."""
        c = ae.config
        b, h, t, d = info.shape
        if info.layer >= c.layers or h != c.heads or d != c.head_dim[info.tensor]:
            raise CodecError(f"ae: layer {info.layer} {info.tensor} of {h} heads x {d} does not fit the weights "
                             f"({c.layers} layers of {c.heads} heads x {c.head_dim[info.tensor]})")
        tensor = info.tensor if self.entropy else "value"
        return ChunkInfo(info.layer, tensor, info.token_start, (b, h, t, c.latent_dim), torch.float32)

    @torch.no_grad()
    def encode(self, chunk, info, context):
        self._check_context(context)
        ae = self.network(context, chunk.device)
        latent = ae.encode(info.tensor, info.layer, chunk)
        if self.entropy:
            return self._coder.encode(latent, self._latent_info(ae, info), [context[-1]])
        return self._latents.encode(latent, self._latent_info(ae, info), [])

    def decode(self, payload, info, context):
        return self.decode_to(payload, info, context, "cpu")

    @torch.no_grad()
    def decode_to(self, payload, info, context, device):
        """The payload moves to `device` as it is (a few bytes per vector); 8-bit latents are
        dequantized and the network run there."""
        device = torch.device(device)
        self._check_context(context)
        ae = self.network(context, device)
        latent_info = self._latent_info(ae, info)
        if self.entropy:
            latent = self._coder.decode(payload, latent_info, [context[-1]]).to(device)
        elif self.bits == 8 and device.type != "cpu":
            latent = self._dequantize_8bit(payload, latent_info, device)
        else:
            latent = self._latents.decode(payload, latent_info, []).to(device)
        return ae.decode(info.tensor, info.layer, latent).to(info.dtype)

    def _dequantize_8bit(self, payload, info: ChunkInfo, device) -> torch.Tensor:
        """`quant`'s 8-bit value layout (float16 minima, float16 scales, one byte per code),
        decoded with tensor operations on `device`."""
        check_payload_length(payload, self._latents.payload_length(info), info, self.name)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        groups = self._latents._param_shape(info)
        n = math.prod(groups)
        lo, scale = data[:4 * n].view(torch.float16).float().reshape(2, *groups)
        codes = data[4 * n:].float().reshape(info.shape)
        g, d = self.group_size, info.shape[3]
        return codes * scale.repeat_interleave(g, 3)[..., :d] + lo.repeat_interleave(g, 3)[..., :d]
