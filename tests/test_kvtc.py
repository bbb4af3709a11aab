"""kvtc: the calibrated transform codec. Synthetic caches with a profile fitted on other caches
of the same shape: round trips within the target's error, bit-identical decoding, keys coded
before their rotary embedding, and profiles refused when they do not fit or are damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kvcodec
from kvcodec.calibration.fit import from_caches
from kvcodec.codecs import kvtc
from kvcodec.errors import CodecError, KVCError
from kvcodec.transform import rope
from kvcodec.transform.profile import Profile, Rope

LAYERS, HEADS, DIM = 3, 2, 16
ROPES = [Rope((1.0 / 10000 ** (np.arange(0, DIM, 2) / DIM)).astype(np.float32), 1.0)] * LAYERS


def correlated_cache(seed: int, tokens: int = 96, positions=None) -> kvcodec.KVCache:
    """Keys and values whose channels, all heads together, share a few directions (as a model's
    do), keys rotated at their positions as a model stores them."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.Generator().manual_seed(99)  # the same directions in every cache
    layers = []
    for i in range(LAYERS):
        basis = torch.randn(4, HEADS * DIM, generator=mix, dtype=torch.float64)
        pre = (torch.randn(tokens, 4, generator=g, dtype=torch.float64) @ basis
               + 0.05 * torch.randn(tokens, HEADS * DIM, generator=g, dtype=torch.float64))
        pre = pre.reshape(1, tokens, HEADS, DIM).permute(0, 2, 1, 3)
        pos = positions if positions is not None else torch.arange(tokens)[None]
        key = rope.rotate(pre, ROPES[i].inv_freq, 1.0, pos).to(torch.float16)
        value = (torch.randn(tokens, 4, generator=g, dtype=torch.float64) @ basis).reshape(
            1, tokens, HEADS, DIM).permute(0, 2, 1, 3).to(torch.float16)
        layers.append(kvcodec.LayerKV(key, value, None if positions is None else positions))
    return kvcodec.KVCache(layers)


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    profile = from_caches([correlated_cache(s) for s in (1, 2, 3)], ROPES, model="synthetic")
    path = tmp_path_factory.mktemp("profiles") / "profile.safetensors"
    path.write_bytes(profile.to_bytes())
    return str(path)


def rel_errors(a: kvcodec.KVCache, b: kvcodec.KVCache):
    return [float((x.double() - y.double()).norm() / x.double().norm())
            for la, lb in zip(a.layers, b.layers) for x, y in ((la.key, lb.key), (la.value, lb.value))]


def test_round_trip_error_follows_the_target(profile_path):
    cache = correlated_cache(7)
    errors, sizes = [], []
    for target in (1e-5, 1e-3, 1e-1):
        data = kvcodec.encode(cache, "kvtc", profile=profile_path, target_kl=target, chunk_tokens=40)
        errors.append(max(rel_errors(cache, kvcodec.decode(data))))
        sizes.append(len(data))
    assert errors[0] < 0.01 and errors[0] < errors[1] < errors[2]
    assert sizes[0] > sizes[1] > sizes[2]


def test_sinks_are_exact_and_decoding_is_deterministic(profile_path):
    cache = correlated_cache(8)
    data = kvcodec.encode(cache, "kvtc", profile=profile_path, target_kl=1e-2, sinks=3, chunk_tokens=32)
    a, b = kvcodec.decode(data), kvcodec.decode(data)
    for la, lb, lo in zip(a.layers, b.layers, cache.layers):
        assert torch.equal(la.key, lb.key) and torch.equal(la.value, lb.value)
        assert torch.equal(la.key[:, :, :3], lo.key[:, :, :3]) and not torch.equal(la.key[:, :, 3:], lo.key[:, :, 3:])


def test_keys_are_coded_before_their_rotation(profile_path):
    """Coded at their true positions, keys of a cache held from position 500 on compress as well
    as those held from 0; told the wrong positions (as if from 0), they cost far more."""
    at = torch.arange(500, 596)[None]
    shifted = correlated_cache(9, positions=at)
    right = kvcodec.encode(shifted, "kvtc", profile=profile_path, target_kl=1e-3)
    back = kvcodec.decode(right)
    assert torch.equal(back.layers[0].positions, at)
    wrong = kvcodec.KVCache([kvcodec.LayerKV(lay.key, lay.value) for lay in shifted.layers])
    base = kvcodec.encode(correlated_cache(9), "kvtc", profile=profile_path, target_kl=1e-3)
    assert len(right) < 1.1 * len(base)
    assert len(kvcodec.encode(wrong, "kvtc", profile=profile_path, target_kl=1e-3)) > 1.3 * len(right)
    assert max(rel_errors(shifted, back)) < 0.2


def test_rotation_round_trips():
    x = torch.randn(1, 2, 50, DIM, dtype=torch.float64)
    pos = torch.arange(1000, 1050)[None]
    back = rope.unrotate(rope.rotate(x, ROPES[0].inv_freq, 1.3, pos), ROPES[0].inv_freq, 1.3, pos)
    assert torch.allclose(back, x, atol=1e-6)
    assert not torch.allclose(rope.rotate(x, ROPES[0].inv_freq, 1.0, pos), x, atol=1e-2)


def test_embedded_profile_travels_and_is_checked(profile_path, tmp_path, monkeypatch):
    cache = correlated_cache(10)
    data = kvcodec.encode(cache, "kvtc", profile=profile_path, embed=True)
    monkeypatch.setattr(kvtc.PROFILES, "_given", {})  # a process that was never given the file
    monkeypatch.setenv(kvtc.SEARCH_ENV, str(tmp_path))
    assert max(rel_errors(cache, kvcodec.decode(data))) < 0.2
    referenced = kvcodec.encode(cache, "kvtc", profile=profile_path)
    monkeypatch.setattr(kvtc.PROFILES, "_given", {})
    with pytest.raises(KVCError, match="kvtc profile sha256:.*not found"):
        kvcodec.decode(referenced)


def test_a_profile_of_another_model_is_refused(profile_path):
    other = kvcodec.KVCache([kvcodec.LayerKV(lay.key[:, :1], lay.value[:, :1]) for lay in correlated_cache(4).layers])
    with pytest.raises(KVCError, match="profile is for a model of 3 layers of 2 heads"):
        kvcodec.encode(other, "kvtc", profile=profile_path)
    with pytest.raises(KVCError, match="profile is for a model of 3 layers"):
        kvcodec.encode(kvcodec.KVCache(correlated_cache(4).layers[:2]), "kvtc", profile=profile_path)


def test_damaged_profiles_are_refused(profile_path):
    good = Profile.from_bytes(open(profile_path, "rb").read())
    data = good.to_bytes()
    assert Profile.from_bytes(data).transforms[(1, "key")].sensitivity == 1.0
    broken = dict(good.transforms)
    t = broken[(0, "value")]
    for bad, pattern in ((data[:100], "not a readable|runs past"), (b"x" * 7, "too short"),
                         (data.replace(b"kvcodec-kvtc-profile", b"kvcodec-kvtc-profilX"), "not a kvcodec-kvtc-profile")):
        with pytest.raises(CodecError, match=pattern):
            Profile.from_bytes(bad)
    nan = t.mean.copy()
    nan[0] = np.nan
    broken[(0, "value")] = type(t)(nan, t.encoder, t.decoder, t.spread, 1.0)
    with pytest.raises(CodecError, match="0.value.mean is not finite"):
        Profile.from_bytes(Profile(good.model, good.heads, good.head_dims, good.ropes, broken, {}).to_bytes())
    broken[(0, "value")] = type(t)(t.mean, t.encoder[:, :3], t.decoder, t.spread, 1.0)
    with pytest.raises(CodecError, match="0.value.encoder is missing or not of shape"):
        Profile.from_bytes(Profile(good.model, good.heads, good.head_dims, good.ropes, broken, {}).to_bytes())
    broken[(0, "value")] = type(t)(t.mean, t.encoder, t.decoder, t.spread, 0.0)
    with pytest.raises(CodecError, match="sensitivity must be positive"):
        Profile.from_bytes(Profile(good.model, good.heads, good.head_dims, good.ropes, broken, {}).to_bytes())


def test_bad_options_are_refused(profile_path):
    cache = correlated_cache(5)
    for options, pattern in (({}, "profile must name"), ({"profile": profile_path, "target_kl": 0}, "target_kl"),
                             ({"profile": "/no/such.safetensors"}, "no such profile file")):
        with pytest.raises(KVCError, match=pattern):
            kvcodec.encode(cache, "kvtc", **options)


def test_the_integer_decoder_stays_exact():
    """W and F of spec 8.7: every sum of products of symbols below 2**20 stays below 2**53."""
    t = from_caches([correlated_cache(1)], ROPES).transforms[(0, "key")]
    for step in (1e-4, 1.0, 1e3):
        w, f = kvtc.integer_decoder(t, np.full(HEADS * DIM, step, np.float32))
        assert np.array_equal(w, np.rint(w)) and (np.abs(w).sum(1).max() + 1) * 2 ** 20 < 2 ** 53
        assert np.abs(np.ldexp(w, -f) - t.decoder.astype(np.float64) * np.float64(np.float32(step))).max() <= 2.0 ** (-f - 1)


def test_the_codec_is_immutable_and_its_config_round_trips(profile_path):
    codec = kvcodec.get_codec("kvtc", profile=profile_path, target_kl=0.01)
    assert codec.profile.startswith("sha256:") and type(codec).from_config(codec.get_config()) == codec
    with pytest.raises(AttributeError, match="immutable"):
        codec.target_kl = 1.0
    before = dict(vars(codec))
    kvcodec.decode(kvcodec.encode(correlated_cache(11), codec))
    assert vars(codec) == before


def test_the_command_line_packs_inspects_and_unpacks_kvtc(profile_path, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from kvcodec.tools.cli import cli

    from kvcodec import cachefiles

    def run(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.output

    cache = correlated_cache(12)
    cachefiles.save_cache(cache, tmp_path / "c.pt")
    code, out = run("pack", tmp_path / "c.pt", "-c", "kvtc", "--opt", f"profile={profile_path}", "-q")
    assert code == 0, out
    code, out = run("inspect", tmp_path / "c.kvc")
    assert code == 0 and "kvtc" in out
    monkeypatch.setattr(kvtc.PROFILES, "_given", {})  # a later process: the profile is found by its hash
    code, out = run("unpack", tmp_path / "c.kvc", "-o", tmp_path / "back.pt")
    assert code == 1 and "not found" in out and "KVCODEC_PROFILE_PATH" in out
    monkeypatch.setenv(kvtc.SEARCH_ENV, str(Path(profile_path).parent))
    code, out = run("unpack", tmp_path / "c.kvc", "-o", tmp_path / "back.pt")
    assert code == 0, out
    assert max(rel_errors(cache, cachefiles.load_cache(tmp_path / "back.pt"))) < 0.2
    code, out = run("calibrate", "-o", tmp_path / "profile.txt")
    assert code == 1 and "must end in .safetensors" in out


def test_cachegen_takes_its_steps_from_a_profile(profile_path, monkeypatch):
    """cachegen with a profile: per-channel steps from the profile's sensitivities and metric,
    finer for a lower target; the file decodes without the profile (its steps are in the file)."""
    cache = correlated_cache(13)
    errors, sizes = [], []
    for target in (1e-4, 1e-2):
        data = kvcodec.encode(cache, "cachegen", profile=profile_path, target_kl=target)
        monkeypatch.setattr(kvtc.PROFILES, "_given", {})
        errors.append(max(rel_errors(cache, kvcodec.decode(data))))
        sizes.append(len(data))
        assert kvcodec.open(data).header.codecs[0].config["profile"].startswith("sha256:")
        monkeypatch.undo()
    assert errors[0] < errors[1] and sizes[0] > sizes[1]
    plain = kvcodec.get_codec("cachegen").get_config()
    assert "profile" not in plain and "target_kl" not in plain  # files without a profile are as before
    for options, pattern in (({"target_kl": 0.01}, "needs a profile"),
                             ({"profile": profile_path, "key_step": 0.2}, "leave out key_step")):
        with pytest.raises(KVCError, match=pattern):
            kvcodec.encode(cache, "cachegen", **options)
    with pytest.raises(KVCError, match="profile is for a model of 3 layers"):
        kvcodec.encode(kvcodec.KVCache(cache.layers[:2]), "cachegen", profile=profile_path)


def test_size_and_error_targets_choose_among_divergence_targets(profile_path):
    cache = correlated_cache(14, tokens=120)
    data = kvcodec.encode(cache, "kvtc", profile=profile_path, chunk_tokens=40, target_ratio=3)
    assert 3 <= cache.nbytes / len(data) < 3.75  # the planner stays under the budget
    assert len(kvcodec.open(data).header.codecs) >= 2  # presets mixed per chunk
    bounded = kvcodec.encode(cache, "kvtc", profile=profile_path, chunk_tokens=40, max_error=0.05)
    assert max(rel_errors(cache, kvcodec.decode(bounded))) <= 0.05


def test_cachegen_with_a_profile_meets_size_and_error_targets(profile_path):
    cache = correlated_cache(15, tokens=120)
    data = kvcodec.encode(cache, "cachegen", profile=profile_path, chunk_tokens=40, target_ratio=1.8)
    assert 1.8 <= cache.nbytes / len(data) < 2.25
    assert {c.config.get("target_kl") for c in kvcodec.open(data).header.codecs} <= set(kvtc.profiles.TARGET_LADDER)


def test_hostile_profiles_give_clean_errors(profile_path, tmp_path):
    good = Profile.from_bytes(open(profile_path, "rb").read())
    t = good.transforms[(0, "key")]
    huge = dict(good.transforms)
    huge[(0, "key")] = type(t)(t.mean, np.full_like(t.encoder, 3e38), t.decoder, t.spread, t.sensitivity)
    path = tmp_path / "huge.safetensors"
    path.write_bytes(Profile(good.model, good.heads, good.head_dims, good.ropes, huge, {}).to_bytes())
    with pytest.raises(KVCError, match="out of float32's range"):
        kvcodec.encode(correlated_cache(16), "kvtc", profile=str(path))
    tiny = {k: type(v)(v.mean, v.encoder, v.decoder, v.spread, 1e-45) for k, v in good.transforms.items()}
    path.write_bytes(Profile(good.model, good.heads, good.head_dims, good.ropes, tiny, {}, 1e-38).to_bytes())
    for codec in ("kvtc", "cachegen"):
        with pytest.raises(KVCError, match="out of float32's range"):
            kvcodec.encode(correlated_cache(16), codec, profile=str(path), target_kl=10)
    zero = [Rope(r.inv_freq, 0.0) for r in good.ropes]
    with pytest.raises(CodecError, match="rope.scale must be positive"):
        Profile.from_bytes(Profile(good.model, good.heads, good.head_dims, tuple(zero), good.transforms, {}).to_bytes())
