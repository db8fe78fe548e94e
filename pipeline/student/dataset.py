"""A teacher cache joined to any map-style dataset by sample id, for your own training loop.

`TeacherTargets(dataset, cache, ids)` wraps a dataset whose item i is (input, label) or an
input alone; `ids[i]` is that item's sample id, the key the cache was written with (a
`TransferSet` from `pipeline.load_transfer_set` carries its own). Item i is a dict that torch's
default collate batches::

    {"inputs": (*input) float32, "labels": int (-1: unknown), "ids": int,
     "teacher": (C,) float32, ["features": {name: (...) float32}]}

`teacher` is the teacher's raw logits at T = 1 (a top-k cache's rebuilt, exact on the kept
classes); from a sampled cache it is the target distribution at `temperature` itself, which
only losses bound with `target="distribution"` take (`TeacherTargets.form` says which).

Views: a cache of V augmented views serves, at epoch e (`set_epoch`), view (e + offset) mod V
of each sample, offset seeded by (seed, sample id) as `pipeline train-student` does, with the
input regenerated from the view's seed: the very input the teacher saw, given the same
un-augmented input.

The targets of the wrapped samples are read once, shard by shard, and held in memory:
N × V × C × 4 bytes (and the feature targets asked for). A cache larger than memory trains
through `pipeline train-student`, which streams it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import PipelineError
from pipeline.student.targets import MemoryTargets, ViewPlan, open_targets, plan_views


class _Ids:
    """The smallest transfer set `open_targets` joins by id: sample ids and a length."""

    def __init__(self, sample_ids: np.ndarray, spec: str):
        self.sample_ids, self.spec = sample_ids, spec

    def __len__(self) -> int:
        return len(self.sample_ids)


class TeacherTargets(torch.utils.data.Dataset):
    """`dataset` with the teacher's targets of each item from the cache at `cache`.

    ids: one sample id per item of `dataset`; None takes `dataset.sample_ids` (a
        `TransferSet`'s), whose data fingerprint is then checked against the cache's, so a
        cache of other data is refused. Other datasets are joined by id alone: every id must
        be in the cache, and the inputs must be the ones the teacher saw.
    views: views to train on, the first N of the cache's (0: all); 1 without augmentation.
    seed: seeds which view of each sample an epoch serves.
    temperature: required for a sampled cache (its target is a distribution at T).
    features: names of feature targets to serve too (`pipeline inspect CACHE` lists them).
    """

    def __init__(
        self,
        dataset: Any,
        cache: str | Path,
        ids: Sequence[int] | np.ndarray | None = None,
        *,
        views: int = 1,
        seed: int = 0,
        temperature: float | None = None,
        features: Sequence[str] = (),
    ):
        self.dataset = dataset
        self.ids = _sample_ids(dataset, ids)
        checked = ids is None  # a TransferSet: its fingerprint is checked
        data = dataset if checked else _Ids(self.ids, f"the {len(self.ids)} ids given")
        self._targets, attrs = open_targets(
            cache, data, cross_modal=not checked, mode="memory", features=tuple(features)
        )
        assert isinstance(self._targets, MemoryTargets)
        from pipeline.data.views import Views

        self._spec = Views.from_attrs(attrs).spec or None  # None: the raw inputs
        self.plan = _plan(self._targets.num_views, views, self.ids, seed)
        self.temperature = _check_temperature(self._targets.sample, temperature)
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return self._targets.num_classes

    @property
    def form(self) -> str:
        """What `teacher` holds: "logits", or a "distribution" at `temperature` (sampled)."""
        return self._targets.form

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch `epoch`'s views (as DistributedSampler.set_epoch); one view: no effect."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = _input_and_label(self.dataset[i])
        view = int(self.plan.of(np.array([i]), self.epoch)[0])
        if self._spec is not None:  # regenerate the augmented view the teacher saw
            from pipeline.data.views import apply_views

            seeds = self._targets.seeds[i : i + 1, view]  # (1,)
            x = apply_views(np.asarray(x)[None], seeds, self._spec)[0]
        item = {
            "inputs": torch.as_tensor(np.asarray(x, dtype=np.float32)),
            "labels": y,
            "ids": int(self.ids[i]),
            "teacher": self._teacher(i, view),
        }
        if self._targets.features:
            item["features"] = {k: v[i, view] for k, v in self._targets.features.items()}
        return item

    def _teacher(self, i: int, view: int) -> torch.Tensor:
        target = self._targets.logits[i, view]  # (C,), or (P, C) sampled
        if self.form == "logits":
            return target
        from pipeline.cache.sparse import planes_distribution

        tp = float(self._targets.sample.get("proposal_temperature", 1.0))
        return planes_distribution(target[None], self.temperature, proposal_temperature=tp)[0]


def _sample_ids(dataset: Any, ids: Sequence[int] | np.ndarray | None) -> np.ndarray:
    if ids is None:
        if not hasattr(dataset, "sample_ids"):
            raise PipelineError(
                "TeacherTargets: pass ids=, the sample id of each item (the key the cache was "
                "written with); only a TransferSet carries its own"
            )
        ids = dataset.sample_ids
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise PipelineError(f"TeacherTargets: ids must be one integer per item, got {ids.dtype}")
    if len(ids) != len(dataset):
        raise PipelineError(f"TeacherTargets: {len(ids)} ids for {len(dataset)} items")
    return ids.astype(np.int64)


def _plan(held: int, views: int, ids: np.ndarray, seed: int) -> ViewPlan:
    count = held if views == 0 else views
    if not 1 <= count <= held:
        raise PipelineError(f"TeacherTargets: views={views}; the cache holds {held} (0: all)")
    return plan_views(count, ids, seed)


def _check_temperature(sample: dict[str, Any] | None, temperature: float | None) -> float | None:
    if sample is not None and temperature is None:
        raise PipelineError(
            "TeacherTargets: a sampled cache's target is a distribution at a temperature: "
            "pass temperature="
        )
    if temperature is not None and not temperature > 0:
        raise PipelineError(f"TeacherTargets: temperature must be > 0, got {temperature}")
    return temperature


def _input_and_label(item: Any) -> tuple[Any, int]:
    """(input, label) of a dataset item: a pair, or an input alone (label -1)."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        x, y = item
        return x, int(y)
    return item, -1
