"""The fuzz target in CI: a short deterministic run over mutated, truncated and spliced files
(checksums recomputed so the damage reaches validation and decoders), and every crasher ever
found replayed. `benchmarks/fuzz_reader.py` runs the long campaign."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import kvcodec
from kvcodec.errors import ChecksumError, KVCError
from kvcodec.testing import fuzz

REGRESSIONS = sorted((Path(__file__).parent / "fuzz_regressions").glob("*.kvc"))


@pytest.fixture(scope="module")
def seeds():
    return fuzz.seed_files()


def test_reseal_lets_damage_past_the_checksums(seeds):
    data = seeds[0]
    assert fuzz.reseal(data) == data  # an intact file is unchanged
    with kvcodec.open(data) as reader:
        at = int(reader.records["offset"][0]) + 3
    damaged = bytearray(data)
    damaged[at] ^= 0x10
    with pytest.raises(ChecksumError):
        kvcodec.decode(bytes(damaged))
    kvcodec.decode(fuzz.reseal(bytes(damaged)))  # raw: a changed value, now past the checksums


def test_mutations_are_deterministic_and_varied(seeds):
    a = [d for _, d in fuzz.cases(7, 50, seeds)]
    assert a == [d for _, d in fuzz.cases(7, 50, seeds)]
    assert len({fuzz.digest(d) for d in a}) > 45


def test_a_crash_a_hang_and_a_huge_allocation_are_failures(monkeypatch):
    def crash(data, device=None):
        raise IndexError("boom")

    monkeypatch.setattr(fuzz, "decode", crash)
    assert not fuzz.run_case(b"x").ok and "IndexError" in fuzz.run_case(b"x").problem

    def hang(data, device=None):
        while True:
            pass

    monkeypatch.setattr(fuzz, "decode", hang)
    assert "no answer" in fuzz.run_case(b"x", timeout=0.2).problem

    def hog(data, device=None):
        blocks = [bytearray(1 << 20) for _ in range(80)]
        raise KVCError(str(len(blocks)))

    monkeypatch.setattr(fuzz, "decode", hog)
    outcome = fuzz.run_case(b"x")
    assert not outcome.ok and "allocated" in outcome.problem


@pytest.mark.slow
def test_short_fuzz_run_finds_no_failure(seeds):
    failures, refused = [], 0
    for i, data in fuzz.cases(2026, 1500, seeds):
        outcome = fuzz.run_case(data)
        refused += outcome.refused
        if not outcome.ok:
            failures.append((i, outcome.problem))
    assert not failures, failures[:5]
    assert 500 < refused < 1500  # most mutations are refused, some still decode


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_regressions_stay_fixed(path):
    outcome = fuzz.run_case(path.read_bytes())
    assert outcome.ok, outcome.problem


def test_random_seeds_cover_every_codec(seeds):
    names = set()
    for data in seeds:
        with kvcodec.open(data) as reader:
            names |= {c["name"] for c in reader.info()["codecs"]}
    assert {"raw", "zstd", "shuffle-zstd", "quant", "cachegen"} <= names
    assert random.Random(0).random() == random.Random(0).random()
