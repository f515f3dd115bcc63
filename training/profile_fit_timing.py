"""How long a recalibration profile fit takes: `fit_profile` per method on an artifact's
calibration set (its validation logits, `calibration_set.npz`), NumPy only.

    python -m training.profile_fit_timing models/shipped/cifar10-augmix [--n 1000 5000] [--repeat 3]

Prints, per method and batch size n, the median wall time of the full fit (the k-fold
cross-fitting plus the final fit on all images), the cross-fitted NLL / ECE-15 before (the
card's temperature) and after, and the NLL of the calibrator fitted on the first n images
measured on the remaining images of the set (held out; none when n is the whole set). The service's cost target compares it with an evaluate of the
same images (`benchmarks.mc_and_http_cost`); this measures the calibration part alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

METHODS = ("temperature", "vector", "dirichlet", "auto")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.profile_fit_timing", description=__doc__.splitlines()[0])
    p.add_argument("artifact", help="artifact folder with calibration_set.npz")
    p.add_argument("--n", type=int, nargs="+", default=[1000, 5000], help="batch sizes (first n images)")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats (median reported)")
    args = p.parse_args(argv)

    import numpy as np

    from models.artifact import read_card
    from models.calibration import log_softmax
    from models.calibration.recalibration import fit_profile
    from models.conformal_set import load_calibration_set
    from training.conformal_check import cpu_name

    card = read_card(args.artifact)
    stored = load_calibration_set(args.artifact, card)
    if stored is None:
        print(f"{args.artifact}: no calibration_set.npz (python -m training.fit_conformal)", file=sys.stderr)
        return 1
    logits, labels = stored[0].astype(np.float64), stored[1]
    rows = []
    for n in args.n:
        z, y = logits[:n], labels[:n]
        reference = log_softmax(z, float(card["temperature"]))
        for method in METHODS:
            times = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                fit = fit_profile(z, y, method, reference=reference)
                times.append(time.perf_counter() - started)
            held = logits[n:]
            heldout = (float(-fit.calibrator.log_probabilities(held)[np.arange(len(held)), labels[n:]].mean())
                       if len(held) else None)
            rows.append({"n": int(len(y)), "method": method, "chosen": fit.calibrator.method,
                         "seconds_median": round(statistics.median(times), 3),
                         "nll_before": round(fit.report["before"]["nll"], 4),
                         "nll_after_cv": round(fit.report["after"]["nll"], 4),
                         "ece_before": round(fit.report["before"]["ece_15"], 4),
                         "ece_after_cv": round(fit.report["after"]["ece_15"], 4),
                         "heldout_n": int(len(held)),
                         "nll_heldout": None if heldout is None else round(heldout, 4)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"artifact": card.get("name"), "cpu": cpu_name(), "repeat": args.repeat, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
