"""Turn what a caller has (file paths, PNG/JPEG bytes, folders, arrays) into request bodies.

Standard library only: files are sent as they are, a folder is tarred in memory. NumPy is used
only when the caller hands over NumPy arrays (so it is already installed).
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


@dataclass
class Body:
    """What to send: JSON, or multipart files [(field, (name, bytes, content_type))]."""

    json: Optional[dict] = None
    files: list = field(default_factory=list)

    def httpx_kwargs(self) -> dict:
        return {"json": self.json} if self.json is not None else {"files": self.files}


def _is_array(obj: Any) -> bool:
    return hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "tobytes")


def _content_type(name: str) -> str:
    return IMAGE_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def _npy_bytes(array) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _list_depth(obj: Any) -> int:
    depth = 0
    while isinstance(obj, list) and obj:
        depth, obj = depth + 1, obj[0]
    return depth


def predict_body(images: Any) -> Body:
    """Paths/bytes -> multipart files; a NumPy array -> one .npy; nested lists or {"b64"} -> JSON."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray)) or _is_array(images):
        images = [images]
    items = list(images)
    if not items:
        raise ValueError("no images given")
    if _list_depth(items) == 3:  # one image as nested lists [32][32][3]
        items = [items]
    if all(isinstance(i, (list, dict)) for i in items):
        return Body(json={"instances": items})
    files = []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            files.append(("files", (path.name, path.read_bytes(), _content_type(path.name))))
        elif isinstance(item, (bytes, bytearray)):
            files.append(("files", (f"image-{i}.png", bytes(item), "application/octet-stream")))
        elif _is_array(item):
            files.append(("files", (f"array-{i}.npy", _npy_bytes(item), "application/octet-stream")))
        else:
            raise TypeError(f"image {i}: expected a path, PNG/JPEG bytes, a NumPy array or a nested "
                            f"list, got {type(item).__name__}")
    return Body(files=files)


def tar_directory(folder: Path) -> bytes:
    """An image-folder tree as an in-memory .tar.gz (hidden files left out)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and not any(p.startswith(".") for p in rel.parts):
                tar.add(path, arcname=str(rel))
    return buf.getvalue()


def evaluate_body(x: Any, y: Any = None) -> Body:
    """A .npz / archive path or a folder (labels from the data), or arrays/lists x with labels y."""
    if isinstance(x, (str, os.PathLike)):
        if y is not None:
            raise ValueError("labels come from the file or folder; do not pass y with a path")
        path = Path(x)
        if path.is_dir():
            return Body(files=[("file", (f"{path.name or 'images'}.tar.gz", tar_directory(path),
                                         "application/gzip"))])
        return Body(files=[("file", (path.name, path.read_bytes(), "application/octet-stream"))])
    if y is None:
        raise ValueError("labels y are required with in-memory images")
    if _is_array(x):
        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, x=np.ascontiguousarray(x), y=np.asarray(y))
        return Body(files=[("file", ("batch.npz", buf.getvalue(), "application/octet-stream"))])
    labels = y.tolist() if _is_array(y) else list(y)
    return Body(json={"instances": list(x), "labels": labels})


IMAGE_SUFFIXES = tuple(IMAGE_TYPES)


def _batch_items(batch: Any) -> list:
    """A folder -> its image files (sorted, hidden ones left out); anything else as predict takes it."""
    if isinstance(batch, (str, os.PathLike)) and Path(batch).is_dir():
        files = sorted(p for p in Path(batch).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(batch).parts))
        if not files:
            raise ValueError(f"{batch}: no PNG/JPEG images in this folder")
        return [str(p) for p in files]
    return batch


def compare_body(in_distribution: Any, suspect: Any) -> Body:
    """Two batches, each as `predict_body` takes images (or a folder of images): JSON when both are
    nested lists / {"b64"} objects, else multipart with the fields `in_distribution` and `suspect`."""
    bodies = {"in_distribution": predict_body(_batch_items(in_distribution)),
              "suspect": predict_body(_batch_items(suspect))}
    if all(b.json is not None for b in bodies.values()):
        return Body(json={name: b.json["instances"] for name, b in bodies.items()})
    if any(b.json is not None for b in bodies.values()):
        raise ValueError("give both batches in the same form: nested lists for both, or files/arrays for both")
    return Body(files=[(name, part) for name, b in bodies.items() for _, part in b.files])


def outputs_body(scores: Any, y: Any = None, *, probabilities: bool = False) -> Body:
    """A classifier's outputs for /v1/calibration/evaluate: an .npz path (`logits` or `probs`, and `y`)
    as it is; arrays -> one .npz; nested lists -> JSON. `probabilities`: the scores are probabilities."""
    if isinstance(scores, (str, os.PathLike)):
        if y is not None:
            raise ValueError("labels come from the .npz (its y array); do not pass y with a path")
        path = Path(scores)
        return Body(files=[("file", (path.name, path.read_bytes(), "application/octet-stream"))])
    if y is None:
        raise ValueError("labels y are required with in-memory scores")
    if _is_array(scores):
        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, **{"probs" if probabilities else "logits": np.ascontiguousarray(scores)}, y=np.asarray(y))
        return Body(files=[("file", ("outputs.npz", buf.getvalue(), "application/octet-stream"))])
    labels = y.tolist() if _is_array(y) else list(y)
    return Body(json={"probabilities" if probabilities else "logits": list(scores), "labels": labels})


def scores_body(scores: Any, *, probabilities: bool = False) -> Body:
    """Unlabelled outputs for /v1/calibrations/{id}/apply: an .npz path (`logits` or `probs`) as it is;
    arrays -> one .npz; nested lists -> JSON."""
    if isinstance(scores, (str, os.PathLike)):
        path = Path(scores)
        return Body(files=[("file", (path.name, path.read_bytes(), "application/octet-stream"))])
    key = "probs" if probabilities else "logits"
    if _is_array(scores):
        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, **{key: np.ascontiguousarray(scores)})
        return Body(files=[("file", ("outputs.npz", buf.getvalue(), "application/octet-stream"))])
    return Body(json={"probabilities" if probabilities else "logits": list(scores)})

