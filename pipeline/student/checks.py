"""What stage two refuses of a cache before it reads a target: an incomplete cache, one of
other data or other classes, a loss its sparse targets cannot train, a combine method it has
no members for; and what a student records of the targets it trained from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import TeacherCache, open_cache
from pipeline.cache.ensemble import COMBINE_METHODS
from pipeline.cache.sparse import (
    check_sparse_loss,
)
from pipeline.cache.tokens import is_token_cache
from pipeline.core.errors import PipelineError
from pipeline.data import TransferSet

DEFAULT_BUDGET = "2GiB"
# Peak bytes while reading a shard, in multiples of its stored size (benchmarks/bench_students.py
# measures the streaming peak against the budget).
READ_COPIES = {"zarr": 4, "hdf5": 1}


def sparse_kind(attrs: dict[str, Any]) -> str | None:
    """The kind of sparse targets ("topk", "sampled") of a cache with attributes `attrs`;
    None for full logits."""
    kind = attrs.get("targets")
    return None if kind in (None, "logits") else str(kind)


def sample_record(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The `sample` attribute of a sampled cache (k, values, proposal_temperature, seed...);
    None for any other cache."""
    return (attrs.get("sample") or {}) if sparse_kind(attrs) == "sampled" else None


def targets_record(attrs: dict[str, Any]) -> dict[str, Any]:
    """What a student records about the targets it trained from: their kind ("logits",
    "topk", "sampled") and, for sparse ones, K (and for sampled: the draws' seed, proposal
    temperature, and whether the drawn classes' logits were stored)."""
    kind = sparse_kind(attrs) or "logits"
    if kind == "topk":
        return {"kind": kind, "k": int((attrs.get("topk") or {}).get("k", 0))}
    if kind == "sampled":
        record = sample_record(attrs)
        return {
            "kind": kind,
            "k": int(record.get("k", 0)),
            "values": bool(record.get("values")),
            "proposal_temperature": float(record.get("proposal_temperature", 1.0)),
            "seed": record.get("seed"),
        }
    return {"kind": kind}


def check_targets_for_loss(
    attrs: dict[str, Any],
    loss: str,
    temperature: float | None = None,
    option: str = "--temperature",
) -> None:
    """Refuse, in one line naming `loss` and the reason, a loss that cannot train from the
    sparse targets of the cache with attributes `attrs` (`pipeline.cache.sparse.sparse_support`);
    and a `temperature` (set by `option`) that sampled targets drawn without their logits
    cannot give. Every loss trains from full logits. Call before reading the targets."""
    if (kind := sparse_kind(attrs)) is None:
        return
    check_sparse_loss(loss, kind)
    record = sample_record(attrs)
    if record is None or temperature is None or record.get("values"):
        return
    tp = float(record.get("proposal_temperature", 1.0))
    if temperature != tp:
        raise PipelineError(
            f"loss {loss} at T = {temperature:g} ({option}): the cache's sampled targets were "
            f"drawn at T = {tp:g} and keep counts only, which give no other T; train at "
            f"{option} {tp:g}, or re-run precompute-logits with --sample-values"
        )


def stored_combine(cache: TeacherCache) -> str:
    """How precompute combined the teacher's members into the stored `logits`."""
    return (cache.attrs.get("teacher") or {}).get("combine") or "mean-logits"


def check_combine(method: str, cache: TeacherCache) -> bool:
    """Whether combining the teacher by `method` needs the per-member logits.

    mean-logits is what precompute stores as `logits`; mean-probs depends on the student's
    temperature, so it is computed per batch from the members.
    """
    if method not in COMBINE_METHODS:
        raise PipelineError(f"--combine {method!r}: expected one of {', '.join(COMBINE_METHODS)}")
    stored = stored_combine(cache)
    if method == "mean-logits" and stored == "mean-logits":
        return False
    if not cache.has_members:
        raise PipelineError(
            f"--combine {method} needs per-member logits, and {cache.path} has none (its "
            f"logits were combined by {stored}): precompute with --keep-members"
        )
    return True


def check_cache(path: str | Path, ts: TransferSet, cross_modal: bool = False) -> dict[str, Any]:
    """The checks of `open_targets` without reading targets; returns the cache attributes."""
    with open_cache(path) as cache:
        check_opened(cache, ts, cross_modal)
        cache.rows_for(ts.sample_ids)  # every id of the data must be in the cache
        return cache.attrs


def check_opened(
    cache: TeacherCache,
    ts: TransferSet,
    cross_modal: bool,
    then: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Refuse an incomplete cache, a token cache and one of other data; then run
    `then(attrs)`."""
    cache.require_complete()
    if is_token_cache(cache.attrs):  # its rows are tokens: no sample data matches them
        made = (cache.attrs.get("data") or {}).get("spec", "?")
        raise PipelineError(
            f"--cache {cache.path} is a token cache (its rows are the tokens of {made}) and "
            f"--data {ts.spec} is samples: give the sequences it was made from"
        )
    if not cross_modal:
        cache.require_fingerprint(cache.data_fingerprint(ts), ts.spec)
    _check_classes(cache, ts)
    if then is not None:
        then(cache.attrs)


def _check_classes(cache: TeacherCache, ts: TransferSet) -> None:
    """Refuse data whose classes are not the cache's: other class names, or labels beyond the
    cache's class count (a student would learn one label set against another's targets)."""
    mine, theirs = getattr(ts, "class_names", None), cache.attrs.get("class_names")
    spec = getattr(ts, "spec", "the data")
    if mine and theirs and list(mine) != list(theirs):
        differ = [i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b]
        where = f"; class {differ[0]}: {mine[differ[0]]!r} here, {theirs[differ[0]]!r} there"
        raise PipelineError(
            f"--data {spec}: its {len(mine)} classes are not the {len(theirs)} of cache "
            f"{cache.path}{where if differ else ''}: the cache was made for other labels"
        )
    labels = getattr(ts, "labels", None)
    if labels is not None and len(labels) and int(np.max(labels)) >= cache.num_classes:
        raise PipelineError(
            f"--data {spec}: label {int(np.max(labels))} is outside the {cache.num_classes} "
            f"classes of cache {cache.path}: the cache was made for other labels"
        )
