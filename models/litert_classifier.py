"""The served classifier without TensorFlow: the backbone in LiteRT, the head and MC dropout in NumPy.

Why: TensorFlow is ~1.2 GB of the serving image, and the service only ever runs a frozen backbone
and a four-layer head (MCDropout -> Dense -> Rescaling -> linear). `training.export_litert` writes the
backbone as a LiteRT flatbuffer (`backbone.tflite`) and the head's weights (`head.npz`) next to
`model.keras`, and records their SHA-256 in the model card; this module loads only those files
(checksums first) and answers like `models.inference.SplitClassifier`: the same method names, the
same calibrated probabilities (to 1e-5, checked at export), and for MC dropout the same masks for
the same seed (`models.philox` reproduces TensorFlow's stateless uniform numbers bit for bit).
Nothing here imports TensorFlow or Keras.
"""

from __future__ import annotations

import os
import queue
from pathlib import Path

import numpy as np

from models.artifact import ArtifactError, read_card, sha256_file
from models.calibration.uncertainty import (
    MCSummary,
    chunked_mc_summary,
    concat_summaries,
    mc_chunks,
    mc_seed_pair,
    summarize_mc_samples,
)
from models.philox import stateless_uniform, stateless_uniform_many

CARD_KEY = "litert"               # the model card's block describing the exported files
BACKBONE_FILE = "backbone.tflite"
HEAD_FILE = "head.npz"
EXPORT_COMMAND = "python -m training.export_litert"
IMAGE_SHAPE = (32, 32, 3)

# head.npz: `layers` names each head layer's operation in order; its parameters are "<index>.<name>"
HEAD_OPS = {"dropout": ("rate",), "dense": ("kernel", "bias"), "rescale": ("scale", "offset"), "identity": ()}


def save_head(path: Path, ops: list[tuple[str, dict[str, np.ndarray]]]) -> None:
    """Write the head as plain arrays (no pickles): `layers` plus "<index>.<param>" entries."""
    arrays = {"layers": np.array([name for name, _ in ops])}
    for index, (name, params) in enumerate(ops):
        if name not in HEAD_OPS or set(params) != set(HEAD_OPS[name]):
            raise ValueError(f"head layer {index}: unsupported operation {name!r} with {sorted(params)}")
        arrays.update({f"{index}.{key}": np.asarray(value, np.float32) for key, value in params.items()})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_head(path: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [str(name) for name in data["layers"]]
            ops = [(name, {key: data[f"{index}.{key}"] for key in HEAD_OPS[name]})
                   for index, name in enumerate(names)]
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{path}: not a head file ({type(exc).__name__}: {exc})") from None
    return ops


def litert_files(folder: Path, card: dict) -> tuple[Path, Path]:
    """The verified paths of the exported backbone and head; ArtifactError names what is wrong and
    how to fix it (missing export, tampered file, export of an older model.keras)."""
    block = card.get(CARD_KEY)
    fix = f"run `{EXPORT_COMMAND} {folder}` (needs TensorFlow) or serve with CALIB_RUNTIME=keras"
    if not isinstance(block, dict):
        raise ArtifactError(f"{folder / BACKBONE_FILE}: no LiteRT export recorded in the model card; {fix}")
    if block.get("model_sha256") != card["model_sha256"]:
        raise ArtifactError(f"{folder / BACKBONE_FILE}: exported from another model.keras; {fix}")
    paths = []
    for kind in ("backbone", "head"):
        path = folder / block.get(f"{kind}_file", BACKBONE_FILE if kind == "backbone" else HEAD_FILE)
        if not path.is_file():
            raise ArtifactError(f"{path}: LiteRT file missing; {fix}")
        actual = sha256_file(path)
        if actual != block.get(f"{kind}_sha256"):
            raise ArtifactError(f"{path}: checksum mismatch (card says {str(block.get(f'{kind}_sha256'))[:12]}..., "
                                f"file is {actual[:12]}...): the file was modified or truncated; {fix}")
        paths.append(path)
    return paths[0], paths[1]


class _Backbone:
    """One LiteRT interpreter and the batch size its tensors are allocated for. An interpreter is
    not thread-safe, so each call takes one from a pool (`LiteRTClassifier._pool`) and returns it."""

    def __init__(self, model: bytes, num_threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=model, num_threads=num_threads)
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self.batch = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.batch != len(images):   # reallocating costs ~1 ms: only when the batch size changes
            self.interpreter.resize_tensor_input(self.input_index, [len(images), *IMAGE_SHAPE], strict=False)
            self.interpreter.allocate_tensors()
            self.batch = len(images)
        self.interpreter.set_tensor(self.input_index, images)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_index).copy()


class LiteRTClassifier:
    """`SplitClassifier`'s serving interface on LiteRT + NumPy (see the module docstring)."""

    runtime = "litert"

    def __init__(self, backbone: bytes, head: list[tuple[str, dict[str, np.ndarray]]], temperature: float,
                 *, num_threads: int | None = None):
        self._model = bytes(backbone)   # interpreters keep pointing into this buffer
        self._ops = head
        self._temperature = float(temperature)
        self._num_threads = num_threads or os.cpu_count() or 1
        self._pool: queue.SimpleQueue[_Backbone] = queue.SimpleQueue()
        probe = self._take()
        self.feature_dim = int(probe.interpreter.get_output_details()[0]["shape"][-1])
        self._pool.put(probe)
        dense = [params for name, params in head if name == "dense"]
        if not dense:
            raise ValueError("the head has no dense layer")
        self._num_classes = int(dense[-1]["kernel"].shape[-1])

    @classmethod
    def from_artifact(cls, directory: str | os.PathLike, *, num_threads: int | None = None
                      ) -> tuple[dict, "LiteRTClassifier"]:
        """Verify the card (model.keras checksum) and the LiteRT files' checksums, then load them."""
        folder = Path(directory)
        card = read_card(folder)
        backbone_path, head_path = litert_files(folder, card)
        try:
            classifier = cls(backbone_path.read_bytes(), load_head(head_path), card["temperature"],
                             num_threads=num_threads)
        except ArtifactError:
            raise
        except (ValueError, RuntimeError) as exc:   # LiteRT's errors for a bad flatbuffer
            raise ArtifactError(f"{backbone_path}: LiteRT could not load it ({type(exc).__name__}: {exc})") from None
        return card, classifier

    @property
    def temperature(self) -> float:
        return self._temperature

    @property
    def num_classes(self) -> int:
        return self._num_classes

    # --- backbone -------------------------------------------------------------------------
    def _take(self) -> _Backbone:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return _Backbone(self._model, self._num_threads)

    def features(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """uint8 [N,32,32,3] -> float32 features [N, D], in chunks of `batch_size`."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"images must be [N, 32, 32, 3], got {images.shape}")
        if not len(images):
            return np.zeros((0, self.feature_dim), np.float32)
        backbone = self._take()
        try:
            chunks = [backbone(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        finally:
            self._pool.put(backbone)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    # --- head -----------------------------------------------------------------------------
    def _head(self, x: np.ndarray, seed_pair: tuple[int, int] | None,
              uniforms: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """The head's layers in order, as Keras computes them in float32; dropout draws its mask
        only when `seed_pair` is given (the layer at index i uses seed_pair + i, like
        `SplitClassifier._head_sampled`), else it is the identity (inference mode). `uniforms`:
        each dropout layer's uniform numbers, drawn beforehand (`mc_summaries_from_features`);
        `x` may then have leading dimensions, one per draw (the dense layer is a stacked matmul,
        one BLAS call per draw, so each draw's numbers equal its own 2-D call's bit for bit)."""
        x = np.asarray(x, np.float32)
        for index, (name, p) in enumerate(self._ops):
            if name == "dropout":
                rate = float(p["rate"])
                if (seed_pair is not None or uniforms is not None) and rate > 0.0:
                    u = (uniforms[index] if uniforms is not None
                         else stateless_uniform(x.shape, (seed_pair[0] + index, seed_pair[1] + index)))
                    keep = (u >= np.float32(rate)).astype(np.float32)
                    x = x * keep / np.float32(1.0 - rate)
            elif name == "dense":
                x = x @ p["kernel"] + p["bias"]
            elif name == "rescale":
                x = x * p["scale"] + p["offset"]
        return x.astype(np.float32, copy=False)

    def head_logits(self, features: np.ndarray) -> np.ndarray:
        return self._head(features, None)

    def logits(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """Uncalibrated deterministic logits [N, K] (divide by `temperature` to calibrate)."""
        return self.head_logits(self.features(images, batch_size))

    # --- MC dropout -----------------------------------------------------------------------
    def mc_logits_from_features(self, features: np.ndarray, n_samples: int, seed: int = 0) -> np.ndarray:
        """[T, B, K] uncalibrated logits from T dropout masks on the head (sample-major, as in TF)."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        features = np.asarray(features, np.float32)
        x = self._head(np.tile(features, (n_samples, 1)), mc_seed_pair(seed))
        return x.reshape(n_samples, len(features), -1)

    def mc_summary_from_features(self, features: np.ndarray, n_samples: int, seed: int, temperature: float,
                                 chunk_rows: int = 65_536) -> MCSummary:
        return chunked_mc_summary(self.mc_logits_from_features, features, n_samples, seed, temperature, chunk_rows)

    def mc_summaries_from_features(self, features: np.ndarray, requests: list[tuple[int, int, int, int]],
                                   temperature: float, chunk_rows: int = 65_536) -> list[MCSummary]:
        """`mc_summary_from_features(features[start:stop], T, seed, ...)` for each request
        (start, stop, T, seed) of a micro-batch, the same numbers bit for bit, computed together:
        every request's masks (its own seeds) in a few Philox passes, then the head and the
        summary once per group of equally shaped chunks, at most `chunk_rows` rows per group."""
        features = np.asarray(features, np.float32)
        chunks = [(r, start + a, start + b, t, seed_c)   # (request, rows, T, chunk seed), in request order
                  for r, (start, stop, t, seed) in enumerate(requests)
                  for a, b, seed_c in mc_chunks(stop - start, t, seed, chunk_rows)]
        groups: dict[tuple[int, int], list[list[int]]] = {}   # (T, images) -> chunk indices, bounded groups
        for i, (_, start, stop, t, _) in enumerate(chunks):
            bins = groups.setdefault((t, stop - start), [[]])
            if bins[-1] and (len(bins[-1]) + 1) * t * (stop - start) > chunk_rows:
                bins.append([])
            bins[-1].append(i)
        dropout = self._dropout_widths()
        parts: list[MCSummary | None] = [None] * len(chunks)
        for (t, b), bins in groups.items():
            for members in bins:
                draws = [((t * b, width), (mc_seed_pair(chunks[i][4])[0] + index, mc_seed_pair(chunks[i][4])[1] + index))
                         for index, width in dropout for i in members]
                u = stateless_uniform_many(draws)
                uniforms = {index: np.stack(u[k * len(members):(k + 1) * len(members)])
                            for k, (index, _) in enumerate(dropout)}
                x = np.stack([np.tile(features[chunks[i][1]:chunks[i][2]], (t, 1)) for i in members])
                z = self._head(x, None, uniforms).reshape(len(members), t, b, -1)   # [R, T, b, K]
                summary = summarize_mc_samples(z.transpose(1, 0, 2, 3).reshape(t, len(members) * b, -1), temperature)
                for j, i in enumerate(members):
                    rows = slice(j * b, (j + 1) * b)
                    parts[i] = MCSummary(t, summary.mean[rows], summary.variance[rows],
                                         summary.predictive_entropy[rows], summary.expected_entropy[rows],
                                         summary.mutual_information[rows])
        return [concat_summaries([parts[i] for i, chunk in enumerate(chunks) if chunk[0] == r])
                for r in range(len(requests))]

    def _dropout_widths(self) -> list[tuple[int, int]]:
        """(layer index, input width) of each head dropout layer with a rate above 0."""
        out, width = [], self.feature_dim
        for index, (name, p) in enumerate(self._ops):
            if name == "dropout" and float(p["rate"]) > 0.0:
                out.append((index, width))
            elif name == "dense":
                width = int(p["kernel"].shape[-1])
        return out

    def mc_logits(self, images: np.ndarray, n_samples: int, seed: int = 0) -> np.ndarray:
        return self.mc_logits_from_features(self.features(images), n_samples, seed)
