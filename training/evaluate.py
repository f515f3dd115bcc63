"""Recompute an artifact's card figures on a data source, optionally drawing a reliability diagram.

    python -m training.evaluate models/shipped/cifar10-airbench --data keras --png diagram.png

The figures printed are computed from scratch (fresh logits on the test split); with the
artifact's own data source they must match the card, and `--check` fails if they do not.
"""

from __future__ import annotations

from commandline import ArgumentParser, CommandError, command, invoked_as, setup_tensorflow

setup_tensorflow()

import json
import sys
from pathlib import Path

from models.calibration.selective import format_summary

PROG = invoked_as("training.evaluate", "calib-evaluate")
METRICS_SHOWN = ("accuracy", "nll", "brier", "ece", "mce", "adaptive_ece", "classwise_ece")


def evaluate_artifact(artifact_dir: str, data_source: str, *, n_bins: int = 15) -> dict:
    """Fresh test-split metrics before/after the artifact's temperature, plus the card's copy."""
    from training.data import load_cifar10

    data = load_cifar10(data_source)   # first: a bad source fails before TensorFlow loads

    from models.artifact import load_artifact
    from models.calibration import compute_metrics
    from models.inference import SplitClassifier

    artifact = load_artifact(artifact_dir)
    if list(data.class_names) != list(artifact.card["classes"]):
        raise CommandError(f"class names of {data_source} differ from the artifact's")
    classifier = SplitClassifier(artifact.model)
    logits = classifier.logits(data.x_test)
    t = classifier.temperature
    return {
        "artifact": str(artifact.path),
        "data": {"source": data.source, "checksum": data.checksum},
        "temperature": t,
        "before": compute_metrics(logits, data.y_test, temperature=1.0, n_bins=n_bins),
        "after": compute_metrics(logits, data.y_test, temperature=t, n_bins=n_bins),
        "card": artifact.card,
        "dataset": data,
        "logits": logits,
    }


def accuracy_by_views(artifact_dir: str, data_source: str, *, data=None) -> dict[str, float]:
    """Test accuracy of the artifact's weights with fewer test-time views: what each view buys.

    Pass `data` (already loaded, e.g. `evaluate_artifact(...)["dataset"]`) to skip decoding again.
    """
    import dataclasses

    from models.artifact import load_artifact
    from models.inference import SplitClassifier
    from models.network import NetworkConfig, build_classifier
    from training.data import load_cifar10

    artifact = load_artifact(artifact_dir)
    data = data if data is not None else load_cifar10(data_source)
    net = NetworkConfig(**artifact.card["training"]["network"])
    backbone, head = artifact.model.get_layer("backbone"), artifact.model.get_layer("head")
    variants = {"one view": dataclasses.replace(net, flip_tta=False, translate_tta=False),
                "+ mirror": dataclasses.replace(net, flip_tta=True, translate_tta=False),
                "+ mirror + shifts": dataclasses.replace(net, flip_tta=True, translate_tta=True)}
    out = {}
    for name, cfg in variants.items():
        classifier = SplitClassifier(build_classifier(cfg, backbone=backbone, head=head))
        out[name] = float((classifier.logits(data.x_test).argmax(axis=1) == data.y_test).mean())
    return out


def selective_summary(result: dict, target_accuracy: float | None = None):
    """Selective prediction on the after-T test probabilities: the same report as the service's."""
    from models.calibration import softmax
    from models.calibration.selective import selective_report

    return selective_report(softmax(result["logits"], result["temperature"]), result["dataset"].y_test,
                            target_accuracy=target_accuracy)


def card_mismatches(result: dict, tolerance: float = 1e-4) -> list[str]:
    """Names of figures that differ from the card (same data source assumed)."""
    card_metrics = result["card"]["metrics"]
    problems = []
    for key, fresh in (("test_before_temperature", result["before"]),
                       ("test_after_temperature", result["after"])):
        stored = card_metrics[key]
        for name in METRICS_SHOWN:
            if abs(stored[name] - getattr(fresh, name)) > tolerance:
                problems.append(f"{key}.{name}: card {stored[name]:.6f}, now {getattr(fresh, name):.6f}")
    return problems


def format_table(result: dict) -> str:
    rows = [f"{'metric':<15}{'before T':>12}{'after T':>12}"]
    for name in METRICS_SHOWN:
        rows.append(f"{name:<15}{getattr(result['before'], name):>12.4f}{getattr(result['after'], name):>12.4f}")
    rows.append(f"temperature    {result['temperature']:.4f}   n = {result['after'].n}")
    return "\n".join(rows)


def bootstrap_lines(result: dict, n_resamples: int, n_bins: int) -> list[str]:
    """95% percentile-bootstrap intervals of the after-T test figures, one printable line each."""
    from models.calibration import bootstrap_intervals

    intervals = bootstrap_intervals(result["logits"], result["dataset"].y_test,
                                    temperature=result["temperature"], n_bins=n_bins,
                                    n_resamples=n_resamples)
    return [f"after T, 95% bootstrap ({n_resamples} resamples) {name:<9}{iv.estimate:.4f}"
            f"  [{iv.low:.4f}, {iv.high:.4f}]" for name, iv in intervals.items()]


@command(PROG)
def main(argv=None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="artifact folder (model.keras + model_card.json)")
    parser.add_argument("--data", default=None,
                        help="data source (default: the one recorded in the card)")
    parser.add_argument("--bins", type=int, default=15)
    parser.add_argument("--png", help="write a reliability diagram (before/after) to this PNG")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--views", action="store_true",
                        help="also print test accuracy with one view, + mirror, + 1-px shifts")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="also print 95%% bootstrap intervals (N resamples) of accuracy, NLL and "
                             "ECE after T: how much a fresh test set of this size could differ")
    parser.add_argument("--target-accuracy", type=float, metavar="A",
                        help="also print the lowest confidence threshold whose accepted test images "
                             "reach accuracy A (0 < A <= 1), and its coverage")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless the figures equal the card's (same data source)")
    args = parser.parse_args(argv)
    if args.bootstrap and args.bootstrap < 2:
        parser.error("--bootstrap needs at least 2 resamples")
    if args.target_accuracy is not None and not 0.0 < args.target_accuracy <= 1.0:
        parser.error(f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")

    from models.artifact import read_card
    from training.data import recorded_data_source
    card = read_card(args.artifact)   # checks the artifact before TensorFlow is imported
    source = args.data or recorded_data_source(card)
    result = evaluate_artifact(args.artifact, source, n_bins=args.bins)
    selective = selective_summary(result, args.target_accuracy)
    if args.json:
        print(json.dumps({"artifact": result["artifact"], "data": result["data"],
                          "temperature": result["temperature"],
                          "before": result["before"].to_dict(), "after": result["after"].to_dict(),
                          "selective": selective.to_dict()},
                         indent=2))
    else:
        print(format_table(result))
        print(format_summary(selective))
    if args.views:
        for name, accuracy in accuracy_by_views(args.artifact, source, data=result["dataset"]).items():
            print(f"test accuracy, {name:<18}{accuracy:.4f}")
    if args.bootstrap:
        print("\n".join(bootstrap_lines(result, args.bootstrap, args.bins)))
    if args.png:
        from models.calibration import reliability_diagram_png
        Path(args.png).write_bytes(reliability_diagram_png(
            result["before"], result["after"], title=f"{Path(args.artifact).name} on the test split"))
        print(f"reliability diagram written to {args.png}", file=sys.stderr)
    if args.check:
        problems = card_mismatches(result) if args.bins == 15 else ["--check needs --bins 15"]
        for p in problems:
            print("MISMATCH", p, file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
