"""Feature targets, the contract: what `--features` means, and the formulas both stages apply.

A feature target is an intermediate teacher output cached beside the logits, per view. Stage
one (pipeline.teacher.features) computes it; stage two (pipeline.student.feature_losses)
applies the same formula to the student, so both import it from here.

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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import PipelineError
from pipeline.data.views import Param, splitmix, view_seeds

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
        values[key] = kind.params[key].parse(raw, key, text, where)
    params = tuple((k, values.get(k, p.default)) for k, p in kind.params.items())
    return params, dtype


# ------------------------------------------------------------------ projections (input-grad)


def projections(seed: int, sample_ids: np.ndarray, view: int, k: int, c: int) -> np.ndarray:
    """The k unit vectors r_k in R^c of view `view` of each sample: a function of (seed, sample
    id, view, k) alone, like a view's seed (SplitMix64 mixing, then Box-Muller normals scaled
    to unit length), so stage two rebuilds them in any batch.  # (B, k, c) float32"""
    ids = np.ascontiguousarray(sample_ids, dtype=np.int64).reshape(-1)
    per_view = view_seeds(seed, ids, view + 1)[:, view].view(np.uint64)  # (B,)
    keys = splitmix(per_view[:, None] ^ (_TAG | np.arange(k, dtype=np.uint64)))  # (B, k)
    counters = keys[:, :, None] + np.arange(2 * c, dtype=np.uint64)  # (B, k, 2c), wraps
    bits = splitmix(counters) >> np.uint64(11)  # 53 random bits each
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
