"""Per-epoch resume for the lab's training loops (every section that trains over epochs).

A section's loop runs through `run_epochs`: after each epoch it writes the model's weights, its
optimizer's variables, the dropout RNG state and everything the epoch logged
(`training.checkpoint.write_checkpoint`, atomic) into `<report folder>/.checkpoint/<variant>/`.
Re-running the same command restores the last complete epoch, replays the logged epochs into the
section's curves, moves the data pipeline on by the finished epochs (`advance`), and trains the
rest: the report is the one an uninterrupted run writes (`tests/test_lab_resume.py`). The folder
is removed when the report is written (`training.lab.__main__`); a checkpoint of other settings
is refused with a one-line error (exit 2).

Section 4 (`mixing`) checkpoints through Keras' `fit` instead (`training.checkpoint.EpochCheckpoint`)
and keeps each finished condition's result; the mechanism underneath is the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from training.checkpoint import fingerprint, latest_checkpoint, read_meta, restore_checkpoint, write_checkpoint


class LoopCheckpoint:
    """One training loop's checkpoint folder (None: no checkpointing, e.g. in unit tests)."""

    def __init__(self, root: Path | None, variant: str, settings: dict, seed: int) -> None:
        self.folder = None if root is None else Path(root) / variant
        self.sha = fingerprint({"variant": variant, "seed": seed, **settings})
        self.seed = seed

    def resume(self, model, optimizer) -> tuple[int, list]:
        """(epochs done, their logged values), with the state restored; (0, []) to start afresh."""
        from commandline import UsageError

        latest = None if self.folder is None else latest_checkpoint(self.folder)
        if latest is None:
            return 0, []
        if read_meta(latest)["config_sha256"] != self.sha:
            raise UsageError(f"{self.folder} holds the checkpoint of other settings; use another --out")
        meta = restore_checkpoint(latest, model, optimizer=optimizer)
        print(f"[lab] {self.folder.name}: resuming from epoch {meta['epoch']}", flush=True)
        return int(meta["epoch"]), [list(entry) for entry in meta["history"]["logged"]]

    def save(self, epochs_done: int, model, optimizer, logged: list) -> None:
        if self.folder is not None:
            write_checkpoint(self.folder, model, epoch=epochs_done, history={"logged": logged},
                             config_sha=self.sha, seed=self.seed, optimizer=optimizer)


def run_epochs(checkpoint: LoopCheckpoint | None, model, optimizer, epochs: int,
               one_epoch: Callable[[int], Sequence], log: Callable[..., None],
               advance: Callable[[int], None] | None = None) -> None:
    """`log(*one_epoch(epoch))` for every epoch, resumable. `one_epoch` trains and evaluates one
    epoch and returns what `log` takes (numbers only: they are stored as JSON); `advance(k)` moves
    a data pipeline whose order depends on how often it was iterated past `k` epochs."""
    checkpoint = checkpoint or LoopCheckpoint(None, "", {}, 0)
    start, logged = checkpoint.resume(model, optimizer)
    for entry in logged:
        log(*entry)
    if start and advance is not None:
        advance(start)
    for epoch in range(start, epochs):
        entry = list(one_epoch(epoch))
        log(*entry)
        logged.append(entry)
        checkpoint.save(epoch + 1, model, optimizer, logged)
