"""Feature losses in training: the term grammar, checks against the cache, the total loss a
student trains on, FitNets regressors through resume, and the errors."""

import json
import re

import pytest
import torch

from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.core.training import Trainee
from pipeline.data import load_transfer_set
from pipeline.models import create_model
from pipeline.models.checkpoint import load_checkpoint
from pipeline.student.feature_losses import at_loss, fitnet_loss
from pipeline.student.feature_training import FeatureTerms, bind_terms, check_terms, parse_terms
from pipeline.student.students import TrainStudentConfig
from pipeline.student.targets import TargetBatch
from stages import precompute_logits, train_student
from tests.conftest import invoke

CNN = {"model": "cnn", "model_kwargs": {"channels": [8, 16], "hidden": 32}}


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory, teacher_ckpt):
    """The CNN teacher's attention map and hint at layer 5 (16 x 8 x 8) on digits:train."""
    out = tmp_path_factory.mktemp("features") / "train.zarr"
    cfg = PrecomputeConfig(features=["att=5:attention", "hint=5:hint"])
    return precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:train", out)


def test_terms_parse_with_their_loss_settings_and_refuse_bad_forms():
    at, fsp, sob = parse_terms(["at:att=5:weight=500", "fsp:g=2+5", "sobolev:sob"])
    assert (at.loss, at.feature, at.layers) == ("at", "att", ("5",))
    assert at.settings["weight"] == 500 and at.settings["weight_decay"] == 1.0
    assert fsp.layers == ("2", "5") and sob.layers == ()
    for bad, message in [
        ("at", "expected LOSS:FEATURE"),
        ("nope:att=5", "unknown feature loss 'nope'"),
        ("at:att", "at takes =LAYER"),
        ("fsp:g=2", "fsp takes =LAYER_A+LAYER_B"),
        ("sobolev:sob=3", "sobolev takes no student layer"),
        ("at:att=5:weight", "'weight' is not KEY=NUMBER"),
        ("at:att=5:beta=1", "beta"),
    ]:
        with pytest.raises(PipelineError, match=re.escape(message)):
            parse_terms([bad])


def test_terms_are_checked_against_the_caches_features():
    features = {"att": {"kind": "attention"}, "hint": {"kind": "hint"}}
    check_terms(parse_terms(["at:att=5", "nst:hint=5"]), features, "c.zarr")
    with pytest.raises(PipelineError, match=r"has no feature 'x' \(its features: att, hint"):
        check_terms(parse_terms(["at:x=5"]), features, "c.zarr")
    with pytest.raises(PipelineError, match="at reads attention features, 'hint' is hint"):
        check_terms(parse_terms(["at:hint=5"]), features, "c.zarr")


def test_total_loss_is_the_logit_loss_plus_the_weighted_terms(feature_cache):
    """On one batch, what the trainer minimises equals KD + 1000 · AT + 2 · FitNets computed
    by hand from the student's own layer output and the cached targets."""
    from pipeline.cache import open_cache
    from pipeline.student.losses import get_loss

    torch.manual_seed(0)
    model = create_model("cnn", 10, (1, 8, 8), **CNN["model_kwargs"])
    ts = load_transfer_set("digits:train")
    x = torch.from_numpy(ts.inputs[:16])
    with open_cache(feature_cache) as cache:
        features = cache.features
        att, hint = cache.feature("att", slice(0, 16))[:, 0], cache.feature("hint", slice(0, 16))
        logits = torch.from_numpy(cache.logits(slice(0, 16))[:, 0])
    terms = parse_terms(["at:att=5", "fitnet:hint=5:weight=2"])
    bound, capture = bind_terms(terms, features, model, x[:2], "student cnn")
    side = FeatureTerms(bound, capture)
    kd = get_loss("kd").bind(4.0, {"alpha": 0.9})
    trainee = Trainee("s", model, kd, TrainStudentConfig(**CNN), teacher=None, terms=side)
    batch = TargetBatch(
        logits, features={"att": torch.from_numpy(att), "hint": torch.from_numpy(hint[:, 0])}
    )
    y = torch.from_numpy(ts.labels[:16])
    out = model.train()(x)
    total = trainee._loss_of(out, logits, y, x, batch)
    layer = capture.outputs.get("5")
    assert layer is None  # read and cleared by the terms
    act = model[:6](x)  # the student's layer 5 again, same weights, no dropout before it
    reg = side.modules[0]
    expected = (
        kd(out, logits, y)
        + 1000 * at_loss(act, torch.from_numpy(att).reshape(16, 8, 8))
        + 2 * fitnet_loss(act, torch.from_numpy(hint[:, 0]).float(), regressors=reg)
    )
    assert torch.allclose(total, expected, rtol=1e-5)


def test_feature_losses_train_and_change_the_student(tmp_path, feature_cache):
    plain = train_student.run(
        TrainStudentConfig(**CNN, epochs=2), feature_cache, "digits:train", tmp_path / "kd"
    )
    cfg = TrainStudentConfig(**CNN, epochs=2, feature_losses=["at:att=5", "nst:hint=5"])
    a = train_student.run(cfg, feature_cache, "digits:train", tmp_path / "a")
    b = train_student.run(cfg, feature_cache, "digits:train", tmp_path / "b")
    wa, wb, wp = (load_checkpoint(p / "student.pt")[0].state_dict() for p in (a, b, plain))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # deterministic
    assert not all(torch.equal(wa[k], wp[k]) for k in wa)  # the terms did something
    info = json.loads((a / "student.json").read_text())
    assert info["config"]["feature_losses"] == ["at:att=5", "nst:hint=5"]


def test_fitnet_regressor_resumes_with_the_student(tmp_path, feature_cache, monkeypatch):
    cfg = TrainStudentConfig(**CNN, epochs=3, feature_losses=["fitnet:hint=5"])
    straight = train_student.run(cfg, feature_cache, "digits:train", tmp_path / "straight")
    save = Trainee.save

    def crash_after_epoch_one(self):
        save(self)
        if self.epochs_done == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainee, "save", crash_after_epoch_one)
    with pytest.raises(KeyboardInterrupt):
        train_student.run(cfg, feature_cache, "digits:train", tmp_path / "resumed")
    state = torch.load(tmp_path / "resumed.resume.pt", weights_only=True)
    assert any("weight" in k for k in state["extra"])  # the regressor's weights are saved
    monkeypatch.setattr(Trainee, "save", save)
    out = train_student.run(cfg, feature_cache, "digits:train", tmp_path / "resumed", resume=True)
    wa, wb = (load_checkpoint(p / "student.pt")[0].state_dict() for p in (straight, out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--feature-loss", "at:att=9x"], "has no layer '9x' (closest:"),
        (["--feature-loss", "at:nope=5"], "has no feature 'nope' (its features: att, hint"),
        (["--feature-loss", "at:att=5", "--loss", "ce"], "loss ce ignores the teacher"),
        (["--feature-loss", "at:att=5", "--cache-memory", "1KiB"], "hold their targets in memory"),
    ],
)
def test_feature_loss_errors_are_one_line(tmp_path, runner, feature_cache, args, message):
    from tests.test_cli_errors import assert_clean_error

    result = invoke(
        runner, "train-student", "--cache", feature_cache, "--data", "digits:train",
        "--out", tmp_path / "s", "--student", "cnn", "--model-kwargs",
        json.dumps(CNN["model_kwargs"]), "--epochs", "1", *args,
    )  # fmt: skip
    assert_clean_error(result, message)
    assert not (tmp_path / "s").exists()


def test_a_cache_without_features_names_what_to_precompute(tmp_path, runner, train_cache):
    from tests.test_cli_errors import assert_clean_error

    result = invoke(
        runner, "train-student", "--cache", train_cache, "--data", "digits:train",
        "--out", tmp_path / "s", "--feature-loss", "at:att=5",
    )  # fmt: skip
    assert_clean_error(result, "no feature 'att' (its features: none; precompute with --features")


def test_losses_lists_the_feature_losses_with_their_kinds(runner):
    text = invoke(runner, "losses").output
    assert "Feature losses, added to any of the above with --feature-loss" in text
    assert "fitnet   reads cached hint features" in text
    rows = {r["name"]: r for r in json.loads(invoke(runner, "losses", "--json").output)}
    assert rows["at"]["kind"] == "attention" and rows["at"]["settings"]["weight"]["default"] == 1e3
    assert rows["sobolev"]["kind"] == "input-grad"


def test_sobolev_rebuilds_stage_ones_projections_so_the_teacher_matches_itself(
    tmp_path, teacher_ckpt
):
    """The teacher as its own student: its input gradients of the projections stage two
    rebuilds from (seed, sample id, view) equal the cached ones, so the term is ~0; with
    another sample's projections it is not."""
    from pipeline.cache import open_cache
    from pipeline.student.feature_training import projections_key, row_projections

    cfg = PrecomputeConfig(features=["grad=input:input-grad:k=2,t=4:dtype=float32"], seed=3)
    cache = precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:train", tmp_path / "g.zarr")
    model, _ = load_checkpoint(teacher_ckpt)
    ts = load_transfer_set("digits:train")
    with open_cache(cache) as c:
        features, cached = c.features, torch.from_numpy(c.feature("grad", slice(0, 32))[:, 0])
    term = parse_terms(["sobolev:grad"])
    side = FeatureTerms(*bind_terms(term, features, model, torch.zeros(2, 1, 8, 8), "teacher"))
    proj = torch.from_numpy(row_projections(features["grad"], ts.sample_ids[:32], 1, 10)[:, 0])
    key = projections_key(term[0])

    def value(projections):
        x = torch.from_numpy(ts.inputs[:32]).requires_grad_(True)
        batch = TargetBatch(torch.zeros(32, 10), features={"grad": cached, key: projections})
        labels = torch.from_numpy(ts.labels[:32])
        return float(side.value(x, model.eval()(x), batch, labels, 0, pretraining=False).detach())

    assert value(proj) < 1e-9
    assert value(proj.roll(1, 0)) > 1e-4  # the projections are per sample


def test_grad_at_student_side_is_stage_ones_map(tmp_path, teacher_ckpt):
    """The teacher as its own student: its CE-gradient attention (labels, else the teacher's
    top class) equals the cached grad-attention map, so the grad-at term is ~0."""
    from pipeline.cache import open_cache

    cfg = PrecomputeConfig(features=["gat=input:grad-attention"])
    cache = precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:train", tmp_path / "g.zarr")
    model, _ = load_checkpoint(teacher_ckpt)
    ts = load_transfer_set("digits:train")
    with open_cache(cache) as c:
        features, cached = c.features, torch.from_numpy(c.feature("gat", slice(0, 32))[:, 0])
        logits = torch.from_numpy(c.logits(slice(0, 32))[:, 0])
    side = FeatureTerms(
        *bind_terms(parse_terms(["grad-at:gat"]), features, model, torch.zeros(2, 1, 8, 8), "t")
    )
    x = torch.from_numpy(ts.inputs[:32]).requires_grad_(True)
    labels = torch.from_numpy(ts.labels[:32]).clone()
    batch = TargetBatch(logits, features={"gat": cached})
    value = float(side.value(x, model.eval()(x), batch, labels, 0, pretraining=False).detach())
    assert value < 1e-10
    agree = logits.argmax(1) == labels
    labels[agree] = -1  # unlabelled rows take the teacher's top class: the same maps here
    again = float(side.value(x, model.eval()(x), batch, labels, 0, pretraining=False).detach())
    assert agree.any() and again < 1e-10
