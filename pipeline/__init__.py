"""kd-pipeline: run the teacher once, distil many students from its cached logits.

The Python API, for your own training loop (the same objects the `pipeline` commands use)::

    import pipeline as kd

    kd.precompute_logits("models/teacher.pt", "digits:train", "caches/train.zarr")
    data = kd.TeacherTargets(kd.load_transfer_set("digits:train"), "caches/train.zarr")
    loss_fn = kd.distillation_loss("kd", temperature=4.0, alpha=0.9)
    for batch in torch.utils.data.DataLoader(data, batch_size=64, shuffle=True):
        loss = loss_fn(student(batch["inputs"]), batch["teacher"], batch["labels"])

    with kd.open_cache("caches/train.zarr") as cache:
        logits = cache.targets([0, 5, 7])  # (3, C) raw teacher logits, by sample id

docs/api.md has the whole story. Only the names in `__all__` are the API: every other module
and name may change between versions. Names are imported on first use, so `import pipeline`
(and `pipeline --help`) loads neither torch nor zarr.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name: the module that defines it.
_HOMES = {
    "open_cache": "pipeline.cache.reader",
    "TeacherCache": "pipeline.cache.reader",
    "TeacherTargets": "pipeline.student.dataset",
    "distillation_loss": "pipeline.student.losses",
    "list_losses": "pipeline.student.losses",
    "kd_loss": "pipeline.student.losses",
    "soft_loss": "pipeline.student.losses",
    "mse_loss": "pipeline.student.losses",
    "dkd_loss": "pipeline.student.losses",
    "dist_loss": "pipeline.student.losses",
    "ce_loss": "pipeline.student.losses",
    "precompute_logits": "pipeline.teacher.precompute",
    "load_transfer_set": "pipeline.data",
    "TransferSet": "pipeline.data",
    "create_model": "pipeline.models",
    "list_models": "pipeline.models",
    "PipelineError": "pipeline.core.errors",
}

__all__ = ["__version__", *_HOMES]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
