"""show-targets and the report's dark-knowledge figure: the right samples, drawn from the
cache at the asked temperatures."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.figures import ambiguous_ids, read_targets, softmax_at
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

PNG = b"\x89PNG\r\n\x1a\n"


def test_softmax_at_temperature_by_hand():
    z = np.array([[2.0, 0.0, -2.0]])
    e = np.exp(z[0] / 4)
    assert softmax_at(z, 4.0)[0] == pytest.approx(e / e.sum(), rel=1e-12)


def test_ambiguous_ids_are_the_smallest_top_two_gaps():
    logits = np.array([[5.0, 0.0], [0.1, 0.0], [1.0, 0.0], [0.0, 0.1]])
    ids = np.array([10, 11, 12, 13])
    # Gaps: 11 and 13 tie (|0.1|), then 12, then 10; ties broken by id.
    assert ambiguous_ids(logits, ids, 3) == [11, 13, 12]


def test_read_targets_joins_by_id_in_the_asked_order(train_cache):
    with open_cache(train_cache) as cache:
        ids, logits = cache.sample_ids, cache.logits()[:, 0]
    chosen = [int(ids[7]), int(ids[2])]
    got = read_targets(train_cache, chosen)
    assert got["ids"] == chosen
    np.testing.assert_array_equal(got["logits"], logits[[7, 2]])


def test_show_targets_writes_a_png_and_refuses_bad_input(tmp_path, runner, test_cache):
    out = tmp_path / "fig.png"
    result = invoke(runner, "show-targets", test_cache, "--out", out, "--count", "2")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG
    with open_cache(test_cache) as cache:
        expected = ambiguous_ids(cache.logits()[:, 0], cache.sample_ids, 2)
    assert f"sample ids {expected[0]}, {expected[1]}" in result.output

    cases = [
        (["--out", out], "already exists"),
        (["--out", tmp_path / "b.png", "--id", "999999"], "sample ids not in the cache: [999999]"),
        (["--out", tmp_path / "b.png", "--temperatures", "1,0"], "--temperatures [1.0, 0.0]"),
        (["--out", tmp_path / "b.png", "--temperatures", "hot"], "--temperatures"),
        (["--out", tmp_path / "b.png", "--count", "0"], "--count must be >= 1"),
    ]
    for args, fragment in cases:
        assert_clean_error(invoke(runner, "show-targets", test_cache, *args), fragment)
    assert not (tmp_path / "b.png").exists()
