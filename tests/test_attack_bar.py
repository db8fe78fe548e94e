"""The attack bar: about 150 attacks on the artifacts, each tried on every reader it concerns,
tallied by what came of it. Every kind the adversarial trials used is here: random damage,
truncated, emptied and deleted files, swapped, copied and foreign shards and chunks, hand
edits of attributes, checkpoints naming code, a cache replaced under a reader, resume on
another cache, kills at every finish/swap/publish step (local and on a local S3), and a file
size limit hit mid-run. The bar is 0 silent acceptances, 0 code executed, 0 mixed students,
0 leftovers after the next run, 0 "unexpected error" lines; each test prints its tally.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import random
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.cache.schema import LABELS, LOGITS, MEMBER_LOGITS, SAMPLE_IDS
from pipeline.cache.verify import check_cache
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.data import load_transfer_set
from pipeline.student.targets import open_targets
from stages import convert_cache, precompute_logits
from tests import procs
from tests.cache import kill_writer
from tests.cache.test_attrs_digest import EDITS, edit
from tests.cache.test_kill_points import (
    CACHE_CASES,
    DIR_POINTS,
    URL_POINTS,
    cases,
    content,
    reference,
    run_killed,
)
from tests.test_security import code_checkpoint

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.s3server"]
ROOT = Path(__file__).resolve().parents[1]
# digits:test has 360 rows: chunks of 16 rows, shards of 2 chunks = 12 shards.
CFG = PrecomputeConfig(chunk_rows=16, chunks_per_shard=2, keep_members=True)
NODES = (LOGITS, MEMBER_LOGITS, SAMPLE_IDS, LABELS)
OK = {"refused", "same"}  # what a reader may make of an attack: anything else fails the bar


@pytest.fixture(scope="module")
def ts():
    return load_transfer_set("digits:test")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, teacher_ckpt, teacher_ckpt_mlp) -> dict[str, Path]:
    """Caches of one layout in each format: "a", and "b" of other numbers (the members in the
    other order, combined by mean-probs), the source of "foreign" shards and chunks."""
    root = tmp_path_factory.mktemp("bar")
    teachers = {"a": [teacher_ckpt, teacher_ckpt_mlp], "b": [teacher_ckpt_mlp, teacher_ckpt]}
    cfgs = {"a": CFG, "b": dataclasses.replace(CFG, combine="mean-probs")}
    return {
        name + suffix: precompute_logits.run(
            cfgs[name], [str(t) for t in teachers[name]], "digits:test", root / (name + suffix)
        )
        for name in ("a", "b")
        for suffix in (".zarr", ".h5")
    }


# -- what the readers make of a cache ---------------------------------------------------------


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def read_nodes(path: Path) -> str:
    """Every node, as open_cache reads it (inspect, the library, spot checks)."""
    with open_cache(path) as c:
        return _digest([np.asarray(c.read(n)) for n in NODES] + [np.array(str(c.attrs))])


def read_targets(path: Path, ts, mode: str) -> str:
    """Every row's targets as train-student and evaluate read them (`mode` memory/stream)."""
    targets, _ = open_targets(path, ts, mode=mode, combine=("mean-probs",), budget="10MiB")
    got = {}
    for rows, batch in targets.epoch(0, 64, 0):
        for i, r in enumerate(rows.tolist()):
            got[r] = (batch.logits[i].numpy(), batch.members[:, i].numpy())
    return _digest([a for r in sorted(got) for a in got[r]])


def verified(path: Path) -> str:
    """`pipeline verify`: "same" only with no problem at all."""
    problems, _ = check_cache(path)
    if problems:
        raise PipelineError("; ".join(problems))
    return "verified"


def converted(path: Path, ts) -> str:
    """convert-cache to the other format, then the copy read back."""
    dst = path.with_name(path.stem + "-copy" + (".h5" if path.suffix == ".zarr" else ".zarr"))
    shutil.rmtree(dst, ignore_errors=True) if dst.is_dir() else dst.unlink(missing_ok=True)
    convert_cache.run(path, dst)
    try:
        return read_nodes(dst)
    finally:
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()


def readers(ts) -> dict[str, Callable[[Path], str]]:
    return {
        "open_cache": read_nodes,
        "memory": lambda p: read_targets(p, ts, "memory"),
        "stream": lambda p: read_targets(p, ts, "stream"),
        "verify": verified,
        "convert-cache": lambda p: converted(p, ts),
    }


def judge(action: Callable[[], str], expected: str) -> str:
    """What came of one read: "refused" (one line), "same" (what was written), "changed"
    (other data believed: a silent acceptance) or "unexpected: ..." (not one clean line)."""
    try:
        got = action()
    except PipelineError as e:
        text = str(e)
        return "refused" if "\n" not in text and "unexpected" not in text else f"unexpected: {text}"
    except Exception as e:  # noqa: BLE001 (the bar counts whatever escapes)
        return f"unexpected: {type(e).__name__}: {e}"
    return "same" if got == expected else "changed"


# -- the attacks on a cache: each changes a fresh copy in place --------------------------------


def zarr_shards(path: Path, node: str = LOGITS) -> list[Path]:
    return sorted(p for p in (path / node / "c").rglob("*") if p.is_file())


def hdf5_chunks(path: Path, node: str) -> list[tuple[int, int]]:
    """(byte offset, size) of every stored chunk of `node`."""
    with h5py.File(path, "r") as f:
        d = f[node].id
        infos = [d.get_chunk_info(i) for i in range(d.get_num_chunks())]
    return [(info.byte_offset, info.size) for info in infos]


def xor_byte(file: Path, offset: int, mask: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ mask]))


def copy_bytes(src: Path, src_at: int, dst: Path, dst_at: int, size: int) -> None:
    with open(src, "rb") as f:
        f.seek(src_at)
        data = f.read(size)
    with open(dst, "r+b") as f:
        f.seek(dst_at)
        f.write(data)


def zarr_attacks(rng: random.Random, foreign: Path) -> list[tuple[str, Callable[[Path], None]]]:
    """Random bytes in shard files of every node, then emptied, truncated, swapped, copied,
    foreign and deleted shards."""
    attacks = []
    for _ in range(30):
        node, pick, mask = rng.choice(NODES), rng.random(), rng.randrange(1, 256)

        def damage(p, node=node, pick=pick, mask=mask):
            file = rng_pick(zarr_shards(p, node), pick)
            xor_byte(file, int(pick * file.stat().st_size), mask)

        attacks.append((f"random byte in {node}", damage))

    def shard(p: Path, k: int, node: str = LOGITS) -> Path:
        return p / node / "c" / str(k) / ("0/0" if node == LOGITS else "")

    for k in (0, 5, 11):
        j = (k + 3) % 12
        attacks += [
            (f"empty shard {k}", lambda p, k=k: shard(p, k).write_bytes(b"")),
            (f"truncated shard {k}", lambda p, k=k: _truncate(shard(p, k))),
            (f"shards {k} and {j} swapped", lambda p, k=k, j=j: _swap(shard(p, k), shard(p, j))),
            (
                f"shard {k} copied over {j}",
                lambda p, k=k, j=j: shutil.copy(shard(p, k), shard(p, j)),
            ),
            (f"foreign shard {k}", lambda p, k=k: shutil.copy(shard(foreign, k), shard(p, k))),
        ]
    attacks += [(f"deleted shard {k}", lambda p, k=k: shard(p, k).unlink()) for k in (2, 9)]
    member, ids = f"{MEMBER_LOGITS}/c/0/3/0/0", f"{SAMPLE_IDS}/c/0"
    attacks += [
        ("foreign member shard", lambda p: shutil.copy(foreign / member, p / member)),
        ("foreign sample ids", lambda p: shutil.copy(foreign / ids, p / ids)),
    ]
    return attacks


def hdf5_attacks(rng: random.Random, foreign: Path) -> list[tuple[str, Callable[[Path], None]]]:
    """Random bytes in stored chunks of every node and anywhere in the file, then a truncated
    and an emptied file, chunks copied over others and foreign chunks."""
    attacks = []
    for _ in range(25):
        node, pick, mask = rng.choice(NODES), rng.random(), rng.randrange(1, 256)

        def damage(p, node=node, pick=pick, mask=mask):
            offset, size = rng_pick(hdf5_chunks(p, node), pick)
            xor_byte(p, offset + int(pick * size * 7919) % size, mask)

        attacks.append((f"random byte in a {node} chunk", damage))
    for _ in range(10):
        pick, mask = rng.random(), rng.randrange(1, 256)
        attacks.append((
            f"random byte at {pick:.3f} of the file",
            lambda p, pick=pick, mask=mask: xor_byte(p, int(pick * p.stat().st_size), mask),
        ))  # fmt: skip
    attacks += [("truncated file", _truncate), ("empty file", lambda p: p.write_bytes(b""))]
    for a, b in ((0, 5), (3, 4), (7, 20)):
        attacks.append((f"chunk {a} copied over {b}", lambda p, a=a, b=b: _chunk_over(p, p, a, b)))
    for k in (1, 12, 22):
        attacks.append((f"foreign chunk {k}", lambda p, k=k: _chunk_over(foreign, p, k, k)))
    return attacks


def rng_pick(items: list, pick: float):
    return items[int(pick * len(items)) % len(items)]


def _truncate(file: Path) -> None:
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)


def _swap(fa: Path, fb: Path) -> None:
    data = fa.read_bytes()
    shutil.copy(fb, fa)
    fb.write_bytes(data)


def _chunk_over(src: Path, dst: Path, a: int, b: int) -> None:
    """Chunk `a` of `src`'s logits written over chunk `b` of `dst`'s, as far as it fits."""
    sa, sb = hdf5_chunks(src, LOGITS)[a], hdf5_chunks(dst, LOGITS)[b]
    copy_bytes(src, sa[0], dst, sb[0], min(sa[1], sb[1]))


def attribute_attacks() -> list[tuple[str, Callable[[Path], None], str]]:
    """The hand edits of tests/cache/test_attrs_digest.py that apply to a plain cache."""
    plain = [(what, change) for name, what, change in EDITS if name.startswith("plain")]
    return [(f"edited {w}", c, suffix) for w, c in plain for suffix in (".zarr", ".h5")]


def tally(results: list[tuple[str, str, str]], title: str) -> Counter:
    counts = Counter(outcome.split(":")[0] for _, _, outcome in results)
    attacks = len({a for a, _, _ in results})
    print(f"\n{title}: {attacks} attacks, {len(results)} outcomes: {dict(counts)}")
    return counts


def attack_caches(tmp_path, pristine, ts, suffix, attacks) -> list[tuple[str, str, str]]:
    """Each attack on a fresh copy of the pristine cache, read by every reader."""
    src = pristine["a" + suffix]
    expected = {name: read(src) for name, read in readers(ts).items()}
    results = []
    for i, (what, attack) in enumerate(attacks):
        copy = tmp_path / f"{i}{suffix}"
        shutil.copytree(src, copy) if src.is_dir() else shutil.copy(src, copy)
        attack(copy)
        for name, read in readers(ts).items():
            outcome = judge(functools.partial(read, copy), expected[name])
            results.append((f"{i}: {what}", name, outcome))
        shutil.rmtree(copy) if copy.is_dir() else copy.unlink()
    return results


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_damaged_swapped_emptied_and_edited_caches_are_never_believed(
    tmp_path, pristine, ts, suffix
):
    rng = random.Random(f"bar{suffix}")
    foreign = pristine["b" + suffix]
    attacks = (zarr_attacks if suffix == ".zarr" else hdf5_attacks)(rng, foreign)
    attacks += [(what, change_of(change)) for what, change, s in attribute_attacks() if s == suffix]
    results = attack_caches(tmp_path, pristine, ts, suffix, attacks)
    counts = tally(results, f"caches ({suffix})")
    bad = [r for r in results if r[2] not in OK]
    assert not bad, "\n".join(map(str, bad))
    assert len(attacks) >= 40 and counts["refused"] > 0


def change_of(change) -> Callable[[Path], None]:
    return lambda p: edit(p, change)


# -- artifacts that would run code ------------------------------------------------------------


def _loaded(ckpt: Path) -> str:
    from pipeline.models.checkpoint import load_checkpoint

    return str(load_checkpoint(ckpt))


def test_checkpoints_naming_code_never_run_it(tmp_path, monkeypatch):
    """Checkpoints whose model field names code, loaded the ways the commands load them."""
    marker = tmp_path / "ran"
    monkeypatch.chdir(tmp_path)
    names = {
        "subprocess:getoutput": {"cmd": f"touch {marker}"},
        "os:system": {"command": f"touch {marker}"},
        "builtins:exec": {"source": f"open({str(marker)!r}, 'w')"},
        "builtins:eval": {"source": f"open({str(marker)!r}, 'w')"},
        "shutil:rmtree": {"path": str(tmp_path)},
        "pathlib:Path.touch": {"self": str(marker)},
        "torch.hub:load": {"repo_or_dir": "x/y", "model": "z"},
        "pipeline.core.usercode:load_object": {"ref": "os:system"},
    }
    results = []
    for i, (model, kwargs) in enumerate(names.items()):
        ckpt = code_checkpoint(tmp_path / f"{i}.pt", model, kwargs)
        results.append((model, "load_checkpoint", judge(functools.partial(_loaded, ckpt), "")))
    counts = tally(results, "checkpoints naming code")
    assert not marker.exists() and (tmp_path / "0.pt").exists(), "code named by a file ran"
    assert counts == Counter(refused=len(names)), results


# -- one student, one teacher -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_cache_replaced_under_a_reader_is_never_mixed_in(tmp_path, pristine, ts, suffix):
    """Another teacher's cache of the same data put at the path while it is being read: the
    next read (open_cache) or the next streamed batch is refused, never served."""
    src, other = pristine["a" + suffix], pristine["b" + suffix]
    put = shutil.copytree if src.is_dir() else shutil.copy
    reference, _ = open_targets(src, ts, mode="stream", budget="200KiB")
    written = {r: b.logits[i] for rows, b in reference.epoch(0, 32, 0) for i, r in enumerate(rows)}
    results = []
    for reader in ("open_cache", "stream"):
        cache = tmp_path / f"{reader}{suffix}"
        put(src, cache)
        if reader == "open_cache":
            opened = open_cache(cache)
            opened.read(LOGITS)
            read_again = functools.partial(opened.read, LOGITS)
        else:
            targets, _ = open_targets(cache, ts, mode="stream", budget="200KiB")
            batches = targets.epoch(0, 32, 0)
            next(batches)
            read_again = functools.partial(_served_rows, batches, written)
        shutil.rmtree(cache) if cache.is_dir() else cache.unlink()
        put(other, cache)
        expected = "same" if reader == "stream" else ""
        results.append((f"replaced during a {reader} read", reader, judge(read_again, expected)))
    counts = tally(results, f"concurrent replace ({suffix})")
    assert set(counts) <= OK and counts["refused"] >= 1, results


def _served_rows(batches, written: dict) -> str:
    """ "same" when every row served after the swap is the cache that was opened, row for row
    (what was read before the swap); anything of the other cache is "changed"."""
    for rows, batch in batches:
        for i, r in enumerate(rows):
            if not np.array_equal(batch.logits[i].numpy(), written[r].numpy()):
                return "changed"
    return "same"


def test_a_resumed_student_never_mixes_two_teachers(tmp_path, pristine, ts, monkeypatch):
    """An interrupted train-student resumed after the cache at its path was replaced by
    another teacher's cache of the same data (each format): refused, then the original cache
    resumes to the very student an uninterrupted run trains."""
    from pipeline.core.training import Trainee
    from pipeline.models.checkpoint import load_checkpoint
    from pipeline.student.students import TrainStudentConfig
    from stages import train_student

    cfg = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [16]}, epochs=2)
    save, results = Trainee.save, []

    def crash_after_epoch_one(self):
        save(self)
        if self.epochs_done == 1:
            raise KeyboardInterrupt

    for suffix in (".zarr", ".h5"):
        src, other = pristine["a" + suffix], pristine["b" + suffix]
        put = shutil.copytree if src.is_dir() else shutil.copy
        cache, out = tmp_path / f"t{suffix}", tmp_path / f"s{suffix[1:]}"
        straight = train_student.run(cfg, src, "digits:test", tmp_path / f"straight{suffix[1:]}")
        put(src, cache)
        monkeypatch.setattr(Trainee, "save", crash_after_epoch_one)
        with pytest.raises(KeyboardInterrupt):
            train_student.run(cfg, cache, "digits:test", out)
        monkeypatch.setattr(Trainee, "save", save)
        shutil.rmtree(cache) if cache.is_dir() else cache.unlink()
        put(other, cache)
        resume = functools.partial(train_student.run, cfg, cache, "digits:test", out, resume=True)
        results.append((f"resume on another {suffix} cache", suffix, judge(resume, "")))
        shutil.rmtree(cache) if cache.is_dir() else cache.unlink()
        put(src, cache)
        resume()
        a, b = (load_checkpoint(p / "student.pt")[0].state_dict() for p in (out, straight))
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)  # one teacher
    counts = tally(results, "resume on another cache")
    assert counts == Counter(refused=2), results


# -- kills at every finish, swap and publish step, then the same command again -----------------


def test_kills_at_every_finish_step_leave_nothing_after_the_next_run(tmp_path):
    results = []
    for suffix, point, old in CACHE_CASES:
        out = tmp_path / f"{suffix[1:]}-{point}-{old}" / f"c{suffix}"
        outcome = _kill_cache(tmp_path, out, point, old)
        results.append((f"{suffix} {point} old={old}", "rerun", outcome))
    for point, old in cases(DIR_POINTS):
        out = tmp_path / f"dir-{point}-{old}" / "student"
        outcome = _kill_dir(tmp_path, out, point, old)
        results.append((f"student {point} old={old}", "rerun", outcome))
    counts = tally(results, "kills")
    assert counts == Counter(same=len(results)), [r for r in results if r[2] != "same"]


def _kill_cache(tmp_path: Path, out: Path, point: str, old: bool) -> str:
    write = functools.partial(kill_writer.write_cache, str(out))
    return _kill(tmp_path, out, point, old, write, "cache")


def _kill_dir(tmp_path: Path, out: Path, point: str, old: bool) -> str:
    return _kill(tmp_path, out, point, old, functools.partial(kill_writer.write_dir, out), "dir")


def _kill(tmp_path: Path, out: Path, point: str, old: bool, write, kind: str) -> str:
    """Kill a run that replaces seed 1's output (`old`) by seed 2's at `point`; then what the
    kill left and what the same command run again leaves."""
    before = None
    if old:
        write(1, overwrite=False)
        before = content(out)
    new = reference(tmp_path, out.name, 2)
    run_killed([kind, str(out), "2", "--overwrite"], point, out.name)
    if out.exists() and content(out) not in (before, new):
        return "half-written output after the kill"
    write(2, overwrite=True)
    left = sorted(os.listdir(out.parent))
    if left != [out.name]:
        return f"leftover: {left}"
    return "same" if content(out) == new else "changed"


def test_kills_while_publishing_to_object_storage_leave_nothing(tmp_path, s3_server):
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server.endpoint})
    results = []
    for i, (point, old) in enumerate(cases(URL_POINTS)):
        bucket = s3_server.make_bucket(f"bar-{i}")
        url = f"{bucket}/c.zarr"
        if old:
            kill_writer.write_cache(url, 1, overwrite=False)
        run_killed(["cache", url, "2", "--overwrite"], point, "c.zarr", env=s3_server.env)
        kill_writer.write_cache(url, 2, overwrite=True)
        keys = s3_server.keys(bucket.removeprefix("s3://"))
        local = tmp_path / f"{i}.zarr"
        fs.get(f"{bucket.removeprefix('s3://')}/c.zarr", str(local), recursive=True)
        left = [k for k in keys if not k.startswith("c.zarr/")]
        outcome = (
            f"leftover: {left}"
            if left
            else ("same" if content(local) == reference(tmp_path, "c.zarr", 2) else "changed")
        )
        results.append((f"s3 {point} old={old}", "rerun", outcome))
    counts = tally(results, "kills on object storage")
    assert counts == Counter(same=len(results)), results


# -- a write that fails mid-run: the file size limit -------------------------------------------


# Runs the command with a file size limit: a write past it fails with EFBIG, as a full disk
# fails with ENOSPC, at whatever point of the run it happens.
LIMITED = (
    "import os, resource, signal, sys; "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)); "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, '-m', 'pipeline', *sys.argv[1:]])"
)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_write_failing_mid_run_is_one_line_and_the_rerun_finishes(tmp_path, teacher_ckpt, suffix):
    out = tmp_path / f"c{suffix}"
    args = ["precompute-logits", "--teacher", str(teacher_ckpt), "--data", "digits:test",
            "--out", str(out), "--chunk-rows", "16", "--chunks-per-shard", "1",
            "--keep-members"]  # fmt: skip
    failed = procs.run([sys.executable, "-c", LIMITED, *args], cwd=ROOT)
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1 and "unexpected" not in failed.stderr, failed.stderr
    assert last.startswith("Error: a file grew past the largest size allowed"), last
    assert not out.exists()
    again = procs.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.name + ".run.json"]
    with open_cache(out) as c:
        c.require_complete()
