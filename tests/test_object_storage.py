"""Caches on object storage: precompute writes a Zarr cache to s3:// (a local moto server
started by the test), train-student reads it, inspect and verify check it."""

import json

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.core.config import PrecomputeConfig
from pipeline.models.checkpoint import load_checkpoint
from stages import precompute_logits
from tests.cache.helpers import stable_attrs
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

pytest_plugins = ["tests.s3server"]
LAYOUT = ["--chunk-rows", "16", "--chunks-per-shard", "2"]


def precompute_args(teacher, out, *extra) -> list[str]:
    return [
        "precompute-logits", "--teacher", str(teacher), "--data", "digits:test",
        "--out", str(out), *LAYOUT, *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_precompute_to_s3_then_inspect_verify_and_read(runner, s3_server, teacher_ckpt, tmp_path):
    url = s3_server.make_bucket("kd-caches") + "/teacher/test.zarr"
    result = invoke(runner, *precompute_args(teacher_ckpt, url))
    assert result.exit_code == 0, result.output
    keys = s3_server.keys("kd-caches")
    assert "teacher/test.zarr/zarr.json" in keys
    assert not [k for k in keys if ".partial" in k or "/progress/" in k]

    local = precompute_logits.run(
        PrecomputeConfig(chunk_rows=16, chunks_per_shard=2), [str(teacher_ckpt)],
        "digits:test", tmp_path / "local.zarr",
    )  # fmt: skip
    with open_cache(url) as remote, open_cache(local) as here:
        assert remote.complete
        np.testing.assert_array_equal(remote.read("logits"), here.read("logits"))
        assert stable_attrs(remote.attrs) == stable_attrs(here.attrs)

    result = invoke(runner, "verify", url, "--data", "digits:test")
    assert result.exit_code == 0, result.output
    assert "ok (zarr, 360 samples" in result.output and "fingerprint matches" in result.output
    result = invoke(runner, "inspect", url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["path"] == url

    # A student trained from the cache on S3 is the student trained from the local copy.
    students = {}
    for name, cache in (("remote", url), ("local", local)):
        students[name] = tmp_path / name
        result = invoke(
            runner, "train-student", "--cache", str(cache), "--data", "digits:test",
            "--out", str(students[name]), "--student", "mlp", "--model-kwargs",
            '{"hidden": [16]}', "--epochs", "2", "--loss", "kd", "--seed", "0",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    remote_info = json.loads((students["remote"] / "student.json").read_text())
    assert remote_info["cache"]["path"] == url
    a, _ = load_checkpoint(students["remote"] / "student.pt")
    b, _ = load_checkpoint(students["local"] / "student.pt")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name

    # convert-cache both ways: S3 Zarr -> local HDF5 -> S3 Zarr, the same logits.
    h5 = tmp_path / "copy.h5"
    back = url.replace("test.zarr", "copy.zarr")
    for src, dst in ((url, h5), (h5, back)):
        result = invoke(runner, "convert-cache", str(src), str(dst))
        assert result.exit_code == 0, result.output
    with open_cache(back) as again, open_cache(local) as here:
        np.testing.assert_array_equal(again.read("logits"), here.read("logits"))
    assert not [k for k in s3_server.keys("kd-caches") if ".tmp-" in k]


@pytest.mark.slow
def test_a_killed_run_on_s3_resumes_and_an_hdf5_url_is_refused(
    runner, s3_server, teacher_ckpt, tmp_path, monkeypatch
):
    from pipeline.teacher import shards as shards_lib
    from tests.cache.helpers import ctrl_c_at_forward

    url = s3_server.make_bucket("kd-resume") + "/c.zarr"
    forward = ctrl_c_at_forward(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        precompute_logits.run(
            PrecomputeConfig(chunk_rows=16, chunks_per_shard=2), [str(teacher_ckpt)],
            "digits:test", url,
        )  # fmt: skip
    keys = s3_server.keys("kd-resume")
    assert not [k for k in keys if k.startswith("c.zarr/")]  # no cache until it is complete
    assert "c.zarr.partial/progress/shard-0.json" in keys
    monkeypatch.setattr(shards_lib, "_forward", forward)
    result = invoke(runner, *precompute_args(teacher_ckpt, url))
    assert result.exit_code == 0, result.output
    with open_cache(url) as cache:
        assert cache.complete and np.isfinite(cache.read("logits")).all()

    result = invoke(runner, *precompute_args(teacher_ckpt, url))
    assert_clean_error(result, f"{url} already exists (pass --overwrite")
    result = invoke(runner, *precompute_args(teacher_ckpt, "s3://kd-resume/c.h5"))
    assert_clean_error(result, "HDF5 caches are local files only")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("s3:/bucket/t.zarr", "did you mean s3://bucket/t.zarr?"),
        ("s3://", "a URL with no path"),
        ("s3://bucket", "give a path inside the bucket"),
        ("s4://bucket/t.zarr", "not a storage URL fsspec knows"),
        ("s3://bucket/t.h5", "HDF5 caches are local files only"),
    ],
)
def test_a_mistyped_url_is_one_line_and_writes_nothing_local(
    runner, teacher_ckpt, tmp_path, monkeypatch, url, fragment
):
    monkeypatch.chdir(tmp_path)  # a URL taken for a path would create ./s3: here
    result = invoke(runner, *precompute_args(teacher_ckpt, url))
    assert_clean_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_readme_s3_tryout(tmp_path):
    """docs/scale-out.md's local S3 try-out, run as pasted (bash, in a scratch directory), on a free
    port instead of 5555 so that it cannot meet another server."""
    import os
    import re
    import socket
    import sys
    from pathlib import Path

    from tests import procs
    from tests.s3server import UNSET

    pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
    readme = (Path(__file__).resolve().parents[1] / "docs/scale-out.md").read_text()
    (block,) = re.findall(r"```bash\n(moto_server .*?)```", readme, re.S)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "tryout.sh"
    script.write_text("set -euo pipefail\n" + block.replace("5555", str(port)))
    env = {k: v for k, v in os.environ.items() if k not in UNSET and not k.startswith("AWS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    empty = tmp_path / "empty"  # no developer ~/.aws changes what the block does
    empty.write_text("")
    env |= {"AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)}
    scratch = tmp_path / "kd-scratch"
    scratch.mkdir()
    result = procs.run(["bash", str(script)], cwd=scratch, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cache written to s3://kd-scratch/train.zarr" in result.stdout
    assert "s3://kd-scratch/train.zarr: ok (zarr, 1437 samples" in result.stdout
    assert "student written to s3-student" in result.stdout
    assert (scratch / "s3-student" / "student.pt").is_file()
