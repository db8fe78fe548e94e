"""Bring your own student and loss: `package.module:function` students and losses train from
a cache, are recorded in provenance, and the students evaluate and export when the user names
their factory again (a checkpoint never runs code by itself); a teacher trained from a
factory is `FACTORY@CHECKPOINT`; a registered toy loss with a new setting works from
params.yaml and the command line with no other change."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest
import torch

from pipeline.models.checkpoint import load_checkpoint
from pipeline.student.losses import LOSSES, Setting, register_loss
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

STUDENTS = """
import torch

def tiny(num_classes, input_shape, hidden=16):
    d = 1
    for n in input_shape:
        d *= n
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(d, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, num_classes)
    )

def no_shape(hidden=8):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

def wrong_classes(num_classes, input_shape):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7))

def not_a_module(num_classes):
    return 42
"""

LOSSES_PY = '''
import torch
import torch.nn.functional as F

def margin_kd(student, teacher, labels, *, temperature, margin=0.0):
    """KL at T plus a margin on the student's own top logit."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2
    return kl + margin * student.max(1).values.mean()

def per_row(student, teacher, labels):
    return (student - teacher).pow(2).mean(1)

def nan_loss(student, teacher, labels):
    return student.sum() * float("nan")

def needs_setting(student, teacher, labels, *, scale):
    return student.sum() * scale
'''

FAST = ["--epochs", "2", "--data", "digits:train"]


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """mystudents.py and mylosses.py in the working directory, as a user would write them."""
    (tmp_path / "mystudents.py").write_text(textwrap.dedent(STUDENTS))
    (tmp_path / "mylosses.py").write_text(textwrap.dedent(LOSSES_PY))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    import sys

    for name in ("mystudents", "mylosses"):
        sys.modules.pop(name, None)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_factory_student_and_user_loss_train_evaluate_and_export(
    user_code, runner, train_cache, test_cache
):
    out = user_code / "student"
    result = invoke(
        runner, "train-student", "--cache", train_cache, "--out", out, *FAST,
        "--student", "mystudents:tiny", "--model-kwargs", '{"hidden": 12}',
        "--loss", "mylosses:margin_kd", "--loss-arg", "margin=0.05", "--temperature", "2",
        "--epochs", "6",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((out / "student.json").read_text())
    assert info["model"] == "mystudents:tiny" and info["loss_settings"] == {"margin": 0.05}
    assert info["code"]["model"] == {
        "source": "mystudents:tiny",
        "sha256": sha256(user_code / "mystudents.py"),
    }
    assert info["code"]["loss"] == {
        "source": "mylosses:margin_kd",
        "sha256": sha256(user_code / "mylosses.py"),
    }
    # Rebuilt through the factory, which the user names: the checkpoint alone runs nothing.
    model, meta = load_checkpoint(out / "student.pt", code="mystudents:tiny")
    assert model[1].out_features == 12 and meta["num_params"] == 64 * 12 + 12 + 12 * 10 + 10

    metrics = user_code / "m.json"
    evaluate = ["evaluate", "--student", out, "--cache", test_cache, "--data", "digits:test",
                "--out", metrics, "--latency-runs", "0"]  # fmt: skip
    refused = invoke(runner, *evaluate)
    assert_clean_error(refused, "'mystudents:tiny'", "name it yourself: --model mystudents:tiny")
    assert not metrics.exists()
    result = invoke(runner, *evaluate, "--model", "mystudents:tiny")
    assert result.exit_code == 0, result.output
    scores = json.loads(metrics.read_text())
    info = json.loads((user_code / "m.info.json").read_text())
    # Far above chance (0.1) after a few epochs on the user's loss alone (teacher: ~0.77).
    assert info["loss"] == "mylosses:margin_kd" and scores["accuracy"] > 0.3
    assert scores["agreement"] > 0.4

    exported = user_code / "student.ts"
    refused = invoke(runner, "export", "--student", out, "--out", exported)
    assert_clean_error(refused, "name it yourself: --model mystudents:tiny")
    assert not exported.exists()
    result = invoke(runner, "export", "--student", out, "--out", exported,
                    "--model", "mystudents:tiny")  # fmt: skip
    assert result.exit_code == 0, result.output
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(torch.jit.load(str(exported))(x), model(x), atol=1e-6)


def test_factory_without_shape_arguments_gets_only_its_kwargs(user_code, runner, train_cache):
    out = user_code / "s"
    result = invoke(
        runner, "train-student", "--cache", train_cache, "--out", out, *FAST,
        "--student", "mystudents:no_shape", "--loss", "soft",
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_params_name_the_factory_for_evaluate_and_export(
    user_code, runner, train_cache, test_cache
):
    """`evaluate.model` and `export.model` in params.yaml do what --model does; a wrong one
    is refused naming the key, and a registry student ignores them."""
    out, plain = user_code / "student", user_code / "plain"
    for student, model in ((out, "mystudents:tiny"), (plain, "mlp")):
        result = invoke(runner, "train-student", "--cache", train_cache, "--out", student,
                        *FAST, "--student", model, "--loss", "soft")  # fmt: skip
        assert result.exit_code == 0, result.output
    params = user_code / "params.yaml"
    params.write_text("evaluate: {model: 'mystudents:tiny'}\nexport: {model: 'mystudents:tiny'}\n")
    for student in (out, plain):
        evaluated = invoke(
            runner, "evaluate", "--params", params, "--student", student, "--cache", test_cache,
            "--data", "digits:test", "--out", student.with_suffix(".json"), "--latency-runs", "0",
        )  # fmt: skip
        exported = invoke(runner, "export", "--params", params, "--student", student,
                          "--out", student.with_suffix(".pt"))  # fmt: skip
        assert evaluated.exit_code == 0 and exported.exit_code == 0, (
            evaluated.output + exported.output
        )
    info = json.loads((user_code / "student.info.json").read_text())
    assert info["model"] == "mystudents:tiny" and info["config"]["model"] == "mystudents:tiny"

    params.write_text("export: {model: mystudents:wrong_classes}\n")
    result = invoke(runner, "export", "--params", params, "--student", out,
                    "--out", user_code / "x.pt")  # fmt: skip
    assert_clean_error(
        result,
        "'mystudents:tiny', not 'mystudents:wrong_classes' (",
        "params.yaml:export.model)",
        "give --model mystudents:tiny",
    )
    result = invoke(runner, "export", "--student", out, "--out", user_code / "x.pt",
                    "--model", "mlp")  # fmt: skip
    assert_clean_error(result, "--model 'mlp': expected package.module:function")
    assert not (user_code / "x.pt").exists()


def test_a_teacher_trained_from_a_factory_is_factory_at_checkpoint(user_code, runner):
    """train-teacher --model FACTORY writes a checkpoint that `layers` and
    `precompute-logits` refuse as a bare file, and take as FACTORY@CHECKPOINT: rebuilt with
    the checkpoint's kwargs (no-argument calls could not build it) and weights."""
    teacher = user_code / "teacher.pt"
    result = invoke(runner, "train-teacher", "--data", "digits:train", "--out", teacher,
                    "--model", "mystudents:tiny", "--model-kwargs", '{"hidden": 12}',
                    "--epochs", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    refused = invoke(runner, "layers", teacher, "--data", "digits:test")
    assert_clean_error(refused, f"give the teacher as mystudents:tiny@{teacher}")
    result = invoke(runner, "layers", f"mystudents:tiny@{teacher}", "--data", "digits:test")
    assert result.exit_code == 0 and "Linear   (12,)" in result.output, result.output

    cache = user_code / "c.zarr"
    result = invoke(runner, "precompute-logits", "--teacher", f"mystudents:tiny@{teacher}",
                    "--data", "digits:test", "--out", cache)  # fmt: skip
    assert result.exit_code == 0, result.output
    from pipeline.cache import open_cache
    from pipeline.data import load_transfer_set

    model, _ = load_checkpoint(teacher, code="mystudents:tiny")
    ts = load_transfer_set("digits:test")
    with open_cache(cache) as c:
        (member,) = c.attrs["teacher"]["members"]
        stored = c.read("logits")[:, 0]
    assert member["kind"] == "factory" and member["sha256"] == sha256(teacher)
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(stored), model(torch.from_numpy(ts.inputs)))


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--student", "mystudents:not_a_module"], ["--student mystudents:not_a_module", "int"]),
        (["--student", "mystudents:wrong_classes"], ["outputs 7 classes", "10 classes"]),
        (["--student", "mystudents:missing"], ["has no function 'missing'"]),
        (["--student", "nosuchmodule:fn"], ["cannot import 'nosuchmodule'"]),
        (["--loss", "mylosses:per_row"], ["--loss mylosses:per_row", "shape (64,)", "scalar"]),
        (["--loss", "mylosses:nan_loss"], ["--loss mylosses:nan_loss", "nan", "finite"]),
        (["--loss", "mylosses:needs_setting"], ["'scale' needs a numeric default"]),
        (["--loss", "mylosses:margin_kd", "--loss-arg", "gap=1"], ["--loss-arg gap", "margin"]),
        (["--loss", "kd", "--beta", "2"], ["--beta: loss kd has no setting 'beta'", "alpha"]),
        (["--loss", "kd", "--loss-arg", "alpha"], ["--loss-arg 'alpha'", "NAME=NUMBER"]),
        (["--loss", "kd", "--alpha", "2"], ["--alpha must be in [0, 1], got 2"]),
        (["--loss", "kd", "--alpha", "nan"], ["--alpha must be a finite number, got nan"]),
        (["--loss", "dkd", "--loss-arg", "beta=-1"], ["--loss-arg beta must be >= 0, got -1"]),
        (["--loss", "hinton"], ["unknown loss 'hinton'"]),
        (["--lr", "inf"], ["--lr: expected a finite number, got inf"]),
    ],
)
def test_bad_user_code_and_settings_fail_in_one_line(
    user_code, runner, train_cache, args, fragments
):
    out = user_code / "s"
    result = invoke(runner, "train-student", "--cache", train_cache, "--out", out, *FAST, *args)
    assert_clean_error(result, *fragments)
    assert not out.exists() and not list(user_code.glob("s.*"))


@pytest.mark.parametrize(
    "params, fragments",
    [
        ("losses: {kd: {beta: 8}}", ["params.yaml:losses.kd.beta", "no setting 'beta'"]),
        ("losses: {kd: {alpha: 1.5}}", ["params.yaml:losses.kd.alpha must be in [0, 1]"]),
        ("losses: {kd: {alpha: .nan}}", ["params.yaml:losses.kd.alpha must be a finite number"]),
        ("train_student: {beta: 8}", ["train_student: unknown key 'beta'", "losses.LOSS"]),
        ("train_student: {lr: -1}", ["params.yaml:train_student.lr must be > 0, got -1.0"]),
        ("students: {x: {model: 'mystudents:not_a_module'}}", ["students.x.model"]),
    ],
)
def test_bad_settings_in_params_name_the_key(user_code, runner, train_cache, params, fragments):
    (user_code / "params.yaml").write_text(params + "\n")
    out = user_code / "s"
    extra = ["--name", "x"] if "students:" in params else []
    result = invoke(
        runner, "train-student", "--params", "params.yaml", "--cache", train_cache,
        "--out", out, *FAST, "--loss", "kd", *extra,
    )  # fmt: skip
    assert_clean_error(result, *fragments)
    assert not out.exists()


@pytest.fixture
def toy_loss():
    """A loss registered the way a contributor adds one: a function and its declaration."""

    @register_loss(
        "toy",
        settings={"margin": Setting(0.5, 0.0, 2.0, "hinge margin on the teacher's top class")},
        paper="a test",
    )
    def toy_loss_fn(student, teacher, labels, *, temperature, margin):
        """Hinge on the teacher's top class, plus KL at T."""
        top = teacher.argmax(1)
        own = student.gather(1, top[:, None])[:, 0]
        rest = student.masked_fill(torch.nn.functional.one_hot(top, student.shape[1]).bool(), -1e9)
        hinge = torch.relu(margin - own + rest.max(1).values).mean()
        p_t = torch.softmax(teacher / temperature, 1)
        log_s = torch.log_softmax(student / temperature, 1)
        return hinge + torch.nn.functional.kl_div(log_s, p_t, reduction="batchmean")

    yield toy_loss_fn
    del LOSSES["toy"]


def test_a_registered_loss_with_a_new_setting_needs_no_other_change(
    toy_loss, tmp_path, runner, train_cache
):
    s = torch.tensor([[2.0, 1.5, -1.0], [0.0, 0.3, 0.1]])
    t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    from pipeline.student.losses import bind_loss

    hinge = (max(0.0, 0.7 - 2.0 + 1.5) + max(0.0, 0.7 - 0.1 + 0.3)) / 2
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(s / 2, 1), torch.softmax(t / 2, 1), reduction="batchmean"
    )
    got = bind_loss("toy", 2.0, {"margin": 0.7})(s, t, torch.tensor([0, 2]))
    assert got.item() == pytest.approx(hinge + kl.item(), rel=1e-6)

    (tmp_path / "params.yaml").write_text("losses:\n  toy: {margin: 0.3, epochs: 2}\n")
    common = ["--cache", train_cache, "--data", "digits:train", "--loss", "toy"]
    a = invoke(runner, "train-student", "--params", tmp_path / "params.yaml", *common,
               "--out", tmp_path / "a")  # fmt: skip
    b = invoke(runner, "train-student", *common, "--epochs", "2", "--loss-arg", "margin=0.3",
               "--out", tmp_path / "b")  # fmt: skip
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ma, ia = load_checkpoint(tmp_path / "a" / "student.pt")
    mb, ib = load_checkpoint(tmp_path / "b" / "student.pt")
    assert ia["loss_settings"] == ib["loss_settings"] == {"margin": 0.3}
    assert ia["config"]["epochs"] == 2
    for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
        assert torch.equal(pa, pb)  # same settings from either source: the same student

    bad = invoke(runner, "train-student", *common, "--loss-arg", "margin=3",
                 "--out", tmp_path / "c")  # fmt: skip
    assert_clean_error(bad, "--loss-arg margin must be in [0, 2], got 3")
    listing = invoke(runner, "losses")
    assert "toy" in listing.output and "margin=0.5 (in [0, 2])" in listing.output


def test_losses_lists_every_loss_with_settings_and_paper(runner):
    result = invoke(runner, "losses", "--json")
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert set(rows) >= {"kd", "soft", "mse", "dkd", "dist", "ce"}
    assert rows["dkd"]["settings"]["beta"]["default"] == 8.0
    assert rows["kd"]["settings"]["alpha"]["range"] == "in [0, 1]"
    assert "Hinton" in rows["kd"]["paper"] and rows["ce"]["teacher"] is False
