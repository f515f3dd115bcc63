"""Print the shipped model's figures against the project's targets (numbers, never asserts).

    python -m training.benchmark models/shipped/cifar10-airbench --data /path/to/cifar10-jpeg

Accuracy and ECE are recomputed from the artifact on the test split; the training wall time
is the one the training run recorded in the card. `--throughput` also times a few training
steps of the same network on this machine.
"""

from __future__ import annotations

import os

from commandline import ArgumentParser, command, invoked_as, setup_tensorflow

setup_tensorflow()

import platform
import sys
import time

PROG = invoked_as("training.benchmark", "calib-benchmark")

TARGETS = {
    "test accuracy (after T)": (">=", 0.90),
    "ECE-15 after T": ("<=", 0.015),
    "training wall time [min]": ("<=", 30.0),
}


def training_throughput(card: dict, steps: int = 10) -> float:
    """Images per second of `fit` on random data for the card's network (warm-up excluded)."""
    import keras
    import numpy as np

    from models.network import NetworkConfig, build_classifier
    from training.pipeline import training_dataset

    net = NetworkConfig(**card["training"]["network"])
    batch = card["training"]["config"]["batch_size"]
    model = build_classifier(net, test_time_views=False)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * (steps + 2), 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, net.num_classes, len(x))
    ds = training_dataset(x, y, batch_size=batch, num_classes=net.num_classes, seed=0)
    model.fit(ds.take(2), verbose=0)
    started = time.perf_counter()
    model.fit(ds.skip(2).take(steps), verbose=0)
    return steps * batch / (time.perf_counter() - started)


@command(PROG)
def main(argv=None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--data", default=None, help="data source (default: the card's)")
    parser.add_argument("--throughput", action="store_true")
    args = parser.parse_args(argv)

    from models.artifact import read_card
    from training.data import recorded_data_source
    from training.evaluate import evaluate_artifact

    card = read_card(args.artifact)
    source = args.data or recorded_data_source(card)
    result = evaluate_artifact(args.artifact, source)
    measured = {
        "test accuracy (after T)": result["after"].accuracy,
        "ECE-15 after T": result["after"].ece,
        "training wall time [min]": card["training"]["wall_seconds"] / 60.0,
    }
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; data: {result['data']['source']}")
    print(f"{'figure':<28}{'measured':>10}{'target':>12}{'ratio':>8}  met")
    for name, (op, target) in TARGETS.items():
        value = measured[name]
        met = value >= target if op == ">=" else value <= target
        print(f"{name:<28}{value:>10.4f}{op + ' ' + format(target, 'g'):>12}{value / target:>8.2f}  {'yes' if met else 'NO'}")
    before = result["before"]
    print(f"before T: accuracy {before.accuracy:.4f}, ECE-15 {before.ece:.4f}, NLL {before.nll:.4f};"
          f" T = {result['temperature']:.4f}")
    if args.throughput:
        print(f"training throughput: {training_throughput(card):.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
