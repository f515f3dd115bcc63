"""Per-set resume of the shift benchmark: a run that is killed keeps the sets it finished.

The benchmark runs every model over 1 + 75 sets (clean, 15 corruptions x 5 severities) plus the OOD
sets; on 2 CPU cores with 10,000 images that is hours. After each set, what the report needs of it
(each model's logits and OOD scores: `SetOutputs`) is written to `<output>/.checkpoint/<set>.npz`;
a re-run of the same command loads the finished sets instead of corrupting and running them again,
so its report has the very numbers an uninterrupted run gives. The folder is removed once the
report is written.

`config.json` holds a fingerprint of everything the outputs depend on (artifacts' model SHA-256 and
temperatures, the data checksum and subset, seed, MC samples, runtime, batch size, feature density):
a checkpoint of other settings is refused with a one-line error rather than mixed in.

Writes are atomic (temp file, fsync, `os.replace`): a kill leaves each set's file whole or absent.
Files are plain arrays, read with `allow_pickle=False`.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np

from training.checkpoint import fingerprint, write_atomically

CONFIG = "config.json"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class CheckpointMismatch(ValueError):
    """The checkpoint folder holds the sets of other settings."""


class SetCheckpoint:
    """Finished sets' outputs of one benchmark run (one list of `SetOutputs` per set, in model order)."""

    def __init__(self, folder: str | os.PathLike, config: dict) -> None:
        self.folder = Path(folder)
        self.sha = fingerprint(config)
        stored = self.folder / CONFIG
        if stored.is_file():
            held = json.loads(stored.read_text()).get("config_sha256")
            if held != self.sha:
                raise CheckpointMismatch(f"{self.folder} holds the finished sets of other settings; use another "
                                         f"--output, or delete that folder to start afresh")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(stored, json.dumps({"config_sha256": self.sha, "config": config}, indent=1).encode())

    def _path(self, key: str) -> Path:
        return self.folder / f"{_SAFE.sub('_', key)}.npz"

    def load(self, key: str):
        """The stored outputs of set `key` (a list of SetOutputs), or None if it was not finished."""
        from training.shift.benchmark import SetOutputs

        path = self._path(key)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            n_models = int(z["n_models"])
            outputs = []
            for i in range(n_models):
                prefix = f"m{i}__score__"
                scores = {name[len(prefix):]: z[name] for name in z.files if name.startswith(prefix)}
                outputs.append(SetOutputs(z[f"m{i}__logits"], scores))
        return outputs

    def save(self, key: str, outputs) -> None:
        arrays = {"n_models": np.asarray(len(outputs))}
        for i, out in enumerate(outputs):
            arrays[f"m{i}__logits"] = np.asarray(out.logits)
            for name, values in out.scores.items():
                arrays[f"m{i}__score__{name}"] = np.asarray(values)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomically(self._path(key), buffer.getvalue())

    def finished(self) -> int:
        return len(list(self.folder.glob("*.npz")))

