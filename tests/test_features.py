"""Feature targets (`--features`): the grammar, seeded projections, cached attention maps,
hints, FSP matrices and input gradients equal to ones computed by hand from the teacher on the
regenerated views, bad inputs as one-line errors, sizes before the run, resume and convert-cache
keeping the feature nodes, and `pipeline layers`."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.cache import features as feats
from pipeline.cache import open_cache, schema
from pipeline.cache.reader import describe, describe_lines
from pipeline.cache.verify import check_cache
from pipeline.cache.writer import finished_shards
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.data import load_transfer_set
from pipeline.data.views import Views, apply_views
from pipeline.models import create_model
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint
from pipeline.teacher import features as extract
from pipeline.teacher import precompute as precompute_lib
from pipeline.teacher import shards as shards_lib
from pipeline.teacher.teachers import Teacher
from stages import convert_cache, precompute_logits
from tests.cache.helpers import (
    ctrl_c_at_forward,
    hdf5_chunks,
    mlp_checkpoint,
    reseal,
    stable_attrs,
    zarr_files,
)
from tests.cache.test_resume import command, run_killed
from tests.conftest import invoke
from tests.formats import export_onnx, save_torchscript, tiny_net
from tests.reference import teacher_forward
from tests.test_cli_errors import assert_clean_error

# digits:test has 360 rows (1, 8, 8): shards of 2 chunks of 16 rows make 12 shards.
LAYOUT = {"chunk_rows": 16, "chunks_per_shard": 2}
VIEWS = {"views": 2, "augment": "shift:max=1", "seed": 5}
# The cnn teacher's layers: 2 ReLU (4, 8, 8), 5 ReLU (8, 8, 8), 6 MaxPool (8, 4, 4).
FEATURES = [
    "att=2:attention",
    "att1=6:attention:p=1",
    "h=5:hint",
    "f=2,5:fsp",
    "sob=input:input-grad:k=2,t=2,dtype=float32",
    "sob16=input:input-grad",
    "ga=input:grad-attention",
]


def cnn_checkpoint(path: Path, seed: int = 0) -> Path:
    """A small digits CNN (untrained, seeded) whose batch norms have non-trivial statistics."""
    torch.manual_seed(seed)
    kwargs = {"channels": [4, 8], "hidden": 16}
    model = create_model("cnn", 10, (1, 8, 8), **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    meta = {"model": "cnn", "model_kwargs": kwargs, "num_classes": 10,
            "input_shape": [1, 8, 8], "class_names": None}  # fmt: skip
    return save_checkpoint(path, model, meta)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    return cnn_checkpoint(tmp_path_factory.mktemp("features") / "cnn.pt")


@pytest.fixture(scope="module")
def cached(tmp_path_factory, cnn) -> Path:
    """A cache of every kind of feature, on 2 augmented views of digits:test."""
    cfg = PrecomputeConfig(**VIEWS, **LAYOUT, features=FEATURES)
    out = tmp_path_factory.mktemp("features") / "c.zarr"
    return precompute_logits.run(cfg, [str(cnn)], "digits:test", out)


def the_views(cache) -> list[np.ndarray]:
    """Each view's inputs, regenerated from the stored seeds.  # V x (N, 1, 8, 8)"""
    ts = load_transfer_set("digits:test")
    spec = Views.from_attrs(cache.attrs).spec
    return [apply_views(ts.inputs, cache.view_seeds()[:, v], spec) for v in range(2)]


def activation(ckpt: Path, x: np.ndarray, layer: int, shard_rows: int) -> np.ndarray:
    """Output of layer `layer` of the Sequential teacher, by running its first layers on
    precompute's batches (`teacher_forward`).  # (N, *activation)"""
    model, _ = load_checkpoint(ckpt)
    return teacher_forward(model[: layer + 1], x, shard_rows)


# ---------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    "text, canonical, shape_of",
    [
        ("att3=layers.2:attention", "att3=layers.2:attention:p=2.0", "attention"),
        (" a = x : Attention : p=1 ", "a=x:attention:p=1.0", "attention"),
        ("h=layer3.0.conv2:hint", "h=layer3.0.conv2:hint", "hint"),
        ("h=x:hint:dtype=float32", "h=x:hint:dtype=float32", "hint"),
        ("g=a,b:fsp", "g=a,b:fsp", "fsp"),
        ("s=input:input-grad", "s=input:input-grad:k=1:t=1.0", "input-grad"),
        ("s=input:input-grad:k=2,t=4", "s=input:input-grad:k=2:t=4.0", "input-grad"),
        ("s=input:input-grad:t=4:k=2", "s=input:input-grad:k=2:t=4.0", "input-grad"),
        ("ga=input:grad-attention", "ga=input:grad-attention", "grad-attention"),
    ],
)
def test_specs_parse_to_a_canonical_form(text, canonical, shape_of):
    (spec,) = feats.parse_features([text])
    assert spec.canonical == canonical and spec.kind == shape_of
    assert feats.parse_features([canonical]) == [spec]  # the canonical form reads back


@pytest.mark.parametrize(
    "texts, message",
    [
        (["layers.2:attention"], "expected NAME=LAYER:KIND"),
        (["a=layers.2"], "expected NAME=LAYER:KIND"),
        (["9a=x:hint"], "expected NAME=LAYER:KIND"),
        (["a/b=x:hint"], "expected NAME=LAYER:KIND"),
        (["a=x:gram"], "unknown kind 'gram' (known: attention, hint, fsp, input-grad"),
        (["a=x:attention:p=0"], "p must be a number > 0, got '0'"),
        (["a=x:attention:q=1"], "attention takes KEY=VALUE once per key, got 'q=1' (its keys: p)"),
        (["a=x:attention:p=1,p=2"], "got 'p=2'"),
        (["a=x:hint:dtype=int8"], "dtype must be one of float16, float32, got 'int8'"),
        (["a=x:attention:dtype=float16"], "(its keys: p)"),
        (["g=a:fsp"], "fsp takes g=LAYER_A,LAYER_B:fsp"),
        (["g=a,b,c:fsp"], "fsp takes g=LAYER_A,LAYER_B:fsp"),
        (["a=x,y:hint"], "hint takes a=LAYER:hint"),
        (
            ["s=layers.2:input-grad"],
            "input-grad is taken at the teacher's input: write s=input:input-grad",
        ),  # fmt: skip
        (["s=input:input-grad:k=0"], "k must be an integer >= 1, got '0'"),
        (["s=input:input-grad:k=1.5"], "k must be an integer >= 1, got '1.5'"),
        (["a=x:hint", "a=y:hint"], "feature name 'a' given twice"),
    ],
)
def test_bad_specs_are_one_line_errors(texts, message):
    with pytest.raises(PipelineError) as e:
        feats.parse_features(texts, "--features")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("--features ")


# ------------------------------------------------------------------------------ projections


def projection_reference(seed: int, sample_id: int, view: int, k: int, c: int) -> np.ndarray:
    """One projection in plain Python integers and math (not the code under test)."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    view_seed = mix(mix(mix(seed) ^ (sample_id & mask)) ^ view)
    key = mix(view_seed ^ (0x50524F4A00000000 | k))
    u = [((mix((key + i) & mask) >> 11) + 0.5) / 2.0**53 for i in range(2 * c)]
    z = [math.sqrt(-2 * math.log(u[i])) * math.cos(2 * math.pi * u[c + i]) for i in range(c)]
    norm = math.sqrt(sum(v * v for v in z))
    return np.array([v / norm for v in z], np.float32)


def test_projections_depend_on_seed_sample_id_view_and_k_alone():
    ids = np.array([7, -3, 2**40, 11], np.int64)
    r = feats.projections(5, ids, 1, 3, 10)  # (4, 3, 10)
    assert r.shape == (4, 3, 10) and r.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(r, axis=-1), 1, rtol=1e-6)
    for b in (0, 1, 2):
        for k in range(3):
            np.testing.assert_allclose(r[b, k], projection_reference(5, int(ids[b]), 1, k, 10),
                                       rtol=1e-6, atol=1e-7)  # fmt: skip
    # Any batch, any order: the same vectors per sample.
    np.testing.assert_array_equal(feats.projections(5, ids[::-1], 1, 3, 10), r[::-1])
    np.testing.assert_array_equal(feats.projections(5, ids[2:3], 1, 2, 10)[0], r[2, :2])
    others = [feats.projections(6, ids, 1, 3, 10), feats.projections(5, ids, 0, 3, 10)]
    assert all(not np.allclose(o, r) for o in others)
    assert not np.allclose(r[:, 0], r[:, 1])
    # Uniform on the sphere: mean 0 and E[r_c^2] = 1/C.
    many = feats.projections(0, np.arange(20000), 0, 1, 10)[:, 0]
    assert np.abs(many.mean(0)).max() < 0.01
    np.testing.assert_allclose((many**2).mean(0), 0.1, atol=0.005)


# ------------------------------------------------------------ cached values against the teacher


def test_the_cache_declares_every_feature(cached):
    with open_cache(cached) as cache:
        f = cache.features
        assert list(f) == ["att", "att1", "h", "f", "sob", "sob16", "ga"]
        assert f["att"] == {
            "spec": "att=2:attention:p=2.0", "kind": "attention", "layers": ["2"],
            "params": {"p": 2.0}, "layer_shapes": [[4, 8, 8]], "shape": [64], "dtype": "float32",
        }  # fmt: skip
        assert f["f"]["layer_shapes"] == [[4, 8, 8], [8, 8, 8]] and f["f"]["shape"] == [4, 8]
        assert f["sob"]["params"] == {"k": 2, "t": 2.0, "seed": 5}
        assert f["sob"]["projections"] == feats.PROJECTIONS
        assert f["h"]["dtype"] == "float16" and f["sob"]["dtype"] == "float32"
        assert cache.attrs["dims"] == {
            "att.0": 64, "att1.0": 16, "h.0": 8, "h.1": 8, "h.2": 8, "f.0": 4, "f.1": 8,
            "sob.0": 2, "sob.1": 1, "sob.2": 8, "sob.3": 8, "sob16.0": 1, "sob16.1": 1,
            "sob16.2": 8, "sob16.3": 8, "ga.0": 64,
        }  # fmt: skip
        names = [n.name for n in cache.nodes()]
        assert names == ["logits", "sample_ids", "labels", "views/seed"] + [
            f"features/{name}" for name in f
        ]
        shapes = {name: cache.feature(name).shape for name in f}
        assert shapes == {
            "att": (360, 2, 64), "att1": (360, 2, 16), "h": (360, 2, 8, 8, 8),
            "f": (360, 2, 4, 8), "sob": (360, 2, 2, 1, 8, 8), "sob16": (360, 2, 1, 1, 8, 8),
            "ga": (360, 2, 64),
        }  # fmt: skip
        assert cache.feature("h").dtype == np.float16
        assert cache.attrs["params"]["features"] == [
            feats.parse_features([t])[0].canonical for t in FEATURES
        ]
    assert check_cache(cached)[0] == []


def test_attention_hints_and_fsp_are_the_teachers_own_on_each_view(cached, cnn):
    with open_cache(cached) as cache:
        views, shard_rows = the_views(cache), cache.attrs["shard_rows"]
        for v, x in enumerate(views):
            a2, a5, a6 = (activation(cnn, x, layer, shard_rows) for layer in (2, 5, 6))
            # AT: mean over channels of |A|^p, flattened, divided by its L2 norm.
            for name, a, p in (("att", a2, 2), ("att1", a6, 1)):
                q = (np.abs(a.astype(np.float64)) ** p).mean(1).reshape(len(a), -1)
                q /= np.linalg.norm(q, axis=1, keepdims=True)
                np.testing.assert_allclose(cache.feature(name)[:, v], q, rtol=1e-5, atol=1e-7)
            # Hint: the raw activation, stored as float16.
            hint = cache.feature("h")[:, v]
            np.testing.assert_allclose(hint.astype(np.float32), a5, rtol=1e-3, atol=1e-4)
            # FSP: G[i, j] = sum over positions of A_i B_j, divided by H*W.
            g = np.einsum("nihw,njhw->nij", a2.astype(np.float64), a5.astype(np.float64)) / 64
            np.testing.assert_allclose(cache.feature("f")[:, v], g, rtol=1e-5, atol=1e-6)
        assert not np.array_equal(views[0], views[1])  # the views differ, and so do features
        assert not np.allclose(cache.feature("att")[:, 0], cache.feature("att")[:, 1])


def jacobian(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """d logits / d input of one sample, by torch.autograd.functional.  # (C, *input)"""
    inp = torch.from_numpy(x[None].copy())
    jac = torch.autograd.functional.jacobian(lambda t: model(t)[0], inp)
    return jac[:, 0].numpy().astype(np.float64)


def test_input_gradients_and_gradient_attention_are_the_teachers_own(cached, cnn):
    model, _ = load_checkpoint(cnn)
    rows = np.array([0, 1, 57, 200, 359])
    with open_cache(cached) as cache:
        ids, labels = cache.sample_ids[rows], cache.labels[rows]
        records = cache.features
        for v, x in enumerate(the_views(cache)):
            r = feats.feature_projections(records["sob"], ids, v, 10)  # (5, 2, 10)
            r16 = feats.feature_projections(records["sob16"], ids, v, 10)
            for i, row in enumerate(rows):
                jac = jacobian(model, x[row])  # (10, 1, 8, 8)
                with torch.no_grad():
                    z = model(torch.from_numpy(x[row : row + 1]))[0].double().numpy()
                # d softmax(z / T)_c / dz_j = p_c (delta_cj - p_j) / T
                p = np.exp(z / 2 - (z / 2).max())
                p /= p.sum()
                dp = (np.diag(p) - np.outer(p, p)) / 2 @ jac.reshape(10, -1)  # (C, 64)
                want = (r[i].astype(np.float64) @ dp).reshape(2, 1, 8, 8)
                got = cache.feature("sob", rows[i : i + 1])[0, v]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
                # t = 1, float16
                p1 = np.exp(z - z.max())
                p1 /= p1.sum()
                want16 = r16[i, 0] @ ((np.diag(p1) - np.outer(p1, p1)) @ jac.reshape(10, -1))
                got16 = cache.feature("sob16", rows[i : i + 1])[0, v, 0].reshape(-1)
                np.testing.assert_allclose(got16, want16, rtol=2e-3, atol=1e-3 * abs(want16).max())
                # grad-attention: dCE/dx = sum_c (p_c - onehot_c) dz_c/dx, |.| summed over C
                ce = ((p1 - np.eye(10)[labels[i]]) @ jac.reshape(10, 1, 64)[:, 0]).reshape(1, 64)
                att = np.abs(ce).sum(0)
                att /= np.linalg.norm(att)
                got_att = cache.feature("ga", rows[i : i + 1])[0, v]
                np.testing.assert_allclose(got_att, att, rtol=1e-4, atol=1e-6)


def test_gradient_attention_takes_the_top_class_where_the_label_is_unknown():
    model = tiny_net(2, seed=4)
    x = torch.randn(6, 2, 5, 5, requires_grad=True)
    z = model(x)
    unknown = feats.gradient_attention(z, x, torch.full((6,), -1), retain_graph=True)
    top = feats.gradient_attention(z, x, z.argmax(1))
    torch.testing.assert_close(unknown, top, rtol=0, atol=0)
    assert unknown.shape == (6, 25)
    torch.testing.assert_close(unknown.norm(dim=1), torch.ones(6))


def test_projected_gradients_support_double_backprop():
    """Stage two's sobolev loss differentiates the student's input gradient again."""
    model = tiny_net(2, seed=5)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    r = torch.from_numpy(feats.projections(0, np.arange(3), 0, 2, 3))
    g = feats.projected_gradients(model(x), x, r, 4.0, create_graph=True)  # (3, 2, 2, 4, 4)
    assert g.shape == (3, 2, 2, 4, 4)
    g.pow(2).sum().backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- bad inputs


def run_cli(runner, tmp_path, teachers, *features, data="digits:test", extra=()):
    args = ["precompute-logits", "--data", data, "--out", tmp_path / "c.zarr", *extra]
    args += [a for t in teachers for a in ("--teacher", t)]
    args += [a for f in features for a in ("--features", f)]
    return invoke(runner, *args)


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "c.zarr.partial").exists()


@pytest.mark.parametrize(
    "feature, fragments",
    [
        (
            "a=22:attention",
            [
                "--features 'a=22:attention:p=2.0': teacher",
                "has no layer '22' (closest: 2, 12",
                "`pipeline layers TEACHER` lists them all",
            ],
        ),  # fmt: skip
        (
            "f=2,6:fsp",
            [
                "fsp needs layers of equal spatial size; 2 outputs (4, 8, 8), 6 outputs "
                "(8, 4, 4) (per sample)"
            ],
        ),  # fmt: skip
        ("a=10:attention", ["attention needs a (C, H, W) or (C, L) output", "10 gives (16,)"]),
        ("f=8,5:fsp", ["fsp needs a (C, H, W) or (C, L) output", "8 gives (32,)"]),
    ],
)
def test_layers_the_kind_cannot_use_are_refused_naming_them(
    tmp_path, runner, cnn, feature, fragments
):
    result = run_cli(runner, tmp_path, [cnn], feature)
    assert_clean_error(result, *fragments)
    assert_nothing_written(tmp_path)


def test_a_missing_layer_is_named_with_its_own_feature(tmp_path, runner, cnn):
    result = run_cli(runner, tmp_path, [cnn], "a=2:attention", "b=99:hint")
    assert_clean_error(result, "--features 'b=99:hint': teacher", "has no layer '99' (closest: 9")
    assert_nothing_written(tmp_path)


NAMED = """import torch
from pipeline.models import create_model


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = create_model("cnn", 10, (1, 8, 8), channels=[4, 8], hidden=16)

    def forward(self, x):
        return self.layers(x)


def build():
    torch.manual_seed(0)
    return Net()
"""


def test_module_paths_of_a_named_teacher_and_their_closest_names(tmp_path, runner, monkeypatch):
    (tmp_path / "named_net.py").write_text(NAMED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "named_net", raising=False)
    result = run_cli(runner, tmp_path, ["named_net:build"], "a=layer.2:attention")
    assert_clean_error(result, "has no layer 'layer.2' (closest: layers.2,")
    out = tmp_path / "ok.zarr"
    args = ["precompute-logits", "--teacher", "named_net:build", "--data", "digits:test"]
    result = invoke(runner, *args, "--out", out, "--features", "a=layers.2:attention")
    assert result.exit_code == 0, result.output
    with open_cache(out) as cache:
        assert cache.features["a"]["layers"] == ["layers.2"]
        assert cache.feature("a").shape == (360, 1, 64)
    sys.modules.pop("named_net", None)


def test_onnx_torchscript_and_ensembles_are_refused_clearly(tmp_path, runner, cnn):
    model = tiny_net(1, classes=10, seed=3)
    onnx = export_onnx(model, tmp_path / "t.onnx", (1, 8, 8))
    result = run_cli(runner, tmp_path, [onnx], "s=input:input-grad")
    assert_clean_error(result, "--features 's=input:input-grad:k=1:t=1.0': teacher",
                       "t.onnx is an ONNX model and onnxruntime gives no gradients")  # fmt: skip
    result = run_cli(runner, tmp_path, [onnx], "h=conv:hint")
    assert_clean_error(result, "is an ONNX model and forward hooks need torch modules")

    scripted = save_torchscript(model, tmp_path / "s.pt")
    result = run_cli(runner, tmp_path, [scripted], "h=conv:hint")
    assert_clean_error(result, "s.pt is TorchScript, whose modules take no forward hooks")
    # Gradients work through TorchScript.
    out = tmp_path / "scripted.zarr"
    args = ["--teacher", scripted, "--data", "digits:test", "--out", out]
    result = invoke(runner, "precompute-logits", *args, "--features", "ga=input:grad-attention")
    assert result.exit_code == 0, result.output
    with open_cache(out) as cache:
        np.testing.assert_allclose(np.linalg.norm(cache.feature("ga")[:, 0], axis=1), 1, 1e-5)

    mlp = mlp_checkpoint(tmp_path / "mlp.pt")
    result = run_cli(runner, tmp_path, [cnn, mlp], "a=2:attention")
    assert_clean_error(result, "features come from one teacher, and 2 were given (an ensemble)")
    assert_nothing_written(tmp_path)


def test_features_from_params_yaml_name_the_key(tmp_path, runner, cnn):
    params = tmp_path / "params.yaml"
    params.write_text("precompute_logits:\n  features: ['a=2:gram']\n")
    result = run_cli(runner, tmp_path, [cnn], extra=["--params", params])
    assert_clean_error(result, "params.yaml:precompute_logits.features 'a=2:gram': unknown kind")
    params.write_text("precompute_logits:\n  features: a=2:attention\n")
    result = run_cli(runner, tmp_path, [cnn], extra=["--params", params])
    assert_clean_error(result, "precompute_logits.features: expected a list")
    assert_nothing_written(tmp_path)


def test_a_float16_feature_that_overflows_is_refused_naming_the_samples(tmp_path):
    def mutate(model):
        model[1].weight.mul_(1e6)  # hidden activations far beyond float16's range

    ckpt = mlp_checkpoint(tmp_path / "big.pt", mutate=mutate)
    cfg = PrecomputeConfig(features=["h=2:hint"], **LAYOUT)
    with pytest.raises(PipelineError, match=r"features/h: NaN/Inf for sample ids \[") as e:
        precompute_logits.run(cfg, [str(ckpt)], "digits:test", tmp_path / "c.zarr")
    assert "give the feature :dtype=float32" in str(e.value)
    cfg = PrecomputeConfig(features=["h=2:hint:dtype=float32"], **LAYOUT)
    out = precompute_logits.run(cfg, [str(ckpt)], "digits:test", tmp_path / "d.zarr")
    with open_cache(out) as cache:
        assert np.abs(cache.feature("h")).max() > 65504


# -------------------------------------------------------------------------- sizes before the run


def test_every_nodes_size_is_printed_before_the_run(tmp_path, cnn, capsys):
    cfg = PrecomputeConfig(**VIEWS, features=["h=5:hint", "att=2:attention"], keep_members=True)
    out = precompute_logits.run(cfg, [str(cnn)], "digits:test", tmp_path / "c.zarr")
    err = capsys.readouterr().err
    per_sample = 80 + 80 + 8 + 8 + 16 + 2 * 512 * 2 + 2 * 64 * 4  # 2752 bytes
    assert f"projected cache size: {360 * per_sample / 1024:.1f} KiB for 360 samples" in err
    for line in [
        "  logits          (360, 2, 10) float32: 28.1 KiB (80 B/sample)",
        "  members/logits  (1, 360, 2, 10) float32: 28.1 KiB (80 B/sample)",
        "  sample_ids      (360,) int64: 2.8 KiB (8 B/sample)",
        "  views/seed      (360, 2) int64: 5.6 KiB (16 B/sample)",
        "  features/h      (360, 2, 8, 8, 8) float16: 720.0 KiB (2.0 KiB/sample)",
        "  features/att    (360, 2, 64) float32: 180.0 KiB (512 B/sample)",
    ]:
        assert line in err.splitlines(), err
    with open_cache(out) as cache:
        info = describe(cache)
    assert info["arrays"]["features/h"]["bytes_per_sample"] == 2048
    lines = dict(describe_lines(info))
    assert lines["features/h"] == "(360, 2, 8, 8, 8) float16, 2.0 KiB/sample"
    assert lines["members/logits"] == "(1, 360, 2, 10) float32, 80 B/sample"
    assert lines["feature h"] == "hint of 5" and lines["feature att"] == "attention of 2 (p=2.0)"


def test_a_cache_beyond_the_size_limit_is_refused_naming_the_node(
    tmp_path, runner, cnn, monkeypatch
):
    extra = ["--max-cache-size", "100KiB"]
    result = run_cli(runner, tmp_path, [cnn], "h=5:hint", "a=2:attention", extra=extra)
    assert_clean_error(
        result, "projected cache size 469.7 KiB (before compression) exceeds --max-cache-size "
        "100.0 KiB; the largest node is features/h (360, 1, 8, 8, 8): 360.0 KiB (1.0 KiB/sample)",
    )  # fmt: skip
    result = run_cli(runner, tmp_path, [cnn], "h=5:hint", extra=["--max-cache-size", "lots"])
    assert_clean_error(result, "--max-cache-size 'lots': expected a size such as 512MiB")
    assert_nothing_written(tmp_path)
    # The default: half the free space on the disk the cache goes to.
    usage = shutil.disk_usage(tmp_path)._replace(free=400 * 1024)
    monkeypatch.setattr(precompute_lib.shutil, "disk_usage", lambda path: usage)
    result = run_cli(runner, tmp_path, [cnn], "h=5:hint")
    assert_clean_error(result, "exceeds --max-cache-size (default: half the 400.0 KiB free at",
                       "the largest node is features/h")  # fmt: skip
    assert_nothing_written(tmp_path)
    result = run_cli(runner, tmp_path, [cnn], "h=5:hint", extra=["--max-cache-size", "1MiB"])
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------- resume and convert-cache


def test_an_interrupted_run_with_features_resumes_byte_identical(tmp_path, cnn, monkeypatch):
    cfg = PrecomputeConfig(**VIEWS, **LAYOUT, features=FEATURES[:5])
    forward = ctrl_c_at_forward(monkeypatch, 5)  # Ctrl-C while shard 4 is computed
    out = tmp_path / "c.zarr"
    with pytest.raises(KeyboardInterrupt):
        precompute_logits.run(cfg, [str(cnn)], "digits:test", out)
    assert len(finished_shards(tmp_path / "c.zarr.partial")) == 4
    monkeypatch.setattr(shards_lib, "_forward", forward)

    for other in (FEATURES[:4], [*FEATURES[:4], "sob=input:input-grad:k=3"], FEATURES[:6]):
        changed = PrecomputeConfig(**VIEWS, **LAYOUT, features=other)
        with pytest.raises(PipelineError, match="holds an unfinished run with other settings"):
            precompute_logits.run(changed, [str(cnn)], "digits:test", out)
    # The same features written otherwise are the same run.
    same = [f.canonical for f in feats.parse_features(FEATURES[:5])]
    precompute_logits.run(PrecomputeConfig(**VIEWS, **LAYOUT, features=same), [str(cnn)],
                          "digits:test", out)  # fmt: skip
    clean = precompute_logits.run(cfg, [str(cnn)], "digits:test", tmp_path / "clean.zarr")
    assert zarr_files(out) == zarr_files(clean)
    with open_cache(out) as a, open_cache(clean) as b:
        assert stable_attrs(a.attrs) == stable_attrs(b.attrs)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_kill_9_mid_run_with_features_then_resume_is_byte_identical(tmp_path, runner, cnn, suffix):
    extra = ["--views", "2", "--augment", "shift:max=1", "--seed", "5"]
    extra += [a for f in FEATURES for a in ("--features", f)]
    out = tmp_path / "killed" / f"c{suffix}"
    args = command([cnn], out, *extra)
    run_killed(args, kill_at=5)  # shard 5's logits on disk, its features not
    partial = out.with_name(out.name + ".partial")
    assert (partial / "logits/c/5/0/0").is_file()
    assert not (partial / "features/h/c/5/0/0/0/0").exists()
    assert (partial / "features/h/c/4/0/0/0/0").exists()
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output

    cfg = PrecomputeConfig(**VIEWS, **LAYOUT, keep_members=True, features=FEATURES)
    clean = precompute_logits.run(cfg, [str(cnn)], "digits:test", tmp_path / f"clean{suffix}")
    if suffix == ".zarr":
        assert zarr_files(out) == zarr_files(clean)
    else:
        assert hdf5_chunks(out) == hdf5_chunks(clean)
    with open_cache(out) as a, open_cache(clean) as b:
        assert stable_attrs(a.attrs) == stable_attrs(b.attrs)


def test_convert_cache_keeps_the_features(tmp_path, cached):
    h5, back = tmp_path / "c.h5", tmp_path / "back.zarr"
    convert_cache.run(cached, h5)
    convert_cache.run(h5, back)
    with open_cache(cached) as a, open_cache(h5) as b, open_cache(back) as c:
        assert b.format == "hdf5"
        for cache in (b, c):
            assert cache.features == a.features and cache.attrs["dims"] == a.attrs["dims"]
            assert [n.name for n in cache.nodes()] == [n.name for n in a.nodes()]
            for name in a.features:
                got, want = cache.read_stored(f"features/{name}"), a.read_stored(f"features/{name}")
                assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert zarr_files(back, root=False) == zarr_files(cached, root=False)
    for path in (h5, back):
        problems, summary = check_cache(path)
        assert problems == [] and summary["shards_read"] == 12 * (2 + len(FEATURES))


def test_verify_finds_a_damaged_or_missing_feature(tmp_path, cached):
    import zarr

    bad = tmp_path / "bad.zarr"
    shutil.copytree(cached, bad)
    group = zarr.open_group(str(bad), mode="r+")
    values = group["features/att"][40]
    values[1, 3] = np.nan
    group["features/att"][40] = values
    ts = load_transfer_set("digits:test")
    assert check_cache(bad)[0][0].startswith("features/att: rows 32-63 not what was written")
    reseal(bad)  # sealed with its NaN: the node's own check finds it
    assert check_cache(bad)[0] == [f"features/att: NaN/Inf for sample ids [{ts.sample_ids[40]}]"]
    shutil.rmtree(bad / "features" / "att")
    assert "features/att: array missing" in check_cache(bad)[0]
    with open_cache(bad) as cache, pytest.raises(PipelineError, match="cache has no feature 'x'"):
        cache.feature("x")


def test_without_features_the_cache_is_as_before(tmp_path, cnn):
    cfg = PrecomputeConfig(**LAYOUT)
    out = precompute_logits.run(cfg, [str(cnn)], "digits:test", tmp_path / "c.zarr")
    with open_cache(out) as cache:
        assert "features" not in cache.attrs and "dims" not in cache.attrs
        assert "features" not in cache.attrs["params"] and cache.features == {}
        assert [n.name for n in cache.nodes()] == ["logits", "sample_ids", "labels"]


# ------------------------------------------------------------------------ the schema family


def test_feature_nodes_come_from_a_caches_attributes():
    attrs = {"features": {"a": {"kind": "hint", "layers": ["x"], "shape": [3, 2],
                                "dtype": "float16"}}}  # fmt: skip
    (node,) = schema.declared(attrs)
    assert (node.name, node.dims, node.dtype, node.axis) == (
        "features/a",
        ("N", "V", "a.0", "a.1"),
        "float16",
        0,
    )
    assert schema.get("features/a", attrs) == node
    assert schema.get("features/a").axis == 0  # a backend's lookup: the row axis alone
    assert [n.name for n in schema.nodes(attrs)][-1] == "features/a"
    assert "features/a" not in [n.name for n in schema.nodes()]
    with pytest.raises(ValueError, match="not a cache node"):
        schema.get("features/b", attrs)
    with pytest.raises(ValueError, match="lies in the family"):
        schema.register_node(schema.Node("features/x", ("N",), "float32"))


# ------------------------------------------------------------------------- pipeline layers


def test_layers_lists_module_paths_types_and_shapes(runner, cnn):
    result = invoke(runner, "layers", cnn, "--data", "digits:test")
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()) for line in result.output.splitlines()]
    assert lines[:4] == [
        "input input (1, 8, 8)", "0 Conv2d (4, 8, 8)", "1 BatchNorm2d (4, 8, 8)",
        "2 ReLU (4, 8, 8)",
    ]  # fmt: skip
    assert "6 MaxPool2d (8, 4, 4)" in lines and "12 Linear (10,)" in lines
    rows = json.loads(invoke(runner, "layers", cnn, "--data", "digits:test", "--json").output)
    assert rows[3] == {"path": "2", "type": "ReLU", "shape": [4, 8, 8], "calls": 1}


def test_layers_refuses_onnx_and_torchscript_and_bad_teachers(tmp_path, runner):
    model = tiny_net(1, classes=10, seed=3)
    onnx = export_onnx(model, tmp_path / "t.onnx", (1, 8, 8))
    result = invoke(runner, "layers", onnx, "--data", "digits:test")
    assert_clean_error(result, "t.onnx is an ONNX model: it has no torch modules to name")
    scripted = save_torchscript(model, tmp_path / "s.pt")
    result = invoke(runner, "layers", scripted, "--data", "digits:test")
    assert_clean_error(result, "s.pt is TorchScript, whose modules take no forward hooks")
    result = invoke(runner, "layers", tmp_path / "gone.pt")
    assert_clean_error(result, "checkpoint not found")


SHARED = """import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.act = torch.nn.ReLU()
        self.unused = torch.nn.Linear(2, 2)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.act(self.act(x)).flatten(1))


def build():
    torch.manual_seed(0)
    return Net()
"""


def test_layers_says_which_modules_did_not_run_or_ran_twice(tmp_path, runner, monkeypatch):
    (tmp_path / "shared_net.py").write_text(SHARED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "shared_net", raising=False)
    result = invoke(runner, "layers", "shared_net:build", "--data", "digits:test")
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()) for line in result.output.splitlines()]
    assert "act ReLU (1, 8, 8) (runs 2 times per forward)" in lines
    assert "unused Linear - (did not run)" in lines
    result = run_cli(runner, tmp_path, ["shared_net:build"], "h=act:hint")
    assert_clean_error(result, "layer 'act' of teacher shared_net:build runs 2 times in one "
                       "forward call (a shared module)")  # fmt: skip
    sys.modules.pop("shared_net", None)


def test_hooks_copy_outputs_that_a_later_inplace_op_changes(tmp_path):
    """A layer followed by ReLU(inplace=True): its hint is its own output, negatives kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(192, 10)).eval()  # fmt: skip
    x = torch.from_numpy(load_transfer_set("digits:test").inputs[:8].copy())
    teacher = Teacher(model, "inplace", "", "t", num_classes=10, module=model)
    (f,) = extract.resolve(feats.parse_features(["h=0:hint"]), [teacher], x.numpy())
    with extract.Extractor([f], teacher, "cpu") as extractor, torch.inference_mode():
        extractor.start(8, 1)
        model(x)
        extractor.collect(0, 0, x.numpy(), np.arange(8), np.zeros(8, np.int64))
    with torch.inference_mode():
        want = model[0](x).numpy()
    assert (want < 0).any()
    np.testing.assert_array_equal(extractor.values["features/h"][:, 0], want)
