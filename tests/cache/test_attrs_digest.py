"""Attributes are covered by a digest every reader checks: an edited dtype, view spec, sampling
temperature, feature parameter, class name or format version is refused in one line by
open_cache, train-student, evaluate, convert-cache and verify, never believed."""

from __future__ import annotations

import json

import h5py
import pytest

from pipeline.cache import layout, open_cache
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from stages import precompute_logits
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

DAMAGED = "is damaged: its attributes differ from the digest recorded when it was written"


def edit(path, change) -> None:
    """Apply `change(attrs)` to the stored attributes, as a hand edit would."""
    if path.suffix == ".zarr":
        meta = path / "zarr.json"
        doc = json.loads(meta.read_text())
        change(doc["attributes"])
        meta.write_text(json.dumps(doc))
        return
    with h5py.File(path, "r+") as f:
        attrs = {k: json.loads(v) for k, v in f.attrs.items()}
        change(attrs)
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v)


def _set(*keys, value):
    def change(attrs):
        node = attrs
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return change


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_ckpt) -> dict[str, object]:
    """Small test-split caches of each kind the edits below touch."""
    root, t = tmp_path_factory.mktemp("edits"), [str(teacher_ckpt)]
    kinds = {
        "plain.zarr": PrecomputeConfig(),
        "plain.h5": PrecomputeConfig(),
        "views.zarr": PrecomputeConfig(views=2, augment="shift:max=1"),
        "sampled.zarr": PrecomputeConfig(sample_k=4, sample_values=True),
        "features.zarr": PrecomputeConfig(features=["att=0:attention"]),
    }
    return {
        name: precompute_logits.run(cfg, t, "digits:test", root / name)
        for name, cfg in kinds.items()
    }


EDITS = [
    ("plain.zarr", "logits_dtype", _set("logits_dtype", value="float16")),
    ("plain.h5", "logits_dtype", _set("logits_dtype", value="float16")),
    ("plain.zarr", "class_names", _set("class_names", 3, value="seven")),
    ("plain.zarr", "num_classes", _set("num_classes", value=11)),
    ("plain.zarr", "teacher sha256", _set("teacher", "sha256", value="0" * 64)),
    ("plain.h5", "data fingerprint", _set("data", "fingerprint", value="0" * 64)),
    ("views.zarr", "views.augment", _set("views", "augment", value="shift:max=2")),
    ("views.zarr", "views.seed", _set("views", "seed", value=1)),
    ("sampled.zarr", "proposal T", _set("sample", "proposal_temperature", value=2.0)),
    ("features.zarr", "feature p", _set("features", "att", "params", "p", value=4.0)),
    ("plain.zarr", "a shard digest", _set("shard_digests", "algorithm", value="md5")),
    ("plain.zarr", "the digest itself", _set("attrs_digest", "value", value="0" * 64)),
]


@pytest.mark.parametrize("name, what, change", EDITS, ids=[f"{n}:{w}" for n, w, _ in EDITS])
def test_an_edited_attribute_is_refused_by_every_reader(
    tmp_path, runner, caches, name, what, change
):
    import shutil

    src = caches[name]
    path = tmp_path / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, path)
    edit(path, change)
    with pytest.raises(PipelineError, match=DAMAGED):
        open_cache(path)
    data = ["--data", "digits:test"]
    student = ["--out", tmp_path / "s", "--epochs", "1", "--temperature", "2"]
    result = invoke(runner, "train-student", "--cache", path, *data, *student)
    assert_clean_error(result, DAMAGED)
    result = invoke(runner, "convert-cache", path, tmp_path / "copy.zarr")
    assert_clean_error(result, DAMAGED)
    assert not (tmp_path / "copy.zarr").exists()
    result = invoke(runner, "inspect", path)
    assert_clean_error(result, DAMAGED)
    result = invoke(runner, "verify", path)
    assert_clean_error(result, "its attributes differ from the digest recorded")


@pytest.mark.parametrize("name", ["plain.zarr", "plain.h5"])
def test_a_version_edited_to_1_does_not_switch_the_checks_off(tmp_path, runner, caches, name):
    import shutil

    src = caches[name]
    path = tmp_path / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, path)
    edit(path, _set("format_version", value=1))
    with pytest.raises(PipelineError, match="format_version says 1 .* the version was edited"):
        open_cache(path)
    assert_clean_error(invoke(runner, "inspect", path), "the version was edited")


def test_every_finished_cache_and_copy_carries_a_matching_digest(tmp_path, runner, caches):
    for path in (caches["plain.zarr"], caches["plain.h5"]):
        copy = tmp_path / f"c-{path.name}.zarr"
        assert invoke(runner, "convert-cache", path, copy).exit_code == 0
        for cache_path in (path, copy):
            with open_cache(cache_path) as cache:
                recorded = cache.attrs[layout.ATTRS_DIGEST]
                assert recorded == layout.attrs_digest(cache.attrs)
                assert recorded["algorithm"] == "sha256" and len(recorded["value"]) == 64


@pytest.mark.parametrize("text", ["[1, 2]", "{bad", '{"zarr_format": 3, "node_type": "group"'])
def test_a_root_metadata_file_that_cannot_be_read_is_damage_not_a_crash(
    tmp_path, runner, caches, text
):
    import shutil

    path = tmp_path / "c.zarr"
    shutil.copytree(caches["plain.zarr"], path)
    (path / "zarr.json").write_text(text)
    for args in (["inspect", path], ["verify", path]):
        assert_clean_error(invoke(runner, *args), f"cache {path} is damaged")
