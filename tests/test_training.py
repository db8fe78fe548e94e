"""The shared training loop: schedules, optimizers, lockstep training, data order."""

import numpy as np
import pytest
import torch

from pipeline.core.config import OptimConfig, resolve
from pipeline.core.errors import PipelineError
from pipeline.core.training import TrainData, Trainee, fit_many, lr_at


@pytest.mark.parametrize(
    "optim, torch_schedule",
    [
        (
            OptimConfig("adamw", 0.01, schedule="cosine"),
            lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5 * 7),
        ),
        (OptimConfig("sgd", 0.1, schedule="step", milestones=[2, 4]), None),
        (OptimConfig("sgd", 0.1, schedule="constant"), None),
    ],
)
def test_learning_rate_schedules_match_torch(optim, torch_schedule):
    """Per-step learning rates of 5 epochs x 7 steps against torch's own schedulers."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=optim.lr)
    if torch_schedule is None:
        make = {
            "step": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, optim.milestones, 0.1),
            "constant": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0),
        }[optim.schedule]
        sched, per_epoch = make(opt), True
    else:
        sched, per_epoch = torch_schedule(opt), False
    for step in range(35):
        assert lr_at(optim, step, 7, 5) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()  # no gradient: changes nothing, keeps torch's call order
        if not per_epoch or step % 7 == 6:
            sched.step()


def test_bad_optimizer_settings_name_their_source():
    for values, message in [
        ({"optimizer": "adam"}, "--optimizer 'adam'"),
        ({"schedule": "linear"}, "--schedule 'linear'"),
        ({"lr": 0}, "--lr must be > 0"),
        ({"momentum": 1.0}, "--momentum must be in [0, 1)"),
        ({"schedule": "step", "milestones": [0]}, "--milestones [0]"),
        (
            {"epochs": 10, "schedule": "step", "milestones": [10]},
            "--milestones [10]: each must be an epoch in 1..9",
        ),
        ({"milestones": [3]}, "--milestones [3]: milestones apply to the step schedule only"),
    ]:
        with pytest.raises(PipelineError) as e:
            resolve(OptimConfig, ("command line", values))
        assert message in str(e.value)
    with pytest.raises(PipelineError, match=r"^p.yaml:train_teacher.lr must be > 0, got -1.0$"):
        resolve(OptimConfig, ("p.yaml:train_teacher", {"lr": -1}))


def test_labels_only_epochs_visit_every_row_once_in_a_seeded_order():
    data = TrainData(torch.arange(10.0)[:, None], torch.arange(10))
    first = [y.tolist() for _, y, _ in data.batches(0, 4, seed=3)]
    assert sorted(sum(first, [])) == list(range(10)) and [len(b) for b in first] == [4, 4, 2]
    assert first == [y.tolist() for _, y, _ in data.batches(0, 4, seed=3)]
    assert first != [y.tolist() for _, y, _ in data.batches(1, 4, seed=3)]


def test_lockstep_models_train_as_they_would_alone():
    """Two dropout models side by side end equal to each trained on its own."""
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32))
    y = torch.arange(40) % 3
    data = TrainData(x, y)

    def make(seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)
        )
        loss = lambda s, t, labels: torch.nn.functional.cross_entropy(s, labels)  # noqa: E731
        return Trainee(f"m{seed}", net, loss, OptimConfig("sgd", 0.1))

    kw = {"epochs": 3, "batch_size": 8, "seed": 0, "device": torch.device("cpu")}
    together = [make(1), make(2)]
    fit_many(together, data, **kw)
    for seed, trained in zip((1, 2), together, strict=True):
        alone = make(seed)
        fit_many([alone], data, **kw)
        for a, b in zip(alone.model.parameters(), trained.model.parameters(), strict=True):
            assert torch.equal(a, b)
        assert alone.log == trained.log


def test_the_teacher_takes_the_students_optimizer_settings(tmp_path, runner):
    """One OptimConfig: train-teacher gains SGD, momentum and the step schedule."""
    from pipeline.models.checkpoint import load_checkpoint
    from tests.conftest import invoke

    out = tmp_path / "t.pt"
    result = invoke(
        runner, "train-teacher", "--data", "digits:train", "--out", out, "--model", "mlp",
        "--model-kwargs", '{"hidden": [16]}', "--optimizer", "sgd", "--lr", "0.05",
        "--momentum", "0.8", "--schedule", "step", "--milestones", "2", "--epochs", "3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    _, meta = load_checkpoint(out)
    cfg = meta["config"]
    assert (cfg["optimizer"], cfg["momentum"], cfg["schedule"]) == ("sgd", 0.8, "step")
    assert [row["lr"] for row in meta["log"]] == pytest.approx([0.05, 0.05, 0.005])

    bad = invoke(runner, "train-teacher", "--data", "digits:train", "--out", tmp_path / "b.pt",
                 "--schedule", "step", "--milestones", "40", "--epochs", "3")  # fmt: skip
    assert bad.exit_code != 0 and "--milestones [40]: each must be an epoch in 1..2" in bad.output
    assert not (tmp_path / "b.pt").exists()


def test_a_diverging_student_stops_naming_the_epoch_and_step_and_is_never_written(
    tmp_path, runner, train_cache
):
    """A finite but absurd learning rate blows the weights up: the run stops with the epoch
    and step where the loss stopped being finite, and neither the student nor its resume
    checkpoint is written."""
    from tests.conftest import invoke
    from tests.test_cli_errors import assert_clean_error

    out = tmp_path / "s"
    result = invoke(
        runner, "train-student", "--cache", train_cache, "--data", "digits:train", "--out", out,
        "--optimizer", "sgd", "--lr", "1e30", "--momentum", "0", "--epochs", "2",
        "--schedule", "constant", "--model-kwargs", '{"hidden": [8]}',
    )  # fmt: skip
    assert_clean_error(result, "s: the loss became", "at epoch 1, step", "nothing was written")
    step = int(result.output.split(", step ")[1].split(" ")[0])
    assert 1 < step <= 23  # not the first step (finite there), within epoch 1's 23 steps
    assert not out.exists() and not (tmp_path / "s.resume.pt").exists()
    assert not (tmp_path / "s.dvclive").exists()  # nor its training curves
