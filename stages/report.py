"""Stage: one Markdown table of the teacher and every evaluated student."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_output


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def render(results: list[dict[str, Any]]) -> str:
    """The summary Markdown for a list of evaluate outputs."""
    first = results[0]
    lines = [
        "# Distillation summary",
        "",
        f"Test data: `{first['data']}` ({first['num_samples']} samples). Teacher outputs come from "
        "the test-split cache; the teacher was not loaded.",
        "",
        "| model | role | loss | T | alpha | labelled | test acc % | agreement % "
        "| KL(t‖s) | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {'+'.join(first['teacher']['models']) or 'teacher'} | teacher | – | – | – | 1.0 "
        f"| {_pct(first['teacher_accuracy'])} | 100.00 | 0 | {first['teacher']['num_params']:,} |",
    ]
    for r in sorted(results, key=lambda r: r["student"]):
        distils = r["loss"] != "ce"
        lines.append(
            f"| {r['model']} | student `{r['student']}` | {r['loss']} "
            f"| {r['temperature'] if distils else '–'} | {r['alpha'] if distils else '–'} "
            f"| {r['labeled_fraction']} | {_pct(r['accuracy'])} | {_pct(r['agreement'])} "
            f"| {r['kl_teacher_student']:.4f} | {r['num_params']:,} |"
        )
    lines += ["", *_verdict(results)]
    return "\n".join(lines) + "\n"


def _verdict(results: list[dict[str, Any]]) -> list[str]:
    baselines = [r for r in results if r["loss"] == "ce" and r["accuracy"] is not None]
    distilled = [r for r in results if r["loss"] != "ce" and r["accuracy"] is not None]
    if not baselines or not distilled:
        return []
    base = max(baselines, key=lambda r: r["accuracy"])
    best = max(distilled, key=lambda r: r["accuracy"])
    gain = 100 * (best["accuracy"] - base["accuracy"])
    return [
        f"Best distilled student `{best['student']}` vs CE baseline `{base['student']}`: "
        f"{gain:+.2f} points of test accuracy."
    ]


def run(metrics_dir: Path, out: Path) -> Path:
    """Read every `*.json` from `metrics_dir` (evaluate outputs) and write `out`."""
    files = sorted(Path(metrics_dir).glob("*.json"))
    if not files:
        raise PipelineError(f"no metrics *.json files in {metrics_dir}")
    results = [json.loads(f.read_text()) for f in files]
    with atomic_output(out, overwrite=True) as tmp:
        tmp.write_text(render(results))
    return Path(out)
