"""Sequences: the built-in corpus and token files, causal models, and token caches (per-token
top-k of a causal teacher) written by precompute-logits."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache, schema
from pipeline.cache.tokens import kept_mass
from pipeline.cache.writer import KILL_AT_SHARD_ENV
from pipeline.core.errors import PipelineError
from pipeline.data.sequences import POSITION_BITS, load_sequences, stdlib_files
from pipeline.models import create_model
from pipeline.models.checkpoint import save_checkpoint
from tests import procs
from tests.cache.helpers import zarr_files
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

ROOT = Path(__file__).resolve().parents[1]
DATA = "pystdlib:train?limit=60&length=48"


def lm_checkpoint(path: Path, context: int = 48, vocab: int = 256, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = create_model("gpt_nano", vocab, (context,))
    meta = {"model": "gpt_nano", "model_kwargs": {}, "num_classes": vocab,
            "input_shape": [context], "role": "teacher"}  # fmt: skip
    return save_checkpoint(path, model, meta)


# -- sequence sets --------------------------------------------------------------------------------


def test_the_built_in_corpus_is_the_standard_library_as_bytes():
    train, test = load_sequences("pystdlib:train"), load_sequences("pystdlib:test")
    assert len(stdlib_files()) > 100 and len(train) > 5 * len(test) > 1000
    assert not set(train.sequence_ids) & set(test.sequence_ids)  # files go wholly to one split
    first = stdlib_files()[0].read_bytes()[:128]
    assert bytes(train.tokens[0, : train.lengths[0]].astype(np.uint8)) == first
    again = load_sequences("pystdlib:train")
    assert again.fingerprint() == train.fingerprint()  # deterministic


def test_positions_ids_and_labels_of_the_distilled_tokens():
    seqs = load_sequences(DATA)
    seq, pos = seqs.positions()
    assert len(seq) == int((seqs.lengths - 1).sum())  # every position with a next token
    ids = seqs.token_ids()
    assert np.array_equal(ids >> POSITION_BITS, seqs.sequence_ids[seq])
    assert np.array_equal(ids & ((1 << POSITION_BITS) - 1), pos)
    assert np.array_equal(seqs.next_tokens(), seqs.tokens[seq, pos + 1])


def test_token_files_with_padding_and_completion_only(tmp_path):
    toks = np.array([[5, 6, 7, 0, 0], [1, 2, 3, 4, 9]])
    np.savez(tmp_path / "t.npz", tokens=toks, prompt_lengths=np.array([2, 3]), ids=[10, 20])
    seqs = load_sequences(f"tokens:{tmp_path / 't.npz'}?pad=0&vocab=16&distil=completion")
    assert seqs.lengths.tolist() == [3, 5]  # the trailing pad run is not part of a sequence
    seq, pos = seqs.positions()  # completion: the positions that predict tokens after the prompt
    assert list(zip(seq.tolist(), pos.tolist(), strict=True)) == [(0, 1), (1, 2), (1, 3)]
    assert seqs.next_tokens().tolist() == [7, 4, 9]


@pytest.mark.parametrize(
    "tokens, extra, message",
    [
        ([[3, 0, 0]], "?pad=0", "sequence id 0 has 1 tokens; a sequence needs at least 2"),
        ([[3, 99]], "?vocab=16", "position 1: token id 99 is outside the vocabulary [0, 16)"),
        ([[3, -1]], "", "token id -1 is outside the vocabulary"),
    ],
)
def test_bad_sequences_are_one_line(tmp_path, tokens, extra, message):
    np.save(tmp_path / "t.npy", np.array(tokens))
    with pytest.raises(PipelineError, match=re.escape(message)):
        load_sequences(f"tokens:{tmp_path / 't.npy'}{extra}")


# -- causal models --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt_nano", "gpt_micro"])
def test_a_causal_model_never_sees_later_tokens(name):
    torch.manual_seed(0)
    model = create_model(name, 64, (16,)).eval()
    x = torch.randint(0, 64, (3, 16))
    changed = x.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 64
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert a.shape == (3, 16, 64)
    assert torch.equal(a[:, :9], b[:, :9]) and not torch.equal(a[:, 9:], b[:, 9:])


def test_models_counts_the_causal_models_at_a_sequence_sets_shape(runner):
    result = invoke(runner, "models", "--data", DATA)
    assert result.exit_code == 0, result.output
    assert "parameters at 256 classes, input (48,)" in result.output
    assert re.search(r"gpt_nano\s+[\d,]+\s+1 layer", result.output), result.output
    names = {line.split()[0] for line in result.output.splitlines()[1:]}
    assert names == {"causal_transformer", "gpt_nano", "gpt_micro", "gpt_mini", "hf_causal_lm"}


# -- token caches ---------------------------------------------------------------------------------


def precompute(runner, teacher, out, *extra):
    """precompute-logits on CPU, where the references below compute (a GPU gives other bits)."""
    return invoke(runner, "precompute-logits", "--teacher", teacher, "--data", DATA,
                  "--out", out, "--topk", "8", "--batch-size", "7", "--chunk-rows", "128",
                  "--chunks-per-shard", "2", "--device", "cpu", *extra)  # fmt: skip


def teacher_rows(teacher: Path, seqs, rows: slice, batch_size: int = 7, dtype=None):
    """The teacher's own logits (N, V) at the distilled positions of `rows`, with the forward
    calls precompute makes for the shard holding them (the same batches: the same bits), under
    autocast to `dtype` when given."""
    model = torch.load(teacher, weights_only=True)
    net = create_model("gpt_nano", 256, (48,))
    net.load_state_dict(model["state_dict"])
    seq, pos = seqs.positions()
    s, p = seq[rows], pos[rows]
    out = []
    for first in range(int(s[0]), int(s[-1]) + 1, batch_size):
        last = min(first + batch_size, int(s[-1]) + 1)
        length = int(seqs.lengths[first:last].max())
        mixed = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
        with torch.no_grad(), mixed:
            logits = net.eval()(torch.from_numpy(seqs.tokens[first:last, :length]).long())
        mine = (s >= first) & (s < last)
        out.append(logits[s[mine] - first, p[mine]])
    return torch.cat(out)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_token_cache_holds_each_tokens_top_k_and_exact_lse(tmp_path, runner, suffix):
    teacher = lm_checkpoint(tmp_path / "lm.pt")
    out = tmp_path / f"c{suffix}"
    result = precompute(runner, teacher, out)
    assert result.exit_code == 0, result.output
    seqs = load_sequences(DATA)
    with open_cache(out) as c:
        assert c.num_samples == int((seqs.lengths - 1).sum()) and c.num_classes == 256
        assert np.array_equal(c.sample_ids, seqs.token_ids())
        assert np.array_equal(c.labels, seqs.next_tokens())
        assert c.attrs["tokens"]["num_sequences"] == len(seqs)
        assert c.attrs["data"]["fingerprint"] == seqs.fingerprint()
        values, indices = c.read(schema.TOPK_VALUES)[:, 0], c.read(schema.TOPK_INDICES)[:, 0]
        lse = c.read(schema.TOPK_LSE)[:, 0]
        shard_rows = c.attrs["shard_rows"]
    for start in range(0, len(values), shard_rows):
        rows = slice(start, min(start + shard_rows, len(values)))
        logits = teacher_rows(teacher, seqs, rows)
        top, idx = logits.topk(8, 1)
        assert np.array_equal(values[rows], top.numpy())  # bit for bit
        assert np.array_equal(indices[rows], idx.numpy())
        assert np.array_equal(lse[rows], torch.logsumexp(logits, 1).numpy())
    assert (kept_mass(values, lse) <= 1 + 1e-6).all()


def test_an_onnx_language_model_is_a_token_teacher(tmp_path, runner):
    """An exported causal LM (int64 token ids (batch, length) → (batch, length, V) logits, both
    axes dynamic) caches what onnxruntime computes, within float tolerance of torch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import warnings

    teacher = lm_checkpoint(tmp_path / "lm.pt")
    net = torch.load(teacher, weights_only=True)
    model = create_model("gpt_nano", 256, (48,))
    model.load_state_dict(net["state_dict"])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 48, dtype=torch.long),),
                          tmp_path / "lm.onnx", input_names=["tokens"], dynamo=True,
                          dynamic_shapes={"tokens": {0: batch, 1: length}})  # fmt: skip
    result = precompute(runner, tmp_path / "lm.onnx", tmp_path / "c.zarr")
    assert result.exit_code == 0, result.output
    with open_cache(tmp_path / "c.zarr") as c:
        rows = slice(0, c.attrs["shard_rows"])
        values, lse = c.read(schema.TOPK_VALUES, rows)[:, 0], c.read(schema.TOPK_LSE, rows)[:, 0]
        assert c.attrs["teacher"]["members"][0]["kind"] == "onnx"
    logits = teacher_rows(teacher, load_sequences(DATA), rows)
    np.testing.assert_allclose(values, logits.topk(8, 1).values.numpy(), atol=1e-4)
    np.testing.assert_allclose(lse, torch.logsumexp(logits, 1).numpy(), atol=1e-4)


def test_a_bf16_token_cache_is_the_teachers_forward_under_autocast(tmp_path, runner):
    teacher = lm_checkpoint(tmp_path / "lm.pt")
    result = precompute(runner, teacher, tmp_path / "c.zarr", "--precision", "bf16")
    assert result.exit_code == 0, result.output
    with open_cache(tmp_path / "c.zarr") as c:
        rows = slice(0, c.attrs["shard_rows"])
        values, lse = c.read(schema.TOPK_VALUES, rows)[:, 0], c.read(schema.TOPK_LSE, rows)[:, 0]
    logits = teacher_rows(teacher, load_sequences(DATA), rows, dtype=torch.bfloat16).float()
    assert np.array_equal(values, logits.topk(8, 1).values.numpy())  # bit for bit
    assert np.array_equal(lse, torch.logsumexp(logits, 1).numpy())
    fp32 = teacher_rows(teacher, load_sequences(DATA), rows).topk(8, 1).values.numpy()
    assert not np.array_equal(values, fp32)  # it did run in bfloat16


@pytest.mark.slow
def test_a_killed_token_run_resumes_byte_identical(tmp_path, runner):
    teacher = lm_checkpoint(tmp_path / "lm.pt")
    out = tmp_path / "killed" / "c.zarr"
    args = ["precompute-logits", "--teacher", teacher, "--data", DATA, "--out", out,
            "--topk", "8", "--batch-size", "7", "--chunk-rows", "128",
            "--chunks-per-shard", "2", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, KILL_AT_SHARD_ENV: "3"}
    killed = procs.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert invoke(runner, *args).exit_code == 0
    clean = tmp_path / "clean" / "c.zarr"
    assert precompute(runner, teacher, clean).exit_code == 0
    assert zarr_files(out) == zarr_files(clean)


def test_sequences_longer_than_the_teachers_context_are_refused(tmp_path, runner):
    teacher = lm_checkpoint(tmp_path / "lm.pt", context=32)
    result = precompute(runner, teacher, tmp_path / "c.zarr")
    assert_clean_error(result, "sequences of up to 48 tokens", "context of --teacher", "(32")
    assert not list(tmp_path.glob("c.zarr*"))


def test_a_teacher_with_a_smaller_vocabulary_is_refused(tmp_path, runner):
    teacher = lm_checkpoint(tmp_path / "lm.pt", vocab=128)
    result = precompute(runner, teacher, tmp_path / "c.zarr")
    assert_clean_error(result, "a vocabulary of 256 tokens, but --teacher", "predicts 128")
    assert not list(tmp_path.glob("c.zarr*"))


@pytest.mark.parametrize(
    "given, named", [([], "Error: a sequence"), (["--topk", "0"], "--topk 0: ")]
)
def test_a_token_cache_needs_topk(tmp_path, runner, given, named):
    teacher = lm_checkpoint(tmp_path / "lm.pt")
    result = invoke(runner, "precompute-logits", "--teacher", teacher, "--data", DATA,
                    "--out", tmp_path / "c.zarr", *given)  # fmt: skip
    assert_clean_error(result, named, "top-k logits (--topk K, K >= 1", "--sample-k K")
    assert not list(tmp_path.glob("c.zarr*"))


def test_a_sampled_token_cache_holds_each_tokens_draws(tmp_path, runner):
    """--sample-k: K classes drawn per token from the teacher at T = 1, seeded by (seed, token
    id): the draws of the teacher's own logits, row for row."""
    from pipeline.cache.sparse import sample_targets

    teacher = lm_checkpoint(tmp_path / "lm.pt")
    out = tmp_path / "s.zarr"
    result = invoke(runner, "precompute-logits", "--teacher", teacher, "--data", DATA,
                    "--out", out, "--sample-k", "16", "--sample-values", "--batch-size", "7",
                    "--chunk-rows", "128", "--chunks-per-shard", "2",
                    "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    seqs = load_sequences(DATA)
    with open_cache(out) as c:
        assert c.attrs["targets"] == "sampled" and c.attrs["sample"]["k"] == 16
        indices = c.read(schema.SAMPLE_INDICES)[:, 0]
        counts = c.read(schema.SAMPLE_COUNTS)[:, 0]
        values = c.read(schema.SAMPLE_VALUES)[:, 0]
        shard_rows = c.attrs["shard_rows"]
    assert (counts.sum(1) == 16).all()
    rows = slice(shard_rows, 2 * shard_rows)  # one shard, with the forward calls of precompute
    logits = teacher_rows(teacher, seqs, rows).numpy()
    want_idx, want_counts = sample_targets(logits, 16, 0, seqs.token_ids()[rows])
    assert np.array_equal(indices[rows], want_idx) and np.array_equal(counts[rows], want_counts)
    taken = np.take_along_axis(logits, want_idx.astype(np.intp), 1)
    assert np.array_equal(values[rows], taken)


TEACHER_WITH_HOLES = """
import torch


class Holes(torch.nn.Module):
    '''Logits (B, L, 256) equal to the position, with -Inf at token 0 (ruled out) and, when
    `nan`, NaN at position 3.'''

    def __init__(self, nan):
        super().__init__()
        self.nan = nan

    def forward(self, x):
        out = torch.arange(256.0).expand(*x.shape, 256).clone()
        out[..., 0] = float("-inf")
        if self.nan:
            out[:, 3, 7] = float("nan")
        return out


def clean():
    return Holes(False)


def broken():
    return Holes(True)
"""


@pytest.mark.parametrize("args", [("--topk", "8"), ("--sample-k", "8")])
def test_nan_logits_are_refused_naming_tokens_and_minus_inf_is_kept_out(
    tmp_path, runner, monkeypatch, args
):
    (tmp_path / "holes.py").write_text(TEACHER_WITH_HOLES)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["precompute-logits", "--data", DATA, "--device", "cpu", *args]
    result = invoke(runner, *base, "--teacher", "holes:broken", "--out", tmp_path / "b.zarr")
    # Top-k: the NaN at position 3 is named first; drawn targets refuse the -Inf too.
    first = load_sequences(DATA).sequence_ids[0] << POSITION_BITS | (3 if "--topk" in args else 0)
    assert_clean_error(result, "produced NaN/Inf logits for tokens", f"[{first}")
    assert not list(tmp_path.glob("b.zarr*"))
    result = invoke(runner, *base, "--teacher", "holes:clean", "--out", tmp_path / "c.zarr")
    if args[0] == "--sample-k":  # a draw needs every logit finite, as a sample cache does
        assert_clean_error(result, "produced NaN/Inf logits for tokens")
        return
    assert result.exit_code == 0, result.output
    with open_cache(tmp_path / "c.zarr") as c:
        assert (c.read(schema.TOPK_INDICES)[:, 0] > 0).all()  # token 0 (-Inf) never kept
        lse = c.read(schema.TOPK_LSE)[:, 0]
    assert np.allclose(lse, np.log(np.exp(np.arange(1.0, 256.0)).sum()))  # it adds 0
