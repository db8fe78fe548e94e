"""Hugging Face causal language models from a local directory, as teachers and students.

A directory with a ``config.json`` is a Hugging Face model: ``--teacher DIR`` loads its weights
(``*.safetensors`` only: a pickled ``pytorch_model.bin`` could run code when read), ``--model
DIR`` builds a freshly initialised student from its config alone. Either way nothing is
downloaded (``HF_HUB_OFFLINE=1``, ``local_files_only``) and no code from the directory runs (a
config with ``auto_map``, i.e. ``trust_remote_code``, is refused). `HFCausalLM` wraps the model
in the contract of `pipeline.models.causal`: token ids (B, L) → next-token logits (B, L, V),
where V is the vocabulary it is used with: a model whose head is padded past the tokenizer's
vocabulary (152,064 rows for 151,646 tokens, say) has the padding rows cut off (the rule in
docs/sequences.md). A student is saved as the registry model `hf_causal_lm` with its config
as a kwarg, so its checkpoint rebuilds it without the directory.

Needs the `hf` extra: ``pip install 'kd-pipeline[hf]'`` (transformers, tokenizers, safetensors).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import PipelineError, one_line
from pipeline.models import register_model

INSTALL = "pip install 'kd-pipeline[hf]'"


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` is a local Hugging Face model directory (it holds a config.json)."""
    return Path(path).expanduser().is_dir() and (Path(path).expanduser() / "config.json").is_file()


def transformers_module(what: str) -> Any:
    """`transformers`, offline; a missing install is a one-line error naming `what`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError:
        raise PipelineError(f"{what}: Hugging Face models need transformers ({INSTALL})") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights": ours is the one bar
    return transformers


class HFCausalLM(nn.Module):
    """A transformers causal LM as token ids (B, L) → logits (B, L, vocab): its logits past
    `vocab` (head padding) are cut off."""

    def __init__(self, model: nn.Module, vocab: int | None = None):
        super().__init__()
        self.model = model
        config = model.config
        self.vocab = int(vocab or config.vocab_size)
        context = getattr(config, "max_position_embeddings", None)
        self.context = int(context) if context else None
        self.input_shape = (self.context,) if self.context else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L) → (B, L, V)
        logits = self.model(input_ids=tokens.long(), use_cache=False).logits
        return logits[..., : self.vocab]


def read_config(path: Path, what: str) -> dict[str, Any]:
    """config.json of a model directory, refused when it asks for the directory's own code."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{what} {path}: config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise PipelineError(
            f"{what} {path}: config.json has no model_type (not a transformers model)"
        )
    if "auto_map" in config:
        raise PipelineError(
            f"{what} {path}: its config names code in the directory (auto_map); kd-pipeline "
            "never runs a model directory's code"
        )
    return config


def load_hf_teacher(path: Path, what: str = "--teacher") -> HFCausalLM:
    """The pretrained causal LM in `path` (config.json + *.safetensors), in eval mode."""
    read_config(path, what)
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")]
        why = f" ({', '.join(pickled)} is pickled: convert it)" if pickled else ""
        raise PipelineError(f"{what} {path}: no *.safetensors weights{why}")
    tf = transformers_module(f"{what} {path}")
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except Exception as e:  # transformers raises many types for a foreign directory
        raise PipelineError(f"{what} {path}: not a loadable causal LM ({one_line(e)})") from None
    return HFCausalLM(model.eval())


def registry_form(
    model: str, kwargs: dict[str, Any], vocab: int, context: int, what: str
) -> tuple[str, dict[str, Any]]:
    """The registry name and kwargs a model option `model` (given by `what`) is built and
    saved as: a Hugging Face directory (its config.json) is `hf_causal_lm` with that config,
    so a checkpoint rebuilds it without the directory; anything else is itself. The model's
    vocabulary may exceed `vocab` by head padding only (cut off), and its context must hold
    `context` tokens."""
    if not is_hf_dir(model):
        return model, kwargs
    named = f"{what} {model}"
    if kwargs:
        raise PipelineError(
            f"{named}: a model directory takes no model kwargs (edit its config.json)"
        )
    config = read_config(Path(model).expanduser(), what)
    if any(Path(model).expanduser().glob("*.safetensors")):  # said, not silently dropped
        print(f"note: {named}: built from its config.json alone; its weights are not "
              "loaded (a model trained here starts afresh)", file=sys.stderr)  # fmt: skip
    if int(config.get("vocab_size") or 0) < vocab:
        raise PipelineError(
            f"{named}: its vocabulary ({config.get('vocab_size')}) is smaller than the data's "
            f"({vocab}); a model's head may only be padded past it"
        )
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if positions and int(positions) < context:
        raise PipelineError(
            f"{named}: its context ({positions}) is shorter than the sequences ({context})"
        )
    return "hf_causal_lm", {"config": config}


@register_model(tokens=True)
def hf_causal_lm(
    num_classes: int, input_shape: tuple[int, ...], config: dict[str, Any] | None = None
) -> nn.Module:
    """A Hugging Face causal LM built from its config (--model DIR with a config.json)."""
    if not config:
        raise ValueError("needs its config: give --model a directory with a config.json")
    tf = transformers_module("--model")
    cfg = tf.AutoConfig.for_model(**config)
    if int(cfg.vocab_size) < num_classes:
        raise ValueError(
            f"its vocabulary ({cfg.vocab_size}) is smaller than the cache's ({num_classes})"
        )
    context = getattr(cfg, "max_position_embeddings", None)
    if context and input_shape and input_shape[0] > context:
        raise ValueError(
            f"its context ({context}) is shorter than the sequences ({input_shape[0]})"
        )
    return HFCausalLM(tf.AutoModelForCausalLM.from_config(cfg), num_classes)
