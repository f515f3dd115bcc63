"""The regularization and calibration lab: six reproducible Keras experiments with reports.

    python -m training.lab weight-decay          # one section
    python -m training.lab all --quick --out /tmp/lab   # every section, small, on the repository's test fixture

Each section module has `run(ctx, report)`: it trains what it needs, puts its numbers in
`report.figures`, its plots in `report.png(...)` and its summary in `report.summary`; `report.py`
writes `<out>/<section>/report.json`, `report.md` and the PNGs with the command, data source,
seed, wall time and library versions of the run.
"""

SECTIONS = {
    "weight-decay": "training.lab.weight_penalties",
    "dropout": "training.lab.dropout",
    "batchnorm": "training.lab.batchnorm",
    "mixing": "training.lab.mixing",
    "smoothing": "training.lab.smoothing",
    "spectral-clipping": "training.lab.spectral_clipping",
}

__all__ = ["SECTIONS"]
