"""Stage: train a teacher on a labelled split and save a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.core.config import TrainTeacherConfig, as_dict
from pipeline.core.device import resolve_device, seed_everything, use_threads
from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import check_not_input, check_writable, data_path
from pipeline.core.lm import check_takes_tokens, fit_lm
from pipeline.core.runrecord import write_record
from pipeline.core.training import TrainData, fit
from pipeline.data import load_transfer_set
from pipeline.data.sequences import is_sequence_spec, load_sequences
from pipeline.models import count_parameters, create_model, model_origin
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.hf import registry_form


def run(cfg: TrainTeacherConfig, data: str, out: Path, overwrite: bool = False) -> Path:
    """Fit `cfg.model` on the labelled rows of `data`; write the checkpoint to `out`."""
    out = Path(out)
    check_not_input(out, {"--data": data_path(data)})
    check_writable(out, overwrite)
    device = resolve_device(cfg.device)
    if is_sequence_spec(data):
        return _run_lm(cfg, data, out, overwrite, device)
    ts = load_transfer_set(data)
    known = ts.labels >= 0
    if not known.any():
        raise PipelineError(f"--data {data}: a teacher needs labels, and this data has none")
    num_classes = len(ts.class_names) if ts.class_names else int(ts.labels.max()) + 1

    seed_everything(cfg.seed)
    what = cfg.source("model")
    model = create_model(cfg.model, num_classes, ts.input_shape, what=what, **cfg.model_kwargs)
    rows = TrainData(torch.from_numpy(ts.inputs[known]), torch.from_numpy(ts.labels[known]))
    threads = use_threads(model, rows.inputs[:1], cfg.threads)
    # Every row is labelled, so plain cross-entropy (the teacher needs no distillation loss).
    ce = lambda s, t, y: F.cross_entropy(s, y)  # noqa: E731
    start = time.perf_counter()
    log = fit(model, rows, ce, cfg, seed=cfg.seed, device=device, desc="train-teacher")
    seconds = time.perf_counter() - start
    meta = {
        "role": "teacher",
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "code": {"model": model_origin(cfg.model)},
        "num_classes": num_classes,
        "class_names": ts.class_names,
        "input_shape": list(ts.input_shape),
        "num_params": count_parameters(model),
        "config": as_dict(cfg),
        "data": {"spec": data, "fingerprint": ts.fingerprint()},
        "log": log,
    }
    path = save_checkpoint(out, model.cpu(), meta, overwrite=overwrite)
    # Wall time and threads are facts of the run and the machine: in the run record.
    facts = {"command": "train-teacher", "seconds": round(seconds, 3), "threads": threads}
    write_record(path, facts, identity=path)
    return path


def _run_lm(cfg: TrainTeacherConfig, data: str, out: Path, overwrite: bool, device) -> Path:
    """A causal language model on the sequences `data` (next-token cross-entropy)."""
    seqs = load_sequences(data)
    seed_everything(cfg.seed)
    shape = (seqs.context,)
    name, kwargs = registry_form(cfg.model, cfg.model_kwargs, seqs.vocab, seqs.context,
                                 cfg.source("model"))  # fmt: skip
    model = create_model(name, seqs.vocab, shape, cfg.source("model"), **kwargs)
    given = "model" in cfg._sources
    what = f"{cfg.source('model')} {cfg.model}" if given else f"--model {cfg.model} (the default)"
    check_takes_tokens(model, seqs, seqs.vocab, what)
    threads = use_threads(model, torch.from_numpy(seqs.tokens[:1]).long(), cfg.threads)
    start = time.perf_counter()
    log = fit_lm(model, seqs, cfg, seed=cfg.seed, device=device, desc="train-teacher")
    meta = {
        "role": "teacher", "model": name, "model_kwargs": kwargs,
        "code": {"model": model_origin(cfg.model)}, "num_classes": seqs.vocab,
        "input_shape": list(shape), "num_params": count_parameters(model),
        "config": as_dict(cfg), "data": {"spec": data, "fingerprint": seqs.fingerprint()},
        "log": log,
    }  # fmt: skip
    path = save_checkpoint(out, model.cpu(), meta, overwrite=overwrite)
    facts = {"command": "train-teacher", "seconds": round(time.perf_counter() - start, 3)}
    write_record(path, {**facts, "threads": threads}, identity=path)
    return path
