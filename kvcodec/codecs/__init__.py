"""Built-in codecs (ids and bitstreams in format_spec/kvc-v1.md, section 8)."""

from kvcodec.codecs.ae import AECodec
from kvcodec.codecs.cachegen import CacheGenCodec
from kvcodec.codecs.kvtc import KVTCCodec
from kvcodec.codecs.quant import QuantCodec
from kvcodec.codecs.raw import RawCodec
from kvcodec.codecs.zstd import ShuffleZstdCodec, ZstdCodec
from kvcodec.registry import register_codec

for _cls in (RawCodec, ZstdCodec, ShuffleZstdCodec, QuantCodec, CacheGenCodec, AECodec, KVTCCodec):
    register_codec(_cls, builtin=True)

__all__ = ["RawCodec", "ZstdCodec", "ShuffleZstdCodec", "QuantCodec", "CacheGenCodec", "AECodec", "KVTCCodec"]
