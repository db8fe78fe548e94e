"""show-targets and the report's dark-knowledge figure: the right samples, drawn from the
cache at the asked temperatures beside their inputs; and the plots' rules (no point hides
another)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.data import load_transfer_set
from pipeline.report import figures
from pipeline.report.figures import ambiguous_ids, read_inputs, read_targets, softmax_at
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
    # The inputs come from the data the cache names (digits:train), joined by sample id.
    data = load_transfer_set("digits:train")
    rows = [int(np.flatnonzero(data.sample_ids == i)[0]) for i in chosen]
    assert got["inputs_note"] is None
    np.testing.assert_array_equal(got["inputs"], data.inputs[rows])


def test_inputs_are_left_out_with_a_reason_rather_than_failing(tmp_path):
    data = load_transfer_set("digits:test")
    ids, labels = [int(data.sample_ids[3]), int(data.sample_ids[0])], data.labels[[3, 0]]
    inputs, note = read_inputs("digits:test", ids, labels)
    assert note is None and inputs.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(inputs, data.inputs[[3, 0]])
    cases = [
        (None, ids, labels, "does not name its data"),
        (f"npz:{tmp_path / 'gone.npz'}", ids, labels, "could not be loaded"),
        ("digits:test", [ids[0], 10**9], labels, "lacks some of these sample ids"),
        ("digits:test", ids, (labels + 1) % 10, "labels these samples otherwise"),
    ]
    for spec, ids_, labels_, fragment in cases:
        inputs, note = read_inputs(spec, ids_, labels_)
        assert inputs is None and fragment in note, (spec, note)
    # Feature vectors are no pictures: nothing to show, and nothing to explain.
    np.savez(tmp_path / "f.npz", x=np.zeros((3, 16), np.float32), y=np.arange(3))
    assert read_inputs(f"npz:{tmp_path / 'f.npz'}", [0], np.array([0])) == (None, None)
    assert figures.is_image_shape((1, 8, 8)) and figures.is_image_shape((3, 32, 32))
    assert figures.is_image_shape((28, 28)) and not figures.is_image_shape((64,))
    assert not figures.is_image_shape((16, 8, 8))  # 16 channels: features, not a picture


def test_the_figure_is_drawn_with_or_without_inputs(tmp_path, test_cache):
    targets = read_targets(test_cache, None, 2)
    assert targets["inputs"].shape == (2, 1, 8, 8)
    with_inputs = figures.plot_targets(targets, (1.0, 4.0), tmp_path / "a.png")
    targets |= {"inputs": None, "inputs_note": "data digits:x could not be loaded"}
    without = figures.plot_targets(targets, (1.0, 4.0), tmp_path / "b.png")
    for png in (with_inputs, without):
        assert png.read_bytes()[:8] == PNG


def test_points_are_spread_only_where_they_would_touch():
    xs, keys = [100.0, 100.0, 100.0, 100.0, 50.0], ["d", "c", "b", "a", "e"]
    # Without heights: every point sharing an x is spread, in the order of `keys`.
    spread = figures.spread_positions(xs, keys)
    assert sorted(range(4), key=lambda i: spread[i]) == [3, 2, 1, 0] and spread[4] == 50.0
    # With heights: 0.5 and 0.51 touch (closer than 0.05), 0.9 and 0.7 stay at their x.
    spread = figures.spread_positions(xs, keys, [0.5, 0.51, 0.9, 0.7, 0.5], close=0.05)
    assert spread[2] == 100.0 and spread[3] == 100.0
    assert spread[1] < 100.0 < spread[0]  # c before d
    assert spread[0] / spread[1] == pytest.approx(10**figures.SPREAD_DECADES)


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


def test_show_targets_writes_the_format_its_extension_names(tmp_path, runner, test_cache):
    """.pdf is a PDF and .svg an SVG; an extension that names no image format is refused
    before anything is read, not filled with PNG bytes."""
    from tests.test_cli_errors import assert_clean_error

    for name, magic in (("f.pdf", b"%PDF"), ("f.svg", b"<?xml"), ("f.png", b"\x89PNG")):
        out = tmp_path / name
        result = invoke(runner, "show-targets", test_cache, "--out", out, "--count", "1")
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).read_bytes().startswith(magic), name
    bad = tmp_path / "f.jpgx"
    result = invoke(runner, "show-targets", test_cache, "--out", bad)
    assert_clean_error(result, f"--out {bad}: expected one of .png, .pdf, .svg, .jpg, .jpeg")
    assert not bad.exists()
