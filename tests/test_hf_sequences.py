"""Hugging Face language models, offline: JSON-lines text through a local tokenizer, a causal
LM teacher from a local directory (its head padded past the tokenizer), HF students from a
config directory, and the one-line refusals (another tokenizer, pickled weights, remote code,
a vocabulary too small, a cache of another tokenizer)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache, schema
from pipeline.core.errors import PipelineError
from pipeline.data.sequences import load_sequences
from pipeline.models.checkpoint import load_checkpoint
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

PAD = 13  # the teacher's head has 13 rows past the tokenizer's vocabulary
WORDS = "the cache holds raw logits of a teacher so students train at any temperature".split()


def _tokenizer(lines: list[str], size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["[UNK]", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _llama(vocab: int, width: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A folder with docs.jsonl, qa.jsonl, teacher/ (weights + tokenizer.json, head padded),
    student/ (a config only) and other-tok/ (another tokenizer)."""
    root = tmp_path_factory.mktemp("hf")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) for _ in range(120)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    qa = [{"prompt": t[:15], "completion": t[15:]} for t in lines[:30]]
    (root / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in qa) + "\n")
    tok = _tokenizer(lines, 300)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_llama(vocab + PAD, 32, 2))
    model.save_pretrained(root / "teacher")
    tok.save(str(root / "teacher" / "tokenizer.json"))
    _llama(vocab + 5, 16, 1).save_pretrained(root / "student")
    (root / "other-tok").mkdir()
    _tokenizer(lines[::-1], 280).save(str(root / "other-tok" / "tokenizer.json"))
    return root


def data(hf: Path, extra: str = "", file: str = "docs.jsonl", tok: str = "teacher") -> str:
    return f"jsonl:{hf / file}?tokenizer={hf / tok}&length=24{extra}"


def test_jsonl_texts_are_the_tokenizers_ids_split_truncated_or_packed(hf):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf / "teacher" / "tokenizer.json"))
    texts = [json.loads(line)["text"] for line in (hf / "docs.jsonl").read_text().splitlines()]
    ids = [tok.encode(t).ids for t in texts]
    split = load_sequences(data(hf))
    want = [i[a : a + 24] for i in ids for a in range(0, len(i), 24) if len(i[a : a + 24]) >= 2]
    assert [s[:n].tolist() for s, n in zip(split.tokens, split.lengths, strict=True)] == want
    assert split.sequence_ids.tolist() == list(range(len(want)))
    assert split.vocab == tok.get_vocab_size(with_added_tokens=True) and split.vocab_exact
    truncated = load_sequences(data(hf, "&overflow=truncate"))
    assert len(truncated) == len(ids) and truncated.lengths.tolist() == [
        min(len(i), 24) for i in ids
    ]
    packed = load_sequences(data(hf, "&pack=1"))
    flat = [t for i in ids for t in i]
    assert packed.tokens[: len(packed) - 1].ravel().tolist() == flat[: 24 * (len(packed) - 1)]
    assert int(packed.lengths.sum()) == len(flat)


def test_jsonl_prompts_and_completions_distil_the_completion(hf):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf / "teacher" / "tokenizer.json"))
    seqs = load_sequences(data(hf, "&distil=completion", file="qa.jsonl"))
    first = json.loads((hf / "qa.jsonl").read_text().splitlines()[0])
    prompt = tok.encode(first["prompt"]).ids
    whole = prompt + tok.encode(first["completion"], add_special_tokens=False).ids
    assert seqs.tokens[0, : seqs.lengths[0]].tolist() == whole[:24]
    assert seqs.prompt_lengths[0] == len(prompt)
    seq, pos = seqs.positions()  # the first distilled position predicts the completion's first
    assert pos[seq == 0][0] == len(prompt) - 1


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        ('{"text": "a b"}\nnot json\n', "", "line 2 is not JSON"),
        ('{"body": "a b"}\n', "", "line 1 has no string 'text'"),
        ('{"text": "a b"}\n', "&distil=completion", "needs every line to have a prompt"),
        ('{"prompt": "a", "completion": "b"}\n', "&pack=1", "prompt/completion lines are not"),
        ('{"prompt": "a", "completion": "b"}\n{"text": "c d"}\n', "", "mixes text lines"),
    ],
)
def test_bad_jsonl_is_one_line_naming_the_line(hf, tmp_path, lines, extra, message):
    (tmp_path / "bad.jsonl").write_text(lines)
    with pytest.raises(PipelineError, match=message):
        load_sequences(f"jsonl:{tmp_path / 'bad.jsonl'}?tokenizer={hf / 'teacher'}{extra}")


def test_a_hf_teacher_cache_is_its_own_forward_with_the_head_padding_cut(hf, tmp_path, runner):
    out = tmp_path / "c.zarr"
    result = invoke(runner, "precompute-logits", "--teacher", hf / "teacher", "--data", data(hf),
                    "--topk", "8", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    seqs = load_sequences(data(hf))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf / "teacher").eval()
    with torch.no_grad():  # the teacher's own forward, batched as precompute batches
        logits = model(input_ids=torch.from_numpy(seqs.tokens).long()).logits
    assert logits.shape[-1] == seqs.vocab + PAD
    seq, pos = seqs.positions()
    rows = logits[torch.from_numpy(seq), torch.from_numpy(pos), : seqs.vocab]  # padding cut
    with open_cache(out) as c:
        assert c.attrs["num_classes"] == seqs.vocab
        assert c.attrs["tokens"]["teacher_head"] == seqs.vocab + PAD
        assert c.attrs["teacher"]["members"][0]["kind"] == "hf"
        values = np.asarray(c.read(schema.TOPK_VALUES))[:, 0]
        indices = np.asarray(c.read(schema.TOPK_INDICES))[:, 0]
        lse = np.asarray(c.read(schema.TOPK_LSE))[:, 0]
    np.testing.assert_allclose(values, rows.topk(8).values.numpy(), rtol=1e-5, atol=1e-5)
    assert (indices < seqs.vocab).all()
    np.testing.assert_allclose(lse, torch.logsumexp(rows, 1).numpy(), rtol=1e-5, atol=1e-5)
    result = invoke(runner, "inspect", out)
    assert f"vocabulary {seqs.vocab} (the teacher's head of {seqs.vocab + PAD} cut" in result.output


@pytest.fixture(scope="module")
def hf_cache(hf, tmp_path_factory):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("hfc") / "c.zarr"
    result = invoke(CliRunner(), "precompute-logits", "--teacher", hf / "teacher",
                    "--data", data(hf), "--topk", "8", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_train_teacher_builds_a_hf_model_from_its_config(hf, tmp_path, runner):
    out = tmp_path / "t.pt"
    result = invoke(runner, "train-teacher", "--data", data(hf), "--model", hf / "student",
                    "--epochs", "1", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    model, meta = load_checkpoint(out)  # rebuilt from the config kept in the checkpoint
    assert (
        meta["model"] == "hf_causal_lm" and meta["model_kwargs"]["config"]["model_type"] == "llama"
    )
    seqs = load_sequences(data(hf))
    with torch.no_grad():
        assert model(torch.from_numpy(seqs.tokens[:2]).long()).shape == (2, 24, seqs.vocab)


def test_a_student_directory_with_weights_says_they_are_not_loaded(hf, hf_cache, tmp_path, runner):
    result = invoke(runner, "train-student", "--data", data(hf), "--cache", hf_cache,
                    "--student", hf / "teacher", "--epochs", "1",
                    "--out", tmp_path / "s")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "its weights are not loaded" in result.output


@pytest.mark.parametrize("student", ["gpt_nano", "student"])
def test_students_registry_and_hf_config_train_and_rebuild(hf, hf_cache, tmp_path, runner, student):
    out = tmp_path / "s"
    model = hf / student if student == "student" else student
    result = invoke(runner, "train-student", "--data", data(hf), "--cache", hf_cache,
                    "--student", model, "--loss", "kl", "--epochs", "2", "--batch-size", "16",
                    "--lr", "3e-3", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    rebuilt, info = load_checkpoint(out / "student.pt")  # without the config directory
    seqs = load_sequences(data(hf))
    x = torch.from_numpy(seqs.tokens[:2]).long()
    with torch.no_grad():
        assert rebuilt(x).shape == (2, 24, seqs.vocab)  # a padded student head is cut too
    assert info["log"][-1]["loss"] < info["log"][0]["loss"]
    metrics = tmp_path / "m.json"
    result = invoke(runner, "evaluate", "--student", out, "--cache", hf_cache, "--data", data(hf),
                    "--out", metrics)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert 0 < json.loads(metrics.read_text())["bits_per_token"] < np.log2(seqs.vocab)


def _refusals(hf: Path, tmp: Path) -> list[tuple[list, str]]:
    (tmp / "pickled").mkdir()
    (tmp / "pickled" / "config.json").write_text((hf / "teacher" / "config.json").read_text())
    (tmp / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    (tmp / "remote").mkdir()
    config = json.loads((hf / "teacher" / "config.json").read_text())
    (tmp / "remote" / "config.json").write_text(json.dumps({**config, "auto_map": {"x": "m.M"}}))
    (tmp / "tiny").mkdir()
    config = json.loads((hf / "student" / "config.json").read_text())
    (tmp / "tiny" / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    torch.manual_seed(0)
    small = transformers.AutoModelForCausalLM.from_config(_llama(200, 16, 1))
    small.save_pretrained(tmp / "small-head")  # a head smaller than the tokenizer's 300
    pre = ["precompute-logits", "--topk", "8", "--out", tmp / "x.zarr", "--teacher"]
    return [
        (
            [*pre, hf / "teacher", "--data", data(hf, tok="other-tok")],
            "tokenize with the teacher's",
        ),
        ([*pre, tmp / "pickled", "--data", data(hf)], "pytorch_model.bin is pickled"),
        ([*pre, tmp / "remote", "--data", data(hf)], "never runs a model directory's code"),
        (
            [*pre, hf / "teacher", "--data", data(hf).replace("length=24", "length=90&pack=1")],
            "longer than the context",
        ),  # fmt: skip
        ([*pre, hf / "teacher", "--data", f"jsonl:{hf / 'docs.jsonl'}"], "give the tokenizer"),
        (
            [*pre, hf / "teacher", "--data", "pystdlib:train?limit=4&length=24"],
            "has its own tokenizer of",
        ),  # fmt: skip
        ([*pre, tmp / "small-head", "--data", data(hf)], "but --teacher"),
    ]


def test_bad_hf_inputs_are_one_line_and_write_nothing(hf, hf_cache, tmp_path, runner):
    student = ["train-student", "--cache", hf_cache, "--loss", "kl", "--out", tmp_path / "s"]
    cases = _refusals(hf, tmp_path) + [
        (
            [*student, "--data", data(hf, tok="other-tok"), "--student", "gpt_nano"],
            "was made with another tokenizer",
        ),  # fmt: skip
        (
            [*student, "--data", data(hf), "--student", tmp_path / "tiny"],
            "its vocabulary (100) is smaller than the data's",
        ),  # fmt: skip
    ]
    for args, message in cases:
        assert_clean_error(invoke(runner, *args), message)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "s").exists()
