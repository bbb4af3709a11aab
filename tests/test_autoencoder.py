"""The `ae` codec and its training on synthetic caches: training lowers the reconstruction error
below a stated bound, weights save and load exactly, embedded and referenced weights decode alike,
and wrong, damaged or missing weights are refused."""

from __future__ import annotations

import struct
import zlib
from collections import OrderedDict

import pytest
import torch

import kvcodec
from kvcodec.codecs import ae as ae_codec
from kvcodec.codecs.ae import SEARCH_ENV
from kvcodec.codecs.autoencoder import CacheAutoencoder
from kvcodec.container.chunking import cut
from kvcodec.errors import CodecError, InputError
from kvcodec.eval import ae_training

from conftest import synthetic_cache

LATENT = 4


def low_rank_cache(seed=0, layers=2, heads=2, tokens=48, dim=16) -> kvcodec.KVCache:
    """Vectors that lie in a 4-dimensional subspace per layer (plus a little noise): a latent of
    4 can hold them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        basis = torch.randn(LATENT, dim, generator=g)
        k, v = (torch.randn(1, heads, tokens, LATENT, generator=g) @ basis + 0.01 * torch.randn(1, heads, tokens, dim, generator=g)
                for _ in range(2))
        out.append(kvcodec.LayerKV(k.half(), v.half()))
    return kvcodec.KVCache(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = low_rank_cache()
    ae = ae_training.train([cache], LATENT, hidden=32, steps=400, lr=1e-2)
    folder = tmp_path_factory.mktemp("weights")
    digest = ae.save(folder / "ae.safetensors")
    return cache, ae, folder, digest


def test_training_reduces_the_error_below_the_bound(trained):
    cache, ae, _, _ = trained
    untrained = ae_training.train([cache], LATENT, hidden=32, steps=1, lr=1e-9)
    before, after = ae_training.relative_error(untrained, cache), ae_training.relative_error(ae, cache)
    assert all(after[t] < 0.1 for t in after), after  # the stated bound: 10 % relative RMS error
    assert all(after[t] < before[t] / 5 for t in after), (before, after)


def test_shared_weights_with_a_layer_embedding_train_too():
    cache = low_rank_cache(seed=1)
    ae = ae_training.train([cache], LATENT, hidden=32, steps=400, lr=1e-2, shared=True)
    assert ae.nets["key"].w_in.shape[0] == 1 and ae.nets["key"].embed_in.shape == (2, 32)
    assert max(ae_training.relative_error(ae, cache).values()) < 0.2


def test_weights_save_and_load_exactly(trained):
    _, ae, folder, digest = trained
    back = CacheAutoencoder.load(folder / "ae.safetensors")
    assert back.to_bytes() == ae.to_bytes() and back.config == ae.config
    config = (folder / "ae.json").read_text()
    assert digest in config and '"latent_dim": 4' in config


def test_embedded_and_referenced_weights_decode_identically(trained, monkeypatch):
    cache, ae, folder, digest = trained
    embedded = kvcodec.encode(cache, "ae", weights=str(folder / "ae.safetensors"), chunk_tokens=16)
    referenced = kvcodec.encode(cache, "ae", weights=str(folder / "ae.safetensors"), embed=False, chunk_tokens=16)
    assert len(referenced) < len(embedded)
    with kvcodec.open(referenced) as reader:
        assert reader.info()["codecs"][0]["config"]["weights"] == f"sha256:{digest}"  # no local path recorded
    monkeypatch.setenv(SEARCH_ENV, str(folder))
    a, b = kvcodec.decode(embedded), kvcodec.decode(referenced)
    assert a.equal(b)
    x = cache.layers[1].value.float()
    assert float((a.layers[1].value.float() - x).norm() / x.norm()) < 0.1


def test_missing_mismatched_or_damaged_weights_are_refused(trained, tmp_path, monkeypatch):
    cache, _, folder, digest = trained
    monkeypatch.setattr(ae_codec, "_NETWORKS", OrderedDict())
    referenced = kvcodec.encode(cache, "ae", weights=str(folder / "ae.safetensors"), embed=False)
    ae_codec._NETWORKS.clear()  # as in a process that has not loaded these weights
    other = ae_training.train([low_rank_cache(seed=3)], LATENT, hidden=32, steps=5)
    other.save(tmp_path / "other.safetensors")  # a different network in the search path
    monkeypatch.setenv(SEARCH_ENV, str(tmp_path))
    with pytest.raises(CodecError, match=f"sha256:{digest[:16]}.*not found"):
        kvcodec.decode(referenced)
    # embedded weights altered, the container checksums re-sealed
    embedded = bytearray(kvcodec.encode(cache, "ae", weights=str(folder / "ae.safetensors")))
    with kvcodec.open(bytes(embedded)) as reader:
        blob = next(b for b in reader.blobs if b["owner"] == 0)
    start, length = int(blob["offset"]), int(blob["length"])
    mine = bytes(embedded[start:start + length])
    swapped = mine[:-1] + bytes([mine[-1] ^ 1])  # one weight changed: still a valid network
    embedded[start:start + length] = swapped
    reseal_blob(embedded, start, zlib.crc32(swapped))
    with pytest.raises(CodecError, match="do not match the sha256"):
        kvcodec.decode(bytes(embedded))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10" + bytes(40))
    with pytest.raises(CodecError, match="not a kvcodec autoencoder"):
        CacheAutoencoder.load(tmp_path / "broken.safetensors")
    with pytest.raises(InputError, match="no such"):
        CacheAutoencoder.load(tmp_path / "missing.safetensors")
    with pytest.raises(CodecError, match="no such weights file"):
        kvcodec.get_codec("ae", weights=str(tmp_path / "missing.safetensors"))


def test_a_cache_the_weights_do_not_fit_is_refused(trained):
    _, _, folder, _ = trained
    wrong = synthetic_cache(layers=2, heads=2, tokens=10, head_dim=8)
    with pytest.raises(CodecError, match="heads of 8; the weights fit 2 heads of 16"):
        kvcodec.encode(wrong, "ae", weights=str(folder / "ae.safetensors"))
    with pytest.raises(CodecError, match="the weights fit 2 layers"):
        kvcodec.encode(low_rank_cache(layers=3), "ae", weights=str(folder / "ae.safetensors"))


def reseal_blob(data: bytearray, offset: int, crc: int) -> None:
    """Write a blob's new crc32 into the index and re-seal the index checksum."""
    index_offset, index_length = struct.unpack_from("<QQ", data, len(data) - 32)
    n_rec, n_blob, rec_size, blob_size = struct.unpack_from("<IIII", data, index_offset + 4)
    for i in range(n_blob):
        at = index_offset + 32 + n_rec * rec_size + i * blob_size
        if struct.unpack_from("<Q", data, at)[0] == offset:
            struct.pack_into("<I", data, at + 16, crc)
    index = bytes(data[index_offset:index_offset + index_length])
    trailer = len(data) - 32
    struct.pack_into("<I", data, trailer + 20, zlib.crc32(index, zlib.crc32(bytes(data[trailer:trailer + 20]))))


@pytest.mark.slow
@pytest.mark.model
def test_train_ae_on_the_model_then_pack(tmp_path, real_model, monkeypatch):
    from click.testing import CliRunner

    from kvcodec.eval import capture
    from kvcodec.tools.cli import cli

    runner = CliRunner()
    out = runner.invoke(cli, ["train-ae", "--texts", "prose", "-o", str(tmp_path / "w.safetensors")])
    assert out.exit_code == 1 and "is an evaluation text" in out.output
    out = runner.invoke(cli, ["train-ae", "--latent-dim", "8", "--tokens", "64", "--steps", "30",
                              "-o", str(tmp_path / "w.safetensors")])
    assert out.exit_code == 0, out.output
    ae = CacheAutoencoder.load(tmp_path / "w.safetensors")
    assert ae.config.latent_dim == 8 and ae.config.layers == 30 and ae.config.head_dim == {"key": 64, "value": 64}
    assert set(ae.config.texts) == {"train-prose", "train-code", "train-data"}
    cache = capture.capture("code", tokens=32)
    data = kvcodec.encode(cache, "ae", weights=str(tmp_path / "w.safetensors"), embed=False)
    monkeypatch.setenv(SEARCH_ENV, str(tmp_path))
    restored = kvcodec.decode(data)
    assert restored.layers[4].key.shape == cache.layers[4].key.shape and restored.layers[4].key.dtype == torch.float16
    assert 8 < cache.nbytes / len(data) < 16  # 64 float16 elements -> 8 bytes of latents (+ 16-group parameters)


def test_the_device_dequantizer_matches_quant(trained):
    """The 8-bit latent dequantizer used on GPUs gives `quant`'s own decode (run here on the CPU)."""
    cache, _, folder, _ = trained
    codec = kvcodec.get_codec("ae", weights=str(folder / "ae.safetensors"), group_size=3)
    chunks = cut(cache, 64)
    context = codec.load_context(codec.fit(chunks))
    ae = codec.network(context, torch.device("cpu"))
    info, chunk = chunks.of(1, "key")[0]
    payload = codec.encode(chunk, info, context)
    latent_info = codec.quant_info(codec.latent_info(ae, info))
    want = codec.latents.decode(memoryview(payload), latent_info, ())
    assert torch.equal(codec.latents.dequantize_8bit(memoryview(payload), latent_info, "cpu"), want)


def test_a_header_naming_a_local_path_is_refused(trained, tmp_path):
    """A file names its weights by hash: a header naming a local file is refused, not opened."""
    cache, _, folder, digest = trained
    data = bytearray(kvcodec.encode(cache, "ae", weights=str(folder / "ae.safetensors"), embed=False))
    named = f"sha256:{digest}".encode()
    local = tmp_path / ("w" * (len(named) - len(str(tmp_path)) - 1))  # a real file, as long as the hash
    local.write_bytes((folder / "ae.safetensors").read_bytes())
    assert len(str(local)) == len(named)
    at = data.index(named)
    data[at:at + len(named)] = str(local).encode()
    length = struct.unpack_from("<I", data, 12)[0]  # re-seal the header checksum
    struct.pack_into("<I", data, 28, zlib.crc32(bytes(data[32:32 + length]), zlib.crc32(bytes(data[:28]))))
    with pytest.raises(CodecError, match="must name its weights as sha256"):
        kvcodec.decode(bytes(data))
    assert kvcodec.codec_class("ae").from_config({"weights": str(local)}).weights == f"sha256:{digest}"


@pytest.mark.parametrize("embed", [True, False])
def test_entropy_coded_latents_round_trip_smaller_at_a_stated_error(trained, embed, monkeypatch):
    """`entropy=True` codes the latents with cachegen's steps and tables: the file shrinks against
    8-bit latents, the decoded cache stays within the autoencoder's own error plus the step's."""
    cache, ae, folder, _ = trained
    monkeypatch.setenv(SEARCH_ENV, str(folder))
    weights = str(folder / "ae.safetensors")
    plain = kvcodec.encode(cache, "ae", weights=weights, embed=embed, chunk_tokens=16)
    coded = kvcodec.encode(cache, "ae", weights=weights, embed=embed, entropy=True, step=0.1, chunk_tokens=16)
    coarse = kvcodec.encode(cache, "ae", weights=weights, embed=embed, entropy=True, step=0.5, chunk_tokens=16)
    assert len(coarse) < len(coded) < len(plain)
    with kvcodec.open(coded) as reader:
        config = reader.info()["codecs"][0]["config"]
        assert config["entropy"] is True and config["step"] == 0.1
        assert sum(b["owner"] == 0 for b in reader.blobs) == 1 + embed  # tables (and weights)
    exact = ae_training.relative_error(ae, cache)
    restored = kvcodec.decode(coded)
    for i, lay in enumerate(cache.layers):
        for name in ("key", "value"):
            x, y = getattr(lay, name).float(), getattr(restored.layers[i], name).float()
            assert float((y - x).norm() / x.norm()) < exact[name] + 0.05, (i, name)


def test_entropy_coded_latents_need_their_tables(trained):
    cache, _, folder, _ = trained
    codec = kvcodec.get_codec("ae", weights=str(folder / "ae.safetensors"), entropy=True)
    blobs = codec.fit(cut(cache, 64))
    with pytest.raises(CodecError, match="needs 2 context blob\\(s\\); the file has 1"):
        codec.load_context(blobs[:1])
    with pytest.raises(CodecError, match="step must be a number"):
        kvcodec.get_codec("ae", weights=str(folder / "ae.safetensors"), step=0)


def test_a_network_is_loaded_once_per_process(trained, monkeypatch):
    """Weights named by hash never change: a second file referencing them decodes without
    searching the folders again, and embedded weights are still checked against their hash."""
    cache, _, folder, digest = trained
    monkeypatch.setattr(ae_codec, "_NETWORKS", OrderedDict())
    monkeypatch.setenv(SEARCH_ENV, str(folder))
    data = kvcodec.encode(cache, "ae", weights=str(folder / "ae.safetensors"), embed=False)
    first = kvcodec.decode(data)
    monkeypatch.setattr(ae_codec.WEIGHTS, "find", lambda digest: pytest.fail("searched again"))
    assert kvcodec.decode(data).equal(first)
    assert list(ae_codec._NETWORKS) == [(digest, "cpu")]


def test_weights_whose_config_claims_more_than_they_hold_are_refused(trained, monkeypatch):
    """A hostile config (hidden 10^9) is refused before anything of that size is built."""
    import json

    from safetensors.torch import save

    _, ae, _, _ = trained
    tensors = {k: v.detach().float().contiguous() for k, v in ae.state_dict().items()}
    doc = json.loads(json.dumps({"format": "kvcodec-ae-1", "config": {**ae.config.__dict__, "hidden": 10 ** 9}}))
    data = save(tensors, metadata={"kvcodec_ae": json.dumps(doc)})
    monkeypatch.setattr(CacheAutoencoder, "__init__", lambda *a: pytest.fail("built before checking"))
    with pytest.raises(CodecError, match="shapes its config describes"):
        CacheAutoencoder.from_bytes(data)
