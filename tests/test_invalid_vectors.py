"""Must-reject vectors (format_spec/vectors/invalid/): every decoder refuses every file. The
library raises a KVCError, the spec-only reference decoder a Reject naming the rule the file's
name starts with, and the GPU kernels (here under Triton's interpreter) a KVCError too."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import kvcodec

from reference_decoder import Reject, read_kvc

INVALID = Path(__file__).parent.parent / "format_spec" / "vectors" / "invalid"
NAMES = sorted(p.stem for p in INVALID.glob("*.kvc"))


def test_there_are_vectors_for_every_check_of_section_4_and_the_codecs():
    rules = {name.split("-")[0] for name in NAMES}
    assert {"4.1", "4.2", "4.3", "4.4", "4.6", "4.7", "3.2", "4", "8", "8.1", "8.2", "8.4", "9"} <= rules
    assert len(NAMES) >= 25


@pytest.mark.parametrize("name", NAMES)
def test_the_library_refuses(name):
    data = (INVALID / f"{name}.kvc").read_bytes()
    with pytest.raises(kvcodec.KVCError):
        kvcodec.decode(data, decoder="cpu")


@pytest.mark.parametrize("name", NAMES)
def test_the_reference_decoder_refuses_for_the_rule_in_the_name(name):
    data = (INVALID / f"{name}.kvc").read_bytes()
    with pytest.raises(Reject) as refused:
        read_kvc(data)
    rule = name.split("-")[0]
    assert refused.value.rule == rule or refused.value.rule.startswith(rule + "."), str(refused.value)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
@pytest.mark.parametrize("name", NAMES)
def test_the_kernels_refuse(name):
    import torch

    data = (INVALID / f"{name}.kvc").read_bytes()
    with pytest.raises(kvcodec.KVCError):
        kvcodec.decode(data, device="cuda" if torch.cuda.is_available() else "cpu", decoder="kernels")
