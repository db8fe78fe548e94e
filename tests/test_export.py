"""Export: the TorchScript / ONNX file reproduces the PyTorch student."""

import json

import numpy as np
import pytest
import torch

from pipeline.core.config import ExportConfig
from pipeline.core.errors import PipelineError
from pipeline.evaluate.export import METADATA_KEY, export_model
from pipeline.models import create_model
from pipeline.models.checkpoint import save_checkpoint
from stages import export
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error


def make_student(tmp_path, model="resnet8", shape=(3, 16, 16)):
    """A student directory holding a seeded, untrained model in eval mode."""
    torch.manual_seed(0)
    net = create_model(model, 10, shape)
    # Non-trivial batch-norm statistics, so eval mode matters.
    net.train()
    with torch.no_grad():
        net(torch.randn(16, *shape))
    out = tmp_path / "student"
    out.mkdir()
    meta = {
        "name": "student",
        "model": model,
        "model_kwargs": {},
        "num_classes": 10,
        "input_shape": list(shape),
    }
    save_checkpoint(out / "student.pt", net.eval(), meta)
    return out, net


def reference(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load, on purpose
def test_torchscript_export_equals_the_pytorch_student(tmp_path, runner):
    student, net = make_student(tmp_path)
    out = tmp_path / "exports/student.pt"
    result = invoke(runner, "export", "--student", student, "--out", out)
    assert result.exit_code == 0, result.output
    assert "torchscript written to" in result.output
    extra = {METADATA_KEY: ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra[METADATA_KEY])["model"] == "resnet8"
    x = np.random.default_rng(1).normal(size=(5, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(
            loaded(torch.from_numpy(x)).numpy(), reference(net, x), rtol=1e-5, atol=1e-6
        )
    # An existing export is refused without --overwrite.
    assert_clean_error(
        invoke(runner, "export", "--student", student, "--out", out), "already exists"
    )


def test_onnx_export_equals_the_pytorch_student(tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the optional extra kd-pipeline[onnx]")
    pytest.importorskip("onnxscript", reason="ONNX export needs kd-pipeline[onnx]")
    ort = pytest.importorskip("onnxruntime", reason="ONNX export needs kd-pipeline[onnx]")
    import onnx

    student, net = make_student(tmp_path, "mlp", (1, 8, 8))
    out = tmp_path / "student.onnx"
    result = export.run(ExportConfig(format="onnx"), student, out)
    assert result["max_abs_diff"] < 1e-4 and list(tmp_path.glob("*.data")) == []
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for rows in (1, 3, 33):  # the batch axis is dynamic
        x = np.random.default_rng(rows).normal(size=(rows, 1, 8, 8)).astype(np.float32)
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(got, reference(net, x), rtol=1e-4, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta[METADATA_KEY])["export"]["format"] == "onnx"


def test_an_export_that_differs_writes_nothing(tmp_path, monkeypatch):
    _, net = make_student(tmp_path, "mlp", (1, 8, 8))
    import pipeline.evaluate.export as ex

    real = ex.save_torchscript

    def off_by_a_little(*args):
        run = real(*args)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(ex, "save_torchscript", off_by_a_little)
    out = tmp_path / "bad.pt"
    info = {"input_shape": [1, 8, 8]}
    with pytest.raises(
        PipelineError, match=r"differs from the PyTorch student: max \|diff\| 0.001"
    ):
        export_model(net, info, out, fmt="torchscript")
    assert not out.exists() and not (tmp_path / "bad.pt.tmp").exists()


def test_export_bad_input(tmp_path, runner):
    (tmp_path / "empty").mkdir()
    result = invoke(runner, "export", "--student", tmp_path / "empty", "--out", tmp_path / "x.pt")
    assert_clean_error(result, "no student.pt in it")


def test_the_format_follows_the_extension_and_the_opset_is_honoured(tmp_path, runner):
    pytest.importorskip("onnxscript", reason="ONNX export needs kd-pipeline[onnx]")
    onnx = pytest.importorskip("onnx", reason="ONNX export needs kd-pipeline[onnx]")

    student, _ = make_student(tmp_path, "mlp", (1, 8, 8))
    out = tmp_path / "s.onnx"
    result = invoke(runner, "export", "--student", student, "--out", out, "--opset", "17")
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(out))  # an ONNX file, not TorchScript under an .onnx name
    assert [o.version for o in proto.opset_import if o.domain == ""] == [17]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert meta["export"]["format"] == "onnx"

    wrong = tmp_path / "t.onnx"
    refused = invoke(
        runner, "export", "--student", student, "--out", wrong, "--format", "torchscript"
    )
    assert_clean_error(refused, "is named as a onnx file but --format is torchscript")
    assert not wrong.exists()
    # An extension that names neither format is refused, not filled with TorchScript.
    tflite = tmp_path / "s.tflite"
    refused = invoke(runner, "export", "--student", student, "--out", tflite)
    assert_clean_error(refused, f"--out {tflite}: expected one of the extensions .onnx (onnx)")
    assert not tflite.exists()
    # --student may name the checkpoint inside the directory, as users do.
    via_file = invoke(
        runner, "export", "--student", student / "student.pt", "--out", tmp_path / "f.pt"
    )
    assert via_file.exit_code == 0, via_file.output
