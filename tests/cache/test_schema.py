"""The cache schema as data: a node added to the table alone is written, read, verified,
converted and inspected by the existing code; node checks refuse bad values at write time."""

import shutil

import numpy as np
import pytest
import zarr

from pipeline.cache import CacheWriter, open_cache, schema
from pipeline.cache.reader import describe, describe_lines
from pipeline.cache.schema import LABELS, LOGITS, MEMBER_LOGITS, SAMPLE_IDS, VIEW_SEEDS, Node
from pipeline.cache.verify import check_cache
from pipeline.cache.writer import finished_shards
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.data import load_transfer_set
from stages import convert_cache, precompute_logits
from tests.cache.helpers import mlp_checkpoint, portable_attrs, reseal, zarr_files
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

N, V, C, K = 50, 2, 4, 3
# Shards of 2 chunks of 4 rows: 7 shards, the last one of 2 rows.
LAYOUT = {"chunk_rows": 4, "chunks_per_shard": 2}
IDS = np.arange(N, dtype=np.int64) * 10 + 7
PROVENANCE = {
    "class_names": None,
    "teacher": {"members": []},
    "data": {"spec": "test", "fingerprint": "0" * 64},
    "params": {},
    "created_with": {},
    "created_at": "2024-01-01T00:00:00+00:00",
}


def check_scores(values: np.ndarray, block: schema.Block) -> list[str]:
    """Scores are probabilities: every value in [0, 1]."""
    ok = (values >= 0) & (values <= 1)
    bad = ~ok.all(axis=tuple(a for a in range(values.ndim) if a != block.axis))
    if bad.any():
        return [f"outside [0, 1] for sample ids {block.ids[bad][:5].tolist()}"]
    return []


SCORES = Node(
    "extra/scores", ("N", "V", "K"), "float32", check=check_scores, doc="a test-only node"
)


@pytest.fixture
def scores_node():
    with schema.registered(SCORES) as node:
        yield node
    assert SCORES.name not in [n.name for n in schema.nodes()]


def rows_of_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(N, V, C)).astype(np.float32) * 4  # (N, V, C)
    scores = rng.uniform(size=(N, V, K)).astype(np.float32)  # (N, V, K)
    labels = np.arange(N) % (C + 1) - 1  # -1 (unknown) .. C-1
    return logits, scores, labels


def writer(path, labels, **kwargs) -> CacheWriter:
    kwargs = {"nodes": [SCORES.name], "dims": {"K": K}, **LAYOUT, **kwargs}
    return CacheWriter(
        path, sample_ids=IDS, labels=labels, num_classes=C, num_views=V, **kwargs
    )  # fmt: skip


def write_scores_cache(path, logits, scores, labels):
    """A cache with the extra node, written shard by shard."""
    with writer(path, labels) as w:
        assert w.num_shards == 7 and w.shard_nodes == [LOGITS, SCORES.name]
        for k in range(w.num_shards):
            rows = w.shard(k)
            w.write_shard(k, {LOGITS: logits[rows], SCORES.name: scores[rows]}, f"shard {k}")
        return w.finish(PROVENANCE)


def assert_same_cache(a, b, logits, scores, labels):
    with open_cache(a) as x, open_cache(b) as y:
        assert portable_attrs(x.attrs) == portable_attrs(y.attrs)
        if x.format == y.format:  # same stored bytes, same digests
            assert x.attrs == y.attrs
        assert x.nodes() == y.nodes()
        for node in x.nodes():
            sx, sy = x.read_stored(node.name), y.read_stored(node.name)
            assert sx.dtype == sy.dtype and sx.tobytes() == sy.tobytes()
        np.testing.assert_array_equal(y.read(SCORES.name), scores)
        np.testing.assert_array_equal(y.logits(), logits)
        np.testing.assert_array_equal(y.labels, labels)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_registered_node_goes_through_write_read_verify_convert_inspect(
    tmp_path, scores_node, suffix
):
    logits, scores, labels = rows_of_data()
    out = write_scores_cache(tmp_path / f"c{suffix}", logits, scores, labels)
    with open_cache(out) as cache:
        assert cache.format == ("hdf5" if suffix == ".h5" else "zarr")
        assert cache.attrs["dims"] == {"K": 3} and cache.attrs["nodes"] == ["extra/scores"]
        assert [n.name for n in cache.nodes()] == [LOGITS, SAMPLE_IDS, LABELS, SCORES.name]
        got = cache.read(SCORES.name)
        assert got.dtype == np.float32 and got.shape == (N, V, K)
        np.testing.assert_array_equal(got, scores)
        np.testing.assert_array_equal(cache.read(SCORES.name, slice(5, 21)), scores[5:21])
        rows = np.array([49, 0, 17, 17, 3])
        np.testing.assert_array_equal(cache.read(SCORES.name, rows), scores[rows])
        np.testing.assert_array_equal(cache.read(LOGITS), logits)
        np.testing.assert_array_equal(cache.sample_ids, IDS)
        np.testing.assert_array_equal(cache.labels, labels)
        info = describe(cache)
    assert info["arrays"][SCORES.name] == {
        "dims": ["N", "V", "K"],
        "shape": [50, 2, 3],
        "dtype": "float32",
        "stored_dtype": "float32",
        "bytes_per_sample": 24,  # V x K float32, before compression
    }
    lines = dict(describe_lines(info))
    assert lines["extra/scores"] == "(50, 2, 3) float32, 24 B/sample"
    assert lines["logits"] == "(50, 2, 4) float32, 32 B/sample"
    assert lines["labels"] == "(50,) int64, 8 B/sample"

    problems, summary = check_cache(out)
    assert problems == [] and summary["shards_read"] == 14  # 7 of logits, 7 of scores

    other = tmp_path / ("c.h5" if suffix == ".zarr" else "c.zarr")
    back = tmp_path / f"back{suffix}"
    convert_cache.run(out, other)
    convert_cache.run(other, back)
    for path in (other, back):
        assert_same_cache(out, path, logits, scores, labels)
        assert check_cache(path)[0] == []
    if suffix == ".zarr":
        assert zarr_files(back, root=False) == zarr_files(out, root=False)  # even the shards


def test_add_in_uneven_batches_writes_what_write_shard_writes(tmp_path, scores_node):
    logits, scores, labels = rows_of_data()
    by_shard = write_scores_cache(tmp_path / "a.zarr", logits, scores, labels)
    with writer(tmp_path / "b.zarr", labels) as w:
        for lo, hi in [(0, 3), (3, 20), (20, 21), (21, 50)]:
            w.add({LOGITS: logits[lo:hi], SCORES.name: scores[lo:hi]})
        assert w.shards_done == 7
        by_add = w.finish(PROVENANCE)
    assert zarr_files(by_add) == zarr_files(by_shard)


def test_the_node_check_refuses_a_bad_value_at_write_time(tmp_path, scores_node):
    logits, scores, labels = rows_of_data()
    scores[13, 1, 2] = 1.5  # row 13 lies in shard 1 (rows 8-15)
    out = tmp_path / "c.zarr"
    with pytest.raises(
        PipelineError, match=r"extra/scores: outside \[0, 1\] for sample ids \[137\]"
    ):
        write_scores_cache(out, logits, scores, labels)
    partial = tmp_path / "c.zarr.partial"
    assert not out.exists()
    with open_cache(partial) as cache:  # shard 0 kept for a re-run, nothing of shard 1 written
        assert cache.attrs["complete"] is False
    assert finished_shards(partial) == {0: "shard 0"}
    assert not (partial / "logits/c/1/0/0").exists()


def test_verify_runs_the_node_check_and_finds_missing_shards(tmp_path, scores_node):
    logits, scores, labels = rows_of_data()
    good = write_scores_cache(tmp_path / "good.zarr", logits, scores, labels)

    bad = tmp_path / "bad.zarr"
    shutil.copytree(good, bad)
    group = zarr.open_group(str(bad), mode="r+")
    group[SCORES.name][30, 0, 1] = -0.25  # sample id 307
    # Rewritten behind the writer's back: not the shard sealed at finish, refused on read.
    assert check_cache(bad)[0] == [
        "extra/scores: rows 24-31 not what was written at this place (shard 3: its chunk index "
        "and checksums differ from the seal recorded at finish: a swapped, copied, foreign, "
        "emptied or replaced shard)"
    ]
    reseal(bad)  # a consistent rewrite (new seals, digests): the node's own check still runs
    assert check_cache(bad)[0] == ["extra/scores: outside [0, 1] for sample ids [307]"]

    lost = tmp_path / "lost.zarr"
    shutil.copytree(good, lost)
    (lost / "extra/scores/c/2/0/0").unlink()  # shard 2: rows 16-23
    problems, _ = check_cache(lost)
    assert problems == ["extra/scores: rows 16-23 missing (no shard file)"]

    shutil.rmtree(lost / "extra")  # the whole node, which the `nodes` attribute lists
    assert check_cache(lost)[0] == ["extra/scores: array missing"]


def test_verify_finds_a_bad_label_in_hdf5(tmp_path, scores_node):
    import h5py

    logits, scores, labels = rows_of_data()
    out = write_scores_cache(tmp_path / "c.h5", logits, scores, labels)
    with h5py.File(out, "r+") as f:
        f[LABELS][4] = 9
    problems = check_cache(out)[0]
    assert problems == [
        "labels: rows 0-7 not what was written at this place (shard 0: its chunk index and "
        "checksums differ from the seal recorded at finish: a swapped, copied, foreign, "
        "emptied or replaced shard)"
    ]
    reseal(out)  # a consistent rewrite: the node's own check still runs
    assert check_cache(out)[0] == [
        "labels: label 9 of sample id 47 is outside [-1, 4): the cache has 4 classes"
    ]


def test_labels_beyond_the_classes_are_refused_before_writing(tmp_path):
    logits, _, labels = rows_of_data()
    labels[[6, 20]] = [4, 7]
    out = tmp_path / "c.zarr"
    with pytest.raises(PipelineError) as e:
        CacheWriter(out, sample_ids=IDS, labels=labels, num_classes=C, num_views=V)
    assert str(e.value) == (
        f"{out}: labels: label 4 of sample id 67 is outside [-1, 4): the cache has 4 classes "
        "(2 labels outside)"
    )
    assert not out.exists() and not (tmp_path / "c.zarr.partial").exists()


def test_precompute_refuses_a_teacher_with_fewer_classes_than_the_labels(tmp_path, runner):
    teacher = mlp_checkpoint(tmp_path / "three.pt", num_classes=3)
    ts = load_transfer_set("digits:test")
    first = int(np.flatnonzero(ts.labels >= 3)[0])
    out = tmp_path / "c.zarr"
    result = invoke(
        runner, "precompute-logits", "--teacher", teacher, "--data", "digits:test", "--out", out
    )
    assert_clean_error(
        result,
        f"labels: label {ts.labels[first]} of sample id {ts.sample_ids[first]} is outside "
        "[-1, 3): the cache has 3 classes",
    )
    assert not out.exists() and not (tmp_path / "c.zarr.partial").exists()


def test_duplicate_sample_ids_are_refused_before_writing(tmp_path):
    ids = IDS.copy()
    ids[9] = ids[2]
    with pytest.raises(PipelineError, match=r"sample_ids: not unique \(1 ids repeated, e.g. 27\)"):
        CacheWriter(tmp_path / "c.zarr", sample_ids=ids, labels=np.zeros(N), num_classes=C)
    assert not (tmp_path / "c.zarr.partial").exists()


def test_the_writer_refuses_a_shard_with_the_wrong_nodes(tmp_path, scores_node):
    logits, scores, labels = rows_of_data()
    with writer(tmp_path / "c.zarr", labels) as w:
        rows = w.shard(0)
        with pytest.raises(ValueError, match=r"shard 0: nodes given \['logits'\], this cache's"):
            w.write_shard(0, {LOGITS: logits[rows]})
        extra = {LOGITS: logits[rows], SCORES.name: scores[rows], MEMBER_LOGITS: logits[rows]}
        with pytest.raises(ValueError, match="shard nodes are \\['extra/scores', 'logits'\\]"):
            w.write_shard(0, extra)
        with pytest.raises(ValueError, match="add: nodes given"):
            w.add({SCORES.name: scores[:8]})
        with pytest.raises(ValueError, match=r"shard 0: extra/scores \(8, 2, 4\), expected"):
            w.write_shard(0, {LOGITS: logits[rows], SCORES.name: logits[rows]})
        assert w.shards_done == 0
        w.write_shard(0, {LOGITS: logits[rows], SCORES.name: scores[rows]})
        assert w.shards_done == 1
        w.abort()
    with pytest.raises(ValueError, match="no size for dimension"):
        writer(tmp_path / "d.zarr", labels, dims={})


def test_a_cache_without_extra_nodes_keeps_the_v1_attributes(tmp_path):
    logits, _, labels = rows_of_data()
    with CacheWriter(
        tmp_path / "c.zarr", sample_ids=IDS, labels=labels, num_classes=C, num_views=V,
        num_members=2, **LAYOUT,
    ) as w:  # fmt: skip
        members = np.stack([logits, -logits])  # (M, N, V, C)
        w.add({LOGITS: logits, MEMBER_LOGITS: members})
        out = w.finish(PROVENANCE)
    with open_cache(out) as cache:
        assert "dims" not in cache.attrs and "nodes" not in cache.attrs
        assert cache.attrs["format_version"] == 2 and cache.num_members == 2
        rows = np.array([33, 2, 2, 49])
        np.testing.assert_array_equal(cache.read(MEMBER_LOGITS, rows), members[:, rows])
        np.testing.assert_array_equal(cache.member_logits(slice(8, 30)), members[:, 8:30])
        with pytest.raises(PipelineError, match="cache has no extra/scores"):
            with schema.registered(SCORES):
                cache.read(SCORES.name)
    assert check_cache(out)[0] == []


def test_a_create_node_is_given_whole_to_the_writer(tmp_path):
    weights = Node("extra/weight", ("N",), "float32", written="create")
    logits, _, labels = rows_of_data()
    w8 = np.linspace(0, 1, N, dtype=np.float32)
    with schema.registered(weights):
        with pytest.raises(ValueError, match="whole arrays given for"):
            CacheWriter(tmp_path / "x.zarr", sample_ids=IDS, labels=labels, num_classes=C,
                        num_views=V, nodes=[weights.name])  # fmt: skip
        with CacheWriter(
            tmp_path / "c.h5", sample_ids=IDS, labels=labels, num_classes=C, num_views=V,
            nodes=[weights.name], values={weights.name: w8}, **LAYOUT,
        ) as w:  # fmt: skip
            assert w.shard_nodes == [LOGITS] and "dims" not in w.base_attrs
            w.add({LOGITS: logits})
            out = w.finish(PROVENANCE)
        with open_cache(out) as cache:
            np.testing.assert_array_equal(cache.read(weights.name), w8)
            np.testing.assert_array_equal(cache.read(weights.name, slice(10, 12)), w8[10:12])
        assert check_cache(out)[0] == []


def test_the_table_refuses_duplicates_and_bad_rows():
    with pytest.raises(ValueError, match="already in the table"):
        schema.register_node(Node(LOGITS, ("N",), "float32"))
    with pytest.raises(ValueError, match="must hold 'N' exactly once"):
        Node("x", ("V", "C"), "float32")
    with pytest.raises(ValueError, match="written 'later'"):
        Node("x", ("N",), "float32", written="later")
    with pytest.raises(ValueError, match="not in the table"):
        schema.unregister_node("extra/none")
    with pytest.raises(ValueError, match="not a cache node"):
        schema.get("extra/none")
    table = [n.name for n in schema.nodes()]
    assert table == [LOGITS, MEMBER_LOGITS, SAMPLE_IDS, LABELS, VIEW_SEEDS]


def test_view_seeds_are_an_optional_shard_node_of_the_table(tmp_path):
    """views/seed (N, V) int64: in a cache only when asked for (augmented views), written with
    each shard's logits, read through the table like any node."""
    node = schema.get(VIEW_SEEDS)
    assert (node.dims, node.dtype, node.written, node.axis) == (("N", "V"), "int64", "shard", 0)
    sizes = {"N": N, "V": V, "C": C, "M": 0}
    assert not node.present(sizes) and node.present(sizes, [VIEW_SEEDS])
    logits, _, labels = rows_of_data()
    seeds = (IDS[:, None] * 1000 + np.arange(V)).astype(np.int64)  # (N, V)
    with CacheWriter(
        tmp_path / "c.zarr", sample_ids=IDS, labels=labels, num_classes=C, num_views=V,
        nodes=[VIEW_SEEDS], **LAYOUT,
    ) as w:  # fmt: skip
        assert w.shard_nodes == [LOGITS, VIEW_SEEDS] and "dims" not in w.base_attrs
        for lo, hi in [(0, 5), (5, 50)]:
            w.add({LOGITS: logits[lo:hi], VIEW_SEEDS: seeds[lo:hi]})
        out = w.finish(PROVENANCE)
    with open_cache(out) as cache:
        assert cache.attrs["nodes"] == [VIEW_SEEDS] and cache.has_view_seeds
        assert [n.name for n in cache.nodes()] == [LOGITS, SAMPLE_IDS, LABELS, VIEW_SEEDS]
        got = cache.view_seeds()
        assert got.dtype == np.int64 and got.shape == (N, V)
        np.testing.assert_array_equal(got, seeds)
        np.testing.assert_array_equal(cache.read(VIEW_SEEDS, np.array([41, 3])), seeds[[41, 3]])
        lines = dict(describe_lines(describe(cache)))
    assert lines[VIEW_SEEDS] == "(50, 2) int64, 16 B/sample"
    problems, summary = check_cache(out)
    assert problems == [] and summary["shards_read"] == 14  # 7 of logits, 7 of seeds
    shutil.rmtree(out / "views")
    assert check_cache(out)[0] == ["views/seed: array missing"]


def test_precompute_writes_the_same_nodes_as_before(tmp_path, teacher_ckpt):
    cfg = PrecomputeConfig(keep_members=True, chunk_rows=64)
    out = precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:test", tmp_path / "c.zarr")
    with open_cache(out) as cache:
        assert [n.name for n in cache.nodes()] == [LOGITS, MEMBER_LOGITS, SAMPLE_IDS, LABELS]
        np.testing.assert_array_equal(cache.member_logits()[0], cache.logits())
