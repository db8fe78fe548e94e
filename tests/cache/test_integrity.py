"""No silent corruption: one flipped bit anywhere in a stored chunk, shard index or checksum is
caught by `verify` and is an error (one line naming cache, node and rows) wherever the logits
are read; a missing shard never reads as zeros; recorded shard digests prove a cache is the one
written; version-1 caches (no checksums) still read as before."""

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache import CacheWriter, layout, open_cache
from pipeline.cache.schema import LABELS, LOGITS, MEMBER_LOGITS, SAMPLE_IDS
from pipeline.cache.verify import NO_CHECKSUMS, PROVENANCE, check_cache
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.data import load_transfer_set
from pipeline.student.targets import open_targets
from stages import convert_cache, precompute_logits
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

# digits:test has 360 rows: chunks of 16 rows, shards of 2 chunks = 12 shards, 23 chunks.
CFG = PrecomputeConfig(chunk_rows=16, chunks_per_shard=2, keep_members=True)
SHARD, CHUNK = 32, 16
ADVICE = "re-run precompute-logits or restore the cache"


@pytest.fixture(scope="module")
def ts():
    return load_transfer_set("digits:test")


@pytest.fixture(scope="module", params=[".zarr", ".h5"])
def cache(request, tmp_path_factory, teacher_ckpt, teacher_ckpt_mlp):
    """A two-member float32 cache of real teacher logits, in each format (flipped in place
    and restored by the tests: keep them byte-identical on exit)."""
    out = tmp_path_factory.mktemp("integrity") / f"c{request.param}"
    teachers = [str(teacher_ckpt), str(teacher_ckpt_mlp)]
    return precompute_logits.run(CFG, teachers, "digits:test", out)


# ---------------------------------------------------------------------------------------------
# Where to flip: (file, byte offset, position class, rows the damage must be reported for)


def zarr_positions(path, node=LOGITS, shards=(0, 5, 11)):
    """Bit positions in shard files of `node`: every chunk's zstd frame header, payload and
    crc32c, and the shard index at the file end with its own crc32c."""
    out = []
    for k in shards:
        file = path / node / "c" / str(k) / "0" / "0"
        data = file.read_bytes()
        n = 2  # chunks per shard
        index = np.frombuffer(data[-(16 * n + 4) : -4], "<u8").reshape(n, 2)  # (offset, nbytes)
        rows = (k * SHARD, min((k + 1) * SHARD, 360))
        for offset, nbytes in index.tolist():
            if offset == 2**64 - 1:
                continue  # a chunk wholly past the last row is never stored
            out += [(file, offset + i, "frame header", rows) for i in (0, 3, 5)]
            middle = np.linspace(offset + 8, offset + nbytes - 6, 4).astype(int)
            out += [(file, int(i), "payload", rows) for i in middle]
            out += [(file, offset + nbytes - i, "chunk crc32c", rows) for i in (4, 1)]
        end = len(data)
        out += [(file, end - 4 - 16 * n + i, "shard index", rows) for i in (0, 9, 24)]
        out += [(file, end - i, "index crc32c", rows) for i in (4, 1)]
    return out


def hdf5_positions(path, node=LOGITS, chunks=(0, 5, 9, 11, 17, 22)):
    """Bit positions inside stored chunks of `node`: first bytes (zstd frame header), middle,
    last bytes (the fletcher32 trailer and the byte before it)."""
    out = []
    with h5py.File(path, "r") as f:
        infos = [f[node].id.get_chunk_info(i) for i in chunks]
    for info in infos:
        start, size = info.byte_offset, info.size
        row = info.chunk_offset[0]
        rows = (row, min(row + CHUNK, 360))
        out += [(path, start + i, "chunk start", rows) for i in (0, 2, 5)]
        out += [(path, start + size // d, "chunk middle", rows) for d in (3, 2)]
        out += [(path, start + size - i, "fletcher32 trailer", rows) for i in (4, 2, 1)]
        out += [(path, start + size - 5, "chunk end", rows)]
    return out


def flip(file, offset: int, bit: int) -> int:
    """Flip one bit in place; returns the original byte."""
    with open(file, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ (1 << bit)]))
    return old


def put_back(file, offset: int, old: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(bytes([old]))


def damage_message(path, node, rows) -> str:
    return (
        f"{path}: {node} rows {rows[0]}-{rows[1] - 1}: stored data is damaged "
        f"(checksum mismatch); {ADVICE}"
    )


def test_every_flipped_bit_is_caught_by_verify_and_by_every_read(cache, ts):
    positions = zarr_positions(cache) if cache.suffix == ".zarr" else hdf5_positions(cache)
    assert len({(str(f), o) for f, o, _, _ in positions}) == len(positions) >= 50
    before = {p: p.read_bytes() for p in {f for f, _, _, _ in positions}}
    caught, missed = Counter(), []
    for i, (file, offset, kind, rows) in enumerate(positions):
        old = flip(file, offset, bit=i % 8)
        try:
            problems, _ = check_cache(cache)
            expected = f"{LOGITS}: rows {rows[0]}-{rows[1] - 1} damaged (checksum mismatch)"
            verify_ok = expected in problems
            with open_cache(cache) as c, pytest.raises(PipelineError) as read:
                c.read(LOGITS)
            with pytest.raises(PipelineError) as targets:
                open_targets(cache, ts, mode="memory")  # as train-student and evaluate read
            message = damage_message(cache, LOGITS, rows)
            if verify_ok and str(read.value) == message and str(targets.value) == message:
                caught[kind] += 1
            else:
                missed.append((kind, offset, problems, str(read.value)))
        finally:
            put_back(file, offset, old)
    assert {p: p.read_bytes() for p in before} == before  # every byte restored
    print(f"\n{cache.suffix}: {sum(caught.values())} of {len(positions)} flips caught: {caught}")
    assert not missed, missed
    assert sum(caught.values()) == len(positions)
    assert check_cache(cache)[0] == []


def test_the_streaming_read_refuses_damage_too(cache, ts):
    file, offset, _, rows = (
        zarr_positions(cache, shards=(7,)) if cache.suffix == ".zarr" else hdf5_positions(cache)
    )[4]
    old = flip(file, offset, bit=3)
    try:
        targets, _ = open_targets(cache, ts, mode="stream", budget="1MiB")  # reads nothing yet
        with pytest.raises(PipelineError) as e:
            for _ in targets.epoch(0, 32, 0):
                pass
        assert str(e.value) == damage_message(cache, LOGITS, rows)
    finally:
        put_back(file, offset, old)


@pytest.mark.parametrize("node", [MEMBER_LOGITS, SAMPLE_IDS, LABELS])
def test_every_node_carries_checksums(cache, node):
    """Not only the logits: every node of the table is checked on read."""
    if cache.suffix == ".zarr":
        file = cache / node / "c" / ("0/1/0/0" if node == MEMBER_LOGITS else "1")
        offset, rows = len(file.read_bytes()) // 3, (32, 64)
    else:
        with h5py.File(cache, "r") as f:
            info = f[node].id.get_chunk_info(2)  # member 0, rows 32-47
        file, offset, rows = cache, info.byte_offset + info.size // 2, (32, 48)
    with open_cache(cache) as c:
        assert c.backend.checksummed(node)
    old = flip(file, offset, bit=6)
    try:
        problems, _ = check_cache(cache)
        assert f"{node}: rows {rows[0]}-{rows[1] - 1} damaged (checksum mismatch)" in problems
        with open_cache(cache) as c, pytest.raises(PipelineError, match=re.escape(node)):
            c.read(node)
    finally:
        put_back(file, offset, old)


def test_a_deleted_shard_file_is_refused_on_read_not_zeros(tmp_path, cache, ts):
    if cache.suffix != ".zarr":
        pytest.skip("a shard file is a Zarr storage unit")
    lost = tmp_path / "lost.zarr"
    shutil.copytree(cache, lost)
    (lost / LOGITS / "c/4/0/0").unlink()  # rows 128-159
    message = f"{lost}: {LOGITS} rows 128-159: stored data is missing (no shard file); {ADVICE}"
    with open_cache(lost) as c:
        with pytest.raises(PipelineError) as e:
            c.read(LOGITS)
        assert str(e.value) == message
        with pytest.raises(PipelineError, match="rows 128-159"):
            c.logits(np.array([3, 140]))  # row numbers too
        np.testing.assert_array_equal(c.logits(slice(0, 128)).shape, (128, 1, 10))
    with pytest.raises(PipelineError) as e:
        open_targets(lost, ts, mode="memory")
    assert str(e.value) == message
    assert check_cache(lost)[0] == [f"{LOGITS}: rows 128-159 missing (no shard file)"]


def test_a_missing_hdf5_chunk_is_refused_on_read(tmp_path):
    """HDF5: a chunk never written reads as the fill value unless refused."""
    out = write_random(tmp_path / "p.h5", n=64)
    with h5py.File(out, "r+") as f:  # rebuild the logits without the chunk of rows 16-31
        words = f[LOGITS][:]
        del f[LOGITS]
        ds = f.create_dataset(  # as the writer makes it: the other chunks' bytes unchanged
            LOGITS, shape=words.shape, dtype=words.dtype, chunks=(16, 1, 3), fletcher32=True,
            compression="gzip", compression_opts=4, track_times=False, fillvalue=0,
        )  # fmt: skip
        ds[:16], ds[32:] = words[:16], words[32:]
    with open_cache(out) as c:
        np.testing.assert_array_equal(c.read(LOGITS, slice(32, 64)), words[32:])
        with pytest.raises(PipelineError) as e:
            c.read(LOGITS)
    assert str(e.value) == (
        f"{out}: {LOGITS} rows 16-31: stored data is missing (no stored chunk); {ADVICE}"
    )
    assert f"{LOGITS}: rows 16-31 missing (no stored chunk)" in check_cache(out)[0]


def test_verify_reports_every_damaged_range(tmp_path, cache):
    if cache.suffix != ".zarr":
        pytest.skip("shard files are a Zarr thing (HDF5 damage: the flip test)")
    copy = tmp_path / "d.zarr"
    shutil.copytree(cache, copy)
    for k in (2, 9):
        file = copy / LOGITS / f"c/{k}/0/0"
        flip(file, len(file.read_bytes()) // 2, bit=1)
    for k in (5, 6):  # adjacent missing shards are one range
        (copy / MEMBER_LOGITS / f"c/0/{k}/0/0").unlink()
    problems, _ = check_cache(copy)
    assert problems == [
        f"{LOGITS}: rows 64-95 damaged (checksum mismatch)",
        f"{LOGITS}: rows 288-319 damaged (checksum mismatch)",
        f"{MEMBER_LOGITS}: rows 160-223 missing (no shard file)",
    ]


def test_verify_reports_a_recorded_digest_that_disagrees(tmp_path, cache):
    copy = tmp_path / f"d{cache.suffix}"
    (shutil.copytree if cache.suffix == ".zarr" else shutil.copy)(cache, copy)
    with open_cache(copy) as c:
        digests = c.attrs[layout.DIGESTS]
    assert digests["algorithm"] == "sha256" and len(digests["nodes"][LOGITS]) == 12
    digests["nodes"][LOGITS][6] = "0" * 64
    set_attr(copy, layout.DIGESTS, digests)
    with pytest.raises(PipelineError, match="attributes differ from the digest recorded"):
        open_cache(copy)  # the attribute digest no longer matches: every reader refuses it
    assert check_cache(copy)[0][0].startswith("its attributes differ from the digest recorded")
    with open_cache(cache) as c:  # the original: same attributes but the one edited
        attrs = {**c.attrs, layout.DIGESTS: digests}
    set_attr(copy, layout.ATTRS_DIGEST, layout.attrs_digest(attrs))  # a consistent rewrite
    problems, summary = check_cache(copy)
    assert problems == [
        f"{LOGITS}: rows 192-223 differ from what was written (sha256 of the stored shard "
        "does not match the digest recorded at finish)"
    ]
    assert summary["digests_checked"] == 4 * 12  # logits, members, ids, labels


NOT_HERE = "not what was written at this place"


def _misplace(copy: Path, how: str, other: Path) -> None:
    """Put at shard 2 of the logits (rows 64-95) data that was not written there."""
    shard = copy / LOGITS / "c/2/0/0"
    if how == "copied":  # shard 1's file over shard 2's: both intact, one duplicated
        shutil.copy(copy / LOGITS / "c/1/0/0", shard)
    elif how == "swapped":
        tmp = shard.with_name("tmp")
        shutil.move(copy / LOGITS / "c/1/0/0", tmp)
        shutil.move(shard, copy / LOGITS / "c/1/0/0")
        shutil.move(tmp, shard)
    elif how == "foreign":  # the same shard of another cache of the same layout
        shutil.copy(other / LOGITS / "c/2/0/0", shard)
    elif how == "empty":
        shard.write_bytes(b"")


@pytest.mark.parametrize("how", ["copied", "swapped", "foreign", "empty"])
def test_a_shard_not_written_at_its_place_is_refused_by_every_read(
    tmp_path, runner, cache, ts, how
):
    """Each chunk of a copied, swapped or foreign shard is intact (its checksums pass); its
    seal, recorded at finish and checked by every read, says it is not the one written here."""
    if cache.suffix != ".zarr":
        pytest.skip("whole shard files are a Zarr thing (HDF5 chunks: the next test)")
    copy = tmp_path / "s.zarr"
    shutil.copytree(cache, copy)
    other = tmp_path / "o.zarr"  # the same layout, other values (another teacher's)
    shutil.copytree(cache, other)
    write_other_values(other)
    _misplace(copy, how, other)
    rows = "32-63" if how == "swapped" else "64-95"  # the first misplaced shard read
    said = f"{LOGITS} rows {rows}: stored data is {NOT_HERE}"
    with open_cache(copy) as c:
        with pytest.raises(PipelineError, match=said):
            c.read(LOGITS)
        np.testing.assert_array_equal(c.logits(slice(0, 32)).shape, (32, 1, 10))  # the rest reads
    with pytest.raises(PipelineError, match=said):
        open_targets(copy, ts, mode="memory")
    with pytest.raises(PipelineError, match=NOT_HERE):
        next(iter(open_targets(copy, ts, mode="stream", budget="64KiB")[0].epoch(0, 8, 0)))
    result = invoke(runner, "convert-cache", copy, tmp_path / "c.h5")
    assert_clean_error(result, NOT_HERE)
    assert not (tmp_path / "c.h5").exists()  # nothing converted: the copy would look sound
    problems, _ = check_cache(copy)
    assert any(f"rows {rows} {NOT_HERE}" in p for p in problems), problems


def write_other_values(path: Path) -> None:
    """Rewrite the logits of the cache at `path` with other values: same layout, other bytes."""
    import zarr

    arr = zarr.open_array(str(path / LOGITS), mode="r+")
    arr[:] = np.asarray(arr[:]) + np.float32(1.0)


def test_an_hdf5_chunk_moved_within_the_file_is_refused(tmp_path, teacher_ckpt, ts):
    """Copy chunk 1's stored bytes over chunk 2's (uncompressed: the same size): its fletcher32
    passes, the seal of its shard does not."""
    cfg = PrecomputeConfig(compression="none", chunk_rows=16, chunks_per_shard=2)
    copy = precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:test", tmp_path / "m.h5")
    with h5py.File(copy, "r") as f:
        a, b = (f[LOGITS].id.get_chunk_info(i) for i in (1, 2))
    assert a.size == b.size and b.chunk_offset[0] == 32
    data = bytearray(copy.read_bytes())
    data[b.byte_offset : b.byte_offset + b.size] = data[a.byte_offset : a.byte_offset + a.size]
    copy.write_bytes(bytes(data))
    with open_cache(copy) as c:
        with pytest.raises(PipelineError, match=f"rows 32-63: stored data is {NOT_HERE}"):
            c.read(LOGITS, slice(32, 33))
        np.testing.assert_array_equal(c.logits(slice(0, 32)).shape, (32, 1, 10))
    ts_test = load_transfer_set("digits:test")
    with pytest.raises(PipelineError, match=NOT_HERE):
        open_targets(copy, ts_test, mode="memory")


def set_attr(path, key, value):
    if path.suffix == ".zarr":
        meta = path / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"][key] = value
        meta.write_text(json.dumps(doc))
    else:
        with h5py.File(path, "r+") as f:
            f.attrs[key] = json.dumps(value)


# ---------------------------------------------------------------------------------------------
# Format version 1 (no checksums) still reads; convert-cache upgrades it.


def write_random(path, n=100, format_version=layout.FORMAT_VERSION):
    logits = np.random.default_rng(0).normal(size=(n, 1, 3)).astype(np.float32)
    with CacheWriter(
        path, sample_ids=np.arange(n), labels=np.arange(n) % 3, num_classes=3, chunk_rows=16,
        chunks_per_shard=2, format_version=format_version,
    ) as w:  # fmt: skip
        w.add({LOGITS: logits})
        w.finish({k: None for k in PROVENANCE})
    return path


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_version_1_cache_reads_as_before_and_verify_says_it_has_no_checksums(
    tmp_path, runner, suffix
):
    old = write_random(tmp_path / f"v1{suffix}", format_version=1)
    new = write_random(tmp_path / f"v2{suffix}")
    with open_cache(old) as a, open_cache(new) as b:
        assert a.attrs["format_version"] == 1 and layout.DIGESTS not in a.attrs
        assert not a.checksums and not a.backend.checksummed(LOGITS)
        assert b.checksums and b.backend.checksummed(LOGITS)
        np.testing.assert_array_equal(a.logits(), b.logits())
        np.testing.assert_array_equal(a.read_stored(LOGITS), b.read_stored(LOGITS))
    problems, summary = check_cache(old)
    assert problems == [] and summary["notes"] == [NO_CHECKSUMS]
    assert summary["checksums"] is False and summary["digests_checked"] == 0
    assert invoke(runner, "verify", old).exit_code == 0  # said, not failed
    assert check_cache(new)[1]["notes"] == []

    upgraded = tmp_path / f"up{suffix}"
    convert_cache.run(old, upgraded)
    with open_cache(upgraded) as c:
        assert c.attrs["format_version"] == 2 and c.backend.checksummed(LOGITS)
        np.testing.assert_array_equal(c.read_stored(LOGITS), a_words(old))
    assert check_cache(upgraded) == ([], check_cache(upgraded)[1])
    assert check_cache(upgraded)[1]["digests_checked"] == 3 * 4


def a_words(path):
    with open_cache(path) as c:
        return c.read_stored(LOGITS)


def test_a_later_format_version_is_refused_in_one_line(tmp_path, runner):
    out = write_random(tmp_path / "c.zarr")
    set_attr(out, "format_version", 3)
    assert_clean_error(invoke(runner, "verify", out), "format_version 3, this tool reads 1, 2")


# ---------------------------------------------------------------------------------------------
# The writer owns only its own files.


def test_a_foreign_partial_directory_is_refused_not_deleted(tmp_path):
    out = tmp_path / "c.zarr"
    foreign = tmp_path / "c.zarr.partial"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="is not an unfinished cache of kd-pipeline") as e:
        write_random(out)
    assert "\n" not in str(e.value) and str(foreign) in str(e.value)
    assert (foreign / "notes.txt").read_text() == "mine" and not out.exists()

    shutil.rmtree(foreign)  # a Zarr group, but not one of ours
    import zarr

    zarr.open_group(str(foreign), mode="w").create_array("x", shape=(3,), dtype="i8")
    with pytest.raises(PipelineError, match="not an unfinished cache"):
        write_random(out)
    assert (foreign / "x" / "zarr.json").is_file()

    shutil.rmtree(foreign)
    foreign.write_text("a file")
    with pytest.raises(PipelineError, match="not an unfinished cache"):
        write_random(out)
    assert foreign.read_text() == "a file"


def test_our_own_unfinished_partial_is_started_over(tmp_path):
    out = tmp_path / "c.zarr"
    logits = np.zeros((100, 1, 3), np.float32)
    w = CacheWriter(
        out, sample_ids=np.arange(100), labels=np.zeros(100), num_classes=3, chunk_rows=16,
        chunks_per_shard=2,
    )  # fmt: skip
    w.write_shard(0, {LOGITS: logits[:32]})
    w._backend.close()
    w._lock.release()  # as if killed: the partial holds one finished shard
    assert (tmp_path / "c.zarr.partial" / "zarr.json").is_file()
    write_random(out)  # no run record to resume by: ours, so discarded and rewritten
    assert check_cache(out)[0] == [] and not (tmp_path / "c.zarr.partial").exists()


def test_hdf5_conversion_never_touches_a_users_out_tmp(tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    users = tmp_path / "c.h5.tmp"
    users.write_text("the user's own file")
    seen = []
    import pipeline.cache.copy as cachecopy

    real = cachecopy.copy_cache

    def spy(src, dst, *a, **k):
        seen.append(dst)
        return real(src, dst, *a, **k)

    monkeypatch.setattr(cachecopy, "copy_cache", spy)
    write_random(out)
    assert users.read_text() == "the user's own file"
    assert len(seen) == 1 and seen[0].name.startswith("c.h5.tmp-") and not seen[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "c.h5.tmp"]
    assert check_cache(out)[0] == []
