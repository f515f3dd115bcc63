"""`python -m training.shift ARTIFACT [ARTIFACT ...] [--data SRC] [--n-images N] [--output DIR] ...`

Calibration (accuracy, NLL, Brier, ECE-15) of calibrated CIFAR-10 artifacts on CIFAR-10-C
corruptions built from the test split, and OOD detection (1 - max p, entropy, MC mutual
information) against corrupted, synthetic and (with --ood-data) real non-CIFAR-10 images.
Writes report.json, report.md and PNG plots to --output. `--quick` runs a small version on the
repository's test fixture (for CI and tests).

A run that is stopped resumes per set: re-running the same command reads the sets it finished
from `<output>/.checkpoint/` (training.shift.resume) and gives the same report.
"""

from __future__ import annotations

from commandline import ArgumentParser, UsageError, command, invoked_as, setup_tensorflow

setup_tensorflow()

import argparse
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROG = invoked_as("training.shift")
REPO = Path(__file__).resolve().parents[2]
QUICK_DATA = REPO / "tests" / "data" / "cifar10-fixture"
QUICK_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "contrast")
QUICK_N_IMAGES = 50
QUICK_MC_SAMPLES = 10
DEFAULT_MC_SAMPLES = 100   # the service's default: MI figures describe what a client gets; the head is cheap
PATCH = 8


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[2])
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="model artifact folder(s); one line each in the plots")
    parser.add_argument("--data", default=None,
                        help="CIFAR-10 source for load_cifar10: 'keras' (default), the official archive, "
                             "or an image folder (default with --quick: the repository's test fixture)")
    parser.add_argument("--n-images", type=int, default=None,
                        help="stratified, seeded subset of the test split (default: all; --quick: 50)")
    parser.add_argument("--corruptions", default=None,
                        help="comma-separated corruption types (default: all 15; --quick: 3)")
    parser.add_argument("--severities", type=_int_list, default=None, help="comma-separated, 1..5 (default: all)")
    parser.add_argument("--mc-samples", type=int, default=None,
                        help=f"MC-dropout samples per image for the mutual information, >= 2 "
                             f"(default {DEFAULT_MC_SAMPLES}; --quick: {QUICK_MC_SAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="subset, corruption and MC seed")
    parser.add_argument("--cache-dir", default=None,
                        help="cache of corrupted sets (default: the corruptions module's default; 'none': no cache)")
    parser.add_argument("--ood-data", default=None,
                        help="a real non-CIFAR-10 image set: an image folder (<class>/<image>, .tar.gz/.zip "
                             "or directory) or the official CIFAR-100 python archive / folder / test file")
    parser.add_argument("--output", default="reports/shift", help="report folder (files in it are replaced)")
    parser.add_argument("--batch-size", type=int, default=500, help="images per backbone pass")
    parser.add_argument("--backbone-runtime", choices=("keras", "litert"), default="keras",
                        help="run the backbone in Keras, or on the artifact's LiteRT export (backbone.tflite, "
                             "features within ~3e-6 of Keras, ~1.3x faster on a 2-core CPU); the head and the "
                             "MC masks stay in Keras either way")
    parser.add_argument("--feature-density", type=int, default=None, metavar="N_TRAIN",
                        help="also score OOD by the Mahalanobis distance of the backbone features to a class-"
                             "conditional Gaussian fitted on N_TRAIN stratified training-split images")
    parser.add_argument("--quick", action="store_true", help="a few images and types, on the test fixture (CI)")
    args = parser.parse_args(argv)
    return resolve(args)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill --quick defaults and check every argument before anything slow runs (exit 2)."""
    from training.shift.corruptions import CORRUPTIONS, SEVERITIES

    if args.data is None:
        args.data = str(QUICK_DATA) if args.quick else "keras"
    if args.n_images is None and args.quick:
        args.n_images = QUICK_N_IMAGES
    if args.n_images is not None and args.n_images < 10:
        raise UsageError(f"--n-images must be at least 10 (one per class), got {args.n_images}")
    if args.corruptions is None:
        args.corruptions = list(QUICK_CORRUPTIONS if args.quick else CORRUPTIONS)
    else:
        args.corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()]
        unknown = [c for c in args.corruptions if c not in CORRUPTIONS]
        if unknown or not args.corruptions:
            raise UsageError(f"--corruptions: unknown type(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(CORRUPTIONS)}")
        if len(set(args.corruptions)) != len(args.corruptions):
            raise UsageError("--corruptions lists a type twice")
    if args.severities is None:
        args.severities = list(SEVERITIES)
    bad = [s for s in args.severities if s not in SEVERITIES]
    if bad or not args.severities or len(set(args.severities)) != len(args.severities):
        raise UsageError(f"--severities must be distinct values in {','.join(map(str, SEVERITIES))}, "
                         f"got {','.join(map(str, args.severities)) or '(none)'}")
    args.severities = sorted(args.severities)
    if args.mc_samples is None:
        args.mc_samples = QUICK_MC_SAMPLES if args.quick else DEFAULT_MC_SAMPLES
    if args.mc_samples < 2:
        raise UsageError(f"--mc-samples must be at least 2 (mutual information needs several samples), "
                         f"got {args.mc_samples}")
    if args.feature_density is not None and args.feature_density < 20:
        raise UsageError(f"--feature-density needs at least 20 training images (2 per class), "
                         f"got {args.feature_density}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if len(set(map(os.path.normpath, args.artifacts))) != len(args.artifacts):
        raise UsageError("an ARTIFACT is given twice")
    return args


def cpu_model() -> str:
    """`lscpu`'s model name (how the lead sizes a full run), else the platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


class LiteRTBackbone:
    """A SplitClassifier whose backbone runs on the artifact's LiteRT export: the benchmark's time
    is almost all backbone, which LiteRT runs faster on CPU; head logits and MC masks are Keras'."""

    def __init__(self, keras_classifier, path):
        from models.litert_classifier import LiteRTClassifier

        _, self._litert = LiteRTClassifier.from_artifact(path)
        self._keras = keras_classifier

    def features(self, images, batch_size: int = 500):
        return self._litert.features(images, batch_size)

    def __getattr__(self, name):
        return getattr(self._keras, name)


def load_runners(args):
    from models.artifact import load_artifact
    from models.inference import SplitClassifier
    from training.shift.benchmark import ModelRunner

    runners, seen = [], set()
    for path in args.artifacts:
        artifact = load_artifact(path)
        name = artifact.name if artifact.name not in seen else f"{artifact.name} ({Path(path).name})"
        if name in seen:
            raise UsageError(f"two ARTIFACTs are both called {name!r}")
        seen.add(name)
        try:
            classifier = SplitClassifier(artifact.model)
        except (ValueError, TypeError, KeyError) as exc:
            from models.artifact import ArtifactError
            raise ArtifactError(f"{path}: not a backbone/head classifier ({exc})") from None
        if args.backbone_runtime == "litert":
            classifier = LiteRTBackbone(classifier, path)
        runners.append(ModelRunner(name, path, artifact.card, classifier, mc_samples=args.mc_samples,
                                   seed=args.seed, batch_size=args.batch_size))
    return runners


@command(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    from models.artifact import read_card
    from training.data import DataSourceError

    for path in args.artifacts:            # fail in a second on a bad artifact, before TensorFlow
        read_card(path)
    if args.data != "keras" and not Path(args.data).exists():
        raise DataSourceError(f"CIFAR-10 source does not exist: {args.data}")
    if args.ood_data is not None and not Path(args.ood_data).exists():
        raise DataSourceError(f"OOD data does not exist: {args.ood_data}")
    return run(args, argv if argv is not None else sys.argv[1:])


def run(args, argv: list[str]) -> int:
    import numpy as np

    from training.data import load_cifar10
    from training.lab.report import portable_command, portable_path, versions
    from training.shift import ood_sets, report
    from training.shift.benchmark import FEATURE_SCORE, evaluate, stratified_subset
    from training.shift.datasets import corrupted_set, default_cache_dir
    from training.shift.resume import CheckpointMismatch, SetCheckpoint

    started = time.time()
    say = lambda message: print(f"[shift] {message}", file=sys.stderr, flush=True)  # noqa: E731
    load_ood = None
    if args.ood_data is not None:                       # read it first: a bad file fails before inference
        load_ood = ood_sets.load_ood_images(args.ood_data)
    data = load_cifar10(args.data)
    n_total = len(data.y_test)
    n = n_total if args.n_images is None else args.n_images
    if n > n_total:
        raise UsageError(f"--n-images {n} is more than the {n_total} test images of {args.data}")
    index = stratified_subset(data.y_test, n, seed=args.seed)
    images, labels = data.x_test[index], data.y_test[index]
    subset_checksum = f"{data.checksum}+subset(n={n},seed={args.seed})"
    cache_dir = None if args.cache_dir == "none" else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.feature_density is not None and args.feature_density > len(data.y_train):
        raise UsageError(f"--feature-density {args.feature_density} is more than the {len(data.y_train)} "
                         f"training images of {args.data}")
    runners = load_runners(args)
    if args.feature_density is not None:
        train_index = stratified_subset(data.y_train, args.feature_density, seed=args.seed)
        for runner in runners:
            runner.fit_density(data.x_train[train_index], data.y_train[train_index])
        say(f"feature Gaussian fitted on {args.feature_density} training images")
    say(f"{len(runners)} model(s), N={n} images per set, {len(args.corruptions)} types x "
        f"{len(args.severities)} severities, MC T={args.mc_samples}")

    def corrupted():   # each set built only if the checkpoint does not hold it yet
        for name in args.corruptions:
            for severity in args.severities:
                yield name, severity, functools.partial(corrupted_set, images, name, severity, seed=args.seed,
                                                        cache_dir=cache_dir, source_checksum=subset_checksum)

    synthetic = {"uniform_noise": ood_sets.uniform_noise(n, seed=args.seed),
                 f"shuffled_{PATCH}x{PATCH}_patches": ood_sets.shuffled_patches(images, patch=PATCH, seed=args.seed)}
    ood_info = [{"name": "uniform_noise", "n": n, "source": "generated: i.i.d. uniform pixels 0..255",
                 "checksum": None},
                {"name": f"shuffled_{PATCH}x{PATCH}_patches", "n": n,
                 "source": f"generated: the {n} clean test images, {PATCH}x{PATCH} patches permuted within each image",
                 "checksum": None}]
    if load_ood is not None:
        ood = ood_sets.seeded_subset(load_ood.images, n, seed=args.seed)
        synthetic[load_ood.name] = ood
        ood_info.append({"name": load_ood.name, "n": len(ood), "n_available": len(load_ood.images),
                         "source": report.portable_text(load_ood.source, [str(Path(args.ood_data))]),
                         "checksum": load_ood.checksum})

    checkpoint_dir = Path(args.output) / ".checkpoint"
    try:
        checkpoint = SetCheckpoint(checkpoint_dir, {
            "data": subset_checksum, "seed": args.seed, "mc_samples": args.mc_samples,
            "batch_size": args.batch_size, "backbone_runtime": args.backbone_runtime,
            "feature_density": args.feature_density, "ood_data": None if load_ood is None else load_ood.checksum,
            "models": [[r.card.get("model_sha256", ""), float(r.temperature)] for r in runners]})
    except CheckpointMismatch as exc:
        raise UsageError(str(exc)) from None
    resumed_sets = checkpoint.finished()
    if resumed_sets:
        say(f"resuming: {resumed_sets} set(s) finished by an earlier run are read from {checkpoint_dir}")
    started_inference = time.time()
    results = evaluate(runners, labels, images, corrupted(), synthetic,
                       pooled_severities=[s for s in (3, 5) if s in args.severities], progress=say,
                       checkpoint=checkpoint)
    inference_seconds = time.time() - started_inference
    n_images_run = n * (1 + len(args.corruptions) * len(args.severities)) + sum(len(v) for v in synthetic.values())

    data_paths = [] if args.data == "keras" else [str(Path(args.data))]
    meta = {
        "benchmark": "CIFAR-10-C shift and OOD detection",
        "command": portable_command(argv, PROG),
        "quick": bool(args.quick),
        "n_images": n,
        "n_test_images": n_total,
        "subset": (f"stratified seeded subset of {n_total}, seed {args.seed}" if n < n_total
                   else "the whole test split"),
        "subset_index_sha256": hashlib.sha256(np.asarray(index, np.int64).tobytes()).hexdigest(),
        "data": {"argument": args.data if args.data == "keras" else portable_path(args.data),
                 "source": report.portable_text(data.source, data_paths), "checksum": data.checksum},
        "corruptions": args.corruptions,
        "severities": args.severities,
        "seed": args.seed,
        "mc_samples": args.mc_samples,
        "ood_sets": ood_info,
        **({} if args.feature_density is None else {"feature_density": {
            "score": FEATURE_SCORE,
            "what": "squared Mahalanobis distance of the backbone features to the nearest class mean, shared "
                    "covariance (Lee et al. 2018), fitted on a stratified training-split subset",
            "n_train": args.feature_density, "seed": args.seed}}),
        "artifacts": [{"name": r.name, "path": portable_path(str(r.path)), "temperature": r.temperature,
                       "model_sha256": r.card.get("model_sha256", "")} for r in runners],
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "throughput": {"images_per_model": n_images_run, "inference_seconds": round(inference_seconds, 2),
                       "images_per_second_per_model": round(n_images_run * len(runners) / inference_seconds, 1)
                       if inference_seconds > 0 else None,
                       "note": "includes corrupting (or reading cached) sets and MC sampling",
                       "sets_read_from_an_earlier_run": resumed_sets},
        "wall_seconds": round(time.time() - started, 2),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    doc = report.build_document(results, meta, args.severities)
    out = Path(args.output)
    report.write(out, doc, results)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)   # the report holds it all now
    for m in doc["models"]:
        t = report.threshold_check(m)
        agg = m["aggregates"]
        print(f"{m['name']}: clean acc {m['clean']['accuracy']:.4f} ece {m['clean']['ece']:.4f}; "
              f"cA {agg['cA']:.4f} cNLL {agg['cNLL']:.4f} cCE {agg['cCE']:.4f}; "
              f"entropy AUROC clean vs severity {t['severity']} {t['auroc']:.3f}")
    print(f"report written to {portable_path(str(out.resolve()))} (N={n}, {time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
