"""kvcodec as SGLang's HiCache storage (`kvcodec.integrations.sglang`), tested against the real
SGLang 0.5.23 wheel's storage interface and backend factory in an environment of its own
(`tests/stacks.py`; SGLang itself needs CUDA to serve, so no engine runs here)."""

from __future__ import annotations

import pytest

from stacks import run_script, stack_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    python = stack_python("sglang")
    folder = tmp_path_factory.mktemp("hicache") / "pages"
    results, log = run_script(python, "sglang_backend.py", str(folder))
    return results[0], log


def test_the_factory_makes_a_hicache_backend_that_stores_and_finds_pages(result):
    got, _ = result
    assert got["is_hicache_storage"] and got["batch_set"]
    assert got["batch_exists"] == 3 and not got["exists_unknown"]  # the consecutive prefix found
    assert got["lossless_exact"]  # through a second backend on the same folder
    assert got["other_rank_exists"] == 0  # another tensor-parallel rank's heads are its own
    assert not got["other_stage_exists"]  # and a pipeline stage's layers
    assert got["stage_suffixes"] == ["@org-model@tp0of2@pp0of2", "@org-model@tp0of2@pp1of2"]
    assert got["stored_keys"] == ["p0@org-model@tp0of2", "p1@org-model@tp0of2", "p2@org-model@tp0of2"]


def test_pages_are_stored_as_layers_of_keys_and_values(result):
    got, _ = result
    assert got["page_first_layers_are_layers"] and got["page_first_exact"]
    assert 0 < got["lossy_max_error"] <= 0.01 * got["scale"]


def test_a_damaged_or_foreign_page_is_a_logged_miss(result):
    got, log = result
    assert got["after_damage"] == [True, False, False]
    assert got["exists_after_damage"] == 1  # refused entries are deleted: stored again, not counted as hits
    assert "does not decode" in log and "names another key" in log and "treated as a miss" in log
