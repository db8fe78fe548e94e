"""One student, one teacher: a reader is pinned to the cache it opened, a resumed run refuses
another cache, and stage two refuses data whose classes are not the cache's."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.core.config import PrecomputeConfig, TrainTeacherConfig
from pipeline.core.errors import PipelineError
from pipeline.core.training import Trainee
from pipeline.data import load_transfer_set
from pipeline.student.students import TrainStudentConfig
from pipeline.student.targets import open_targets
from stages import precompute_logits, train_student, train_teacher

CFG = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [16]}, epochs=3)


@pytest.fixture(scope="module")
def other_cache(tmp_path_factory):
    """digits:train cached by another teacher: the same data, other targets."""
    root = tmp_path_factory.mktemp("other")
    cfg = TrainTeacherConfig(model="mlp", model_kwargs={"hidden": [8]}, epochs=1, seed=3)
    teacher = train_teacher.run(cfg, "digits:train", root / "t.pt")
    return precompute_logits.run(
        PrecomputeConfig(), [str(teacher)], "digits:train", root / "o.zarr"
    )


def test_a_resumed_run_refuses_another_cache_of_the_same_data(
    tmp_path, train_cache, other_cache, monkeypatch
):
    cache = tmp_path / "train.zarr"
    shutil.copytree(train_cache, cache)
    save = Trainee.save

    def crash_after_epoch_one(self):
        save(self)
        if self.epochs_done == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainee, "save", crash_after_epoch_one)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        train_student.run(CFG, cache, "digits:train", out)
    monkeypatch.setattr(Trainee, "save", save)
    assert (tmp_path / "s.resume.pt").is_file()

    shutil.rmtree(cache)
    shutil.copytree(other_cache, cache)  # the cache at that path replaced: other teacher
    with pytest.raises(PipelineError, match="saved by a run on another teacher cache"):
        train_student.run(CFG, cache, "digits:train", out, resume=True)
    assert not out.exists()

    shutil.rmtree(cache)
    shutil.copytree(train_cache, cache)  # the very cache again: it resumes
    train_student.run(CFG, cache, "digits:train", out, resume=True)
    assert (out / "student.pt").is_file()


def test_a_streaming_reader_stops_when_the_cache_is_replaced(tmp_path, train_cache, other_cache):
    cache = tmp_path / "train.zarr"
    shutil.copytree(train_cache, cache)
    ts = load_transfer_set("digits:train")
    targets, _ = open_targets(cache, ts, mode="stream", budget="400KiB")
    first = [batch.logits.clone() for _, batch in targets.epoch(0, 64, 0)]
    assert sum(len(b) for b in first) == len(ts)

    shutil.rmtree(cache)
    shutil.copytree(other_cache, cache)
    with pytest.raises(PipelineError, match="is not the cache this run started training from"):
        next(iter(targets.epoch(1, 64, 0)))


def test_a_cache_replaced_while_open_is_refused_at_the_next_read(
    tmp_path, train_cache, other_cache
):
    cache = tmp_path / "train.zarr"
    shutil.copytree(train_cache, cache)
    with open_cache(cache) as reader:
        reader.logits(slice(0, 10))
        shutil.move(cache, tmp_path / "old.zarr")
        shutil.copytree(other_cache, cache)
        # The next shard read is not the one sealed at this place, or the cache moved under it.
        with pytest.raises(PipelineError, match="not what was written at this place|changed while"):
            reader.logits(slice(10, 20))


def test_stage_two_refuses_data_whose_classes_are_not_the_caches(tmp_path, train_cache):
    ts = load_transfer_set("digits:train")
    renamed = dataclasses.replace(ts, class_names=[f"c{i}" for i in range(10)])
    with open_cache(train_cache) as cache:
        names = cache.attrs["class_names"]
    with pytest.raises(PipelineError, match=rf"class 0: 'c0' here, {names[0]!r} there"):
        open_targets(train_cache, renamed)
    wider = dataclasses.replace(ts, labels=np.where(ts.labels == 9, 10, ts.labels))
    with pytest.raises(PipelineError, match="label 10 is outside the 10 classes of cache"):
        open_targets(train_cache, wider)
