"""Stage one's feature extraction: forward hooks and input gradients on the teacher, giving
the feature targets (pipeline.cache.features says what each kind is) beside the logits.

Hook kinds come from the very forward call that gives the logits of that view; gradient kinds
from a second call with autograd. Features need one torch teacher: an ensemble, an ONNX model
(no hooks, no gradients) and, for the hook kinds, a TorchScript module (no forward hooks) are
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.cache.features import (
    INPUT,
    PROJECTIONS,
    FeatureSpec,
    attention_map,
    find_layer,
    fsp_matrix,
    gradient_attention,
    hookable,
    projected_gradients,
    projections,
)
from pipeline.cache.schema import FEATURES, feature_dims
from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.teacher.teachers import Teacher


@dataclass(frozen=True)
class Feature:
    """A feature resolved against the teacher: its stored shape per sample and view."""

    spec: FeatureSpec
    shape: tuple[int, ...]  # e.g. (64,) attention, (16, 4, 4) hint, (2, 1, 8, 8) input-grad
    sources: tuple[tuple[int, ...], ...]  # per-sample shape of each layer (or of the input)
    seed: int = 0  # the views' global seed: input-grad projections are drawn from it

    @property
    def node(self) -> str:
        return f"{FEATURES}/{self.spec.name}"

    def record(self) -> dict[str, Any]:
        """This feature in the cache's `features` attribute (schema.feature_nodes reads it)."""
        params: dict[str, Any] = dict(self.spec.params)
        out = {
            "spec": self.spec.canonical,
            "kind": self.spec.kind,
            "layers": list(self.spec.layers),
            "params": params,
        }
        if self.spec.kind == "input-grad":
            params["seed"] = self.seed
            out["projections"] = PROJECTIONS
        shapes = {"layer_shapes": [list(s) for s in self.sources]}
        return {**out, **shapes, "shape": list(self.shape), "dtype": self.spec.dtype}

    def dims(self) -> dict[str, int]:
        """Sizes of its trailing dimensions, for the cache's `dims` attribute."""
        names = feature_dims(self.spec.name, len(self.shape))
        return dict(zip(names, self.shape, strict=True))


def resolve(
    specs: list[FeatureSpec],
    teachers: list[Teacher],
    probe: np.ndarray,
    where: str = "--features",
    seed: int = 0,
) -> list[Feature]:
    """`specs` checked against the teachers, run once on `probe` (B, *input) to learn each
    layer's output shape: one torch teacher, layers that exist and run once, shapes each kind
    can use. Every refusal is one line naming the feature."""
    if not specs:
        return []
    if len(teachers) > 1:
        raise PipelineError(
            f"{where} {specs[0].canonical!r}: features come from one teacher, and "
            f"{len(teachers)} were given (an ensemble); precompute them with one --teacher"
        )
    (teacher,) = teachers
    _check_form(teacher, specs, where)
    paths = list(dict.fromkeys(p for s in specs if s.hooked for p in s.layers))
    outputs = _probe_layers(teacher, paths, probe, where, specs)
    return [_resolved(s, outputs, tuple(probe.shape[1:]), where, seed) for s in specs]


def _check_form(teacher: Teacher, specs: list[FeatureSpec], where: str) -> None:
    """ONNX gives neither hooks nor gradients; TorchScript modules take no forward hooks."""
    grad = next((s for s in specs if not s.hooked), None)
    hooked = next((s for s in specs if s.hooked), None)
    if teacher.module is None:
        s = grad or hooked
        why = "onnxruntime gives no gradients" if s is grad else "forward hooks need torch modules"
        raise PipelineError(
            f"{where} {s.canonical!r}: teacher {teacher.source} is an ONNX model and {why}; "
            "give its checkpoint, TorchScript or factory form"
        )
    if hooked is not None and not hookable(teacher.module):
        raise PipelineError(
            f"{where} {hooked.canonical!r}: teacher {teacher.source} is TorchScript, whose "
            "modules take no forward hooks; give its checkpoint or factory form (input-grad "
            "and grad-attention work on TorchScript)"
        )


class _Recorder:
    """Forward hooks keeping each named layer's outputs while `on`: copies, since a later
    in-place op (ReLU(inplace=True)) would change the very tensor a layer returned."""

    def __init__(self, module: torch.nn.Module, paths: list[str], what: str):
        self.outputs: dict[str, list[Any]] = {p: [] for p in paths}
        self.on = True
        layers = {p: find_layer(module, p, what) for p in paths}
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in layers.items()]

    def _hook(self, path: str):
        def hook(module, args, output) -> None:
            if self.on:
                kept = output.detach().clone() if isinstance(output, torch.Tensor) else output
                self.outputs[path].append(kept)

        return hook

    def clear(self) -> None:
        for kept in self.outputs.values():
            kept.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _probe_layers(
    teacher: Teacher, paths: list[str], probe: np.ndarray, where: str, specs: list[FeatureSpec]
) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of each layer in `paths`, from one forward call on `probe`."""
    if not paths:
        return {}
    for spec in (s for s in specs if s.hooked):  # a missing layer named with its feature
        for path in spec.layers:
            find_layer(
                teacher.module, path, f"{where} {spec.canonical!r}: teacher {teacher.source}"
            )
    recorder = _Recorder(teacher.module, paths, f"teacher {teacher.source}")
    try:
        with torch.inference_mode():
            teacher(torch.from_numpy(np.ascontiguousarray(probe)).to(_device(teacher)))
    finally:
        recorder.remove()
    shapes = {}
    for path, outs in recorder.outputs.items():
        spec = next(s for s in specs if path in s.layers)
        if len(outs) != 1 or not isinstance(outs[0], torch.Tensor):
            why = (
                "does not run in the teacher's forward call"
                if not outs
                else f"runs {len(outs)} times in one forward call (a shared module)"
                if len(outs) > 1
                else f"outputs a {type(outs[0]).__name__}, not one tensor"
            )
            raise PipelineError(
                f"{where} {spec.canonical!r}: layer {path!r} of teacher {teacher.source} "
                f"{why}; name a layer that runs once and outputs a tensor"
            )
        shapes[path] = tuple(outs[0].shape[1:])
    return shapes


def _resolved(
    spec: FeatureSpec,
    outputs: dict[str, tuple[int, ...]],
    input_shape: tuple[int, ...],
    where: str,
    seed: int,
) -> Feature:
    """The stored per-sample shape of `spec`, refusing layer shapes its kind cannot use."""
    sources = tuple(outputs[p] for p in spec.layers) if spec.hooked else (input_shape,)
    said = f"{where} {spec.canonical!r}"
    if spec.kind in ("attention", "fsp", "grad-attention"):
        for path, shape in zip(spec.layers, sources, strict=True):
            if len(shape) < 2:
                raise PipelineError(
                    f"{said}: {spec.kind} needs a (C, H, W) or (C, L) output with channels and "
                    f"a spatial extent; {path} gives {shape} per sample"
                )
    if spec.kind == "fsp" and sources[0][1:] != sources[1][1:]:
        a, b = spec.layers
        raise PipelineError(
            f"{said}: fsp needs layers of equal spatial size; {a} outputs {sources[0]}, {b} "
            f"outputs {sources[1]} (per sample)"
        )
    shape = {
        "attention": lambda: (int(np.prod(sources[0][1:])),),
        "grad-attention": lambda: (int(np.prod(sources[0][1:])),),
        "hint": lambda: sources[0],
        "fsp": lambda: (sources[0][0], sources[1][0]),
        "input-grad": lambda: (int(spec["k"]), *sources[0]),
    }[spec.kind]()
    return Feature(spec, tuple(int(d) for d in shape), sources, seed)


def _device(teacher: Teacher) -> torch.device:
    """Where the teacher's module lives (its first parameter or buffer), else the CPU."""
    for tensor in (*teacher.module.parameters(), *teacher.module.buffers()):
        return tensor.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- extraction


class Extractor:
    """Feature values of one teacher, one forward call of precompute at a time.

    Use as a context (hooks are registered on enter, removed on exit): `start(rows, views)`
    per shard, then `collect(...)` right after the teacher's forward call on each piece and
    view; `values` holds the shard's features by node name, float32 before storing.
    """

    def __init__(self, features: list[Feature], teacher: Teacher, device: Any):
        self.features, self.teacher, self.device = features, teacher, torch.device(device)
        self.values: dict[str, np.ndarray] = {}
        self._recorder: _Recorder | None = None

    def __enter__(self) -> Extractor:
        paths = list(
            dict.fromkeys(p for f in self.features if f.spec.hooked for p in f.spec.layers)
        )
        if paths:
            self._recorder = _Recorder(self.teacher.module, paths, f"teacher {self.teacher.source}")
        return self

    def __exit__(self, *exc) -> None:
        if self._recorder is not None:
            self._recorder.remove()

    def start(self, rows: int, views: int) -> None:
        """A new shard of `rows` rows and `views` views."""
        self.values = {f.node: np.empty((rows, views, *f.shape), np.float32) for f in self.features}

    def collect(
        self, row: int, view: int, x: np.ndarray, ids: np.ndarray, labels: np.ndarray
    ) -> None:
        """Features of rows row.. of view `view`, whose inputs `x` (b, *input) the teacher has
        just been run on (the hooks hold that call's layer outputs); `ids`, `labels` (b,)."""
        rows = slice(row, row + len(x))
        if self._recorder is not None:
            if missing := [p for p, o in self._recorder.outputs.items() if not o]:
                raise PipelineError(
                    f"teacher {self.teacher.source}: layer {missing[0]!r} did not run on "
                    f"sample ids {ids[:5].tolist()}..., so its features cannot be taken"
                )
            outs = {p: o[-1] for p, o in self._recorder.outputs.items()}
            for f in (f for f in self.features if f.spec.hooked):
                self.values[f.node][rows, view] = _hooked(f, outs).cpu().numpy()
            self._recorder.clear()
        grads = [f for f in self.features if not f.spec.hooked]
        if grads:
            for f, value in zip(grads, self._gradients(grads, x, ids, view, labels), strict=True):
                self.values[f.node][rows, view] = value

    def _gradients(
        self, grads: list[Feature], x: np.ndarray, ids: np.ndarray, view: int, labels: np.ndarray
    ) -> list[np.ndarray]:
        """The gradient kinds on `x`, from one forward call with autograd (hooks off)."""
        if self._recorder is not None:
            self._recorder.on = False
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x = x if x.dtype.kind == "f" else x.astype(np.float32)  # e.g. uint8 pixels
                xg = torch.from_numpy(np.ascontiguousarray(x)).to(self.device).requires_grad_()
                z = self.teacher(xg)  # (b, C)
                out = []
                for i, f in enumerate(grads):
                    keep = i < len(grads) - 1
                    out.append(_gradient(f, z, xg, ids, view, labels, keep).cpu().numpy())
                return out
        finally:
            if self._recorder is not None:
                self._recorder.on = True


def _hooked(f: Feature, outs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A hook kind's values from its layers' outputs.  # (b, *f.shape)"""
    a = outs[f.spec.layers[0]]
    if f.spec.kind == "attention":
        return attention_map(a, float(f.spec["p"]))
    if f.spec.kind == "fsp":
        return fsp_matrix(a, outs[f.spec.layers[1]])
    return a.float()  # hint


def _gradient(
    f: Feature,
    z: torch.Tensor,
    x: torch.Tensor,
    ids: np.ndarray,
    view: int,
    labels: np.ndarray,
    retain: bool,
) -> torch.Tensor:
    """A gradient kind's values.  # (b, *f.shape)"""
    if f.spec.kind == "grad-attention":
        y = torch.from_numpy(np.asarray(labels, np.int64)).to(z.device)
        return gradient_attention(z, x, y, retain_graph=retain)
    r = projections(f.seed, ids, view, int(f.spec["k"]), z.shape[1])  # (b, k, C)
    r = torch.from_numpy(r).to(z.device)
    return projected_gradients(z, x, r, float(f.spec["t"]), retain_graph=retain).float()


# ------------------------------------------------------------------------ pipeline layers


def layer_table(teacher: Teacher, probe: np.ndarray) -> list[dict[str, Any]]:
    """Every module path of the teacher with its type and per-sample output shape on `probe`
    (B, *input), the input first: what `--features NAME=LAYER:KIND` can name. A module that
    did not run has shape None; one that ran several times says how often (`calls`)."""
    what = f"teacher {teacher.source}"
    if teacher.module is None:
        raise PipelineError(f"{what} is an ONNX model: it has no torch modules to name")
    if not hookable(teacher.module):
        raise PipelineError(
            f"{what} is TorchScript, whose modules take no forward hooks: give its checkpoint "
            "or factory form to list its layers"
        )
    paths = [p for p, _ in teacher.module.named_modules() if p]
    recorder = _Recorder(teacher.module, paths, what)
    try:
        with torch.inference_mode():
            teacher(torch.from_numpy(np.ascontiguousarray(probe)).to(_device(teacher)))
    finally:
        recorder.remove()
    rows = [{"path": INPUT, "type": "input", "shape": list(probe.shape[1:]), "calls": 1}]
    for path, module in teacher.module.named_modules():
        if path:
            outs = recorder.outputs[path]
            rows.append(
                {
                    "path": path,
                    "type": getattr(module, "original_name", None) or type(module).__name__,
                    "shape": _shape(outs[0]) if outs else None,
                    "calls": len(outs),
                }
            )
    return rows


def _shape(output: Any) -> Any:
    """Per-sample shape of a module output (a tensor, or a tuple/list of them)."""
    if isinstance(output, torch.Tensor):
        return list(output.shape[1:])
    if isinstance(output, (tuple, list)):
        return [_shape(o) for o in output]
    return type(output).__name__
