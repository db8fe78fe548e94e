"""DVC remotes: teacher caches and a student pushed to a remote, wiped, and pulled back byte
for byte, through a local directory remote and through S3 (a moto server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from pipeline.core.config import PrecomputeConfig
from pipeline.student.students import TrainStudentConfig
from tests.test_dvc_e2e import run

pytest_plugins = ["tests.s3server"]

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
# What DVC tracks here: two teacher caches (Zarr directories) and a student directory.
TRACKED = ("caches/train.zarr", "caches/test.zarr", "students/mlp")


@pytest.fixture(scope="module")
def committed_repo(tmp_path_factory, teacher_ckpt, train_cache) -> Path:
    """A git + DVC repo whose TRACKED outputs are `dvc add`ed and committed (built once)."""
    from stages import precompute_logits, train_student

    repo = tmp_path_factory.mktemp("dvc_remote") / "repo"
    (repo / "caches").mkdir(parents=True)
    shutil.copytree(train_cache, repo / "caches/train.zarr")
    precompute_logits.run(
        PrecomputeConfig(), [str(teacher_ckpt)], "digits:test", repo / "caches/test.zarr"
    )
    cfg = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [8]}, epochs=1)
    train_student.run(cfg, repo / "caches/train.zarr", "digits:train", repo / "students/mlp")
    env = git_env()
    run(["git", "init", "-q"], repo, env)
    run([*DVC, "init", "-q"], repo, env)
    run([*DVC, "add", "-q", *TRACKED], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "caches and a student"], repo, env)
    return repo


@pytest.fixture
def repo(committed_repo, tmp_path) -> Path:
    """This test's own copy of `committed_repo` (outputs, .git and .dvc/cache included)."""
    return Path(shutil.copytree(committed_repo, tmp_path / "repo", symlinks=True))


def git_env() -> dict[str, str]:
    """The environment of every subprocess: this venv's tools first, this checkout's code."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),  # `python -m pipeline` runs this checkout
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1",
    }


def tree_digests(repo: Path) -> dict[str, str]:
    """sha256 of every file under the TRACKED outputs, by path relative to `repo`."""
    files = [p for name in TRACKED for p in (repo / name).rglob("*") if p.is_file()]
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def round_trip(repo: Path, env: dict[str, str], remote: str) -> None:
    """Push every tracked output to `remote`, delete the outputs and DVC's cache, pull them
    back, and check that every file is byte-identical and the test cache still verifies."""
    before = tree_digests(repo)
    assert len(before) > 10 and any(k.startswith("students/") for k in before)
    run([*DVC, "push", "-r", remote], repo, env)
    status = run([*DVC, "status", "--cloud", "--remote", remote], repo, env).stdout
    assert f"Cache and remote '{remote}' are in sync" in status, status

    for name in (*TRACKED, ".dvc/cache"):
        shutil.rmtree(repo / name)
    run([*DVC, "pull", "-r", remote], repo, env)
    assert tree_digests(repo) == before
    verify = ["verify", "caches/test.zarr", "--data", "digits:test"]
    run([sys.executable, "-m", "pipeline", *verify], repo, env)


@pytest.mark.slow
def test_local_directory_remote(repo, tmp_path):
    env = git_env()
    remote = tmp_path / "remote"  # any directory: a mounted share, an NFS path
    run([*DVC, "remote", "add", "-d", "local", str(remote)], repo, env)
    round_trip(repo, env, "local")
    assert list((remote / "files/md5").rglob("*"))  # the objects really are in the remote


@pytest.mark.slow
def test_s3_remote(repo, s3_server):
    s3_server.make_bucket("kd-remote")
    # No endpoint and no credentials in dvc's environment (only the empty AWS config files):
    # the `endpointurl` setting and the `--local` credentials are what reach the server.
    aws = s3_server.env
    env = {k: v for k, v in git_env().items() if not k.startswith("AWS_")}
    env.update({k: aws[k] for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")})
    for args in (
        ["add", "-d", "s3", "s3://kd-remote/dvcstore"],
        ["modify", "s3", "endpointurl", s3_server.endpoint],
        ["modify", "--local", "s3", "access_key_id", aws["AWS_ACCESS_KEY_ID"]],
        ["modify", "--local", "s3", "secret_access_key", aws["AWS_SECRET_ACCESS_KEY"]],
    ):
        run([*DVC, "remote", *args], repo, env)
    # The credentials stay out of git: DVC's own .dvc/.gitignore lists config.local.
    assert "config.local" not in run(["git", "status", "--porcelain"], repo, env).stdout
    round_trip(repo, env, "s3")
    assert s3_server.keys("kd-remote", "dvcstore/files/md5/")
