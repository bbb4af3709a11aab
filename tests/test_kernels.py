"""The Triton decoders against the CPU decoders: bit-exact output, the same verdict on corrupt
payloads. Without a GPU they run in Triton's interpreter on small caches; with one, on the GPU
at full size."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import kvcodec  # noqa: E402
from kvcodec.codecs import device  # noqa: E402
from kvcodec.container.chunking import cut  # noqa: E402
from kvcodec.encoding.engine import Encoding, write_cache  # noqa: E402

from conftest import synthetic_cache  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TOKENS, HEADS, HEAD_DIM, CHUNK = (3000, 8, 128, 1024) if ON_GPU else (37, 2, 16, 16)
VECTORS = Path(__file__).parent.parent / "format_spec" / "vectors"

CODECS = [
    ("raw", {}),
    ("quant", {"bits": 2, "group_size": 4}),
    ("quant", {"bits": 3, "group_size": 5}),
    ("quant", {"bits": 4}),
    ("quant", {"bits": 8, "group_size": 7}),
    ("cachegen", {}),
    ("cachegen", {"sinks": 3, "group_size": 3, "anchor_bits": 2, "key_emphasis": 0.0}),
    ("cachegen", {"lanes": 1}),
    ("cachegen", {"lanes": 1, "sinks": 3, "group_size": 3, "anchor_bits": 2, "key_emphasis": 0.0}),
]


def kernel_cache(data: bytes) -> kvcodec.KVCache:
    return kvcodec.decode(data, device=DEVICE, decoder="kernels")


def cpu_cache(data: bytes) -> kvcodec.KVCache:
    return kvcodec.decode(data, decoder="cpu")


def smooth_cache(dtype, tokens=TOKENS, seed=0):
    """Synthetic keys with slowly drifting channels, as slow rotary channels are (cachegen
    anchors those)."""
    cache = synthetic_cache(layers=2, heads=HEADS, tokens=tokens, head_dim=HEAD_DIM, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for lay in cache.layers:
        key = lay.key.float()
        noise = torch.randn(key[..., 2::8].shape, generator=g) * 0.6
        for t in range(1, tokens):  # a slow random walk pulled back toward zero
            noise[:, :, t] += 0.995 * noise[:, :, t - 1]
        key[..., 2::8] = noise
        lay.key = key.to(dtype)
    return cache


@pytest.mark.parametrize("codec,options", CODECS, ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_kernels_decode_bit_exactly(codec, options, dtype):
    data = kvcodec.encode(smooth_cache(dtype), codec, chunk_tokens=CHUNK, **options)
    got = kernel_cache(data)
    assert got.layers[0].key.device.type == DEVICE
    assert got.equal(cpu_cache(data))


@pytest.mark.slow
def test_cachegen_anchors_are_exercised():
    data = kvcodec.encode(smooth_cache(torch.float16, tokens=max(TOKENS, 250)), "cachegen",
                          chunk_tokens=max(CHUNK, 128), sinks=3, group_size=6, anchor_bits=2, key_emphasis=0.0)
    tables = kvcodec.open(data).context(0).tensors
    assert any(t.anchored.any() for t in tables.values())
    assert kernel_cache(data).equal(cpu_cache(data))


@pytest.mark.slow
def test_batches_heads_and_value_head_dims_differ():
    cache = synthetic_cache(layers=2, batch=2, heads=[HEADS, 1], tokens=TOKENS, head_dim=HEAD_DIM,
                            value_head_dim=HEAD_DIM // 2)
    for codec, options in CODECS[1:]:
        data = kvcodec.encode(cache, codec, chunk_tokens=CHUNK, **options)
        assert kernel_cache(data).equal(cpu_cache(data)), codec


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in VECTORS.glob("*.kvc")))
def test_kernels_decode_the_golden_vectors(name):
    data = (VECTORS / f"{name}.kvc").read_bytes()
    got, want = kernel_cache(data), cpu_cache(data)
    if name.startswith("ae-"):  # the fused network equals the CPU's to float32 rounding (spec 8.6)
        for (gk, gv), (wk, wv) in zip(got, want):
            for g, w in ((gk, wk), (gv, wv)):
                tolerance = 4 * torch.finfo(w.dtype).eps * float(w.float().abs().max()) + 1e-6
                assert float((g.cpu().float() - w.float()).abs().max()) <= tolerance
    else:
        assert got.equal(want)


def test_token_range_reads_match():
    data = kvcodec.encode(smooth_cache(torch.bfloat16), "cachegen", chunk_tokens=CHUNK)
    reader = kvcodec.open(data)
    for tokens in (slice(0, 5), slice(CHUNK - 3, CHUNK + 4), slice(TOKENS - 1, None), slice(7, 7)):
        for got, want in zip(reader.read(1, tokens, device=DEVICE, decoder="kernels"),
                             reader.read(1, tokens, decoder="cpu")):
            assert got.shape == want.shape and torch.equal(got.cpu(), want)


def test_streamed_layers_decode_in_groups_as_whole_reads_do(monkeypatch):
    """`stream` decodes each group of layers in one kernel read; `to_hf` of a local file reads
    the whole cache at once. Both give the CPU decoder's tensors."""
    from kvcodec.container import reader as reader_module

    monkeypatch.setattr(reader_module, "STREAM_FETCH_BYTES", 1)  # a group per layer
    cache = synthetic_cache(layers=3, heads=2, tokens=40, head_dim=16, dtype=torch.float16)
    data = kvcodec.encode(cache, "quant", chunk_tokens=16, bits=4)
    want = cpu_cache(data)
    with kvcodec.open(data) as reader:
        seen = [i for i, layer in reader.stream(device=DEVICE, decoder="kernels")
                if torch.equal(layer.key.cpu(), want.layers[i].key) and torch.equal(layer.value.cpu(), want.layers[i].value)]
        assert seen == [0, 1, 2]
        hf = reader.to_hf(device=DEVICE, decoder="kernels")
        assert all(torch.equal(hf.layers[i].keys.cpu(), want.layers[i].key) for i in range(3))


@pytest.mark.parametrize("lanes", [1, 2])
def test_tables_without_tensors_are_refused_by_both_decoders(lanes):
    """A cachegen file whose (checksummed, well-formed) tables cover no tensor at all: a CodecError
    from the kernels as from the CPU decoder, not an internal error."""
    from kvcodec.container import format as fmt
    from kvcodec.container.writer import KVCWriter
    from kvcodec.entropy.shared_tables import SharedTables
    from kvcodec.entropy.tables import FileTables
    from kvcodec.errors import CodecError

    cache = synthetic_cache(layers=1, heads=2, tokens=20, head_dim=16, dtype=torch.float16)
    reader = kvcodec.open(kvcodec.encode(cache, "cachegen", chunk_tokens=16, lanes=lanes))
    out = io.BytesIO()
    writer = KVCWriter(out, reader.header)
    writer.add_blob(0, 0, (FileTables if lanes == 1 else SharedTables)({}).to_blob(0))  # the tables of no layer
    for i, r in enumerate(reader.records):
        shape = tuple(int(r[f]) for f in ("batch", "heads", "tokens", "head_dim"))
        writer.add_record(int(r["layer"]), int(r["tensor"]), int(r["token_start"]), shape,
                          fmt.record_dtype_name(int(r["dtype"])), int(r["codec_slot"]), bytes(reader.payload(i)))
    writer.finish()
    for decode in (kernel_cache, cpu_cache):
        with pytest.raises(CodecError, match="do not cover"):
            decode(out.getvalue())


def test_per_chunk_presets_mix():
    data = kvcodec.encode(smooth_cache(torch.float16), "quant", chunk_tokens=CHUNK, target_ratio=3.0 if ON_GPU else 1.3)
    assert len(kvcodec.open(data).info()["codecs"]) > 1
    assert kernel_cache(data).equal(cpu_cache(data))


class Alternate(Encoding):
    """Chunks alternate between slot 0 and slot 1."""

    def payload(self, info, chunk):
        slot = (info.token_start // CHUNK) % 2
        return slot, self.codecs[slot].encode(chunk, info, self.contexts[slot])


@pytest.mark.parametrize("other", ["zstd", "cachegen"])
def test_codecs_without_kernels_decode_on_the_cpu_beside_them(other):
    cache = smooth_cache(torch.bfloat16)
    codecs = [kvcodec.get_codec("quant", bits=3), kvcodec.get_codec(other)]
    buf = io.BytesIO()
    write_cache(cache, buf, Alternate.of(codecs, [c.fit(cut(cache, CHUNK)) for c in codecs]), CHUNK)
    data = buf.getvalue()
    assert kernel_cache(data).equal(cpu_cache(data))


class Tamper(Encoding):
    """Writes each payload with one byte changed at `position` (from the end if negative)."""

    position = 0

    def payload(self, info, chunk):
        slot, data = super().payload(info, chunk)
        data = bytearray(data)
        data[self.position] ^= 0x5A
        return slot, bytes(data)


@pytest.mark.parametrize("position", [-1, -5, -9, -40, -101, 4 * 40, 4 * 41 + 1])
def test_corrupt_lanes_get_the_cpu_decoders_verdict(position):
    """Payloads with valid checksums but changed lane bytes: the kernels raise CodecError
    exactly when the CPU decoder does, and otherwise decode to the same tensors."""
    cache = synthetic_cache(layers=1, heads=HEADS, tokens=TOKENS, head_dim=HEAD_DIM)
    codec = kvcodec.get_codec("cachegen", sinks=0)
    enc = Tamper.fitted(cut(cache, CHUNK), codec)
    enc.position = position
    buf = io.BytesIO()
    write_cache(cache, buf, enc, CHUNK)
    data = buf.getvalue()
    try:
        want = cpu_cache(data)
    except kvcodec.CodecError:
        with pytest.raises(kvcodec.CodecError, match="cachegen record of layer 0"):
            kernel_cache(data)
    else:
        assert kernel_cache(data).equal(want)


def test_wrong_payload_lengths_are_refused():
    cache = synthetic_cache(layers=1, heads=HEADS, tokens=TOKENS, head_dim=HEAD_DIM)
    for codec in ("quant", "cachegen", "raw"):
        enc = Encoding.fitted(cut(cache, CHUNK), kvcodec.get_codec(codec))
        short = type("Short", (Encoding,), {"payload": lambda self, i, c: (0, Encoding.payload(self, i, c)[1][:-4])})
        buf = io.BytesIO()
        write_cache(cache, buf, short(enc.codecs, enc.blobs, enc.contexts), CHUNK)
        with pytest.raises(kvcodec.CodecError):
            kernel_cache(buf.getvalue())


def test_decoder_choice():
    assert not device.use_kernels("cpu")
    assert not device.use_kernels(None, "auto")
    assert not device.use_kernels("cuda", "cpu")
    with pytest.raises(ValueError, match="decoder must be one of"):
        device.use_kernels("cpu", "gpu")


def test_environment_forces_the_cpu_decoder(monkeypatch):
    monkeypatch.setenv(device.DECODER_ENV, "cpu")
    assert not device.use_kernels("cuda")
    monkeypatch.setenv(device.DECODER_ENV, "kernels")
    assert device.use_kernels(DEVICE)
    monkeypatch.setenv(device.DECODER_ENV, "fast")
    with pytest.raises(ValueError, match="KVCODEC_DECODER"):
        device.use_kernels("cuda")


def test_progress_reports_layers_in_order():
    data = kvcodec.encode(smooth_cache(torch.float16), "quant", chunk_tokens=CHUNK)
    seen = []
    kvcodec.open(data).read_cache(device=DEVICE, decoder="kernels", progress=seen.append)
    assert seen and seen[-1] == 2 and seen == sorted(seen)


@pytest.mark.slow
@pytest.mark.model
def test_kernels_on_a_real_cache(real_model):
    from kvcodec.eval import capture

    cache = capture.capture("code", tokens=512 if ON_GPU else 32)
    if not ON_GPU:  # the interpreter runs a program at a time: the first, a middle and the last layer
        cache = kvcodec.KVCache([cache.layers[i] for i in (0, len(cache.layers) // 2, len(cache.layers) - 1)])
    for codec, options in (("cachegen", {}), ("quant", {"bits": 3})):
        data = kvcodec.encode(cache, codec, chunk_tokens=128 if ON_GPU else 16, **options)
        assert kernel_cache(data).equal(cpu_cache(data)), codec


def test_tensor_sources_decode_alike():
    data = kvcodec.encode(smooth_cache(torch.float16), "quant", chunk_tokens=CHUNK, bits=4)
    source = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if ON_GPU:
        source = source.pin_memory()
    got = kvcodec.decode(source, device=DEVICE, decoder="kernels")
    assert got.equal(cpu_cache(data))
    with pytest.raises(kvcodec.FormatError, match="uint8"):
        kvcodec.open(source.view(torch.int16) if source.numel() % 2 == 0 else source.float())


@pytest.mark.parametrize("options", [{}, {"sinks": 3, "group_size": 6, "anchor_bits": 2, "key_emphasis": 0.0},
                                     {"lanes": 1}, {"lanes": 1, "sinks": 3, "group_size": 6, "key_emphasis": 0.0}])
def test_gpu_cachegen_encode_gives_the_cpu_bytes(options):
    """The GPU chunk encoder (run here on the kernels' device) against the CPU encoder."""
    from kvcodec.kernels import cachegen

    cache = smooth_cache(torch.float16, tokens=max(TOKENS, 250))
    codec = kvcodec.get_codec("cachegen", **options)
    chunks = cut(cache, max(CHUNK, 128))
    context = codec.load_context(codec.fit(chunks))
    assert "group_size" not in options or any(t.anchored.any() for t in context.tensors.values())
    for info, chunk in chunks:
        want = codec.encode(chunk, info, context)
        assert cachegen.encode(codec, chunk.to(DEVICE), info, context) == want
    infos, tensors = [info for info, _ in chunks], [chunk.to(DEVICE) for _, chunk in chunks]
    assert cachegen.encode_many(codec, tensors, infos, context) == codec.encode_many(tensors, infos, context)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("codec,options", CODECS[1:], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_files_encoded_on_the_gpu_are_identical(codec, options):
    cache = smooth_cache(torch.bfloat16)
    assert kvcodec.encode(cache.to("cuda"), codec, chunk_tokens=CHUNK, **options) == \
        kvcodec.encode(cache, codec, chunk_tokens=CHUNK, **options)


def test_pruned_pipeline_files_decode_with_their_positions():
    cache = smooth_cache(torch.float16)
    data = kvcodec.encode(cache, "knorm+cachegen", keep=0.5, chunk_tokens=CHUNK)
    got, want = kernel_cache(data), cpu_cache(data)
    assert got.equal(want) and got.length == want.length == TOKENS
    assert all(torch.equal(a.positions, b.positions) for a, b in zip(got.layers, want.layers))
    assert got.layers[0].key.shape[2] == round(TOKENS * 0.5)


def random_autoencoder(tmp_path, latent, shared, layers=2, heads=HEADS, head_dim=HEAD_DIM, seed=0) -> str:
    """An untrained network with random weights and normalization (the kernel's arithmetic does
    not depend on training); returns the weights file's path."""
    from kvcodec.codecs.autoencoder import AEConfig, CacheAutoencoder

    torch.manual_seed(seed)
    ae = CacheAutoencoder(AEConfig(layers, heads, {"key": head_dim, "value": head_dim}, latent, hidden=32,
                                   shared=shared))
    for net in ae.nets.values():
        net.mean.normal_()
        net.std.uniform_(0.5, 2.0)
        if shared:
            net.embed_up.data.normal_()
    path = tmp_path / f"ae{latent}{'s' if shared else ''}.safetensors"
    ae.save(path)
    return str(path)


@pytest.mark.parametrize("latent,shared,group_size", [(8, False, 16), (12, True, 5)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fused_ae_decoder_matches_the_cpu_decoder(tmp_path, monkeypatch, latent, shared, group_size, dtype):
    """Dequantize + the decoder network in one kernel: equal to the CPU decoder up to float32
    rounding in the matmuls (then one rounding to the output dtype). The CPU path is disabled
    while the kernels decode, so the fused kernel did the work."""
    from kvcodec.codecs.ae import AECodec

    weights = random_autoencoder(tmp_path, latent, shared)
    cache = synthetic_cache(layers=2, heads=HEADS, tokens=TOKENS, head_dim=HEAD_DIM, dtype=dtype)
    data = kvcodec.encode(cache, "ae", weights=weights, group_size=group_size, chunk_tokens=CHUNK)
    want = cpu_cache(data)
    monkeypatch.setattr(AECodec, "decode_to", lambda *a: pytest.fail("decoded off the fused kernel"))
    got = kernel_cache(data)
    for (gk, gv), (wk, wv) in zip(got, want):
        for g, w in ((gk, wk), (gv, wv)):
            assert g.dtype == dtype and g.shape == w.shape
            tolerance = 2 * max(torch.finfo(dtype).eps, 1e-5) * float(w.float().abs().max())
            assert float((g.cpu().float() - w.float()).abs().max()) <= tolerance


def test_entropy_coded_ae_latents_decode_with_the_cachegen_kernel(tmp_path, monkeypatch):
    from kvcodec.codecs.ae import AECodec

    weights = random_autoencoder(tmp_path, 8, False)
    cache = synthetic_cache(layers=2, heads=HEADS, tokens=TOKENS, head_dim=HEAD_DIM)
    data = kvcodec.encode(cache, "ae", weights=weights, entropy=True, chunk_tokens=CHUNK)
    want = cpu_cache(data)
    monkeypatch.setattr(AECodec, "decode_to", lambda *a: pytest.fail("decoded off the kernels"))
    got = kernel_cache(data)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert float((a.cpu().float() - b.float()).abs().max()) <= 1e-3 * float(b.float().abs().max())


class TorchCopyDecoder:
    """A third party's device decoder, in plain torch: copies raw payloads into the output."""

    calls = 0

    @staticmethod
    def supports(codec, context, table, itemsize):
        return table[:, device.TOKENS] > 1  # one-token records decline: they decode on the CPU

    @staticmethod
    def prepare(codec, context, table, staged, out):
        assert context == (b"plugin",)
        TorchCopyDecoder.calls += 1

        def run():
            for row in table.tolist():
                n = row[device.BATCH] * row[device.HEADS] * row[device.TOKENS] * row[device.HEAD_DIM]
                src = staged[row[device.SRC]:row[device.SRC] + n * out.element_size()].view(out.dtype)
                b, h, t, d = (row[c] for c in (device.BATCH, device.HEADS, device.TOKENS, device.HEAD_DIM))
                place = torch.as_strided(out, (b, h, t, d), (row[device.STRIDE_B], row[device.STRIDE_H], d, 1),
                                         row[device.DST])
                place.copy_(src.view(b, h, t, d))
        return device.Launch([run], [])


class PluginRaw(kvcodec.codecs.RawCodec):
    codec_id, name = 5200, "plugin-raw-test"
    device_decoder = f"{__name__}:TorchCopyDecoder"
    blob_count = 1

    def fit(self, chunks):
        return [b"plugin"]


def test_a_plugin_codec_ships_its_own_device_decoder():
    """Declared by the codec class (registered by id like any plugin): the reader's device path
    hands it the records it supports and decodes the rest on the CPU beside it."""
    if "plugin-raw-test" not in kvcodec.registry.CODECS:
        kvcodec.register_codec(PluginRaw)
    cache = synthetic_cache(layers=2, heads=HEADS, tokens=2 * CHUNK + 1, head_dim=HEAD_DIM)
    data = kvcodec.encode(cache, PluginRaw(), chunk_tokens=CHUNK)  # every tensor's last chunk: one token
    TorchCopyDecoder.calls = 0
    got = kernel_cache(data)
    assert TorchCopyDecoder.calls >= 1 and got.equal(cache)
    assert device.decoder_for(PluginRaw()) is TorchCopyDecoder
    assert device.decoder_for(kvcodec.get_codec("zstd")) is None


@pytest.mark.parametrize("codec,options", [("quant", {"bits": 4}), ("quant", {"bits": 8}), ("cachegen", {})],
                         ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_the_top_of_float16_decodes_as_on_the_cpu(codec, options):
    """The kernels saturate as the CPU decoders do: finite, bit-exact (spec section 8, to_dtype)."""
    from test_extremes import near_max_cache

    data = kvcodec.encode(near_max_cache(), codec, chunk_tokens=128, **options)
    got, want = kernel_cache(data), cpu_cache(data)
    assert got.equal(want) and all(torch.isfinite(t).all() for lay in want.layers for t in (lay.key, lay.value))


def test_device_made_cumulative_tables_equal_the_host_ones():
    """The lane decoder's tables, made from the stored count codes with torch (on the GPU in a
    restore), are the host's cumulative weights with 2**24 after each table, integer for integer."""
    import numpy as np

    from kvcodec.entropy import rans
    from kvcodec.kernels.lane_decode import cumulative_with_ends

    data = kvcodec.encode(smooth_cache(torch.float16, tokens=max(TOKENS, 250)), "cachegen", chunk_tokens=CHUNK,
                          key_emphasis=0.0, group_size=6, lanes=1)
    for tt in kvcodec.open(data).context(0).tensors.values():
        want = np.insert(rans.cumulative_many(tt.flat_weights, tt.sizes), np.cumsum(tt.sizes), rans.TOTAL)
        got = cumulative_with_ends(torch.tensor(tt.codes, device=DEVICE), tt.sizes)
        assert np.array_equal(got.cpu().numpy(), want)
    rng = np.random.default_rng(3)  # every size class, ties, tables of zero counts, the largest codes
    sizes = np.array([2, 3, 64, 65, 300, 512, 513, 4096, 7, 40])
    codes = rng.integers(0, 256, int(sizes.sum())).astype(np.uint8)
    codes[:2] = 0
    codes[2:5] = 255
    codes[5 + 64:5 + 64 + 65] = 31  # one table of equal counts
    weights = rans.weights_from_counts_many(rans.codes_to_counts(codes), sizes, split=False)
    want = np.insert(rans.cumulative_many(weights, sizes), np.cumsum(sizes), rans.TOTAL)
    got = cumulative_with_ends(torch.tensor(codes, device=DEVICE), sizes)
    assert np.array_equal(got.cpu().numpy(), want)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_uploads_wait_for_a_ring_region_to_be_copied_before_reusing_it():
    """Small arrays reach the device through one pinned ring (`kvcodec.uploads`): with the
    stream held busy, uploads of more than the ring holds, of mixed sizes so that laps wrap at
    different places, must not overwrite bytes whose copy has not run yet."""
    from kvcodec import uploads

    mib = (1 << 20) // 8  # int64 elements
    sizes = [4 * mib, 4 * mib, 4 * mib, mib, mib, mib, mib, 4 * mib, 4 * mib, 4 * mib, mib, 4 * mib, 3, 2 * mib, 5]
    rng = np.random.default_rng(0)
    sizes += [int(n) for n in rng.integers(1, 4 * mib, 40)]
    copies = []
    for k, n in enumerate(sizes):
        if k in (0, 7, 30):
            torch.cuda._sleep(100_000_000)  # the copies queue behind this
        copies.append(uploads.to_device(np.full(n, k, dtype=np.int64), "cuda"))
    assert all(c.numel() == n and bool((c == k).all()) for k, (c, n) in enumerate(zip(copies, sizes)))
    assert len(uploads._ring.in_flight) < 64  # regions are retired as the ring comes round
    assert uploads.to_device(np.arange(5, dtype=np.float32).reshape(5, 1), "cuda").cpu().equal(
        torch.arange(5, dtype=torch.float32).reshape(5, 1))
