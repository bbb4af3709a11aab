"""Entropy-coded lanes (spec section 9): constriction and the spec's reference decoder agree,
coding stays within 2% of the table's entropy, and corrupt lanes are reported."""

from __future__ import annotations

import numpy as np
import pytest

from kvcodec.entropy import rans as ans
from kvcodec.errors import CodecError


def spec_encode(symbols, weights):
    """The encoder of spec section 9, written out with Python integers."""
    cum = np.concatenate([[0], np.cumsum(weights)])
    words, x = [], 0
    for s in symbols[::-1]:
        w, c = int(weights[s]), int(cum[s])
        if (x >> 40) >= w:
            words.append(x & 0xFFFFFFFF)
            x >>= 32
        x = ((x // w) << 24) | (x % w + c)
    tail = [x & 0xFFFFFFFF, x >> 32]
    while tail and tail[-1] == 0:
        tail.pop()
    return np.array(words + tail, dtype=np.uint32)


def random_table(rng, n):
    return ans.weights_from_counts(rng.integers(0, 1000, n) * (rng.random(n) < 0.8))


def test_weights_are_valid_and_proportional():
    rng = np.random.default_rng(0)
    for n in (2, 3, 17, 255, 4096):
        counts = rng.integers(0, 10**6, n)
        w = ans.weights_from_counts(counts)
        ans.check_weights(w)
        assert w.min() >= 1 and w.sum() == ans.TOTAL
        big = counts > counts.max() // 10
        assert np.allclose(w[big] / ans.TOTAL, counts[big] / counts.sum(), rtol=1e-3)
    assert (ans.weights_from_counts(np.zeros(4)) == ans.TOTAL // 4).all()
    with pytest.raises(CodecError):
        ans.weights_from_counts(np.ones(1))


@pytest.mark.parametrize("seed", range(6))
def test_constriction_output_is_the_spec_bitstream(seed):
    rng = np.random.default_rng(seed)
    w = random_table(rng, int(rng.integers(2, 60)))
    for n in (0, 1, 2, 5, 1000):
        symbols = rng.choice(w.size, n, p=w / w.sum())
        words = ans.encode_lane(symbols, ans.Table(w))
        assert np.array_equal(words, spec_encode(symbols, w))
        assert np.array_equal(ans.decode_lane(words, ans.Table(w), n), symbols)


def test_reference_decoder_matches_across_lanes_and_tables():
    rng = np.random.default_rng(7)
    tables = [random_table(rng, n) for n in (2, 9, 40)]
    which = rng.integers(0, 3, 64)
    symbols = [rng.choice(tables[t].size, 257, p=tables[t] / ans.TOTAL) for t in which]
    lanes = [ans.encode_lane(s, ans.Table(tables[t])) for s, t in zip(symbols, which)]
    assert np.array_equal(ans.decode_lanes_reference(lanes, tables, which, 257), np.stack(symbols))


def test_coded_size_within_two_percent_of_entropy():
    rng = np.random.default_rng(3)
    counts = np.round(1000 * np.exp(-0.5 * ((np.arange(21) - 10) / 2.5) ** 2)).astype(np.int64)
    w = ans.weights_from_counts(counts)
    symbols = rng.choice(21, 16384, p=counts / counts.sum())
    _, seen = np.unique(symbols, return_counts=True)
    p = seen / seen.sum()
    empirical_bits = -(seen * np.log2(p)).sum()
    coded_bits = 32 * ans.encode_lane(symbols, ans.Table(w)).size
    assert empirical_bits < coded_bits < 1.02 * empirical_bits


def test_corrupt_lanes_are_reported():
    rng = np.random.default_rng(4)
    w = random_table(rng, 12)
    symbols = rng.choice(12, 400, p=w / w.sum())
    good = ans.encode_lane(symbols, ans.Table(w))
    detected = 0
    for trial in range(200):
        bad = good.copy()
        if trial % 2:
            bad = bad[: rng.integers(0, bad.size)]
        else:
            bad[rng.integers(bad.size)] ^= np.uint32(1 << int(rng.integers(32)))
        for decode in (lambda b: ans.decode_lane(b, ans.Table(w), 400),
                       lambda b: ans.decode_lanes_reference([b], [w], np.zeros(1, int), 400)[0]):
            try:
                decode(bad)
            except CodecError:
                detected += 1
    assert detected >= 0.95 * 400  # the rest end cleanly by chance; the container's CRC catches them
    with pytest.raises(CodecError):
        ans.decode_lane(good, ans.Table(w), 0)
    with pytest.raises(CodecError):
        ans.Table(np.array([ans.TOTAL, 0]))


def test_count_codes_keep_five_significant_bits():
    counts = np.arange(0, ans.MAX_CODED_COUNT + 1)
    codes = ans.counts_to_codes(counts)
    back = ans.codes_to_counts(codes)
    assert codes.dtype == np.uint8 and np.array_equal(back[:32], counts[:32])
    assert np.all(np.abs(back[32:] - counts[32:]) <= counts[32:] / 32)
    big = ans.counts_to_codes(np.array([10**9, 10**6, 0]))  # scaled down together, zero stays zero
    assert ans.codes_to_counts(big)[2] == 0 and 900 < ans.codes_to_counts(big)[0] / ans.codes_to_counts(big)[1] < 1100


@pytest.mark.parametrize("top", [5, 1 << 19, 1 << 24])
def test_many_tables_get_the_weights_of_one_table_each(top):
    """Zero counts, ties and counts on both sides of 2**20 (where the vectorized sort changes)."""
    rng = np.random.default_rng(top)
    sizes = rng.integers(2, 300, size=40)
    counts = rng.integers(0, top, size=int(sizes.sum()))
    counts[rng.random(counts.size) < 0.3] = 0
    counts[:sizes[0]] = 0  # a table with no counts at all
    many = ans.weights_from_counts_many(counts, sizes)
    flat = ans.weights_from_counts_many(counts, sizes, split=False)
    singles = [ans.weights_from_counts(c) for c in np.split(counts, np.cumsum(sizes)[:-1])]
    assert all(np.array_equal(m, s) for m, s in zip(many, singles))
    assert np.array_equal(flat, np.concatenate(singles))


def test_only_canonical_lanes_are_accepted():
    """A lane's last word is nonzero (spec 9): a zero word appended, or `[0]` for no symbols, is
    refused by the CPU coder, the reference decoder and the spec-only decoder alike."""
    from reference_decoder import Reject
    from reference_decoder import decode_lane as spec_decode_lane

    rng = np.random.default_rng(7)
    w = random_table(rng, 9)
    symbols = rng.choice(9, 50, p=w / w.sum())
    good = ans.encode_lane(symbols, ans.Table(w))
    assert good.size and good[-1] != 0
    spec_table = (0, [int(v) for v in w], [0, *np.cumsum(w)[:-1].tolist()])
    assert spec_decode_lane(good.tolist(), spec_table, 50) == symbols.tolist()
    for words, count in ((np.append(good, np.uint32(0)), 50), (np.zeros(1, np.uint32), 0)):
        with pytest.raises(CodecError, match="canonical"):
            ans.decode_lane(words, ans.Table(w), count)
        with pytest.raises(CodecError, match="canonical"):
            ans.decode_lanes_reference([words], [w], np.zeros(1, int), count)
        with pytest.raises(Reject, match="canonical"):
            spec_decode_lane(words.tolist(), spec_table, count)


def test_many_tables_at_once_match_one_table_at_a_time_on_ties_and_empty_tables():
    """The vectorized leftover rule (threshold per table) against the per-table rule, where ties
    decide who gets the leftover units and where tables have no counts at all."""
    rng = np.random.default_rng(11)
    sizes = rng.integers(2, 60, 400)
    for counts in (rng.integers(0, 3, int(sizes.sum())),  # nearly everything tied
                   rng.integers(0, 5000, int(sizes.sum())) * (rng.random(int(sizes.sum())) < 0.5),
                   np.zeros(int(sizes.sum()), dtype=np.int64)):
        many = ans.weights_from_counts_many(counts, sizes)
        singles = [ans.weights_from_counts(c) for c in np.split(counts, np.cumsum(sizes)[:-1])]
        assert all(np.array_equal(a, b) for a, b in zip(many, singles))
