"""`kvc pack` interrupted at random points (SIGINT or SIGKILL) never leaves a partial file under
the output's name, and a reader shown a file still being written says so."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import kvcodec
from kvcodec.container import format as fmt
from kvcodec.container.writer import KVCWriter, header_for
from kvcodec.errors import FormatError

from conftest import synthetic_cache


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "cache.pt"
    cache = synthetic_cache(layers=24, heads=4, tokens=2048, head_dim=64)  # 50 MB: packing takes a while
    torch.save([(lay.key, lay.value) for lay in cache.layers], path)
    return path


def pack_command(src, out):
    return [sys.executable, "-m", "kvcodec.tools", "pack", str(src), "-o", str(out), "-c", "zstd", "-q"]


def test_pack_takes_long_enough_to_interrupt(big_input, tmp_path):
    start = time.perf_counter()
    subprocess.run(pack_command(big_input, tmp_path / "full.kvc"), check=True)
    assert time.perf_counter() - start > 1.0  # the interrupts below land during the work
    assert kvcodec.unpack(tmp_path / "full.kvc").num_layers == 24


def wait_for_work(proc, folder, limit=30.0) -> None:
    """Until the command has opened its temporary output (its work has begun) or ended."""
    start = time.perf_counter()
    while proc.poll() is None and not list(folder.glob(".out*.tmp")) and time.perf_counter() - start < limit:
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_pack_leaves_no_partial_output(big_input, tmp_path, sig):
    rng = random.Random(int(sig))
    for trial in range(5):
        out = tmp_path / f"out{trial}.kvc"
        proc = subprocess.Popen(pack_command(big_input, out), stderr=subprocess.PIPE, text=True)
        wait_for_work(proc, tmp_path)
        time.sleep(rng.uniform(0.0, 1.0))  # somewhere while the file is written (or just after)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        if out.exists():  # the signal came after the rename (even as the process exited): the file is whole
            kvcodec.unpack(out)
        else:
            assert proc.returncode != 0
        if sig == signal.SIGINT:  # the interrupted process cleans up after itself, in one line
            assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
            if proc.returncode > 0:
                assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        for leftover in tmp_path.glob(".out*.tmp"):  # SIGKILL leaves a temporary, never the output:
            try:  # the reader says it is unfinished (or it was killed between the last byte and the rename)
                kvcodec.unpack(leftover)
            except FormatError as exc:
                assert "still being written" in str(exc) or "too short" in str(exc), exc
            leftover.unlink()


def test_a_file_being_written_is_reported_clearly(tmp_path):
    cache = synthetic_cache()
    path = tmp_path / "growing.kvc"
    with open(path, "wb") as f:
        header = header_for(cache, [kvcodec.get_codec("raw")], 16)
        writer = KVCWriter(f, header)
        writer.add_record(0, 0, 0, tuple(cache.layers[0].key.shape), "float16", 0, b"\0" * 64)
        f.flush()
        with pytest.raises(FormatError, match="no end marker: it is truncated or still being written"):
            kvcodec.open(path)
        from click.testing import CliRunner

        from kvcodec.tools.cli import cli

        result = CliRunner().invoke(cli, ["inspect", str(path)])
        assert result.exit_code == 1 and "still being written" in result.output
    assert fmt.TRAILER.size == 32
