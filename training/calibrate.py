"""Refit an artifact's temperature, optionally for dataset shift, and its OOD threshold.

    python -m training.calibrate runs/my-model --data $CIFAR10_DIR --temperature shift-aware

Why: a temperature fitted on clean validation images is right for clean images only; under
corruption the network stays confident while its accuracy falls. Following Tomani et al. (2021),
`shift-aware` fits one temperature on the clean validation split *plus* copies of part of it
perturbed at five strengths by the four CIFAR-10-C *validation* corruptions (speckle noise,
Gaussian blur, spatter, saturate: Hendrycks & Dietterich kept these out of the 15 benchmark
corruptions for exactly this purpose). Nothing from the test split and none of the 15 benchmark
corruptions is used.

The validation split is rebuilt from the card (`data.split_seed`, `data.n_validation`), so the
data source must be the one the model was trained on (its checksum is compared). The artifact is
rewritten in place, or to `--output`: the temperature layer, the card's test metrics after the new
temperature, the OOD threshold (95% of clean validation images pass, `models.calibration.ood`)
and a `calibration` block saying what was used.
"""

from __future__ import annotations

from commandline import ArgumentParser, CommandError, UsageError, command, invoked_as, setup_tensorflow

setup_tensorflow()

import sys
import time
from pathlib import Path

import numpy as np

PROG = invoked_as("training.calibrate", "calib-calibrate")
METHODS = ("shift-aware", "clean")


def parse_args(argv=None):
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="artifact folder (model.keras + model_card.json)")
    parser.add_argument("--data", default="keras",
                        help="the training data source of the artifact (default: keras)")
    parser.add_argument("--temperature", choices=METHODS, default="shift-aware",
                        help="shift-aware (default) or clean (the validation split only); to refit "
                             "only the OOD threshold, use python -m training.fit_ood_threshold")
    parser.add_argument("--images-per-set", type=int, default=1000, metavar="N",
                        help="validation images per perturbed set (4 corruptions x 5 severities; "
                             "default 1000)")
    parser.add_argument("--tpr", type=float, default=0.95,
                        help="share of clean validation images that pass the OOD flag (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations")
    parser.add_argument("--output", default=None, help="write here instead of in place")
    args = parser.parse_args(argv)
    if args.images_per_set < 1:
        parser.error("--images-per-set must be positive")
    if not 0.5 <= args.tpr < 1.0:
        parser.error("--tpr must be in [0.5, 1)")
    return args


def perturbed_validation(x_val: np.ndarray, y_val: np.ndarray, *, n: int, seed: int):
    """The first `n` validation images (the split is already shuffled) under each validation
    corruption and severity: [(name, severity, images, labels)]."""
    from training.shift.corruptions import SEVERITIES, VALIDATION_CORRUPTIONS, corrupt

    x, y = x_val[:n], y_val[:n]
    return [(name, severity, corrupt(x, name, severity, seed=seed), y)
            for name in VALIDATION_CORRUPTIONS for severity in SEVERITIES]


def calibrate(artifact_dir: str, data_source: str, *, method: str, images_per_set: int = 1000,
              tpr: float = 0.95, seed: int = 0, output: str | None = None) -> dict:
    from training.data import load_cifar10
    from training.fit_ood_threshold import validation_split

    started = time.time()
    data = load_cifar10(data_source)       # before TensorFlow: a bad source fails fast

    from models.artifact import load_artifact, save_artifact
    from models.calibration import compute_metrics, fit_temperature
    from models.calibration.ood import fit_ood_threshold
    from models.inference import SplitClassifier

    artifact = load_artifact(artifact_dir)
    card = {k: v for k, v in artifact.card.items() if k not in ("schema", "model_file", "model_sha256")}
    trained_on = card.get("data", {})
    if trained_on.get("checksum") and trained_on["checksum"] != data.checksum:
        raise CommandError(f"{data_source} is not the data {artifact.name} was trained on (checksum "
                           f"{data.checksum[:20]}... vs the card's {trained_on['checksum'][:20]}...): "
                           f"the validation split would not be the one held out in training")
    x_val, y_val = validation_split(card, data)
    classifier = SplitClassifier(artifact.model)
    val_logits = classifier.logits(x_val)

    sets = [{"set": "clean validation", "n_images": int(len(x_val))}]
    logits, labels = [val_logits], [y_val]
    if method == "shift-aware":
        for name, severity, x, y in perturbed_validation(x_val, y_val, n=images_per_set, seed=seed):
            logits.append(classifier.logits(x))
            labels.append(y)
            sets.append({"set": f"{name}-{severity}", "n_images": int(len(x))})
    temperature = fit_temperature(np.concatenate(logits), np.concatenate(labels))
    previous = classifier.temperature
    classifier.set_temperature(temperature)

    test_logits = classifier.logits(data.x_test)
    after = compute_metrics(test_logits, data.y_test, temperature=temperature)
    card["temperature"] = float(temperature)
    card["metrics"]["test_after_temperature"] = after.to_dict()
    card["metrics"]["validation_after_temperature"] = compute_metrics(
        val_logits, y_val, temperature=temperature).to_dict()
    card["ood_threshold"] = fit_ood_threshold(val_logits, temperature, tpr=tpr)
    card["calibration"] = {
        "temperature_method": method,
        "temperature_before": float(previous),
        "sets": sets,
        "perturbation_seed": seed,
        "note": ("one temperature minimising the NLL over all images of these sets; the "
                 "perturbations are CIFAR-10-C's validation corruptions, not its 15 benchmark "
                 "ones, applied to the validation split (never the test split)"
                 if method == "shift-aware" else "fitted on the clean validation split"),
        "command": " ".join(["python", "-m", "training.calibrate", *sys.argv[1:]]),
        "seconds": round(time.time() - started, 1),
    }
    target = Path(output) if output else artifact.path
    card.pop("conformal_set", None)   # its file is not carried over by save_artifact: rewritten below
    save_artifact(artifact.model, card, target, overwrite=True)
    from models.conformal_set import save_calibration_set   # same validation logits, new model sha256

    save_calibration_set(target, val_logits, y_val, {"data": "validation split",
                                                     "split_seed": card["data"]["split_seed"]})
    return {"path": str(target), "temperature": float(temperature), "previous": float(previous),
            "test": after, "ood_threshold": card["ood_threshold"], "sets": len(sets)}


@command(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.output and Path(args.output).exists() and Path(args.output).resolve() != Path(args.artifact).resolve():
        raise UsageError(f"--output {args.output} already exists")
    result = calibrate(args.artifact, args.data, method=args.temperature,
                       images_per_set=args.images_per_set, tpr=args.tpr, seed=args.seed,
                       output=args.output)
    t = result["test"]
    print(f"temperature {result['previous']:.4f} -> {result['temperature']:.4f} "
          f"({result['sets']} sets)  test accuracy {t.accuracy:.4f}  ECE-15 {t.ece:.4f}  "
          f"NLL {t.nll:.4f}  OOD threshold (entropy) {result['ood_threshold']['threshold']:.4f}")
    print(f"artifact written to {result['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
