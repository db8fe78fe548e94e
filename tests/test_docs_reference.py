"""docs/architecture.md and docs/cache-format.md, checked against the code they describe.

Each test reads a table (or a claim) of a page and compares it with what the code defines: the
package folders and modules, the import rule that tests/test_architecture.py enforces, the CLI
commands, dvc.yaml's stages and deps, the schema's nodes and families, the attributes real caches
carry, and the default numbers of the layout. A page that falls behind the code fails here.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.cache import layout, schema, sparse

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ARCH = (DOCS / "architecture.md").read_text(encoding="utf-8")
FORMAT = (DOCS / "cache-format.md").read_text(encoding="utf-8")
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
CODE_ROOTS = ("pipeline", "stages")
# dvc.yaml's matrix placeholders, as the pages write them.
ITEMS = {
    "${item.split}": "SPLIT",
    "${item.student}": "STUDENT",
    "${item.loss}": "LOSS",
    "${item.temperature}": "T",
}


# --------------------------------------------------------------------------- reading pages


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table row (`\\|` is a pipe inside a cell)."""
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [c.strip().replace("\\|", "|") for c in cells]


def _code(text: str) -> list[str]:
    """Every `inline code` span of `text`, in order."""
    return re.findall(r"`([^`]+)`", text)


def _table(page: str, header: str) -> dict[str, list[str]]:
    """The rows of the table of `page` whose first header cell is `header`, keyed by their
    first cell's code span (or its text when it has none)."""
    lines = page.splitlines()
    starts = [i for i, line in enumerate(lines) if line[:1] == "|" and _cells(line)[0] == header]
    assert len(starts) == 1, f"expected one table headed {header!r}, found {len(starts)}"
    rows: dict[str, list[str]] = {}
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        key = (_code(cells[0]) or [cells[0]])[0]
        assert key not in rows, f"table {header!r}: {key} listed twice"
        rows[key] = cells
    return rows


def _norm(text: str) -> str:
    for placeholder, name in ITEMS.items():
        text = text.replace(placeholder, name)
    return text


def _resolve(dotted: str) -> Any:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"{dotted}: nothing importable")


# --------------------------------------------------------------------------- architecture.md


def _packages() -> list[Path]:
    """Every package folder the map must name: pipeline's sub-packages, and stages/."""
    subs = sorted(p for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file())
    return [*subs, ROOT / "stages"]


def test_the_package_map_names_every_folder_and_every_module():
    rows = _table(ARCH, "folder")
    folders = {f"{p.relative_to(ROOT).as_posix()}/" for p in _packages()}
    assert set(rows) == folders
    for package in _packages():
        named = set(_code(rows[f"{package.relative_to(ROOT).as_posix()}/"][1]))
        modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
        assert modules <= named, f"{package.name}: not in the map: {sorted(modules - named)}"
    for top in ("pipeline/__init__.py", "pipeline/__main__.py"):
        assert f"`{top}`" in ARCH


def test_may_import_is_the_rule_test_architecture_enforces():
    from tests.test_architecture import ALLOWED

    rows = _table(ARCH, "folder")
    for package, allowed in ALLOWED.items():
        assert set(_code(rows[f"pipeline/{package}/"][2])) == allowed, package


def test_every_command_names_its_module_stage_and_library_call():
    from pipeline.cli import COMMANDS

    rows = _table(ARCH, "command")
    assert set(rows) == {f"pipeline {name}" for name in COMMANDS}
    for name, (module, _, _) in COMMANDS.items():
        _, cli, stage, library = rows[f"pipeline {name}"]
        assert _code(cli) == [f"pipeline/cli/{module}.py"], name
        stage_file = ROOT / "stages" / f"{name.replace('-', '_')}.py"
        assert _code(stage) == ([f"stages/{stage_file.name}"] if stage_file.exists() else []), name
        for call in _code(library):
            assert _resolve(call) is not None, f"{name}: {call}"


def test_the_dvc_table_is_dvc_yaml():
    rows = _table(ARCH, "DVC stage")
    assert set(rows) == set(DVC)
    for name, stage in DVC.items():
        _, command, reads, params, writes = rows[name]
        assert _code(command) == [f"pipeline {stage['cmd'].split()[1]}"], name
        data = [_norm(d) for d in stage["deps"] if d.split("/")[0] not in CODE_ROOTS]
        assert set(data) <= set(_code(reads)), name
        assert set(_code(params)) == {_norm(p) for p in stage.get("params", [])}, name
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", [])]
        outs += [next(iter(m)) for m in stage.get("metrics", [])]
        assert set(_code(writes)) == {_norm(o) for o in outs}, name


def _stages_running(path: str) -> set[str]:
    """The DVC stages whose deps cover `path` (a file, or a folder written with a slash)."""
    path = path.rstrip("/")
    return {
        name
        for name, stage in DVC.items()
        if any(path == dep or path.startswith(dep + "/") for dep in stage["deps"])
    }


def _stage_set(cell: str) -> set[str]:
    if cell == "every stage":
        return set(DVC)
    if cell == "none":
        return set()
    return set(_code(cell))


def test_what_a_change_touches_follows_the_dvc_deps():
    rows = _table(ARCH, "you edit")
    for path, (_, stages) in rows.items():
        assert _stage_set(stages) == _stages_running(path), path
    code_deps = {
        d + ("/" if (ROOT / d).is_dir() else "")
        for stage in DVC.values()
        for d in stage["deps"]
        if d.split("/")[0] in CODE_ROOTS
    }
    commands = {f"pipeline/cli/{p.name}" for p in (ROOT / "pipeline" / "cli").glob("*.py")}
    stage_files = {f"stages/{p.name}" for p in (ROOT / "stages").glob("*.py")}
    missing = (code_deps | commands | stage_files) - set(rows)
    assert not missing, f"not in the table: {sorted(missing)}"


def test_each_params_key_re_runs_the_stages_that_list_it():
    rows = _table(ARCH, "`params.yaml` key")
    expected: dict[str, set[str]] = {}
    for name, stage in DVC.items():
        for key in stage.get("params", []):
            expected.setdefault(key.split(".")[0], set()).add(name)
    assert set(rows) == set(expected)
    for key, (_, stages) in rows.items():
        assert set(_code(stages)) == expected[key], key


def test_config_layering_and_registries_name_what_the_code_defines():
    from pipeline.core.config import SECTIONS
    from pipeline.data import list_sources
    from pipeline.student.feature_losses import list_feature_losses
    from pipeline.student.losses import list_losses

    for section in SECTIONS:
        assert f"`{section}`" in ARCH, section
    for name in [*list_sources(), *list_losses(), *list_feature_losses()]:
        assert f"`{name}`" in ARCH, name
    registries = ARCH.split("## Registries", 1)[1].split("\n## ", 1)[0]
    for decorator, home in DECORATORS.items():
        assert f"register_{decorator}" in registries
        assert callable(_resolve(f"{home}.register_{decorator}")), decorator


# The registering decorators the page names, and where each lives.
DECORATORS = {
    "model": "pipeline.models",
    "source": "pipeline.data",
    "loss": "pipeline.student.losses",
    "feature_loss": "pipeline.student.feature_losses",
}


def test_run_records_are_ignored_by_dvc_and_git_as_the_page_says():
    from pipeline.core.runrecord import SUFFIX, record_path

    pattern = f"*{SUFFIX}"
    assert f"`OUT{SUFFIX}`" in ARCH and f"`{pattern}` in `.dvcignore`" in ARCH
    for ignore in (".dvcignore", ".gitignore"):
        assert pattern in (ROOT / ignore).read_text().splitlines(), ignore
    assert record_path("metrics/kd.json").name == "kd.run.json"
    assert "`metrics/NAME.run.json`" in ARCH


def test_temporary_names_are_as_documented():
    from pipeline.core.fsutil import temp_path

    name = temp_path(ROOT / "no-such-output").name
    assert re.fullmatch(r"no-such-output\.tmp-[0-9a-f]{8}", name)
    for page in (ARCH, FORMAT):
        assert "`OUT.tmp-<8 hex digits>`" in page


def test_links_stay_inside_docs_and_resolve():
    for page in ("architecture.md", "cache-format.md"):
        text = (DOCS / page).read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)]+)\)", text):
            file, _, anchor = target.partition("#")
            linked = (DOCS / (file or page)).resolve()
            assert linked.parent == DOCS and linked.is_file(), f"{page}: {target}"
            if anchor:
                assert anchor in _anchors(linked.read_text(encoding="utf-8")), f"{page}: {target}"
    assert "](api.md)" in ARCH


def _anchors(text: str) -> set[str]:
    """MkDocs' default heading ids: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings}


# --------------------------------------------------------------------------- cache-format.md


def _dims(dims: tuple[str, ...]) -> str:
    return "(N,)" if dims == ("N",) else f"({', '.join(dims)})"


def test_every_table_node_is_documented_with_its_dims_dtype_and_writing():
    rows = _table(FORMAT, "node")
    for node in schema.nodes():
        _, dims, dtype, _, written, _ = rows[node.name]
        assert dims == _dims(node.dims), node.name
        assert ("logits dtype" if node.dtype == schema.LOGITS_DTYPE else node.dtype) in dtype
        assert written == {"shard": "per shard", "create": "at create"}[node.written], node.name


# Attributes declaring every family the schema knows, in the fewest caches that can hold them.
FAMILY_ATTRS = [
    {"features": {"NAME": {"kind": "hint", "layers": ["x"], "shape": [3, 4], "dtype": "float16"}}},
    {"targets": "topk", "topk": {"k": 5, "index_dtype": "int16"}},
    {
        "targets": "sampled",
        "sample": {"k": 5, "width": 5, "index_dtype": "int16", "count_dtype": "uint8", "values": 1},
    },
]


def test_every_family_and_its_nodes_are_documented():
    rows = _table(FORMAT, "node")
    declared = [node for attrs in FAMILY_ATTRS for node in schema.declared(attrs)]
    families = schema._FAMILIES  # the registry itself: a new family must be documented
    for prefix in families:
        assert any(n.name.startswith(prefix) for n in declared), f"{prefix}: extend FAMILY_ATTRS"
        assert f"`{prefix}`" in FORMAT, prefix
    documented = {name for name in rows if name.startswith(tuple(families))}
    derived = {n.name for n in declared if not n.name.startswith(f"{schema.FEATURES}/")}
    assert documented == derived | {f"{schema.FEATURES}/NAME"}
    for node in declared:
        _, dims, dtype, _, written, _ = rows[node.name]
        if node.name.startswith(f"{schema.FEATURES}/"):
            assert dims.startswith("(N, V, NAME.0, NAME.1"), dims
        else:
            assert dims == _dims(node.dims), node.name
        assert node.dtype in dtype and written == "per shard", node.name


def test_sparse_dtype_thresholds_are_the_code_s():
    limit = np.iinfo(np.int16).max
    assert sparse.index_dtype(limit) == np.int16 and sparse.index_dtype(limit + 1) == np.int32
    assert sparse.count_dtype(255) == np.uint8 and sparse.count_dtype(256) == np.uint16
    assert f"int16 when C ≤ {limit}, else int32" in FORMAT
    assert "uint8 when K ≤ 255, else uint16" in FORMAT
    assert f"K is at most {sparse.MAX_SAMPLE_K}" in FORMAT


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """Real caches of tiny MLP teachers on 40 rows, one per feature that adds attributes:
    augmented views with features (Zarr), a kept ensemble (HDF5), top-k and sampled targets."""
    from pipeline.core.config import PrecomputeConfig
    from stages import precompute_logits
    from tests.cache.helpers import mlp_checkpoint

    tmp = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    data = tmp / "d.npz"
    x = rng.normal(size=(40, 1, 8, 8)).astype(np.float32)
    np.savez(data, x=x, y=np.arange(40) % 10, ids=np.arange(40) * 3 + 1)
    t1, t2 = (str(mlp_checkpoint(tmp / f"t{s}.pt", seed=s)) for s in (0, 1))
    runs = {
        "views.zarr": ([t1], {"views": 2, "augment": "flip", "features": FEATURES}),
        "members.h5": ([t1, t2], {"keep_members": True}),
        "topk.zarr": ([t1], {"topk": 3}),
        "sampled.zarr": ([t1], {"sample_k": 4, "sample_values": True}),
    }
    return {
        name: precompute_logits.run(PrecomputeConfig(**cfg), teachers, f"npz:{data}", tmp / name)
        for name, (teachers, cfg) in runs.items()
    }


FEATURES = ["h=2:hint", "g=input:input-grad:k=2"]
# Attributes whose values are keyed by data (names, dimensions, nodes), not by fixed keys.
KEYED_BY_DATA = {
    "dims",
    "nodes",
    "class_names",
    "shard_digests.nodes",
    "shard_digests.seals",
    "features",
    "teacher.members.files",
}


def _keys(value: Any, prefix: str = "") -> set[str]:
    """The dotted keys of every dict inside `value` (lists of dicts too), data-keyed aside."""
    out: set[str] = set()
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, dict) or prefix.rstrip(".") in KEYED_BY_DATA:
            continue
        for k, v in item.items():
            out.add(prefix + k)
            out |= _keys(v, f"{prefix}{k}.")
    return out


def _attribute_rows() -> set[str]:
    rows: set[str] = set()
    lines = FORMAT.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| attribute |"):
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.add(_code(_cells(row)[0])[0])
    return rows


def test_every_attribute_of_a_real_cache_is_documented(caches):
    from pipeline.cache import open_cache

    documented = _attribute_rows()
    seen: set[str] = set()
    for path in caches.values():
        with open_cache(path) as cache:
            attrs = cache.attrs
        assert attrs["complete"] is True
        seen |= set(attrs)
        for key in _keys(attrs):
            assert f"`{key.rsplit('.', 1)[-1]}`" in FORMAT, f"{path.name}: {key}"
        for name, record in (attrs.get(schema.FEATURES) or {}).items():
            assert {f"`{k}`" for k in record} <= set(re.findall(r"`[^`]+`", FORMAT)), name
    assert seen <= documented, f"attributes not in a table: {sorted(seen - documented)}"
    # No table row names an attribute no cache carries (partial-only and legacy ones aside).
    assert documented - seen == {layout.PROGRESS, "created_at"}


def test_partial_caches_and_shard_records_are_as_documented(tmp_path):
    from pipeline.cache import CacheWriter
    from pipeline.cache.zarr_backend import RECORDS, ZarrBackend

    out = tmp_path / "c.zarr"
    ids = np.arange(10) * 7

    def writer() -> CacheWriter:
        return CacheWriter(
            out, sample_ids=ids, labels=ids % 3, num_classes=3, num_members=2,
            chunk_rows=4, chunks_per_shard=1, run={"params": {}},
        )  # fmt: skip

    def shard(w: CacheWriter, k: int) -> None:
        rows = w.shard(k).stop - w.shard(k).start
        logits = np.ones((2, rows, 1, 3), np.float32)
        w.write_shard(k, {"logits": logits[0], "members/logits": logits}, f"{k:064x}")

    first = writer()
    shard(first, 0)
    first.abort()  # a finished shard: the partial is kept for a resume
    partial = ZarrBackend(tmp_path / "c.zarr.partial", "r")
    assert set(partial.attrs()[layout.PROGRESS]) == {"run"}
    record = json.loads((tmp_path / "c.zarr.partial" / RECORDS / "shard-0.json").read_text())
    assert set(record) == {"record", "digests"} and "`progress/shard-K.json`" in FORMAT
    assert '`{"record": ..., "digests": {node: sha256}}`' in FORMAT
    resumed = writer()
    assert resumed.shards_left == [1, 2]
    for k in resumed.shards_left:
        shard(resumed, k)
    resumed.finish({})
    for key in ("logits/c/K/0/0", "sample_ids/c/K", "members/logits/c/0/K/0/0"):
        assert f"`{key}`" in FORMAT and (out / key.replace("K", "2")).is_file(), key
    meta = json.loads((out / "logits" / "zarr.json").read_text())
    (sharding,) = meta["codecs"]
    inner = [c["name"] for c in sharding["configuration"]["codecs"]]
    index = [c["name"] for c in sharding["configuration"]["index_codecs"]]
    assert sharding["name"] == "sharding_indexed" and inner == ["bytes", "zstd", "crc32c"]
    assert index == ["bytes", "crc32c"]
    for name in (sharding["name"], *inner):
        assert f"`{name}`" in FORMAT, name


def test_hdf5_storage_is_as_documented(caches):
    import h5py

    with h5py.File(caches["members.h5"], "r") as f:
        codec, level = layout.parse_compression(layout.DEFAULT_COMPRESSION_FOR["hdf5"])
        for name in ("logits", "members/logits", "sample_ids", "labels"):
            ds = f[name]
            assert (ds.compression, ds.compression_opts, ds.fletcher32) == (codec, level, True)
        assert f["members/logits"].chunks[0] == 1  # one member per chunk
        assert json.loads(f.attrs["format"]) == layout.FORMAT  # attributes as JSON strings
    assert "`fletcher32`" in FORMAT and "JSON string" in FORMAT


def test_the_attributes_digest_covers_what_the_page_says():
    """It leaves out itself, `complete` and `progress`, and covers every other attribute."""
    attrs = {"format": layout.FORMAT, "num_classes": 10, "complete": True}
    digest = layout.attrs_digest(attrs)
    excluded = {layout.ATTRS_DIGEST: digest, "complete": False, layout.PROGRESS: {"run": {}}}
    assert layout.attrs_digest({**attrs, **excluded}) == digest
    assert layout.attrs_digest({**attrs, "num_classes": 11}) != digest
    assert "every attribute but itself, `complete` and `progress`" in FORMAT


def _render(value: Any) -> str:
    """A constant as the Defaults table writes it."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_render(v)}" for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return ", ".join(_render(v) for v in value)
    if isinstance(value, type):
        return np.dtype(value).name
    return str(value)


# The defaults the page must quote (it may quote more: every row is checked).
REQUIRED_DEFAULTS = {
    "pipeline.cache.layout.FORMAT_VERSION",
    "pipeline.cache.layout.READABLE_VERSIONS",
    "pipeline.cache.layout.CHUNK_TARGET_BYTES",
    "pipeline.cache.layout.SHARD_TARGET_ROWS",
    "pipeline.cache.layout.MAX_CHUNKS_PER_SHARD",
    "pipeline.cache.layout.DEFAULT_COMPRESSION_FOR",
    "pipeline.cache.layout.LEVELS",
    "pipeline.cache.layout.STORED_DTYPES",
    "pipeline.cache.layout.ATTRS_DIGEST",
    "pipeline.cache.sparse.MAX_SAMPLE_K",
}


def test_every_default_quoted_is_the_code_s():
    rows = _table(FORMAT, "constant")
    assert REQUIRED_DEFAULTS <= set(rows)
    for dotted, (_, value, _) in rows.items():
        assert value.replace("`", "").startswith(_render(_resolve(dotted))), dotted
    assert f"about {layout.CHUNK_TARGET_BYTES >> 20} MiB" in FORMAT
    assert f"`format_version` | {layout.FORMAT_VERSION} |" in FORMAT


def test_the_worked_chunk_examples_follow_the_layout_rules():
    rows = _table(FORMAT, "logits row")
    assert len(rows) >= 4
    for row, (_, row_bytes, chunk_rows, per_shard, shard_rows) in rows.items():
        sizes = dict(re.findall(r"(\w) = (\d+)", row))
        (dtype,) = re.findall(r"b?float\d+", row.split("(")[0])
        word = layout.stored_dtype(dtype)
        if word.name != dtype:  # bfloat16: the page names the stored words
            assert f"stored as {word.name}" in row, row
        expected = int(sizes["V"]) * int(sizes["C"]) * word.itemsize
        chunk = layout.chunk_rows_for(expected)
        chunks = layout.chunks_per_shard_for(chunk)
        got = (int(row_bytes), int(chunk_rows), int(per_shard), int(shard_rows))
        assert got == (expected, chunk, chunks, chunk * chunks), row
