"""Export an artifact for the TensorFlow-free serving runtime (`CALIB_RUNTIME=litert`).

    python -m training.export_litert models/shipped/cifar10-augmix [ARTIFACT ...]

Writes `backbone.tflite` (the backbone, converted by TensorFlow's LiteRT converter) and `head.npz`
(the head's dropout rate and weights) into the artifact folder, checks on a seeded batch that
`models.litert_classifier.LiteRTClassifier` gives the same calibrated probabilities as Keras
(max abs difference <= 1e-5, and the same MC-dropout summary for the same seed), and only then
records both files' SHA-256 and the measured differences in the model card (`litert` block).
`model.keras` is never touched; `training.train` runs this at the end of every training run.
"""

from __future__ import annotations

from commandline import ArgumentParser, command, invoked_as, setup_tensorflow

setup_tensorflow()

import contextlib
import io
import os
import sys
from pathlib import Path

import numpy as np

PROG = invoked_as("training.export_litert")
TOLERANCE = 1e-5        # max abs difference of calibrated probabilities, LiteRT vs Keras
CHECK_IMAGES = 64       # seeded random uint8 images the export is checked on
CHECK_MC_SAMPLES = 20


def head_operations(head_layers) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The head's layers as (operation, float32 parameters), for `models.litert_classifier.save_head`.
    Only what the NumPy head computes exactly like Keras is accepted; anything else is an error."""
    import keras

    from models.layers import MCDropout

    ops = []
    for layer in head_layers:
        if isinstance(layer, MCDropout):
            ops.append(("dropout", {"rate": np.float32(layer.rate)}))
        elif isinstance(layer, keras.layers.Dense) and layer.activation is keras.activations.linear:
            kernel, bias = (np.asarray(keras.ops.convert_to_numpy(w), np.float32) for w in (layer.kernel, layer.bias))
            ops.append(("dense", {"kernel": kernel, "bias": bias}))
        elif isinstance(layer, keras.layers.Rescaling):
            ops.append(("rescale", {"scale": np.float32(layer.scale), "offset": np.float32(layer.offset)}))
        elif isinstance(layer, keras.layers.Activation) and layer.activation is keras.activations.linear:
            ops.append(("identity", {}))
        else:
            raise ValueError(f"head layer {layer.name!r} ({type(layer).__name__}) has no NumPy counterpart")
        if layer.compute_dtype != "float32":
            raise ValueError(f"head layer {layer.name!r} computes in {layer.compute_dtype}, not float32")
    return ops


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_litert(directory: str | os.PathLike, *, images: np.ndarray | None = None) -> dict:
    """Export, verify and record (see the module docstring); returns the card's `litert` block.
    `images`: the uint8 [N,32,32,3] batch to check on (default: CHECK_IMAGES seeded random images)."""
    import tensorflow as tf

    from models.artifact import ArtifactError, load_artifact, sha256_file, update_card
    from models.calibration import softmax
    from models.inference import SplitClassifier
    from models.litert_classifier import BACKBONE_FILE, CARD_KEY, HEAD_FILE, LiteRTClassifier, save_head

    folder = Path(directory)
    artifact = load_artifact(folder)
    keras_clf = SplitClassifier(artifact.model)
    ops = head_operations(keras_clf.head_layers)
    with contextlib.redirect_stdout(io.StringIO()):   # Keras prints every captured variable while converting
        flatbuffer = tf.lite.TFLiteConverter.from_keras_model(keras_clf.backbone).convert()
    litert_clf = LiteRTClassifier(flatbuffer, ops, keras_clf.temperature)

    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, 32, 32, 3), dtype=np.uint8)
    t = float(artifact.card["temperature"])
    keras_features, litert_features = keras_clf.features(images), litert_clf.features(images)
    keras_logits = keras_clf.head_logits(keras_features)
    prob_diff = float(np.max(np.abs(softmax(litert_clf.head_logits(litert_features), t) - softmax(keras_logits, t))))
    # MC: the same masks for the same seed (models.philox); compared on the same features so the
    # check isolates the head
    mc_keras = keras_clf.mc_summary_from_features(keras_features, CHECK_MC_SAMPLES, 0, t)
    mc_litert = litert_clf.mc_summary_from_features(keras_features, CHECK_MC_SAMPLES, 0, t)
    mc_diff = float(max(np.max(np.abs(mc_keras.mean - mc_litert.mean)),
                        np.max(np.abs(mc_keras.variance - mc_litert.variance))))
    if not (prob_diff <= TOLERANCE and mc_diff <= TOLERANCE):
        raise ArtifactError(f"{folder}: the LiteRT export differs from Keras (probabilities {prob_diff:.2e}, "
                            f"MC mean/variance {mc_diff:.2e}; tolerance {TOLERANCE:g}); nothing written")

    _write_atomically(folder / BACKBONE_FILE, lambda p: p.write_bytes(flatbuffer))
    _write_atomically(folder / HEAD_FILE, lambda p: save_head(p, ops))
    block = {
        "backbone_file": BACKBONE_FILE, "backbone_sha256": sha256_file(folder / BACKBONE_FILE),
        "head_file": HEAD_FILE, "head_sha256": sha256_file(folder / HEAD_FILE),
        "model_sha256": artifact.card["model_sha256"],   # the model.keras these files come from
        "converter": f"tensorflow {tf.__version__} TFLiteConverter.from_keras_model",
        "check": {"images": int(len(images)), "tolerance": TOLERANCE,
                  "max_abs_probability_diff": prob_diff,
                  "max_abs_feature_diff": float(np.max(np.abs(litert_features - keras_features))),
                  "mc_samples": CHECK_MC_SAMPLES, "max_abs_mc_mean_variance_diff": mc_diff},
    }
    update_card(folder, {CARD_KEY: block})
    return block


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.strip().splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="artifact folders (model.keras + model_card.json)")
    args = parser.parse_args(argv)
    for folder in args.artifacts:
        block = export_litert(folder)
        check = block["check"]
        print(f"{folder}: {block['backbone_file']} ({(Path(folder) / block['backbone_file']).stat().st_size / 1e6:.2f} MB)"
              f" + {block['head_file']}; max |p_litert - p_keras| {check['max_abs_probability_diff']:.2e}"
              f" on {check['images']} images, MC mean/variance {check['max_abs_mc_mean_variance_diff']:.2e}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
