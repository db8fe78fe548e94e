"""The bad inputs a tired user types, one case a row: every one fails with a non-zero exit and
one line naming the offending file, option or value, no traceback, and leaves every artifact
that existed before byte-identical (and writes nothing new)."""

from __future__ import annotations

import hashlib
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

FACTORIES = """
import sys
import torch

def exits():
    sys.exit(3)

def three_classes():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))

def not_a_module(num_classes=10):
    return 42

def per_row(student, teacher, labels):
    return (student - teacher).pow(2).mean(1)

def constant(student, teacher, labels):
    return torch.tensor(1.0)

def exiting_loss(student, teacher, labels):
    sys.exit(3)

def wide_input(num_classes, input_shape):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(100, num_classes))

class Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)), x

def pair(num_classes, input_shape):
    return Pair()
"""


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, train_cache) -> Path:
    """A tiny student trained for one epoch (evaluate and export cases read it)."""
    out = tmp_path_factory.mktemp("student") / "s"
    from click.testing import CliRunner

    result = invoke(
        CliRunner(), "train-student", "--cache", train_cache, "--data", "digits:train",
        "--out", out, "--epochs", "1", "--model-kwargs", '{"hidden": [8]}',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def world(tmp_path, monkeypatch, train_cache, test_cache, teacher_ckpt, student_dir) -> Path:
    """A working directory holding every artifact a command may read."""
    shutil.copytree(train_cache, tmp_path / "train.zarr")
    shutil.copy(test_cache, tmp_path / "test.h5")
    shutil.copy(teacher_ckpt, tmp_path / "teacher.pt")
    shutil.copytree(student_dir, tmp_path / "student")
    (tmp_path / "factories.py").write_text(textwrap.dedent(FACTORIES))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "existing.json").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    import sys

    sys.modules.pop("factories", None)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (directories as their listing)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts:
            continue
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = root / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(textwrap.dedent(text))

    return setup


def npz(name: str, x: np.ndarray, **arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda root: np.savez(root / name, x=x, **arrays)


def garbage_student(root: Path) -> None:
    (root / "bad_student").mkdir()
    (root / "bad_student/student.pt").write_bytes(b"not a checkpoint")


def payload_student(payload: dict) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / "odd_student").mkdir()
        torch.save(payload, root / "odd_student/student.pt")

    return setup


def no_zarr_json(root: Path) -> None:
    (root / "notacache.zarr").mkdir()


def edited_num_classes(root: Path) -> None:
    import json

    shutil.copytree(root / "train.zarr", root / "edited.zarr")
    meta = json.loads((root / "edited.zarr/zarr.json").read_text())
    meta["attributes"]["num_classes"] = 12
    (root / "edited.zarr/zarr.json").write_text(json.dumps(meta))


def broken_zarr_json(root: Path) -> None:
    shutil.copytree(root / "train.zarr", root / "broken.zarr")
    (root / "broken.zarr/zarr.json").write_text("{not json")


TT = ["train-teacher", "--data", "digits:train", "--out", "t.pt", "--epochs", "1"]
PC = ["precompute-logits", "--teacher", "teacher.pt", "--data", "digits:train", "--out", "c.zarr"]
TS = ["train-student", "--cache", "train.zarr", "--data", "digits:train", "--out", "out"]
EV = ["evaluate", "--student", "student", "--cache", "test.h5", "--data", "digits:test"]
EV_OUT = [*EV, "--out", "m.json", "--latency-runs", "0"]
COMPLEX = np.ones((4, 1, 8, 8), np.complex64)

# (id, arguments, setup or None, fragments the one error line must hold)
CASES = [
    # --- config: params files and values --------------------------------------------------
    ("params-missing", [*TT, "--params", "nope.yaml"], None, ["params file not found", "nope"]),
    (
        "params-binary",
        [*TT, "--params", "p.yaml"],
        write("p.yaml", b"\xff\xfe\x00bin"),
        ["p.yaml", "not a text file"],
    ),
    (
        "params-not-yaml",
        [*TT, "--params", "p.yaml"],
        write("p.yaml", "a: [1, 2\n"),
        ["p.yaml", "not valid YAML"],
    ),
    (
        "params-a-list",
        [*TT, "--params", "p.yaml"],
        write("p.yaml", "- 1\n"),
        ["mapping of sections"],
    ),
    (
        "params-misspelt-section",
        [*TS, "--params", "p.yaml"],
        write("p.yaml", "train_studnt: {epochs: 1}\n"),
        ["unknown section 'train_studnt'"],
    ),
    (
        "params-section-not-mapping",
        [*TT, "--params", "p.yaml"],
        write("p.yaml", "train_teacher: 3\n"),
        ["section 'train_teacher' must be a mapping"],
    ),
    (
        "params-unknown-key",
        [*TT, "--params", "p.yaml"],
        write("p.yaml", "train_teacher: {epoch: 3}\n"),
        ["train_teacher: unknown key 'epoch'"],
    ),
    (
        "params-wrong-type",
        [*TT, "--params", "p.yaml"],
        write("p.yaml", "train_teacher: {epochs: ten}\n"),
        ["train_teacher.epochs: expected int"],
    ),
    (
        "params-nan-lr",
        [*TS, "--params", "p.yaml"],
        write("p.yaml", "train_student: {lr: .nan}\n"),
        ["train_student.lr: expected a finite number"],
    ),
    (
        "params-inf-temperature",
        [*TS, "--params", "p.yaml"],
        write("p.yaml", "train_student: {temperature: .inf}\n"),
        ["train_student.temperature"],
    ),
    (
        "params-loss-setting-in-shared",
        [*TS, "--params", "p.yaml"],
        write("p.yaml", "train_student: {beta: 8}\n"),
        ["unknown key 'beta'", "losses.LOSS"],
    ),
    (
        "params-setting-of-another-loss",
        [*TS, "--params", "p.yaml"],
        write("p.yaml", "losses: {kd: {gamma: 1}}\n"),
        ["p.yaml:losses.kd.gamma", "no setting"],
    ),
    (
        "params-setting-out-of-range",
        [*TS, "--params", "p.yaml"],
        write("p.yaml", "losses: {kd: {alpha: 2}}\n"),
        ["p.yaml:losses.kd.alpha must be in [0, 1]"],
    ),
    (
        "params-setting-a-string",
        [*TS, "--params", "p.yaml"],
        write("p.yaml", "losses: {kd: {alpha: high}}\n"),
        ["losses.kd.alpha: expected a number"],
    ),
    (
        "params-unknown-loss-section",
        [*TS, "--params", "p.yaml"],
        write("p.yaml", "losses: {dkdd: {beta: 4}}\n"),
        ["unknown loss 'dkdd'"],
    ),
    (
        "params-bad-setting-of-unused-loss",
        [*TS, "--params", "p.yaml"],
        write("p.yaml", "losses: {dkd: {gamma: 4}}\n"),
        ["p.yaml:losses.dkd.gamma", "no setting"],
    ),
    (
        "params-loss-entry-not-mapping",
        [*TS, "--params", "p.yaml"],
        write("p.yaml", "losses: {dkd: 4}\n"),
        ["p.yaml:losses.dkd must be a mapping"],
    ),
    (
        "params-loss-inside-loss-entry",
        [*TS, "--params", "p.yaml"],
        write("p.yaml", "losses: {dkd: {loss: kd}}\n"),
        ["p.yaml:losses.dkd.loss", "no setting"],
    ),
    (
        "loss-arg-given-twice",
        [*TS, "--loss", "dkd", "--beta", "4", "--loss-arg", "beta=5"],
        None,
        ["--loss-arg beta: beta is already set by --beta"],
    ),
    ("name-without-params", [*TS, "--name", "mlp"], None, ["--name mlp: needs --params"]),
    (
        "name-not-in-params",
        [*TS, "--params", "p.yaml", "--name", "big"],
        write("p.yaml", "students: {mlp: {model: mlp}}\n"),
        ["--name big: no students.big"],
    ),
    (
        "model-kwargs-not-json",
        [*TT, "--model-kwargs", "{hidden: 3"],
        None,
        ["--model-kwargs: expected a JSON object"],
    ),
    (
        "model-kwargs-negative",
        [*TT, "--model", "mlp", "--model-kwargs", '{"hidden": [-5]}'],
        None,
        ["--model mlp with {'hidden': [-5]}", "negative"],
    ),
    (
        "model-kwargs-unknown",
        [*TT, "--model", "mlp", "--model-kwargs", '{"width": 5}'],
        None,
        ["--model mlp with {'width': 5}", "width"],
    ),
    ("model-unknown", [*TT, "--model", "resnet9000"], None, ["unknown model 'resnet9000'"]),
    ("epochs-zero", [*TT, "--epochs", "0"], None, ["--epochs must be >= 1, got 0"]),
    ("batch-size-zero", [*TT, "--batch-size", "0"], None, ["--batch-size must be >= 1"]),
    ("lr-negative", [*TT, "--lr", "-1"], None, ["--lr must be > 0, got -1.0"]),
    ("lr-inf", [*TS, "--lr", "inf"], None, ["--lr: expected a finite number, got inf"]),
    ("weight-decay-nan", [*TS, "--weight-decay", "nan"], None, ["--weight-decay: expected a fin"]),
    ("momentum-one", [*TT, "--momentum", "1"], None, ["--momentum must be in [0, 1)"]),
    (
        "milestone-past-the-end",
        [*TT, "--schedule", "step", "--milestones", "5"],
        None,
        ["--milestones [5]", "training runs 1 epochs"],
    ),
    (
        "milestones-without-step",
        [*TT, "--epochs", "3", "--milestones", "2"],
        None,
        ["--milestones [2]: milestones apply to the step schedule only"],
    ),
    (
        "milestones-not-numbers",
        [*TT, "--milestones", "a,b"],
        None,
        ["--milestones: expected comma-separated integers"],
    ),
    ("lr-decay-zero", [*TT, "--lr-decay", "0"], None, ["--lr-decay must be in (0, 1]"]),
    ("seed-negative", [*TT, "--seed", "-1"], None, ["--seed must be in [0, "]),
    ("seed-huge", [*TT, "--seed", str(2**70)], None, ["--seed must be in [0, "]),
    ("device-meta", [*TT, "--device", "meta"], None, ["--device 'meta'"]),
    ("device-nonsense", [*TT, "--device", "gpu0"], None, ["--device 'gpu0'"]),
    ("device-no-cuda", [*TT, "--device", "cuda:0"], None, ["--device 'cuda:0'"]),
    ("optimizer-unknown", [*TT, "--optimizer", "adam"], None, ["'--optimizer'", "adam"]),
    # --- data specs --------------------------------------------------------------------------
    ("data-unknown-source", [*TT[:1], "--data", "mnist:train", *TT[3:]], None, ["mnist"]),
    (
        "data-bad-split",
        [*TT[:1], "--data", "digits:validation", *TT[3:]],
        None,
        ["digits:validation"],
    ),
    (
        "data-option-twice",
        [*TT[:1], "--data", "npz:d.npz?std=1&std=2", *TT[3:]],
        npz("d.npz", np.ones((4, 1, 8, 8)), y=np.arange(4)),
        ["option 'std' is given twice"],
    ),
    (
        "data-unknown-option",
        [*TT[:1], "--data", "npz:d.npz?scale=2", *TT[3:]],
        npz("d.npz", np.ones((4, 1, 8, 8)), y=np.arange(4)),
        ["unknown option 'scale'"],
    ),
    (
        "data-complex",
        [*PC[:3], "--data", "npz:c.npz", "--out", "c.zarr"],
        npz("c.npz", COMPLEX),
        ["complex64", "real"],
    ),
    (
        "data-file-missing",
        [*PC[:3], "--data", "npz:gone.npz", "--out", "c.zarr"],
        None,
        ["gone.npz"],
    ),
    # --- precompute-logits -------------------------------------------------------------------
    (
        "teacher-missing",
        ["precompute-logits", "--teacher", "gone.pt", *PC[3:]],
        None,
        ["checkpoint not found", "gone.pt"],
    ),
    (
        "teacher-garbage",
        ["precompute-logits", "--teacher", "junk.pt", *PC[3:]],
        write("junk.pt", b"\x00junk"),
        ["junk.pt"],
    ),
    (
        "teacher-module-missing",
        ["precompute-logits", "--teacher", "nomod:fn", *PC[3:]],
        None,
        ["cannot import 'nomod'"],
    ),
    (
        "teacher-factory-exits",
        ["precompute-logits", "--teacher", "factories:exits", *PC[3:]],
        None,
        ["factories:exits", "SystemExit"],
    ),
    (
        "teacher-factory-not-module",
        ["precompute-logits", "--teacher", "factories:not_a_module", *PC[3:]],
        None,
        ["factories:not_a_module", "not a torch.nn.Module"],
    ),
    (
        "teacher-fewer-classes-than-labels",
        ["precompute-logits", "--teacher", "factories:three_classes", *PC[3:]],
        None,
        ["labels", "3 classes"],
    ),
    (
        "teacher-wrong-input-shape",
        [
            "precompute-logits",
            "--teacher",
            "teacher.pt",
            "--data",
            "npz:rgb.npz",
            "--out",
            "c.zarr",
        ],
        npz("rgb.npz", np.ones((4, 3, 32, 32), np.float32)),
        ["(1, 8, 8)", "(3, 32, 32)"],
    ),
    ("no-teacher", ["precompute-logits", *PC[3:]], None, ["no teacher"]),
    ("dtype-unknown", [*PC, "--dtype", "float8"], None, ["'--dtype'", "float8"]),
    ("compression-unknown", [*PC, "--compression", "lz4"], None, ["--compression 'lz4'"]),
    ("compression-level", [*PC, "--compression", "zstd:99"], None, ["--compression 'zstd:99'"]),
    ("chunk-rows-negative", [*PC, "--chunk-rows", "-1"], None, ["--chunk-rows must be >= 0"]),
    ("precompute-batch-zero", [*PC, "--batch-size", "0"], None, ["--batch-size must be >= 1"]),
    (
        "cache-under-a-file",
        [*PC[:5], "--out", "factories.py/c.zarr"],
        None,
        ["cannot write factories.py/c.zarr"],
    ),
    ("cache-in-proc", [*PC[:5], "--out", "/proc/c.zarr"], None, ["cannot write /proc/c.zarr"]),
    ("cache-exists", [*PC[:5], "--out", "train.zarr"], None, ["train.zarr already exists"]),
    # --- train-student -----------------------------------------------------------------------
    (
        "cache-missing",
        ["train-student", "--cache", "gone.zarr", *TS[3:]],
        None,
        ["cache not found", "gone.zarr"],
    ),
    (
        "cache-not-zarr",
        ["train-student", "--cache", "notacache.zarr", *TS[3:]],
        no_zarr_json,
        ["notacache.zarr", "no zarr.json"],
    ),
    (
        "cache-zarr-json-broken",
        ["train-student", "--cache", "broken.zarr", *TS[3:]],
        broken_zarr_json,
        ["broken.zarr"],
    ),
    (
        "cache-of-other-data",
        [*TS[:3], "--data", "digits:test", *TS[5:]],
        None,
        ["built from other data", "digits:test"],
    ),
    ("loss-unknown", [*TS, "--loss", "hinton"], None, ["unknown loss 'hinton'"]),
    ("loss-arg-no-equals", [*TS, "--loss-arg", "alpha"], None, ["--loss-arg 'alpha'"]),
    ("loss-arg-not-a-number", [*TS, "--loss-arg", "alpha=high"], None, ["--loss-arg 'alpha=high'"]),
    (
        "loss-arg-of-another-loss",
        [*TS, "--loss", "kd", "--beta", "2"],
        None,
        ["--beta: loss kd has no setting 'beta'"],
    ),
    ("alpha-out-of-range", [*TS, "--alpha", "1.5"], None, ["--alpha must be in [0, 1], got 1.5"]),
    ("beta-negative", [*TS, "--loss", "dkd", "--beta", "-1"], None, ["--beta must be >= 0"]),
    ("temperature-zero", [*TS, "--temperature", "0"], None, ["--temperature must be > 0"]),
    ("temperature-nan", [*TS, "--temperature", "nan"], None, ["--temperature: expected a finite"]),
    (
        "labeled-fraction-two",
        [*TS, "--labeled-fraction", "2"],
        None,
        ["--labeled-fraction must be in [0, 1]"],
    ),
    (
        "cache-memory-nonsense",
        [*TS, "--cache-memory", "12 parsecs"],
        None,
        ["--cache-memory '12 parsecs'"],
    ),
    ("threads-negative", [*TS, "--threads", "-1"], None, ["--threads must be >= 0"]),
    (
        "mean-probs-without-members",
        [*TS, "--combine", "mean-probs"],
        None,
        ["members", "train.zarr"],
    ),
    (
        "student-factory-not-module",
        [*TS, "--student", "factories:not_a_module"],
        None,
        ["--student factories:not_a_module", "not a torch.nn.Module"],
    ),
    (
        "user-loss-not-scalar",
        [*TS, "--loss", "factories:per_row", "--epochs", "1"],
        None,
        ["--loss factories:per_row", "scalar"],
    ),
    ("student-out-exists", [*TS[:5], "--out", "student"], None, ["student already exists"]),
    # --- evaluate, export, report ------------------------------------------------------------
    (
        "evaluate-not-a-student",
        ["evaluate", "--student", "metrics", *EV_OUT[3:]],
        None,
        ["--student metrics", "no student.pt"],
    ),
    (
        "evaluate-garbage-checkpoint",
        ["evaluate", "--student", "bad_student", *EV_OUT[3:]],
        garbage_student,
        ["student.pt", "not a readable checkpoint"],
    ),
    (
        "evaluate-foreign-checkpoint",
        ["evaluate", "--student", "odd_student", *EV_OUT[3:]],
        payload_student({"weights": [1, 2]}),
        ["student.pt", "not a kd-pipeline checkpoint"],
    ),
    (
        "evaluate-other-data",
        [*EV[:5], "--data", "digits:train", "--out", "m.json"],
        None,
        ["built from other data"],
    ),
    (
        "evaluate-out-under-a-file",
        [*EV, "--out", "factories.py/m.json", "--latency-runs", "0"],
        None,
        ["cannot write factories.py/m.json"],
    ),
    ("teacher-out-in-proc", [*TT[:3], "--out", "/proc/t.pt"], None, ["cannot write /proc/t.pt"]),
    (
        "student-out-under-a-file",
        [*TS[:5], "--out", "factories.py/s"],
        None,
        ["cannot write factories.py/s"],
    ),
    ("evaluate-out-exists", [*EV, "--out", "existing.json"], None, ["existing.json already"]),
    ("evaluate-ece-bins-zero", [*EV_OUT, "--ece-bins", "0"], None, ["--ece-bins must be >= 1"]),
    (
        "export-unknown-format",
        ["export", "--student", "student", "--out", "s.x", "--format", "tf"],
        None,
        ["'--format'", "tf"],
    ),
    (
        "export-not-a-student",
        ["export", "--student", "metrics", "--out", "s.pt"],
        None,
        ["no student.pt"],
    ),
    (
        "report-into-its-metrics",
        ["report", "--metrics", "metrics", "--out", "metrics/r.md"],
        None,
        ["--out metrics/r.md is inside the input --metrics metrics"],
    ),
    (
        "report-plots-into-the-cache",
        [
            "report",
            "--metrics",
            "metrics",
            "--out",
            "r.md",
            "--plots",
            "train.zarr",
            "--cache",
            "train.zarr",
            "--overwrite",
        ],
        None,
        ["--plots train.zarr is the input --cache train.zarr"],
    ),
    (
        "show-targets-into-the-cache",
        ["show-targets", "train.zarr", "--out", "train.zarr/fig.png"],
        None,
        ["--out train.zarr/fig.png is inside the input CACHE train.zarr"],
    ),
    ("report-no-metrics", ["report", "--metrics", "metrics", "--out", "r.md"], None, ["metrics"]),
    ("report-metrics-missing", ["report", "--metrics", "nodir", "--out", "r.md"], None, ["nodir"]),
    # --- verify, convert-cache, inspect, models ----------------------------------------------
    (
        "verify-other-data",
        ["verify", "train.zarr", "--data", "digits:test"],
        None,
        ["built from other data than --data digits:test"],
    ),
    ("verify-not-a-cache", ["verify", "factories.py"], None, ["factories.py", "neither"]),
    ("convert-same-path", ["convert-cache", "train.zarr", "train.zarr"], None, ["same path"]),
    ("convert-missing", ["convert-cache", "gone.zarr", "x.h5"], None, ["gone.zarr"]),
    ("convert-dst-exists", ["convert-cache", "train.zarr", "test.h5"], None, ["test.h5 already"]),
    ("inspect-missing", ["inspect", "gone.zarr"], None, ["cache not found", "gone.zarr"]),
    ("models-bad-shape", ["models", "--input-shape", "0,8"], None, ["--input-shape"]),
]


@pytest.mark.parametrize(
    "args, setup, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_fails_cleanly_and_touches_nothing(world, runner, args, setup, fragments):
    if setup is not None:
        setup(world)
    before = snapshot(world)
    result = invoke(runner, *args)
    assert_clean_error(result, *fragments)
    assert snapshot(world) == before


def test_the_suite_is_large_and_distinct():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)) >= 60
