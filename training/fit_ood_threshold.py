"""Fit an artifact's out-of-distribution threshold and write it into its model card.

    python -m training.fit_ood_threshold models/shipped/cifar10-airbench --data $CIFAR10_DIR

The service flags a prediction as out of distribution when the predictive entropy of its
calibrated probabilities is above the card's `ood_threshold.threshold`. That threshold lets 95% of
the clean validation images pass, so this command recreates the validation split exactly as
`training.train` drew it (the card's `data.split_seed` and `data.n_validation`), computes the
logits, and writes the block into `model_card.json` atomically; `model.keras` is not touched.
"""

from __future__ import annotations

from commandline import ArgumentParser, CommandError, command, invoked_as, setup_tensorflow

setup_tensorflow()

import json
import sys

PROG = invoked_as("training.fit_ood_threshold")


def validation_split(card: dict, data) -> tuple:
    """The (x_val, y_val) that `training.train` held out for this card's model."""
    from training.data import train_validation_split

    meta = card.get("data") or {}
    try:
        seed, n_val, n_train = int(meta["split_seed"]), int(meta["n_validation"]), int(meta["n_train"])
    except (KeyError, TypeError, ValueError):
        raise CommandError("the card has no data.split_seed / data.n_validation / data.n_train: "
                           "cannot recreate its validation split") from None
    if n_train + n_val != len(data.x_train):
        raise CommandError(f"{data.source} has {len(data.x_train)} training images; the model was "
                           f"trained on {n_train} + {n_val} validation: not the same data")
    if list(data.class_names) != list(card.get("classes", [])):
        raise CommandError(f"class names of {data.source} differ from the card's")
    if n_val == 0:
        raise CommandError("the model was trained without a validation split (n_validation = 0)")
    _, _, x_val, y_val = train_validation_split(data.x_train, data.y_train, n_validation=n_val, seed=seed)
    return x_val, y_val


def fit_artifact(artifact_dir: str, data_source: str, *, tpr: float = 0.95, write: bool = True) -> dict:
    """The `ood_threshold` block for the artifact, computed on its validation split (and written)."""
    from training.data import load_cifar10

    data = load_cifar10(data_source)   # first: a bad source fails before TensorFlow loads

    from models.artifact import load_artifact, update_card
    from models.calibration.ood import fit_ood_threshold
    from models.inference import SplitClassifier

    artifact = load_artifact(artifact_dir)
    card = artifact.card
    recorded = (card.get("data") or {}).get("checksum")
    if recorded and recorded != data.checksum:
        print(f"note: {data.source} has checksum {data.checksum}, the card records {recorded} (another "
              f"copy or format of the data?); the split is the training one only if the images and "
              f"their order are the same", file=sys.stderr, flush=True)
    x_val, _ = validation_split(card, data)
    logits = SplitClassifier(artifact.model).logits(x_val)
    block = fit_ood_threshold(logits, float(card["temperature"]), tpr)
    if write:
        update_card(artifact.path, {"ood_threshold": block})
    return block


@command(PROG)
def main(argv=None) -> int:
    p = artifact_parser(PROG, __doc__)
    p.add_argument("--tpr", type=float, default=0.95, help="share of clean validation images that pass "
                                                           "(default 0.95)")
    p.add_argument("--dry-run", action="store_true", help="print the block, do not write the card")
    args = p.parse_args(argv)
    if not 0.0 < args.tpr <= 1.0:
        p.error(f"--tpr must be in (0, 1], got {args.tpr}")
    block = fit_artifact(args.artifact, args.data, tpr=args.tpr, write=not args.dry_run)
    return print_block("ood_threshold", block, None if args.dry_run else f"{args.artifact}/model_card.json")


def artifact_parser(prog: str, doc: str) -> ArgumentParser:
    """The arguments every post-hoc command on an artifact's validation split takes."""
    p = ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("artifact", help="artifact folder (model.keras + model_card.json)")
    p.add_argument("--data", required=True, help="the CIFAR-10 source the model was trained on "
                                                 "(as given to training.train --data)")
    return p


def print_block(key: str, block: dict, written: str | None) -> int:
    """Print the card block a post-hoc command computed (and, on stderr, where it was written)."""
    print(json.dumps({key: block}, indent=2))
    if written:
        print(f"written to {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
