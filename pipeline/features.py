"""Feature targets: intermediate teacher outputs cached beside the logits, per view.

Grammar (`--features`, repeatable; or `features: [...]` in the precompute_logits section)::

    FEATURE := NAME "=" LAYERS ":" KIND [":" KEY "=" VALUE (("," | ":") KEY "=" VALUE)*]
    LAYERS  := a module path of the teacher (`pipeline layers TEACHER` lists them), two joined
               by "," for fsp, or "input" for the gradient kinds

    attention[:p=2]            AT (Zagoruyko & Komodakis 2017): mean over channels of |A|^p of a
                               (C, *spatial) activation, flattened, L2-normalised per sample:
                               (N, V, prod(spatial)) float32
    hint[:dtype=float16]       the raw activation, for FitNets and NST: (N, V, *activation)
    fsp                        FSP (Yim et al. 2017): A·Bᵀ / (H·W) between two layers of equal
                               spatial size: (N, V, C_a, C_b) float32
    input-grad[:k=1,t=1,dtype=float16]
                               Sobolev training (Czarnecki et al. 2017): the gradient of
                               <softmax(z / t), r_k> with respect to the input, for k seeded
                               unit vectors r_k in R^C (`projections`): (N, V, k, *input)
    grad-attention             AT §3.2: sum over channels of |dCE(z, y)/dx| (y the label, the
                               teacher's top class where unknown), flattened, L2-normalised:
                               (N, V, prod(spatial)) float32

e.g. "att3=layers.2:attention", "g12=layer1,layer2:fsp", "sob=input:input-grad:k=2,t=4".

Each feature is the cache node `features/NAME` (the schema's feature family); the attribute
`features` records what it is (`Feature.record`). Hook kinds come from the very forward call
that gives the logits of that view; gradient kinds from a second call with autograd. Features
need one torch teacher: an ensemble, an ONNX model (no hooks, no gradients) and, for the hook
kinds, a TorchScript module (no forward hooks) are refused.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache.schema import FEATURES, feature_dims
from pipeline.errors import PipelineError
from pipeline.views import Param, _splitmix, view_seeds

if TYPE_CHECKING:  # stage two imports this module for `projections`, never the teachers
    from pipeline.teachers import Teacher

INPUT = "input"  # the LAYERS of the gradient kinds
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
DTYPES = ("float16", "float32")
# Names how input-grad projections are drawn; recorded, so stage two rebuilds the same ones.
PROJECTIONS = "splitmix64-boxmuller/1"
_TAG = np.uint64(0x50524F4A00000000)  # "PROJ": keeps projection keys apart from view seeds


@dataclass(frozen=True)
class Kind:
    """A feature kind: its parameters, what it is computed from and how it is stored."""

    params: dict[str, Param]
    layers: int  # module paths it names: 1, 2 (fsp), 0 (the gradient kinds: "input")
    dtype: str  # stored dtype; a kind with several takes :dtype=
    dtypes: tuple[str, ...] = ()
    what: str = ""


def _positive(v: float) -> bool:
    return v > 0


KINDS: dict[str, Kind] = {
    "attention": Kind({"p": Param(float, 2.0, _positive, "> 0")}, 1, "float32", (), "AT map"),
    "hint": Kind({}, 1, "float16", DTYPES, "raw activation"),
    "fsp": Kind({}, 2, "float32", (), "FSP matrix"),
    "input-grad": Kind(
        {"k": Param(int, 1, lambda v: v >= 1, ">= 1"), "t": Param(float, 1.0, _positive, "> 0")},
        0,
        "float16",
        DTYPES,
        "input gradient of projected soft outputs",
    ),
    "grad-attention": Kind({}, 0, "float32", (), "gradient attention map"),
}


@dataclass(frozen=True)
class FeatureSpec:
    """One `--features` entry: a name, a kind, its layers and every parameter (defaults in)."""

    name: str
    kind: str
    layers: tuple[str, ...]
    params: tuple[tuple[str, int | float], ...]
    dtype: str

    def __getitem__(self, key: str) -> int | float:
        return dict(self.params)[key]

    @property
    def canonical(self) -> str:
        """e.g. "att3=layers.2:attention:p=2.0" (dtype written only when not the kind's)."""
        items = [f"{k}={v!r}" for k, v in self.params]
        if self.dtype != KINDS[self.kind].dtype:
            items.append(f"dtype={self.dtype}")
        return f"{self.name}={','.join(self.layers)}:{self.kind}" + "".join(
            f":{item}" for item in items
        )

    @property
    def hooked(self) -> bool:
        """Taken from module outputs by forward hooks (else from gradients of the input)."""
        return KINDS[self.kind].layers > 0


def parse_features(texts: list[str], where: str = "--features") -> list[FeatureSpec]:
    """The `--features` entries `texts`, in the module's grammar; `where` names the option or
    params key in errors."""
    specs: list[FeatureSpec] = []
    for text in texts:
        spec = _parse_one(str(text), where)
        if any(s.name == spec.name for s in specs):
            raise PipelineError(f"{where} {text!r}: feature name {spec.name!r} given twice")
        specs.append(spec)
    return specs


def _parse_one(text: str, where: str) -> FeatureSpec:
    name, eq, rest = (s.strip() for s in text.partition("="))
    layers, _, tail = rest.partition(":")
    kind_name, _, given = (s.strip() for s in tail.partition(":"))
    if not eq or not NAME.fullmatch(name) or not layers.strip() or not kind_name:
        raise PipelineError(
            f"{where} {text!r}: expected NAME=LAYER:KIND, e.g. att3=layers.2:attention (NAME: "
            "a letter, then letters, digits, _ or -)"
        )
    kind_name = kind_name.lower()
    if kind_name not in KINDS:
        raise PipelineError(
            f"{where} {text!r}: unknown kind {kind_name!r} (known: {', '.join(KINDS)})"
        )
    kind = KINDS[kind_name]
    paths = tuple(p.strip() for p in layers.split(","))
    if kind.layers == 0 and paths != (INPUT,):
        raise PipelineError(
            f"{where} {text!r}: {kind_name} is taken at the teacher's input: write "
            f"{name}={INPUT}:{kind_name}"
        )
    if kind.layers and (len(paths) != kind.layers or not all(paths)):
        form = "LAYER_A,LAYER_B" if kind.layers == 2 else "LAYER"
        raise PipelineError(f"{where} {text!r}: {kind_name} takes {name}={form}:{kind_name}")
    params, dtype = _params(kind_name, given, text, where)
    return FeatureSpec(name, kind_name, paths, params, dtype)


def _params(
    kind_name: str, given: str, text: str, where: str
) -> tuple[tuple[tuple[str, int | float], ...], str]:
    """The parameters written after KIND (defaults filled in), and the stored dtype."""
    kind, values, dtype = KINDS[kind_name], {}, KINDS[kind_name].dtype
    for item in (i.strip() for i in re.split(r"[,:]", given) if i.strip()):
        key, eq, raw = (s.strip() for s in item.partition("="))
        if key == "dtype" and kind.dtypes and raw in kind.dtypes:
            dtype = raw
            continue
        if key == "dtype" and kind.dtypes:
            raise PipelineError(
                f"{where} {text!r}: dtype must be one of {', '.join(kind.dtypes)}, got {raw!r}"
            )
        if key not in kind.params or not eq or key in values:
            known = ", ".join([*kind.params, *(["dtype"] if kind.dtypes else [])]) or "none"
            raise PipelineError(
                f"{where} {text!r}: {kind_name} takes KEY=VALUE once per key, got {item!r} "
                f"(its keys: {known})"
            )
        values[key] = _value(kind.params[key], key, raw, text, where)
    params = tuple((k, values.get(k, p.default)) for k, p in kind.params.items())
    return params, dtype


def _value(param: Param, key: str, raw: str, text: str, where: str) -> int | float:
    try:
        value = param.kind(raw)
    except ValueError:
        value = None
    if value is None or not np.isfinite(value) or not param.ok(value):
        what = "an integer" if param.kind is int else "a number"
        raise PipelineError(f"{where} {text!r}: {key} must be {what} {param.bounds}, got {raw!r}")
    return value


# ------------------------------------------------------------------ projections (input-grad)


def projections(seed: int, sample_ids: np.ndarray, view: int, k: int, c: int) -> np.ndarray:
    """The k unit vectors r_k in R^c of view `view` of each sample: a function of (seed, sample
    id, view, k) alone, like a view's seed (SplitMix64 mixing, then Box-Muller normals scaled
    to unit length), so stage two rebuilds them in any batch.  # (B, k, c) float32"""
    ids = np.ascontiguousarray(sample_ids, dtype=np.int64).reshape(-1)
    per_view = view_seeds(seed, ids, view + 1)[:, view].view(np.uint64)  # (B,)
    keys = _splitmix(per_view[:, None] ^ (_TAG | np.arange(k, dtype=np.uint64)))  # (B, k)
    counters = keys[:, :, None] + np.arange(2 * c, dtype=np.uint64)  # (B, k, 2c), wraps
    bits = _splitmix(counters) >> np.uint64(11)  # 53 random bits each
    u = (bits.astype(np.float64) + 0.5) / 2.0**53  # in (0, 1)
    z = np.sqrt(-2.0 * np.log(u[..., :c])) * np.cos(2.0 * np.pi * u[..., c:])  # (B, k, c)
    return (z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32)


def feature_projections(record: dict[str, Any], sample_ids: np.ndarray, view: int, c: int):
    """`projections` of an input-grad feature as its cache record (`features` attribute)
    states them.  # (B, k, c) float32"""
    params = record["params"]
    if record.get("projections") != PROJECTIONS:
        raise PipelineError(
            f"feature projections made by {record.get('projections')!r}; this version makes "
            f"{PROJECTIONS}"
        )
    return projections(int(params["seed"]), sample_ids, view, int(params["k"]), c)


# ------------------------------------------------------------- the formulas (both stages)


def attention_map(a: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT: mean over channels of |a|^p, flattened, L2-normalised per sample.
    (B, C, *spatial) -> (B, prod(spatial)) float32"""
    a = a.to(torch.promote_types(a.dtype, torch.float32))  # half → float32, float64 kept
    return F.normalize(a.abs().pow(p).mean(1).flatten(1), dim=1)


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FSP: a·bᵀ / (H·W) over the spatial positions.  (B, Ca, *S), (B, Cb, *S) -> (B, Ca, Cb)"""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dtype).flatten(2), b.to(dtype).flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[2]


def projected_gradients(
    logits: torch.Tensor,
    inputs: torch.Tensor,
    r: torch.Tensor,
    t: float,
    create_graph: bool = False,
    retain_graph: bool = False,
) -> torch.Tensor:
    """d<softmax(logits / t), r_k>/d inputs for each k (rows are independent: an eval-mode
    model); `create_graph` for a student's double backprop (sobolev).
    logits (B, C), r (B, k, C) -> (B, k, *input)"""
    p = torch.softmax(logits.float() / t, dim=1)  # (B, C)
    grads = []
    for k in range(r.shape[1]):
        keep = create_graph or retain_graph or k < r.shape[1] - 1
        (g,) = torch.autograd.grad(
            (p * r[:, k]).sum(), inputs, create_graph=create_graph, retain_graph=keep
        )
        grads.append(g)
    return torch.stack(grads, 1)


def gradient_attention(
    logits: torch.Tensor,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    retain_graph: bool = False,
    create_graph: bool = False,
) -> torch.Tensor:
    """AT §3.2: sum over channels of |dCE(logits, y)/d inputs|, flattened, L2-normalised; y is
    the label, the top class where it is -1 (stage two passes the teacher's top class there).
    `create_graph` for a student's double backprop.  (B, C) -> (B, prod(spatial))"""
    y = torch.where(labels >= 0, labels, logits.argmax(1))
    dtype = torch.promote_types(logits.dtype, torch.float32)
    ce = F.cross_entropy(logits.to(dtype), y, reduction="sum")  # sum: each row its own gradient
    keep = retain_graph or create_graph
    (g,) = torch.autograd.grad(ce, inputs, retain_graph=keep, create_graph=create_graph)
    return F.normalize(g.to(dtype).abs().sum(1).flatten(1), dim=1)


# ------------------------------------------------------------------- against the teacher


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


def hookable(module: torch.nn.Module) -> bool:
    """Whether forward hooks can be registered on `module` (not on a TorchScript one)."""
    try:
        module.register_forward_hook(lambda *a: None).remove()
    except (NotImplementedError, RuntimeError):
        return False
    return True


def find_layer(
    module: torch.nn.Module,
    path: str,
    what: str,
    hint: str = "`pipeline layers TEACHER` lists them all",
) -> torch.nn.Module:
    """Submodule `path` of `module`; one that does not exist is an error listing the closest
    names (`what` starts it, e.g. "--features 'a=x:hint': teacher t.pt")."""
    found = dict(module.named_modules())
    if path and path in found:
        return found[path]
    names = [n for n in found if n]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.3) or names[:5]
    raise PipelineError(
        f"{what} has no layer {path!r} (closest: {', '.join(close) or 'none'}; {hint})"
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
