"""Store an artifact's conformal calibration set: its validation split's logits and labels.

    python -m training.fit_conformal models/shipped/cifar10-augmix --data $CIFAR10_DIR

Prediction sets (`coverage` on predict, evaluate and /v2) are split conformal over the
validation images the model never trained on. This command recreates the validation split
exactly as `training.train` drew it (the card's `data.split_seed` and `data.n_validation`),
computes the logits, checks the card's recorded validation figures against them, and writes
`calibration_set.npz` plus the card's `conformal_set` block (`models.conformal_set`);
`model.keras` is not touched.
"""

from __future__ import annotations

from commandline import CommandError, command, invoked_as, setup_tensorflow

setup_tensorflow()

import sys

PROG = invoked_as("training.fit_conformal")

# Recomputed validation NLL / ECE / accuracy must match the card's to this absolute tolerance
# (float32 logits; a different TensorFlow build moves them by ~1e-6).
CHECK_TOLERANCE = 1e-4


def card_check(card: dict, logits, labels) -> dict:
    """The card's `metrics.validation_after_temperature` against the same figures recomputed."""
    from models.calibration import compute_metrics

    recorded = (card.get("metrics") or {}).get("validation_after_temperature")
    if not recorded:
        return {"compared": False, "reason": "the card records no validation figures"}
    now = compute_metrics(logits, labels, temperature=float(card["temperature"])).to_dict()
    diffs = {k: abs(float(now[k]) - float(recorded[k])) for k in ("accuracy", "nll", "ece") if k in recorded}
    return {"compared": True, "max_abs_diff": max(diffs.values()), "diffs": diffs,
            "within_tolerance": max(diffs.values()) <= CHECK_TOLERANCE, "tolerance": CHECK_TOLERANCE}


def fit_artifact(artifact_dir: str, data_source: str, *, write: bool = True, strict: bool = True) -> dict:
    """Compute the validation logits of the artifact, check them against its card and store them."""
    from training.data import load_cifar10

    data = load_cifar10(data_source)   # first: a bad source fails before TensorFlow loads

    from models.artifact import load_artifact
    from models.conformal_set import save_calibration_set
    from models.inference import SplitClassifier
    from training.fit_ood_threshold import validation_split

    artifact = load_artifact(artifact_dir)
    card = artifact.card
    x_val, y_val = validation_split(card, data)
    logits = SplitClassifier(artifact.model).logits(x_val)
    check = card_check(card, logits, y_val)
    if strict and check["compared"] and not check["within_tolerance"]:
        raise CommandError(f"the recomputed validation figures differ from the card's by up to "
                           f"{check['max_abs_diff']:.3g} (> {CHECK_TOLERANCE}): not the training split? "
                           f"{check['diffs']}")
    details = {"data": "validation split", "split_seed": int(card["data"]["split_seed"]),
               "data_checksum": data.checksum, "card_check": check,
               # no machine paths in a committed card: the command with placeholders
               "command": "python -m training.fit_conformal ARTIFACT --data $CIFAR10_DIR"}
    if not write:
        return {"n": int(len(y_val)), **details}
    return save_calibration_set(artifact.path, logits, y_val, details)


@command(PROG)
def main(argv=None) -> int:
    from training.fit_ood_threshold import artifact_parser, print_block

    p = artifact_parser(PROG, __doc__)
    p.add_argument("--dry-run", action="store_true", help="print the block, write nothing")
    p.add_argument("--no-check", action="store_true",
                   help="store the set even when the card's validation figures do not match")
    args = p.parse_args(argv)
    block = fit_artifact(args.artifact, args.data, write=not args.dry_run, strict=not args.no_check)
    return print_block("conformal_set", block,
                       None if args.dry_run else f"{args.artifact}/calibration_set.npz and its model_card.json")


if __name__ == "__main__":
    sys.exit(main())
