"""Loading teachers for stage one, and the provenance each one leaves in the cache.

A teacher is anything that maps a float32 batch (B, *input_shape) to logits (B, C). A
`--teacher` source is one of:

- a checkpoint written by `pipeline train-teacher` (the registry's model, rebuilt; one of a
  factory model is refused here: it is `package.module:function@checkpoint.pt`, below);
- a TorchScript file (`torch.jit.save`), recognised by its contents, whatever its name;
- an ONNX model (`*.onnx`), run with onnxruntime (`pip install 'kd-pipeline[onnx]'`), so
  teachers trained in Keras, TF or JAX can be distilled into PyTorch students; one exported
  with a static batch size is run in chunks of that size;
- a Hugging Face causal LM directory (config.json + *.safetensors; `pipeline.models.hf`), for
  token-level distillation of language models;
- a Python factory `package.module:function`, optionally `@weights.pt` (a state dict loaded
  into what the function returns), imported from the working directory or sys.path; when
  the weights are a train-teacher checkpoint of that very factory, the model is rebuilt as
  it was trained (its num_classes, input_shape and model kwargs).

No file names code that runs: only a factory the user writes in `--teacher` (or params.yaml)
is imported, and a TorchScript or ONNX file is the user's choice to run.

Every member is run once on the first batch of the transfer set before the long run starts,
so a wrong input shape or class count fails in seconds with a message naming the teacher.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import PipelineError, one_line
from pipeline.core.fsutil import sha256_file
from pipeline.core.usercode import call, load_function
from pipeline.models.checkpoint import UntrustedCode, from_payload, load_checkpoint, names_model

# package.module:function[@weights] — a path never matches: it has no ':' before a dotted name.
FACTORY = re.compile(
    r"^(?P<module>[A-Za-z_][\w.]*):(?P<function>[A-Za-z_]\w*)(?:@(?P<weights>.+))?$"
)
FORMS = (
    "a train-teacher checkpoint, a TorchScript or .onnx file, "
    "package.module:function[@weights.pt], or a Hugging Face causal LM directory"
)


@dataclass
class Teacher:
    """A loaded ensemble member and where it came from."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # (B, *input_shape) → (B, C)
    source: str
    sha256: str
    name: str
    num_classes: int | None = None  # None: learnt from the probe batch
    class_names: list[str] | None = None
    input_shape: tuple[int, ...] | None = None
    num_params: int | None = None
    kind: str = "checkpoint"  # checkpoint | torchscript | factory | onnx | hf
    module: torch.nn.Module | None = field(default=None, repr=False)
    # Every file its outputs depend on, path -> sha256: the model file, and a factory's code
    # and weights, an ONNX model's external data. Empty: `sha256`'s file alone.
    files: dict[str, str] = field(default_factory=dict)

    def to(self, device: torch.device) -> Teacher:
        if self.module is not None:
            self.module.to(device).eval()
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "sha256": self.sha256,
            "files": self.files or {self.source: self.sha256},
            "num_params": self.num_params,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "num_classes": self.num_classes,
        }


def load_teacher(source: str) -> Teacher:
    """One teacher from any source form (see the module docstring)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".onnx":
            return _load_onnx(source, path)
        if _is_torchscript(path):
            return _load_torchscript(source, path)
        return _load_checkpoint(source, path)
    match = FACTORY.match(source)
    if match:
        return _load_factory(source, **match.groupdict())
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf(source, path)
    if path.is_dir():  # e.g. a TF SavedModel: it needs exporting first
        raise PipelineError(f"--teacher {source}: is a directory; a teacher is {FORMS}")
    raise PipelineError(f"--teacher {source}: checkpoint not found (a teacher is {FORMS})")


def load_teachers(sources: list[str], probe: np.ndarray) -> list[Teacher]:
    """Load every ensemble member and run each on `probe` (B, *input_shape).

    All members must accept the inputs and agree on class count and class names.
    """
    if not sources:
        raise PipelineError("give at least one --teacher")
    teachers = [load_teacher(src) for src in sources]
    for t in teachers:
        _probe(t, probe)
    first = teachers[0]
    for t in teachers[1:]:
        if t.num_classes != first.num_classes:
            raise PipelineError(
                f"--teacher {t.source} has {t.num_classes} classes but {first.source} has "
                f"{first.num_classes}; ensemble members must agree"
            )
        if t.class_names and first.class_names and t.class_names != first.class_names:
            raise PipelineError(f"--teacher {t.source}: class names differ from {first.source}'s")
    return teachers


def _load_checkpoint(source: str, path: Path) -> Teacher:
    try:
        model, meta = load_checkpoint(path)
    except UntrustedCode as e:
        raise PipelineError(
            f"--teacher {source}: its model is the code {e.reference!r}, and a checkpoint may "
            f"not run code; if you trust {e.reference}, give the teacher as "
            f"{e.reference}@{source}"
        ) from None
    except PipelineError as e:
        detail = str(e).removeprefix(f"{path}: ")
        raise PipelineError(
            f"--teacher {source}: {detail}, nor a TorchScript or ONNX file (a bare state dict "
            f"needs its model code: package.module:function@{source})"
        ) from None
    return _checkpoint_teacher(source, path, model, meta, "checkpoint")


def _checkpoint_teacher(
    source: str, path: Path, model: torch.nn.Module, meta: dict[str, Any], kind: str
) -> Teacher:
    """A Teacher around a model rebuilt from the train-teacher checkpoint at `path`."""
    return Teacher(
        forward=model,
        source=source,
        sha256=sha256_file(path),
        name=meta["model"],
        num_classes=int(meta["num_classes"]),
        class_names=meta.get("class_names"),
        input_shape=tuple(meta["input_shape"]) if meta.get("input_shape") else None,
        num_params=meta.get("num_params"),
        kind=kind,
        module=model,
    )


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips holding constants.pkl and code/; torch.save zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") for name in z.namelist())


def _load_torchscript(source: str, path: Path) -> Teacher:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # jit is deprecated, still read
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise PipelineError(
            f"--teacher {source}: not a loadable TorchScript file ({one_line(e)})"
        ) from None
    return _module_teacher(module, source, sha256_file(path), path.stem, "torchscript")


def _load_factory(source: str, module: str, function: str, weights: str | None) -> Teacher:
    """`module:function[@weights]`: import, call with no arguments, load the state dict; or,
    when `weights` is a train-teacher checkpoint of this factory, rebuild it as trained."""
    reference = f"{module}:{function}"
    path = None if weights is None else Path(weights).expanduser()
    state = None if path is None else _read_state(source, path)
    if path is not None and names_model(state, reference):
        model, meta = from_payload(path, state, code=reference, trust_with="--teacher")
        teacher = _checkpoint_teacher(source, path, model, meta, "factory")
        teacher.files = {str(path): teacher.sha256, **_code_files(reference)}
        return teacher
    fn, origin = load_function(reference, "--teacher")
    model = call(fn, "--teacher", source)
    if not isinstance(model, torch.nn.Module):
        raise PipelineError(
            f"--teacher {source}: {module}.{function}() returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    files = {origin["source"]: origin["sha256"]}  # the code, whose file makes the model
    if path is not None:
        _load_state_dict(source, model, path, state)
        digest = sha256_file(path)
        files = {str(path): digest, **files}
    else:  # the weights are whatever the code makes: its file is the provenance
        digest = origin["sha256"]
    teacher = _module_teacher(model, source, digest, function, "factory")
    teacher.files = files
    return teacher


def _load_hf(source: str, path: Path) -> Teacher:
    """A Hugging Face causal LM directory (`pipeline.models.hf`): every file in it is
    provenance (weights, config, tokenizer)."""
    from pipeline.models.hf import load_hf_teacher

    files = {str(p): sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}
    digest = sha256_file_list(files)
    module = load_hf_teacher(path)
    teacher = _module_teacher(module, source, digest, path.name, "hf")
    teacher.files, teacher.num_classes = files, module.vocab
    return teacher


def sha256_file_list(files: dict[str, str]) -> str:
    """One digest of several files' digests (a directory teacher's identity)."""
    import hashlib

    text = "\n".join(f"{Path(name).name} {digest}" for name, digest in files.items())
    return hashlib.sha256(text.encode()).hexdigest()


def _code_files(reference: str) -> dict[str, str]:
    """{reference: sha256 of its module's source file}, for a factory named on the command line."""
    _, origin = load_function(reference, "--teacher")
    return {origin["source"]: origin["sha256"]}


def _read_state(source: str, path: Path) -> Any:
    """The weights file of a factory teacher, read with weights_only=True."""
    if not path.is_file():
        raise PipelineError(f"--teacher {source}: weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PipelineError(
            f"--teacher {source}: {path} is not a readable state dict ({one_line(e)})"
        ) from None


def _load_state_dict(source: str, model: torch.nn.Module, path: Path, state: Any) -> None:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a kd-pipeline or Lightning-style checkpoint
    if not isinstance(state, dict):
        raise PipelineError(
            f"--teacher {source}: {path} holds {type(state).__name__}, not a state dict"
        )
    try:
        model.load_state_dict(state)
    except Exception as e:
        flat = " ".join(line.strip() for line in str(e).splitlines())
        raise PipelineError(
            f"--teacher {source}: {path} does not fit the model: {flat[:400]}"
        ) from None


def _module_teacher(
    model: torch.nn.Module, source: str, sha256: str, name: str, kind: str
) -> Teacher:
    """A Teacher around a torch module; the module may declare input_shape and class_names."""
    model.eval()
    shape = getattr(model, "input_shape", None)
    names = getattr(model, "class_names", None)
    return Teacher(
        forward=model,
        source=source,
        sha256=sha256,
        name=name,
        class_names=list(names) if isinstance(names, (list, tuple)) else None,
        input_shape=tuple(shape) if isinstance(shape, (list, tuple)) else None,
        num_params=sum(p.numel() for p in model.parameters()),
        kind=kind,
        module=model,
    )


# onnxruntime's input type names → numpy dtypes a batch is cast to.
ONNX_INPUT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    # A language model's token ids (batch, length) → logits (batch, length, vocabulary).
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OnnxForward:
    """Runs an onnxruntime session on torch batches; logits come back on the batch's device.

    A graph exported with a static batch of B (no dynamic batch axis) is run in chunks of B
    rows, the last one padded with copies of its last row, whose outputs are dropped.
    """

    def __init__(
        self, session: Any, input_name: str, output_name: str, dtype: Any, shape: list[Any]
    ):
        self.session = session
        self.input_name, self.output_name = input_name, output_name
        self.dtype = dtype  # what the graph's input takes: float32, float64 or float16
        self.shape = list(shape)  # the declared input shape: ints are static, names dynamic
        self.static_batch = shape[0] if shape and _static(shape[0]) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, *input_shape) → (B, C)
        batch = x.detach().cpu().numpy().astype(self.dtype, copy=False)
        size = self.static_batch
        if size is None or len(batch) == size:
            return torch.from_numpy(self._run(batch)).to(x.device)
        outs = []
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]  # (≤size, *input_shape)
            pad = size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            outs.append(self._run(chunk)[: size - pad])
        return torch.from_numpy(np.concatenate(outs)).to(x.device)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        return np.asarray(out)

    def check(self, source: str, got: tuple[int, ...]) -> None:
        """Refuse batches of shape `got` (batch included) that a static dimension of the
        declared input shape disagrees with; a static batch size is chunked, never refused."""
        want, name = _dims(self.shape), self.input_name
        if len(self.shape) != len(got):
            raise PipelineError(
                f"--teacher {source}: ONNX input '{name}' has {len(self.shape)} dimensions "
                f"{want}, the data's batches have {len(got)} {_dims(got)}"
            )
        for i, (w, g) in enumerate(zip(self.shape, got, strict=True)):
            if i > 0 and _static(w) and w != g:
                raise PipelineError(
                    f"--teacher {source}: ONNX input '{name}' has a static dimension {i} = {w} "
                    f"but the data has {g}: model expects {want}, got {_dims(got)} "
                    "(batch first)"
                )


def _static(dim: Any) -> bool:
    """Whether an onnxruntime shape entry is a fixed size (dynamic ones are names or None)."""
    return isinstance(dim, int) and dim > 0


def _load_onnx(source: str, path: Path) -> Teacher:
    try:
        import onnxruntime as ort
    except ImportError:
        raise PipelineError(
            f"--teacher {source}: ONNX teachers need onnxruntime: pip install 'kd-pipeline[onnx]'"
        ) from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings on stderr for every run
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [p for p in wanted if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:
        raise PipelineError(
            f"--teacher {source}: not a loadable ONNX model ({one_line(e)})"
        ) from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise PipelineError(
            f"--teacher {source}: ONNX model has {len(inputs)} inputs ({names}); "
            "a teacher takes one"
        )
    out = outputs[0]  # the logits; other outputs (probabilities, features) are ignored
    dtype = ONNX_INPUT_TYPES.get(inputs[0].type)
    if dtype is None:
        raise PipelineError(
            f"--teacher {source}: ONNX input '{inputs[0].name}' is {inputs[0].type}; "
            "expected a float tensor (or integer token ids)"
        )
    tokens = np.issubdtype(dtype, np.integer)  # a language model: (batch, length, vocabulary)
    if len(out.shape) != (3 if tokens else 2):
        want = "(batch, length, vocabulary) logits of token ids" if tokens else "(batch, classes)"
        raise PipelineError(
            f"--teacher {source}: ONNX output '{out.name}' has shape {_dims(out.shape)}; "
            f"expected {want}"
        )
    sample = inputs[0].shape[1:]  # (batch, *sample): a static batch is run in chunks
    return Teacher(
        forward=OnnxForward(session, inputs[0].name, out.name, dtype, inputs[0].shape),
        source=source,
        sha256=sha256_file(path),
        name=path.stem,
        num_classes=out.shape[-1] if isinstance(out.shape[-1], int) else None,
        input_shape=tuple(sample) if all(isinstance(d, int) for d in sample) else None,
        num_params=_onnx_num_params(path),
        kind="onnx",
        files=_onnx_files(path),
    )


def _onnx_files(path: Path) -> dict[str, str]:
    """The .onnx file and every external-data file its tensors name (weights kept beside the
    model file, as large exports do), each with its sha256."""
    files = {str(path): sha256_file(path)}
    try:
        import onnx
    except ImportError:  # onnxruntime alone cannot list them; the model file still counts
        return files
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in tensor.external_data}.get("location")
            data = path.parent / where if where else None
            if data is not None and str(data) not in files and data.is_file():
                files[str(data)] = sha256_file(data)
    return files


def _onnx_num_params(path: Path) -> int | None:
    """Parameter count from the model's initializers when the `onnx` package is installed."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _dims(shape: list[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _probe(t: Teacher, probe: np.ndarray) -> None:
    """Run `t` on the first batch: check the input shape it expects and the output it gives."""
    got = tuple(probe.shape[1:])
    if isinstance(t.forward, OnnxForward):  # the declared shape, batch included
        t.forward.check(t.source, tuple(probe.shape))
    elif t.input_shape is not None and tuple(t.input_shape) != got:
        raise PipelineError(
            f"--teacher {t.source} expects inputs of shape {tuple(t.input_shape)}, "
            f"the data has {got}"
        )
    try:
        with torch.inference_mode():
            out = t(torch.from_numpy(np.ascontiguousarray(probe)))
    except Exception as e:  # a foreign model may raise anything on a bad shape
        raise PipelineError(
            f"--teacher {t.source} rejected inputs of shape {got}{_expected(t)}: {_reason(t, e)}"
        ) from None
    if out.ndim != 2 or out.shape[0] != len(probe):
        raise PipelineError(
            f"--teacher {t.source}: expected output (batch, classes), got {tuple(out.shape)}"
        )
    if t.num_classes is None:
        t.num_classes = int(out.shape[1])
    elif out.shape[1] != t.num_classes:
        raise PipelineError(
            f"--teacher {t.source}: outputs {out.shape[1]} classes, its checkpoint says "
            f"{t.num_classes}"
        )


def _expected(t: Teacher) -> str:
    """What the teacher says it takes, as a hint when it rejects the data."""
    if isinstance(t.forward, OnnxForward):
        return f" (model expects {_dims(t.forward.shape)}, batch first)"
    return f" (expects {tuple(t.input_shape)})" if t.input_shape else _first_layer(t.module)


def _reason(t: Teacher, e: Exception) -> str:
    """The model's own error on one line; onnxruntime's spreads the useful part (which index,
    got, expected) over several lines, so those are joined."""
    if not isinstance(t.forward, OnnxForward):
        return one_line(e, with_type=False)
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:400]


def _first_layer(module: torch.nn.Module | None) -> str:
    """What the first Linear/Conv layer takes, as a hint when a model rejects the data."""
    if module is None:
        return ""
    for m in module.modules():
        kind = getattr(m, "original_name", None) or type(m).__name__  # scripted modules too
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if kind == "Linear":
            return f" (its first layer, Linear, takes {weight.shape[1]} features per sample)"
        if kind in ("Conv1d", "Conv2d", "Conv3d"):
            channels = weight.shape[1] * int(getattr(m, "groups", 1))
            return f" (its first layer, {kind}, takes {channels} channels)"
    return ""
