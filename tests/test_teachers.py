"""Teacher sources: train-teacher checkpoints, TorchScript, Python factories, ONNX.

For each form the cached logits are the teacher's own outputs on the same inputs (ONNX within
1e-5 of the torch model it was exported from), the provenance names the file and its sha256,
and a student trains from the cache. Bad teachers fail with one line before the run starts.
"""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.core.fsutil import sha256_file
from pipeline.models.checkpoint import load_checkpoint
from pipeline.teacher.teachers import load_teacher, load_teachers
from tests.conftest import invoke
from tests.formats import (
    assert_one_line_error,
    export_onnx,
    precompute,
    save_torchscript,
    tiny_net,
    write_factory,
)
from tests.reference import teacher_forward

SHAPE = (2, 6, 6)


@pytest.fixture
def data(tmp_path) -> str:
    """A labelled npz transfer set of 10 samples (2, 6, 6) in 3 classes, with its own ids."""
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        x=rng.normal(size=(10, *SHAPE)).astype(np.float32),
        y=np.arange(10) % 3,
        ids=np.arange(100, 110),
    )
    return f"npz:{tmp_path / 'data.npz'}"


@pytest.fixture
def factory(tmp_path, monkeypatch, request) -> str:
    """A factory module in tmp_path, importable from the working directory; its name."""
    name = "kd_factory_" + "".join(c if c.isalnum() else "_" for c in request.node.name)
    write_factory(tmp_path, name, channels=SHAPE[0])
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def _teacher(kind: str, tmp_path, factory: str, data: str, runner):
    """(source string, the torch module it should compute, the file its sha256 is of)."""
    if kind == "checkpoint":
        out = tmp_path / "teacher.pt"
        args = ["--data", data, "--model", "cnn", "--epochs", "1", "--out", out]
        assert invoke(runner, "train-teacher", *args).exit_code == 0
        return str(out), load_checkpoint(out)[0], out
    if kind == "torchscript":
        model = tiny_net(SHAPE[0], seed=1)
        path = save_torchscript(model, tmp_path / "scripted.pt")
        return str(path), model, path
    if kind == "factory":
        # The reference comes from the same file under another name, leaving the pipeline to
        # find the module from the working directory on its own.
        spec = importlib.util.spec_from_file_location("reference", tmp_path / f"{factory}.py")
        code = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(code)
        model = code.build()  # seeded: the weights the pipeline's call makes too
        return f"{factory}:build", model, tmp_path / f"{factory}.py"
    if kind == "factory-weights":
        model = tiny_net(SHAPE[0], seed=2)  # same layer names as the factory's Net
        torch.save(model.state_dict(), tmp_path / "weights.pt")
        return f"{factory}:build@weights.pt", model, tmp_path / "weights.pt"
    if kind == "onnx":
        model = tiny_net(SHAPE[0], seed=3)
        path = export_onnx(model, tmp_path / "teacher.onnx", SHAPE)
        return str(path), model, path
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["checkpoint", "torchscript", "factory", "factory-weights", "onnx"]
)
def test_cached_logits_are_the_teachers_own_and_a_student_trains(
    tmp_path, runner, data, factory, kind
):
    if kind == "onnx":
        pytest.importorskip("onnxruntime")
    source, model, weights_file = _teacher(kind, tmp_path, factory, data, runner)
    cache = tmp_path / "cache.zarr"
    result = precompute(runner, source, data, cache)
    assert result.exit_code == 0, result.output

    from pipeline.data import load_transfer_set

    ts = load_transfer_set(data)
    with open_cache(cache) as c:
        logits = c.logits()[:, 0]
        expected = teacher_forward(model, ts.inputs, c.attrs["shard_rows"])  # (10, 3)
        np.testing.assert_array_equal(c.sample_ids, np.arange(100, 110))
        member = c.attrs["teacher"]["members"][0]
    if kind == "onnx":  # another runtime: equal within float32 rounding
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    else:
        np.testing.assert_array_equal(logits, expected)
    assert member["source"] == source
    assert member["sha256"] == sha256_file(weights_file)
    # Every file the outputs depend on: a factory's code beside its weights.
    code = {f"{factory}:build": sha256_file(tmp_path / f"{factory}.py")}
    files = {
        "factory": code,
        "factory-weights": {"weights.pt": sha256_file(weights_file), **code},  # as given
    }.get(kind, {source: sha256_file(weights_file)})
    assert member["files"] == files
    assert member["num_classes"] == 3
    assert member.get("kind", "checkpoint") == kind.split("-")[0]
    assert member["num_params"] == sum(p.numel() for p in model.parameters())

    student = tmp_path / "student"
    args = ["--cache", cache, "--data", data, "--out", student, "--student", "mlp"]
    result = invoke(runner, "train-student", *args, "--epochs", "2", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    trained, info = load_checkpoint(student / "student.pt")
    with torch.inference_mode():
        out = trained(torch.from_numpy(np.ascontiguousarray(ts.inputs)))
    assert info["num_classes"] == 3 and out.shape == (10, 3)


def test_an_ensemble_mixes_forms(tmp_path, data, factory):
    pytest.importorskip("onnxruntime")
    scripted = save_torchscript(tiny_net(2, seed=1), tmp_path / "s.pt")
    onnx = export_onnx(tiny_net(2, seed=3), tmp_path / "t.onnx", SHAPE)
    from pipeline.data import load_transfer_set

    probe = load_transfer_set(data).inputs[:4]
    members = load_teachers([str(scripted), str(onnx), f"{factory}:build"], probe)
    assert [t.kind for t in members] == ["torchscript", "onnx", "factory"]
    assert [t.num_classes for t in members] == [3, 3, 3]  # learnt from the probe
    assert members[1].input_shape == SHAPE  # declared by the ONNX graph


def test_a_factory_module_can_declare_its_input_shape_and_class_names(tmp_path, monkeypatch):
    (tmp_path / "kd_declared.py").write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))\n"
        "    net.input_shape = (1, 2, 2)\n"
        "    net.class_names = ['cat', 'dog']\n"
        "    return net\n"
    )
    monkeypatch.chdir(tmp_path)
    try:
        t = load_teacher("kd_declared:build")
    finally:
        sys.modules.pop("kd_declared", None)
    assert t.input_shape == (1, 2, 2) and t.class_names == ["cat", "dog"]
    assert t.sha256 == sha256_file(tmp_path / "kd_declared.py")  # no weights: the code is it


# --- bad teachers: one line, non-zero exit, before the long run -------------------------------


def _precompute(runner, tmp_path, teacher, data):
    result = precompute(runner, teacher, data, tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists()
    return result


def test_input_shape_the_teacher_rejects_says_expected_and_got(tmp_path, runner, data):
    scripted = save_torchscript(tiny_net(1), tmp_path / "gray.pt")  # wants 1 channel
    assert_one_line_error(
        _precompute(runner, tmp_path, scripted, data),
        "gray.pt rejected inputs of shape (2, 6, 6)",
        "its first layer, Conv2d, takes 1 channels",
    )


def test_onnx_declared_input_shape_is_checked_first(tmp_path, runner, data):
    pytest.importorskip("onnxruntime")
    onnx = export_onnx(tiny_net(3), tmp_path / "rgb.onnx", (3, 6, 6))
    assert_one_line_error(
        _precompute(runner, tmp_path, onnx, data),
        "rgb.onnx: ONNX input 'input' has a static dimension 1 = 3 but the data has 2",
        "model expects (batch, 3, 6, 6), got (8, 2, 6, 6)",  # the 8-row probe batch
    )
    static = _export_static(tiny_net(3), tmp_path / "rgb1.onnx", (1, 3, 6, 6))
    assert_one_line_error(
        _precompute(runner, tmp_path, static, data),
        "rgb1.onnx: ONNX input 'input' has a static dimension 1 = 3 but the data has 2",
        "model expects (1, 3, 6, 6), got (8, 2, 6, 6)",
    )
    flat = _export_static(torch.nn.Linear(72, 3), tmp_path / "flat.onnx", (1, 72))
    assert_one_line_error(
        _precompute(runner, tmp_path, flat, data),
        "flat.onnx: ONNX input 'input' has 2 dimensions (1, 72), the data's batches have 4 "
        "(8, 2, 6, 6)",
    )


def _export_static(model: torch.nn.Module, path, shape: tuple[int, ...]):
    """ONNX export with every input dimension static, the batch too (no dynamic axes)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (torch.zeros(*shape),), str(path), dynamo=False,
            input_names=["input"], output_names=["logits"],
        )  # fmt: skip
    return path


@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_with_a_static_batch_runs_in_chunks_and_gives_the_dynamic_models_logits(
    tmp_path, runner, data, batch
):
    """10 rows through a graph fixed at `batch` rows: chunks of `batch`, the last one padded
    (4, 4, 2 + 2 padding rows dropped), and the logits of the same net exported dynamic."""
    pytest.importorskip("onnxruntime")
    model = tiny_net(SHAPE[0], seed=3)
    static = _export_static(model, tmp_path / "static.onnx", (batch, *SHAPE))
    dynamic = export_onnx(model, tmp_path / "dynamic.onnx", SHAPE)
    logits = {}
    for name, path in (("static", static), ("dynamic", dynamic)):
        out = tmp_path / f"{name}.zarr"
        result = precompute(runner, path, data, out)
        assert result.exit_code == 0, result.output
        with open_cache(out) as c:
            logits[name] = c.logits()[:, 0]  # (10, 3)
            shard_rows = c.attrs["shard_rows"]
    assert logits["static"].shape == (10, 3)
    np.testing.assert_allclose(logits["static"], logits["dynamic"], rtol=0, atol=1e-6)
    from pipeline.data import load_transfer_set

    expected = teacher_forward(model, load_transfer_set(data).inputs, shard_rows)
    np.testing.assert_allclose(logits["static"], expected, rtol=0, atol=1e-5)

    # In code too: 7 rows through a graph of batch 4 → 4 + 3 (one padding row dropped).
    teacher = load_teacher(str(static))
    x = torch.from_numpy(load_transfer_set(data).inputs[:7])
    np.testing.assert_allclose(teacher(x).numpy(), expected[:7], rtol=0, atol=1e-5)


class _Columns(torch.nn.Module):
    def forward(self, x):  # (B, 2, 6, 6) → (B, 2, 6): not (batch, classes)
        return x.mean(-1)


def test_onnx_output_that_is_not_batch_by_classes(tmp_path, runner, data):
    pytest.importorskip("onnxruntime")
    onnx = export_onnx(_Columns(), tmp_path / "columns.onnx", SHAPE)
    assert_one_line_error(
        _precompute(runner, tmp_path, onnx, data),
        "columns.onnx: ONNX output 'logits' has shape (batch, 2, 6)",
        "expected (batch, classes)",
    )


def test_onnxruntime_missing_names_the_extra(tmp_path, runner, data, monkeypatch):
    path = tmp_path / "any.onnx"
    path.write_bytes(b"not even read")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert_one_line_error(
        _precompute(runner, tmp_path, path, data),
        "ONNX teachers need onnxruntime",
        "pip install 'kd-pipeline[onnx]'",
    )


def test_a_file_that_is_no_onnx_model(tmp_path, runner, data):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00garbage")
    assert_one_line_error(
        _precompute(runner, tmp_path, path, data), "junk.onnx: not a loadable ONNX model"
    )


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("kd_no_such_module:build", ["cannot import 'kd_no_such_module'", "No module named"]),
        ("{factory}:nope", ["module '{factory}' has no function 'nope'"]),
        ("{factory}:not_a_model", ["not_a_model() returned int, not a torch.nn.Module"]),
        ("{factory}:build@gone.pt", ["weights file not found: gone.pt"]),
        ("{factory}:build@wrong.pt", ["wrong.pt does not fit the model", "head.weight"]),
    ],
)
def test_bad_factories(tmp_path, runner, data, factory, spec, fragments):
    torch.save({"head.weight": torch.zeros(3, 7)}, tmp_path / "wrong.pt")
    fragments = [f.format(factory=factory) for f in fragments]
    assert_one_line_error(
        _precompute(runner, tmp_path, spec.format(factory=factory), data), *fragments
    )


def test_a_factory_module_that_fails_to_import(tmp_path, runner, data, monkeypatch):
    (tmp_path / "kd_broken.py").write_text("import torch\ndef build(:\n")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(
        _precompute(runner, tmp_path, "kd_broken:build", data),
        "cannot import 'kd_broken' (SyntaxError",
    )


def test_a_bare_state_dict_points_to_the_factory_form(tmp_path, runner, data):
    torch.save(tiny_net(2).state_dict(), tmp_path / "sd.pt")
    assert_one_line_error(
        _precompute(runner, tmp_path, tmp_path / "sd.pt", data),
        "not a kd-pipeline checkpoint, nor a TorchScript or ONNX file",
        f"package.module:function@{tmp_path / 'sd.pt'}",
    )


def test_a_directory_is_no_teacher(tmp_path, runner, data):
    (tmp_path / "saved_model").mkdir()
    assert_one_line_error(
        _precompute(runner, tmp_path, tmp_path / "saved_model", data),
        "saved_model: is a directory; a teacher is a train-teacher checkpoint",
    )


@pytest.mark.parametrize("names", [["cat", "dog", "eel"], ["cat", "dog"]])
def test_a_cache_takes_the_datas_class_names_when_the_teacher_has_none(tmp_path, runner, names):
    """A TorchScript teacher declares no class names: the data's are recorded, but only when
    they count the teacher's classes."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, *SHAPE)).astype(np.float32)
    np.savez(tmp_path / "named.npz", x=x, y=np.arange(10) % 3, class_names=np.array(names))
    teacher = save_torchscript(tiny_net(SHAPE[0], classes=3), tmp_path / "t.ts")
    out = tmp_path / "c.zarr"
    result = precompute(runner, teacher, f"npz:{tmp_path / 'named.npz'}", out)
    assert result.exit_code == 0, result.output
    with open_cache(out) as cache:
        assert cache.attrs["class_names"] == (names if len(names) == 3 else None)


def test_onnx_external_data_is_in_the_provenance_and_the_teacher_fingerprint(
    tmp_path, runner, data
):
    """Weights kept beside the .onnx file are part of the teacher: another weights file is
    another teacher, for the cache's provenance and for a student's teacher fingerprint."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from pipeline.student.students import teacher_fingerprint

    path = export_onnx(tiny_net(SHAPE[0], seed=3), tmp_path / "teacher.onnx", SHAPE)
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, location="teacher.data",
                    size_threshold=0)  # fmt: skip
    fingerprints = []
    for seed, name in ((3, "a.zarr"), (4, "b.zarr")):
        weights = onnx.load(str(export_onnx(tiny_net(SHAPE[0], seed=seed), tmp_path / "w.onnx",
                                            SHAPE)))  # fmt: skip
        onnx.save_model(weights, str(tmp_path / "w2.onnx"), save_as_external_data=True,
                        location="teacher.data", size_threshold=0)  # fmt: skip
        # The same graph file, other weights in teacher.data beside it.
        assert precompute(runner, str(path), data, tmp_path / name).exit_code == 0
        with open_cache(tmp_path / name) as c:
            member = c.attrs["teacher"]["members"][0]
            fingerprints.append(teacher_fingerprint(c.attrs))
        assert member["files"] == {
            str(path): sha256_file(path),
            str(tmp_path / "teacher.data"): sha256_file(tmp_path / "teacher.data"),
        }
    assert member["sha256"] == sha256_file(path)  # the graph file did not change...
    assert fingerprints[0] != fingerprints[1]  # ...but the teacher did
