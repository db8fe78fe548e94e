"""Language models end to end: train-teacher on sequences, a token cache, train-student from
it with a token loss, and the measures (bits per token, agreement with the teacher)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache, schema
from pipeline.core.lm import Positions, measure_lm
from pipeline.data.sequences import load_sequences
from pipeline.models import create_model
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint
from pipeline.student.token_losses import TokenTargets, token_loss
from tests.conftest import invoke, live_series
from tests.test_cli_errors import assert_clean_error

DATA = "pystdlib:train?limit=48&length=32"
OTHER = "pystdlib:train?limit=40&length=32"
TRAIN = ("--epochs", "2", "--batch-size", "16", "--lr", "3e-3")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(teacher checkpoint, its token cache of DATA) for the module."""
    from click.testing import CliRunner

    root, runner = tmp_path_factory.mktemp("lm"), CliRunner()
    teacher, cache = root / "t.pt", root / "c.zarr"
    result = invoke(runner, "train-teacher", "--data", DATA, "--model", "gpt_nano",
                    *TRAIN, "--out", teacher)  # fmt: skip
    assert result.exit_code == 0, result.output
    result = invoke(runner, "precompute-logits", "--teacher", teacher, "--data", DATA,
                    "--topk", "16", "--out", cache)  # fmt: skip
    assert result.exit_code == 0, result.output
    return teacher, cache


def test_the_teacher_is_a_causal_lm_of_the_corpus(lm):
    model, meta = load_checkpoint(lm[0])
    assert meta["role"] == "teacher" and meta["num_classes"] == 256
    assert meta["input_shape"] == [32] and len(meta["log"]) == 2
    assert meta["log"][1]["loss"] < meta["log"][0]["loss"] < math.log(256)  # it learnt


def test_a_batchs_rows_are_the_cache_rows_of_its_positions(lm):
    """The join of stage two: the distilled positions of any batch of sequences are the
    cache rows whose labels are their next tokens and whose top-1 is the teacher's argmax."""
    teacher, _ = load_checkpoint(lm[0])
    seqs = load_sequences(DATA)
    with open_cache(lm[1]) as c:
        labels, top1 = c.labels, c.read(schema.TOPK_INDICES)[:, 0, 0]
    where = Positions(seqs)
    idx = np.array([3, 7, 8, 30])
    x, mask, rows = where.batch(idx, "cpu")
    assert np.array_equal(labels[rows], where.labels(x, mask).numpy())
    with torch.no_grad():
        argmax = teacher.eval()(x)[mask].argmax(1).numpy()
    assert (top1[rows] == argmax).mean() > 0.99  # ties aside, the teacher's own argmax


def test_the_distillation_term_is_the_token_loss_of_the_teachers_own_logits(lm):
    teacher, _ = load_checkpoint(lm[0])
    seqs = load_sequences(DATA)
    x, mask, rows = Positions(seqs).batch(np.arange(5), "cpu")
    with torch.no_grad():
        logits = teacher.eval()(x)[mask]  # (N, V) the teacher at those positions
    with open_cache(lm[1]) as c:
        v, i = c.read(schema.TOPK_VALUES)[rows, 0], c.read(schema.TOPK_INDICES)[rows, 0]
        lse = c.read(schema.TOPK_LSE)[rows, 0]
    cached = TokenTargets(torch.from_numpy(i.astype(np.int64)), 256, torch.from_numpy(v),
                          torch.from_numpy(lse))  # fmt: skip
    top, idx = logits.topk(16, 1)
    direct = TokenTargets(idx, 256, top, torch.logsumexp(logits, 1))
    student = torch.randn(len(rows), 256, generator=torch.Generator().manual_seed(0))
    a = token_loss("kl", student, cached, 2.0)
    assert torch.allclose(a, token_loss("kl", student, direct, 2.0), rtol=1e-5)


@pytest.mark.parametrize("loss", ["kl", "kl-topk", "reverse-kl", "jsd", "ce"])
def test_train_student_from_a_token_cache(tmp_path, runner, lm, loss):
    out = tmp_path / "s"
    result = invoke(runner, "train-student", "--data", DATA, "--cache", lm[1], "--student",
                    "gpt_nano", "--loss", loss, "--temperature", "2", *TRAIN,
                    "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    model, info = load_checkpoint(out / "student.pt")
    assert info["loss"] == loss and info["cache"]["identity"]
    assert info["log"][-1]["loss"] < info["log"][0]["loss"]
    test = measure_lm(model, load_sequences(DATA), "cpu")
    assert 0 < test["bits_per_token"] < 8  # better than uniform over 256 bytes


def test_bits_per_token_of_a_uniform_model_is_eight():
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, 256)

    got = measure_lm(Uniform(), load_sequences(DATA), "cpu")
    assert got["bits_per_token"] == pytest.approx(8.0, rel=1e-5)
    assert got["perplexity"] == pytest.approx(256, rel=1e-5)


def test_a_student_on_other_sequences_than_the_caches_is_refused(tmp_path, runner, lm):
    result = invoke(runner, "train-student", "--data", OTHER, "--cache", lm[1], "--student",
                    "gpt_nano", "--loss", "kl", "--out", tmp_path / "s")  # fmt: skip
    assert_clean_error(result, "was built from other sequences", f"--data {OTHER}")
    assert not (tmp_path / "s").exists()


def test_a_logit_loss_on_sequences_is_refused(tmp_path, runner, lm):
    result = invoke(runner, "train-student", "--data", DATA, "--cache", lm[1], "--student",
                    "gpt_nano", "--loss", "dkd", "--out", tmp_path / "s")  # fmt: skip
    assert_clean_error(result, "a language model trains with a token loss", "kl-topk")


def test_a_token_loss_setting_out_of_range_is_one_line(tmp_path, runner, lm):
    result = invoke(runner, "train-student", "--data", DATA, "--cache", lm[1], "--student",
                    "gpt_nano", "--loss", "jsd", "--loss-arg", "beta=1.5",
                    "--out", tmp_path / "s")  # fmt: skip
    assert_clean_error(result, "beta", "in [0.01, 0.99]")


def test_inspect_says_tokens_bytes_per_token_and_the_kept_mass(runner, lm):
    from pipeline.cache.tokens import kept_mass

    result = invoke(runner, "inspect", lm[1])
    assert result.exit_code == 0, result.output
    with open_cache(lm[1]) as c:
        mass = kept_mass(c.read(schema.TOPK_VALUES)[:, 0], c.read(schema.TOPK_LSE)[:, 0])
        n = c.num_samples
    lines = dict(line.split(None, 1) for line in result.output.splitlines() if " " in line)
    assert lines["tokens"].startswith(f"{n} distilled tokens (all) of 48 sequences")
    assert f"keep {mass.mean():.2%} of the probability" in lines["kept"]
    assert f"10% of tokens keep less than {np.percentile(mass, 10):.2%}" in lines["kept"]
    assert "bytes/token)" in result.output


def test_evaluate_a_language_model_student(tmp_path, runner, lm):
    student = tmp_path / "s"
    args = ("--data", DATA, "--cache", lm[1])
    assert invoke(runner, "train-student", *args, "--student", "gpt_nano", "--loss", "kl",
                  *TRAIN, "--out", student).exit_code == 0  # fmt: skip
    out = tmp_path / "m.json"
    # On the device of the reference below: on a GPU machine auto would take CUDA's bits.
    on_cpu = ("--device", "cpu")
    result = invoke(runner, "evaluate", "--student", student, *args, *on_cpu, "--out", out)
    assert result.exit_code == 0, result.output
    import json

    metrics = json.loads(out.read_text())
    model, _ = load_checkpoint(student / "student.pt")
    with open_cache(lm[1]) as c:
        top1 = c.read(schema.TOPK_INDICES)[:, 0, 0]
    assert metrics == measure_lm(model, load_sequences(DATA), "cpu", teacher_top1=top1)
    assert f"{metrics['bits_per_token']:.4f} bits per token" in result.output


def test_a_student_from_sampled_token_targets(tmp_path, runner, lm):
    cache = tmp_path / "s.zarr"
    result = invoke(runner, "precompute-logits", "--teacher", lm[0], "--data", DATA,
                    "--sample-k", "32", "--out", cache)  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "s"
    result = invoke(runner, "train-student", "--data", DATA, "--cache", cache, "--student",
                    "gpt_nano", "--loss", "kl-sampled", "--temperature", "1", *TRAIN,
                    "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    _, info = load_checkpoint(out / "student.pt")
    assert info["log"][-1]["loss"] < info["log"][0]["loss"]
    # Each kind of targets is read by its own losses, refused by the others before training.
    other = tmp_path / "o"
    result = invoke(runner, "train-student", "--data", DATA, "--cache", cache, "--student",
                    "gpt_nano", "--loss", "kl", "--out", other)  # fmt: skip
    assert_clean_error(result, "--loss kl does not read the sampled targets", "kl-sampled")
    result = invoke(runner, "train-student", "--data", DATA, "--cache", lm[1], "--student",
                    "gpt_nano", "--loss", "kl-sampled", "--out", other)  # fmt: skip
    assert_clean_error(result, "does not read the top-k targets")
    assert not other.exists()
    # evaluate scores it without agreement: a sampled cache has no teacher top-1.
    metrics = tmp_path / "m.json"
    result = invoke(runner, "evaluate", "--student", out, "--cache", cache, "--data", DATA,
                    "--device", "cpu", "--out", metrics)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "holds sampled targets, not top-k: no top-1 agreement" in result.output
    model, _ = load_checkpoint(out / "student.pt")
    assert json.loads(metrics.read_text()) == measure_lm(model, load_sequences(DATA), "cpu")


def test_sample_data_with_a_token_cache_is_one_line(tmp_path, runner, lm, train_cache):
    """The other way round from "not a token cache": digits against a token cache."""
    result = invoke(runner, "train-student", "--data", "digits:train", "--cache", lm[1],
                    "--out", tmp_path / "s")  # fmt: skip
    assert_clean_error(
        result, f"--cache {lm[1]} is a token cache", "--data digits:train is samples"
    )
    assert not (tmp_path / "s").exists()


def test_an_interrupted_student_resumes_to_the_uninterrupted_weights(
    tmp_path, runner, lm, monkeypatch
):
    import pipeline.core.lm as lm_loop

    args = ("train-student", "--data", DATA, "--cache", lm[1], "--student", "gpt_micro",
            "--loss", "kl", "--epochs", "3", "--batch-size", "16", "--lr", "3e-3")  # fmt: skip
    out = tmp_path / "s"

    def ctrl_c_after_first_epoch(epoch, ranks):
        if epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(lm_loop, "kill_if_asked", ctrl_c_after_first_epoch)
    assert invoke(runner, *args, "--out", out).exit_code != 0  # Ctrl-C: click's Abort
    assert not out.exists() and (tmp_path / "s.resume.pt").is_file()
    assert live_series(tmp_path / "s.dvclive", "train/loss")[0][0] == 1  # epoch 1's row
    assert_clean_error(invoke(runner, *args, "--out", out), "--resume continues it")
    monkeypatch.undo()
    result = invoke(runner, *args, "--resume", "--out", out)
    assert result.exit_code == 0, result.output
    assert invoke(runner, *args, "--out", tmp_path / "whole").exit_code == 0
    resumed = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    whole = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # bit for bit
    assert [s for s, _ in live_series(out, "train/loss")] == [1, 2, 3]  # no epoch twice
    assert live_series(out, "train/loss") == live_series(tmp_path / "whole", "train/loss")
    # The checkpoint and the log are gone once the student is in; its run record stays.
    assert {p.name for p in tmp_path.glob("s.*")} == {"s.run.json"}
    assert '"resumed": true' in (tmp_path / "s.run.json").read_text()


def test_without_loss_and_temperature_a_language_model_trains_kl_at_t_1(tmp_path, runner, lm):
    out = tmp_path / "s"
    result = invoke(runner, "train-student", "--data", DATA, "--cache", lm[1], "--student",
                    "gpt_nano", "--epochs", "1", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    _, info = load_checkpoint(out / "student.pt")
    assert (info["loss"], info["temperature"], info["loss_settings"]) == ("kl", 1.0, {"alpha": 0.5})


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train-teacher", "--epochs", "1"],
            "--model cnn (the default): does not take token sequences",
        ),
        (["train-student", "--student", "mlp", "--loss", "kl"], "--student mlp: does not take"),
        (["train-student"], "the default student (mlp) takes samples: give --student"),
        (
            ["train-student", "--student", "gpt_nano", "--loss-arg", "beta=0.5"],
            "token loss kl has no setting 'beta'",  # kl: the default on sequences, not kd
        ),
        (["train-student", "--student", "gpt_nano", "--views", "2"], "--views: not available"),
        (["train-student", "--student", "gpt_nano", "--holdout", "0"], "--holdout: not available"),
    ],
)
def test_sample_models_and_options_on_sequences_are_one_line(tmp_path, runner, lm, args, message):
    cache = ["--cache", lm[1]] if args[0] == "train-student" else []
    result = invoke(runner, *args, *cache, "--data", DATA, "--out", tmp_path / "x")
    assert_clean_error(
        result, message, *(["a language model is gpt_nano"] if "take" in message else [])
    )
    assert not list(tmp_path.iterdir())


def test_what_language_models_do_not_take_yet_is_one_line(tmp_path, runner, lm):
    result = invoke(runner, "train-students", "--data", DATA, "--cache", lm[1],
                    "--out-dir", tmp_path / "many")  # fmt: skip
    assert_clean_error(result, "pystdlib is a sequence source (language models)")
    assert not (tmp_path / "s").exists()
    assert not any((tmp_path / "many").glob("*"))  # no student written (the folder is made)


def test_streamed_targets_serve_every_token_once_per_epoch_within_the_budget(lm):
    from pipeline.core.lm import Positions
    from pipeline.student.students import TrainStudentConfig
    from pipeline.student.token_targets import TokenTargetSource

    seqs = load_sequences(DATA)
    cfg = TrainStudentConfig(loss="kl", cache_memory="24KiB")
    source = TokenTargetSource(lm[1], seqs, cfg)
    assert source.streamed and len(source.windows) > 3
    where, plan = Positions(seqs), source.plan(8, 0)
    with open_cache(lm[1]) as c:
        values = c.read(schema.TOPK_VALUES)[:, 0]
        served = []
        for idx in plan.batches(1):
            _, _, rows = where.batch(idx, "cpu")
            assert np.array_equal(source.rows(schema.TOPK_VALUES, rows).numpy(), values[rows])
            held = sum(a.numel() * a.element_size() for a in source._arrays.values())
            assert held <= 12 * 1024  # one window, at most half the budget
            served.append(rows)
    served = np.concatenate(served)
    assert np.array_equal(np.sort(served), np.arange(len(values)))  # every token once
    assert sum(1 for _ in plan.batches(1)) == plan.steps
    again = np.concatenate([where.batch(i, "cpu")[2] for i in source.plan(8, 0).batches(1)])
    assert np.array_equal(again, served)  # the same order for the same seed and budget
    source.close()


def test_a_student_streams_its_targets_when_they_exceed_the_budget(tmp_path, runner, lm):
    args = ("train-student", "--data", DATA, "--cache", lm[1], "--student", "gpt_nano",
            "--loss", "kl", *TRAIN)  # fmt: skip
    result = invoke(runner, *args, "--cache-memory", "24KiB", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    _, info = load_checkpoint(tmp_path / "s" / "student.pt")
    assert info["log"][-1]["loss"] < info["log"][0]["loss"]
    result = invoke(runner, *args, "--cache-memory", "1KiB", "--out", tmp_path / "t")
    assert_clean_error(result, "'s targets alone take", "more than half of --cache-memory 1KiB")


def test_evaluate_given_a_teachers_checkpoint_says_it_takes_a_student(tmp_path, runner, lm):
    result = invoke(runner, "evaluate", "--student", lm[0], "--cache", lm[1], "--data", DATA,
                    "--out", tmp_path / "m.json")  # fmt: skip
    assert_clean_error(result, f"--student {lm[0]}: a file; give a student directory")


def test_evaluate_refuses_a_test_cache_of_another_teacher_unless_told(tmp_path, runner, lm):
    """As for sample students: agreement with a teacher the student never saw is refused,
    unless --other-teacher says that is the point; and report takes no LM metrics."""
    student, other, cache = tmp_path / "s", tmp_path / "t2.pt", tmp_path / "c2.zarr"
    assert invoke(runner, "train-student", "--data", DATA, "--cache", lm[1], "--student",
                  "gpt_nano", *TRAIN, "--out", student).exit_code == 0  # fmt: skip
    torch.manual_seed(1)
    model = create_model("gpt_nano", 256, (32,))
    save_checkpoint(other, model, {"model": "gpt_nano", "model_kwargs": {}, "num_classes": 256,
                                   "input_shape": [32]})  # fmt: skip
    assert invoke(runner, "precompute-logits", "--teacher", other, "--data", DATA, "--topk",
                  "16", "--out", cache).exit_code == 0  # fmt: skip
    out = tmp_path / "metrics" / "m.json"
    args = ("evaluate", "--student", student, "--cache", cache, "--data", DATA, "--out", out)
    assert_clean_error(invoke(runner, *args), "was made by another teacher", "--other-teacher")
    assert not out.exists()
    assert invoke(runner, *args, "--other-teacher").exit_code == 0
    result = invoke(runner, "report", "--metrics", out.parent, "--out", tmp_path / "r.md")
    assert_clean_error(result, "a language model's metrics (bits per token)")


def test_a_language_model_student_exports_and_matches(tmp_path, runner, lm):
    student = tmp_path / "s"
    assert invoke(runner, "train-student", "--data", DATA, "--cache", lm[1], "--student",
                  "gpt_nano", *TRAIN, "--out", student).exit_code == 0  # fmt: skip
    result = invoke(runner, "export", "--student", student, "--out", tmp_path / "s.pt")
    assert result.exit_code == 0, result.output
    assert "matches PyTorch on batches [1, 8]: max |diff|" in result.output
    scripted = torch.jit.load(tmp_path / "s.pt")
    model, _ = load_checkpoint(student / "student.pt")
    x = torch.randint(0, 256, (3, 32))
    with torch.no_grad():
        assert torch.allclose(scripted(x), model.eval()(x), atol=1e-5)


def test_verify_checks_a_token_caches_sequences(runner, lm):
    result = invoke(runner, "verify", lm[1], "--data", DATA)
    assert result.exit_code == 0 and f"fingerprint matches {DATA}" in result.output
    assert_clean_error(invoke(runner, "verify", lm[1], "--data", OTHER),
                       "built from other sequences than --data")  # fmt: skip
    assert_clean_error(invoke(runner, "verify", lm[1], "--data", "digits:test"),
                       "a token cache, and --data digits:test is samples")  # fmt: skip
    assert_clean_error(invoke(runner, "verify", lm[1], "--data", DATA, "--teacher", lm[0]),
                       "the spot check against a live teacher is for sample caches")  # fmt: skip
