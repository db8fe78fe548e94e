"""Per-epoch training metrics written with DVCLive, so `dvc plots show`, `dvc exp show` and
VS Code's DVC extension read them: `DIR/plots/metrics/<metric>.tsv` (a row per epoch) and
`DIR/metrics.json` (the last epoch).

The log rows kept by the trainer (and saved in its resume checkpoint) are the source of truth:
a resumed run starts a fresh DVCLive directory and replays them, so the files never hold a
row twice or an epoch the checkpoint does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import remove

# A file in every training log this tool writes: what makes an `OUT.dvclive` ours to replace.
MARKER = ".kd-pipeline-log"

# Log-row key → DVCLive metric name (a path under plots/metrics/).
METRICS = {
    "loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "heldout_loss": "heldout/loss",
    "heldout_accuracy": "heldout/accuracy",
    "lr": "lr",
}


class LiveLog:
    """A DVCLive directory fed one log row per epoch; the step is the epoch number."""

    def __init__(self, directory: Path, rows: list[dict[str, Any]] = ()):
        from dvclive import Live

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / MARKER).write_text("a training log of kd-pipeline\n")
        self.live = Live(
            str(self.directory), save_dvc_exp=False, dvcyaml=None, report=None, resume=False
        )
        # Live opens the enclosing DVC repo to name experiments, which we never save; an open
        # repo leaves git pack handles that print errors at interpreter exit.
        repo = getattr(self.live, "_dvc_repo", None)
        if repo is not None:
            repo.close()
        for row in rows:
            self.log(row)

    def log(self, row: dict[str, Any]) -> None:
        """Append one epoch's row (keys of METRICS that are present and finite)."""
        self.live.step = int(row["epoch"])
        for key, name in METRICS.items():
            value = row.get(key)
            if value is not None and value == value:  # NaN: not measured this run
                self.live.log_metric(name, float(value))
        self.live.make_summary()


def clear_stale(directory: Path) -> None:
    """Remove the training log a killed run left at `directory` (a run starts its own, and a
    resumed one replays the rows its checkpoint holds); refuse one that is not ours."""
    if not (directory.exists() or directory.is_symlink()):
        return
    if directory.is_symlink() or not (directory / MARKER).is_file():
        raise PipelineError(
            f"{directory} exists and is not a training log of kd-pipeline; move or delete it "
            "(it is not deleted for you)"
        )
    remove(directory)
