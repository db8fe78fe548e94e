"""Progress bars: per batch on a terminal, left on screen when done, silent in logs."""

import io
import sys

import numpy as np
import torch

from pipeline.core.training import predict


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _predict_on(stream, monkeypatch, desc):
    monkeypatch.setattr(sys, "stderr", stream)
    model = torch.nn.Linear(4, 3)
    inputs = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    out = predict(model, inputs, batch_size=32, device=torch.device("cpu"), desc=desc)
    assert out.shape == (100, 3)
    return stream.getvalue()


def test_evaluation_bar_moves_per_batch_and_stays_on_a_terminal(monkeypatch):
    import pipeline.core.training
    from pipeline.core.progress import progress

    # tqdm redraws at most every 0.1 s: draw every update to see each batch
    unthrottled = lambda *a, **k: progress(*a, mininterval=0, miniters=1, **k)  # noqa: E731
    monkeypatch.setattr(pipeline.core.training, "progress", unthrottled)
    text = _predict_on(_Terminal(), monkeypatch, "evaluate")
    assert "evaluate" in text and "100/100" in text
    assert "32/100" in text and "64/100" in text  # updated per batch, not once at the end
    assert text.endswith("\n")  # left on screen, not erased


def test_no_bar_when_stderr_is_not_a_terminal_or_no_description(monkeypatch):
    assert _predict_on(io.StringIO(), monkeypatch, "evaluate") == ""
    assert _predict_on(_Terminal(), monkeypatch, None) == ""
