"""The README's Library snippet runs as written (on the real model, in a scratch folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import kvcodec

pytestmark = pytest.mark.model
README = Path(__file__).parent.parent / "README.md"


def test_the_library_snippet_runs(tmp_path, monkeypatch, real_model, capsys):
    text = README.read_text(encoding="utf-8")
    snippet = re.search(r"## Library\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    assert float(capsys.readouterr().out) > 3  # the ratio it prints: 4-bit quant
    assert {p.name for p in tmp_path.iterdir()} == {"ctx.kvc", "small.kvc", "pruned.kvc"}
    assert kvcodec.open(tmp_path / "small.kvc").info()["ratio"] > 4
