"""The Security page (docs/security.md), one test per promise: what is safe to open from a stranger
(caches, checkpoints, weights, data files) runs no code it names, and what runs code
(factories, TorchScript, ONNX, params.yaml) is documented as such."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import layout
from pipeline.core.errors import PipelineError
from pipeline.models.checkpoint import UntrustedCode, load_checkpoint
from tests.cache.helpers import mlp_checkpoint
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

SECURITY = Path(__file__).resolve().parents[1] / "docs" / "security.md"

# A module that leaves a marker when imported and another when called: naming it anywhere in
# a file must do neither.
EVIL_MODULE = """
import pathlib
pathlib.Path({imported!r}).write_text("imported")

def boom(*args, **kwargs):
    pathlib.Path({called!r}).write_text("called")
    return None
"""


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """`evilmod.py` in the working directory, and the markers it would leave."""
    markers = {"imported": tmp_path / "imported", "called": tmp_path / "called"}
    (tmp_path / "evilmod.py").write_text(
        EVIL_MODULE.format(**{k: str(v) for k, v in markers.items()})
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield markers
    sys.modules.pop("evilmod", None)
    assert not any(m.exists() for m in markers.values()), "code named by a file ran"


def code_checkpoint(path: Path, model: str, kwargs: dict) -> Path:
    """A well-formed checkpoint whose model is `model` (code), called with `kwargs`."""
    mlp_checkpoint(path)
    payload = torch.load(path, weights_only=True)
    payload["model"], payload["model_kwargs"] = model, kwargs
    torch.save(payload, path)
    return path


def malicious(tmp_path: Path, evil: dict, which: str) -> tuple[str, dict, Path]:
    """The issue's checkpoint (`subprocess:getoutput` running a command that would create a
    marker), or one naming `evilmod:boom`, whose import alone leaves a marker."""
    if which == "subprocess":
        marker = tmp_path / "touched"
        evil["touched"] = marker
        return "subprocess:getoutput", {"cmd": f"touch {marker}"}, marker
    return "evilmod:boom", {"cmd": "anything"}, evil["called"]


def commands(ckpt: Path, student: Path, tmp_path: Path, test_cache: Path) -> dict[str, list]:
    return {
        "layers": ["layers", ckpt, "--data", "digits:test"],
        "precompute": ["precompute-logits", "--teacher", ckpt, "--data", "digits:test",
                       "--out", tmp_path / "c.zarr"],
        "evaluate": ["evaluate", "--student", student, "--cache", test_cache,
                     "--data", "digits:test", "--out", tmp_path / "m.json"],
        "export": ["export", "--student", student, "--out", tmp_path / "s.pt"],
    }  # fmt: skip


@pytest.mark.parametrize("which", ["subprocess", "evilmod"])
@pytest.mark.parametrize("command", ["layers", "precompute", "evaluate", "export"])
def test_a_checkpoint_naming_code_is_refused_by_every_command(
    evil, tmp_path, runner, test_cache, which, command
):
    model, kwargs, marker = malicious(tmp_path, evil, which)
    student = tmp_path / "student"
    student.mkdir()
    ckpt = code_checkpoint(student / "student.pt", model, kwargs)
    args = commands(ckpt, student, tmp_path, test_cache)[command]
    result = invoke(runner, *args)
    # One line naming the file and the code, saying what to type to run it anyway.
    trust = f"{model}@{ckpt}" if command in ("layers", "precompute") else f"--model {model}"
    assert_clean_error(result, str(ckpt), f"'{model}'", "may not run code", trust)
    assert not marker.exists() and "evilmod" not in sys.modules
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("c.zarr", "m.", "s."))]


def test_trusting_other_code_does_not_trust_the_file_s(evil, tmp_path):
    ckpt = code_checkpoint(tmp_path / "x.pt", "evilmod:boom", {})
    refusal = r"is the code 'evilmod:boom', not 'mine:net' \(--model\)"
    with pytest.raises(UntrustedCode, match=refusal):
        load_checkpoint(ckpt, code="mine:net")
    assert "evilmod" not in sys.modules


@pytest.mark.parametrize(
    "kwargs",
    [{"hidden": torch.tensor([8])}, {"hidden": [[[[[[[[[[8]]]]]]]]]]}, {"f": {"x": torch.ones(1)}}],
)
def test_a_registry_model_gets_only_plain_keyword_arguments(tmp_path, kwargs):
    ckpt = code_checkpoint(tmp_path / "x.pt", "mlp", kwargs)
    with pytest.raises(PipelineError, match=r"model_kwargs is .*holding plain data"):
        load_checkpoint(ckpt)


def test_a_name_outside_the_registry_never_reaches_an_import(tmp_path, monkeypatch):
    """Only a `package.module:function` is ever imported, and only when the user named it;
    any other name from a file is looked up in the registry and nowhere else."""
    from pipeline.core import usercode

    def no_import(*args, **kwargs):
        raise AssertionError("a checkpoint led to an import")

    monkeypatch.setattr(usercode, "import_module", no_import)
    names = ("os.path", "os:system ", "builtins.eval", "../evilmod.py", "evilmod:boom")
    for i, name in enumerate(names):
        ckpt = code_checkpoint(tmp_path / f"x{i}.pt", name, {})
        with pytest.raises(PipelineError, match=re.escape(str(ckpt))):
            load_checkpoint(ckpt)


class _RunsCodeWhenUnpickled:
    """An object whose unpickling would create the file `path` (open in write mode)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoints_and_weights_load_with_weights_only(tmp_path, runner, monkeypatch):
    marker = tmp_path / "unpickled"
    ckpt = mlp_checkpoint(tmp_path / "x.pt")
    payload = torch.load(ckpt, weights_only=True)
    payload["class_names"] = _RunsCodeWhenUnpickled(marker)
    torch.save(payload, ckpt)
    with pytest.raises(PipelineError, match="not a readable checkpoint"):
        load_checkpoint(ckpt)
    (tmp_path / "mynet.py").write_text(
        "import torch\ndef net():\n    return torch.nn.Linear(64, 10)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke(runner, "layers", f"mynet:net@{ckpt}", "--data", "digits:test")
    sys.modules.pop("mynet", None)
    assert_clean_error(result, "is not a readable state dict")
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    """The promise holds for every file torch reads (checkpoints, factory weights, resume
    checkpoints), not only the ones a test opens."""
    root = Path(__file__).resolve().parents[1]
    calls = [
        (path.name, call)
        for path in [*root.glob("pipeline/**/*.py"), *root.glob("stages/*.py")]
        for call in re.findall(r"torch\.load\((.*?)\)\n", path.read_text(), re.S)
    ]
    assert len(calls) >= 4, calls  # checkpoint, factory weights, resume (twice)
    for name, call in calls:
        assert "weights_only=True" in call, f"{name}: torch.load({call})"


def test_a_cache_s_attributes_naming_code_are_never_run(evil, tmp_path, runner, test_cache):
    """A cache records its teachers' sources as text; no command reads them as code."""
    teacher = mlp_checkpoint(tmp_path / "t.pt")
    cache = tmp_path / "c.zarr"
    assert invoke(runner, "precompute-logits", "--teacher", teacher, "--data", "digits:test",
               "--out", cache).exit_code == 0  # fmt: skip
    meta = json.loads((cache / "zarr.json").read_text())
    attrs = meta["attributes"]
    attrs["teacher"]["members"][0].update(source="evilmod:boom@t.pt", kind="factory")
    attrs["params"]["teachers"] = ["evilmod:boom"]
    attrs["codec"] = attrs["model"] = "evilmod:boom"
    attrs["attrs_digest"] = layout.attrs_digest(attrs)  # forged whole: the digest matches
    (cache / "zarr.json").write_text(json.dumps(meta))
    for args in (
        ["inspect", cache],
        ["verify", cache, "--data", "digits:test"],
        ["train-student", "--cache", cache, "--data", "digits:test", "--out", tmp_path / "s",
         "--epochs", "1"],
    ):  # fmt: skip
        result = invoke(runner, *args)
        assert result.exit_code == 0, result.output
    assert "evilmod" not in sys.modules


@pytest.mark.parametrize("codec", ["evilmod:boom", "evilmod.boom", "numcodecs.pickle"])
def test_a_zarr_codec_naming_code_is_refused_without_import(evil, tmp_path, runner, codec):
    """zarr resolves a codec only among the installed ones (none unpickles); any other name
    in zarr.json is refused before a chunk is decoded, and nothing is imported."""
    teacher = mlp_checkpoint(tmp_path / "t.pt")
    cache = tmp_path / "c.zarr"
    assert invoke(runner, "precompute-logits", "--teacher", teacher, "--data", "digits:test",
                  "--out", cache).exit_code == 0  # fmt: skip
    array = cache / "logits" / "zarr.json"
    meta = json.loads(array.read_text())
    meta["codecs"][0]["configuration"]["codecs"].insert(1, {"name": codec})
    array.write_text(json.dumps(meta))
    for args in (
        ["verify", cache],
        ["train-student", "--cache", cache, "--data", "digits:test", "--out", tmp_path / "s",
         "--epochs", "1"],
    ):  # fmt: skip
        result = invoke(runner, *args)
        assert_clean_error(result, f"cache {cache}", "damaged", "Unknown codec")
        assert "unexpected error" not in result.output
    assert not (tmp_path / "s").exists() and "evilmod" not in sys.modules


def test_data_files_never_unpickle(tmp_path, runner):
    """An .npz object array would need pickle, which is never enabled (CIFAR batches go
    through an unpickler of plain data: tests/test_data_sources.py)."""
    marker = tmp_path / "unpickled"
    objects = np.empty(2, dtype=object)
    objects[:] = [_RunsCodeWhenUnpickled(marker), 1]
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4), np.float32), class_names=objects)
    result = invoke(runner, "layers", mlp_checkpoint(tmp_path / "t.pt"),
                    "--data", f"npz:{tmp_path / 'd.npz'}")  # fmt: skip
    assert_clean_error(result, "array 'class_names' holds Python objects")
    assert not marker.exists()


def _security_rows() -> dict[str, str]:
    """The Security table of docs/security.md: first cell (what) → the whole row."""
    text = SECURITY.read_text()
    section = text.split("# Security\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return {row.split("|")[1].strip(): row for row in rows[1:]}


@pytest.mark.parametrize(
    "what, says",
    [
        ("Caches", "yes"),
        ("Checkpoints", "yes"),
        ("The model a checkpoint names", "yes"),
        ("Data files", "yes"),
        ("Python factories and losses", "no: runs code"),
        ("TorchScript files", "no: runs code"),
        ("ONNX models", "no: runs code"),
        ("params.yaml and dvc.yaml", "no: runs code"),
    ],
)
def test_what_runs_code_is_documented_as_running_code(what, says):
    """The Security table says which files are safe from a stranger and which run code."""
    (row,) = [r for k, r in _security_rows().items() if k.startswith(what)]
    assert row.split("|")[2].strip() == says, row


def test_every_security_promise_names_a_test_that_exists():
    """Each row of the Security table cites tests; each cited test exists."""
    root = SECURITY.parents[1]
    rows = _security_rows()
    assert len(rows) >= 8, sorted(rows)
    for row in rows.values():
        cited = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", row)
        assert cited, row
        for path, name in cited:
            source = (root / path).read_text()
            assert not name or f"def {name}(" in source, (path, name)


def test_a_torchscript_file_is_never_opened_as_a_checkpoint(tmp_path):
    """TorchScript runs code: only a --teacher the user names is loaded as one; a student
    directory (or checkpoint) holding a TorchScript archive is refused, not run."""
    student = tmp_path / "student"
    student.mkdir()
    torch.jit.save(torch.jit.script(torch.nn.Linear(64, 10)), str(student / "student.pt"))
    with pytest.raises(PipelineError, match="not a readable checkpoint"):
        load_checkpoint(student / "student.pt")
