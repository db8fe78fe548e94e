"""End to end: `dvc repro` on the built-in default, in a fresh temporary git repo."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests import procs

ROOT = Path(__file__).resolve().parents[1]
REPRO_TIMEOUT = 1800  # the whole default pipeline: about 90 s on an idle 2-core machine


def run(cmd, cwd, env, timeout: float = procs.TIMEOUT):
    result = procs.run(cmd, cwd=cwd, env=env, timeout=timeout)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout}\n{result.stderr}"
    return result


def git_and_dvc(repo: Path, plots: bool = False) -> tuple[dict[str, str], list[str]]:
    """Make `repo` (its files copied in) a git and DVC repository with one commit; returns
    the environment its commands run in and the dvc command. `plots`: with the project's
    custom plot templates."""
    env = {
        # Bytecode writing on, as on users' machines: __pycache__ must not change a stage.
        **{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # The repo's own copy of the code runs (as for a user whose install is the repo).
        "PYTHONPATH": str(repo),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1",
    }
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], repo, env)
    run([*dvc, "init", "-q"], repo, env)
    if plots:
        shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots")
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "init"], repo, env)
    return env, dvc


@pytest.mark.slow
def test_dvc_repro_on_the_default(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    env, dvc = git_and_dvc(repo, plots=True)
    run([*dvc, "repro"], repo, env, timeout=REPRO_TIMEOUT)

    assert (repo / "dvc.lock").is_file()
    assert (repo / "models/teacher.pt").is_file()
    assert (repo / "caches/train.zarr/zarr.json").is_file()
    sidecars = (".info.json", ".run.json")
    files = [p for p in (repo / "metrics").glob("*.json") if not p.name.endswith(sidecars)]
    metrics = {p.stem: json.loads(p.read_text()) for p in files}
    # metrics files hold numbers only (what `dvc exp show` lists); the rest is in sidecars.
    assert all(isinstance(v, (int, float)) for m in metrics.values() for v in m.values())
    # The matrix: sweep.students x sweep.losses x sweep.temperatures, plus a CE baseline.
    students = {f"mlp-{loss}-t{t}" for loss in ("kd", "dkd", "dist") for t in (2, 4)}
    assert set(metrics) == students | {"mlp-ce"}
    summary = (repo / "reports/summary.md").read_text()
    assert "| teacher |" in summary and "student `mlp-ce` (baseline) | ce |" in summary

    # The promise of the default: distillation beats plain training by >= 5 points at 10% labels.
    best_kd = max(metrics["mlp-kd-t4"]["accuracy"], metrics["mlp-kd-t2"]["accuracy"])
    assert best_kd >= metrics["mlp-ce"]["accuracy"] + 0.05
    gain = re.search(r"([+-]\d+\.\d+) points", summary)
    assert gain and float(gain.group(1)) >= 5.0
    assert "## Dark knowledge" in summary
    for png in ("accuracy_vs_temperature.png", "accuracy_vs_params.png", "dark_knowledge.png"):
        assert (repo / "reports/plots" / png).read_bytes()[:4] == b"\x89PNG"
    shown = json.loads(run([*dvc, "plots", "show", "--json"], repo, env).stdout)
    assert not shown.get("errors") and len(shown["data"]) == 7
    # The training curves: every student's held-out accuracy at every epoch, from DVCLive.
    (curves,) = [v for k, v in shown["data"].items() if k.startswith("Held-out accuracy")]
    points = curves[0]["content"]["data"]["values"]
    assert {p["student"] for p in points} == students | {"mlp-ce"}
    assert len([p for p in points if p["student"] == "mlp-kd-t4"]) == 60  # train_student.epochs
    assert (repo / "students/mlp-kd-t4/dvclive/plots/metrics/heldout/accuracy.tsv").is_file()

    # `dvc exp show` lists one small metrics file (each student's accuracy and agreement),
    # the params and the code deps; the full per-student metrics stay in metrics/.
    table = run([*dvc, "exp", "show", "--csv"], repo, env).stdout.splitlines()[0].split(",")
    assert {"best", "gain", "ce", "kd@4", "teacher", "agreement.kd@4"} <= set(table)
    assert not [c for c in table if "latency_ms" in c or "top5" in c or c.endswith(".json")]
    headline = json.loads((repo / "reports/metrics.json").read_text())
    assert headline["kd@4"] == round(metrics["mlp-kd-t4"]["accuracy"], 3)
    assert headline["best"] in {f"{loss}@{t}" for loss in ("kd", "dkd", "dist") for t in (2, 4)}
    assert len(table) <= 115, len(table)
    # docs/dvc.md's dvc exp show lines fit an 80-column terminal: nothing collapsed to "…".
    for keep in ("Experiment|best|gain|ce|teacher", r"Experiment|\w+@"):
        args = [*dvc, "exp", "show", "--no-pager", "--drop", ".*", "--keep", keep]
        shown = run(args, repo, {**env, "COLUMNS": "80"}).stdout
        assert "…" not in shown and max(map(len, shown.splitlines())) <= 80, shown

    # Nothing changed: the pipeline is up to date and a second repro reruns nothing, although
    # the first one wrote bytecode inside pipeline/ (__pycache__, ignored by .dvcignore).
    assert list((repo / "pipeline").glob("__pycache__/*.pyc"))
    assert "up to date" in run([*dvc, "status"], repo, env).stdout.lower()
    assert "Running stage" not in run([*dvc, "repro"], repo, env).stdout

    # Artifacts are a function of their inputs: a stage of every kind forced to run again
    # writes the same bytes (dvc.lock holds the hash of every output; the other students
    # and evaluations run the same code as the ones here), while the run records beside them
    # (time, threads, latency: they differ) are hashed by neither DVC nor git.
    lock = (repo / "dvc.lock").read_text()
    records = ["models/teacher.pt", "caches/train.zarr", "students/mlp-kd-t4", "metrics/mlp-kd-t4"]
    assert all(json.loads((repo / f"{r}.run.json").read_text())["machine"] for r in records)
    each_kind = ["train_teacher", "precompute_logits@train", "precompute_logits@test",
                 "train_student@mlp-dkd-4", "train_baseline@mlp", "evaluate@mlp-kd-4",
                 "evaluate_baseline@mlp", "report"]  # fmt: skip
    forced = run([*dvc, "repro", "-f", "-s", *each_kind], repo, env, timeout=REPRO_TIMEOUT)
    assert forced.stdout.count("Running stage") == len(each_kind), forced.stdout
    assert (repo / "dvc.lock").read_text() == lock
    assert "up to date" in run([*dvc, "status"], repo, env).stdout.lower()
    assert ".run.json" not in run(["git", "status", "--porcelain"], repo, env).stdout

    # Every other command, run in the repo as a user would, leaves the pipeline up to date.
    scratch = tmp_path / "scratch"
    pipeline = [sys.executable, "-m", "pipeline"]
    for args in (
        ["inspect", "caches/train.zarr"],
        ["verify", "caches/test.zarr", "--data", "digits:test"],
        ["models"],
        ["losses"],
        ["sources"],
        ["export", "--student", "students/mlp-kd-t4", "--out", scratch / "kd.pt"],
        ["show-targets", "caches/test.zarr", "--out", scratch / "fig.png"],
        ["convert-cache", "caches/test.zarr", scratch / "test.h5"],
    ):
        run([*pipeline, *map(str, args)], repo, env)
    assert "up to date" in run([*dvc, "status"], repo, env).stdout.lower()

    # A typo in params.yaml (as `dvc exp run -S losses.dkd.beta=abc` writes it) stops the run
    # at check_params, the first stage, before DVC deletes any stage's outputs.
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("beta: 8.0", "beta: abc"))
    typo = procs.run([*dvc, "repro"], cwd=repo, env=env)
    assert typo.returncode != 0
    assert "params.yaml:losses.dkd.beta: expected a number, got 'abc'" in typo.stdout + typo.stderr
    assert "Running stage 'check_params'" in typo.stdout and typo.stdout.count("Running stage") == 1
    assert (repo / "students/mlp-dkd-t2/student.pt").is_file()
    (repo / "params.yaml").write_text(params)
    assert "up to date" in run([*dvc, "status"], repo, env).stdout.lower()

    # Editing a loss re-runs the students, their evaluation and the report: never the teacher
    # or its caches ("run the teacher once").
    with open(repo / "pipeline/student/losses.py", "a") as f:
        f.write("# edited\n")
    changed = _changed_stages(run([*dvc, "status", "--json"], repo, env).stdout)
    assert changed and not {s for s in changed if s.startswith(("train_teacher", "precompute"))}
    assert {s.split("@")[0] for s in changed} == {
        "check_params", "train_student", "train_baseline", "evaluate", "evaluate_baseline",
        "report",
    }  # fmt: skip


def _changed_stages(status_json: str) -> set[str]:
    """Stage names in `dvc status --json` (keys are 'dvc.yaml:NAME' or 'NAME')."""
    return {key.split(":")[-1] for key in json.loads(status_json)}


@pytest.mark.slow
def test_dvc_repro_of_the_language_model_example(tmp_path):
    """examples/lm (docs/sequences.md runs it as `dvc repro examples/lm/dvc.yaml`): teacher,
    token caches, a student from the cache and one on the bytes alone, evaluated; made
    smaller here (fewer sequences and epochs) for the suite's time."""
    repo = tmp_path / "repo"
    (repo / "examples").mkdir(parents=True)
    for name in ("pipeline", "stages", "examples/lm"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    lm = repo / "examples/lm"
    dvc_yaml = (lm / "dvc.yaml").read_text()
    assert "limit=2000" in dvc_yaml and "limit=300" in dvc_yaml
    small = dvc_yaml.replace("limit=2000", "limit=160").replace("limit=300", "limit=40")
    (lm / "dvc.yaml").write_text(small)
    (lm / "params.yaml").write_text(
        (lm / "params.yaml").read_text().replace("epochs: 6", "epochs: 2")
    )
    env, dvc = git_and_dvc(repo)
    run([*dvc, "repro", "examples/lm/dvc.yaml"], repo, env, timeout=REPRO_TIMEOUT)

    metrics = {n: json.loads((lm / f"metrics/lm-{n}.json").read_text()) for n in ("kl", "ce")}
    for m in metrics.values():
        assert 0 < m["bits_per_token"] < 8 and 0 <= m["top1_agreement"] <= 1 and m["tokens"] > 0
    with_teacher = lm / "students/lm-kl/dvclive/plots/metrics/train/loss.tsv"
    assert len(with_teacher.read_text().splitlines()) == 1 + 2  # a header and two epochs
    status = run([*dvc, "status", "examples/lm/dvc.yaml"], repo, env).stdout.lower()
    assert "up to date" in status
