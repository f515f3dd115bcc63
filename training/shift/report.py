"""The shift benchmark's report: report.json (every figure + provenance), report.md and PNG plots.

Committed reports are read on other machines, so paths go through `training.lab.report.portable_path`
(relative, or `$CIFAR10_DIR/...`) and the JSON holds only finite numbers (`_plain` refuses NaN).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from training.lab.report import _plain, portable_path
from training.shift.benchmark import AGGREGATE_NAMES, FEATURE_SCORE, METRICS, ModelResults

# The detection threshold the report checks: predictive-entropy AUROC of clean vs the highest
# severity, averaged over the corruption types (docs/shift-calibration.md says where it comes from).
ENTROPY_AUROC_THRESHOLD = 0.85
THRESHOLD_KEY = "entropy_auroc_threshold"   # models[i].ood[THRESHOLD_KEY] in report.json
OLD_THRESHOLD_KEY = "issue_target"          # the same block in reports written before the rename
SCORE_LABELS = {"max_probability": "1 - max p", "predictive_entropy": "entropy", "mutual_information": "MC MI",
                FEATURE_SCORE: "Mahalanobis"}
DETECTION_KEYS = ("auroc", "aupr", "fpr_at_95_tpr")


def portable_text(text: str, paths: list[str]) -> str:
    """`text` with each absolute path of `paths` written as `portable_path` shows it."""
    for p in sorted(set(paths), key=len, reverse=True):
        if p and p.startswith("/"):
            text = text.replace(p, portable_path(p))
    return text


def file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def threshold_check(model: dict[str, Any]) -> dict[str, Any]:
    """The entropy-AUROC threshold block of one model of a report, also from a report written
    before the block was renamed (key `issue_target`, its threshold under `target`)."""
    ood = model["ood"]
    if THRESHOLD_KEY in ood:
        return ood[THRESHOLD_KEY]
    old = dict(ood[OLD_THRESHOLD_KEY])
    old["threshold"] = old.pop("target")
    return old


def upgrade_report(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` (a report.json) with every model's threshold block under its current name."""
    for m in doc.get("models", []):
        ood = m.get("ood", {})
        if OLD_THRESHOLD_KEY in ood:
            ood[THRESHOLD_KEY] = threshold_check(m)
            del ood[OLD_THRESHOLD_KEY]
    return doc


def build_document(results: list[ModelResults], meta: dict[str, Any], severities: list[int]) -> dict[str, Any]:
    models = []
    for res in results:
        ood_sev = res.ood_per_severity(severities) if res.ood_per_set else {}
        target_sev = str(max(severities))
        entropy = ood_sev.get(target_sev, {}).get("predictive_entropy", {}).get("auroc")
        models.append({
            "name": res.name,
            "temperature": res.temperature,
            "clean": res.clean,
            "aggregates": res.aggregates(),
            "per_severity": res.per_severity(severities),
            "per_set": res.per_set,
            "ood": {
                "corruption_per_severity": ood_sev,
                "corruption_per_set": res.ood_per_set,
                "synthetic_and_real": res.ood_synthetic,
                THRESHOLD_KEY: {
                    "what": f"predictive-entropy AUROC, clean vs severity {target_sev}, mean over the types",
                    "severity": int(target_sev), "auroc": entropy, "threshold": ENTROPY_AUROC_THRESHOLD,
                    "met": None if entropy is None else bool(entropy >= ENTROPY_AUROC_THRESHOLD),
                },
            },
            "reliability": {k: m.to_dict() for k, m in res.reliability.items()},
        })
    return _plain({**meta, "models": models}, "report")


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def _figure(ncols: int = 1, size=(5.5, 4.0)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1]), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).print_png(str(path))


def severity_plot(doc: dict, metric: str, label: str, path: Path) -> None:
    """`metric` against severity (0 = clean), one line per model."""
    fig, (ax,) = _figure()
    sev = sorted(int(s) for s in doc["models"][0]["per_severity"])
    for m in doc["models"]:
        ys = [m["clean"][metric]] + [m["per_severity"][str(s)][metric] for s in sev]
        ax.plot([0, *sev], ys, marker="o", label=f"{m['name']} (T={m['temperature']:.3g})")
    ax.set_xticks([0, *sev])
    ax.set_xticklabels(["clean", *map(str, sev)])
    ax.set_xlabel("corruption severity (mean over types)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} under CIFAR-10-C corruptions, N={doc['n_images']} per set")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def ood_plot(doc: dict, path: Path) -> None:
    """AUROC of each score, clean vs each severity (mean over types), one line per model."""
    scores = _scores_in(doc)
    fig, axes = _figure(len(scores), size=(4.2, 3.8))
    sev = doc["severities"]
    for ax, score in zip(axes, scores):
        for m in doc["models"]:
            per = m["ood"]["corruption_per_severity"]
            ax.plot(sev, [per[str(s)][score]["auroc"] for s in sev], marker="o", label=m["name"])
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        if score == "predictive_entropy":
            ax.axhline(ENTROPY_AUROC_THRESHOLD, color="tab:red", linestyle="--", linewidth=1,
                       label=f"threshold {ENTROPY_AUROC_THRESHOLD}")
        ax.set_ylim(0.4, 1.0)
        ax.set_xticks(sev)
        ax.set_xlabel("severity")
        ax.set_ylabel("AUROC clean vs corrupted")
        ax.set_title(SCORE_LABELS.get(score, score))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, path)


def reliability_plot(res: ModelResults, n_types: int, path: Path) -> None:
    """Clean and pooled-severity reliability diagrams of one model, side by side."""
    from models.calibration.diagram import _draw_panel   # the service's panel, one look everywhere
    from matplotlib.figure import Figure

    panels = [("clean", res.reliability["clean"])] + [
        (f"severity {k.split('_')[1]} ({n_types} types pooled)", m)
        for k, m in res.reliability.items() if k.startswith("severity_")]
    fig = Figure(figsize=(5.2 * len(panels), 6.5), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=[3, 1])
    for col, (name, m) in enumerate(panels):
        ax = fig.add_subplot(grid[0, col])
        _draw_panel(ax, fig.add_subplot(grid[1, col], sharex=ax), name, m)
    fig.suptitle(f"{res.name}: calibrated probabilities under corruption")
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _f(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _scores_in(doc: dict) -> list[str]:
    """The OOD scores a report holds, in SCORE_LABELS order (Mahalanobis only with --feature-density)."""
    held = {s for m in doc["models"] for d in m["ood"]["corruption_per_severity"].values() for s in d}
    return [s for s in SCORE_LABELS if s in held]


def _detection_cells(d: dict, scores: list[str]) -> str:
    return " | ".join(f"{_f(d[s]['auroc'], 3)} / {_f(d[s]['aupr'], 3)} / {_f(d[s]['fpr_at_95_tpr'], 3)}"
                      if s in d else "n/a" for s in scores)


def _provenance_lines(doc: dict) -> list[str]:
    """Where the numbers come from: this run's machine, or each source run of a combined report."""
    def versions(d):
        return ", ".join(f"{k} {v}" for k, v in d["versions"].items())

    if "sources" not in doc:
        return [f"- machine: {doc['machine']['cpu']} ({doc['machine']['cpus']} CPUs); "
                f"wall time {doc['wall_seconds']:.0f} s",
                f"- versions: {versions(doc)}"]
    return ["- combined from these runs, one per report folder:"] + [
        f"  - [{s['report']}]({s['report']}/report.md): `{s['command']}`; {s['machine']['cpu']} "
        f"({s['machine']['cpus']} CPUs), wall time {s['wall_seconds']:.0f} s, finished {s['finished_utc']}; "
        f"{versions(s)}" for s in doc["sources"]]


def markdown(doc: dict, pngs: list[str]) -> str:
    n = doc["n_images"]
    lines = [
        "# CIFAR-10-C shift benchmark" + (" (quick run)" if doc["quick"] else ""),
        "",
        f"**N = {n:,} test images per set** ({doc['subset']}), "
        f"{len(doc['corruptions'])} corruption types x {len(doc['severities'])} severities "
        f"= {len(doc['corruptions']) * len(doc['severities'])} corrupted sets "
        f"({n * len(doc['corruptions']) * len(doc['severities']):,} corrupted images) per model.",
        "",
        f"- command: `{doc['command']}`",
        f"- data: {doc['data']['source']} ({doc['data']['checksum']})",
        f"- corruptions: {', '.join(doc['corruptions'])}; severities {', '.join(map(str, doc['severities']))}; "
        f"corruption seed {doc['seed']}",
        f"- MC dropout: {doc['mc_samples']} samples per image (mutual information)",
        *([f"- Mahalanobis score: {doc['feature_density']['what']} ({doc['feature_density']['n_train']:,} "
           f"images, seed {doc['feature_density']['seed']})"] if "feature_density" in doc else []),
        "- OOD sets: " + "; ".join(f"{s['name']} ({s['n']} images, {s['source']}"
                                   + (f", {s['checksum']}" if s.get("checksum") else "") + ")"
                                   for s in doc["ood_sets"]),
        "- models: " + "; ".join(f"{m['name']} ({m['path']}, T={m['temperature']:.4g}, "
                                 f"model sha256 {m['model_sha256'][:12]}...)" for m in doc["artifacts"]),
        *_provenance_lines(doc),
        "",
        "Metrics use the calibrated probabilities the service returns (softmax of logits / the model's T); "
        "ECE has 15 equal-width bins. cA, cNLL, cBrier, cCE: the metric on each corrupted set, then the mean over "
        "all sets (as google/uncertainty-baselines does). See docs/shift-benchmark.md for the method.",
        "",
        "## Calibration under corruption",
        "",
        "| model | set | accuracy | NLL | Brier | ECE |",
        "|---|---|---|---|---|---|",
    ]
    for m in doc["models"]:
        lines.append(f"| {m['name']} | clean | " + " | ".join(_f(m["clean"][k]) for k in METRICS) + " |")
        for s in doc["severities"]:
            row = m["per_severity"][str(s)]
            lines.append(f"| {m['name']} | severity {s} (mean) | " + " | ".join(_f(row[k]) for k in METRICS) + " |")
        agg = m["aggregates"]
        lines.append(f"| {m['name']} | **all corrupted (cA, cNLL, cBrier, cCE)** | "
                     + " | ".join(f"**{_f(agg[AGGREGATE_NAMES[k]])}**" for k in METRICS) + " |")
    for m in doc["models"]:
        lines += ["", f"### {m['name']}: ECE (accuracy) per corruption type and severity", "",
                  "| type | " + " | ".join(f"s{s}" for s in doc["severities"]) + " |",
                  "|---|" + "---|" * len(doc["severities"])]
        for c in doc["corruptions"]:
            cells = [m["per_set"][f"{c}/{s}"] for s in doc["severities"]]
            lines.append(f"| {c} | " + " | ".join(f"{_f(r['ece'], 3)} ({_f(r['accuracy'], 3)})" for r in cells) + " |")
    lines += ["", "## Out-of-distribution detection", "",
              "Clean test images are in-distribution. Each cell: AUROC / AUPR-Out / FPR at 95% TPR "
              "(higher, higher, lower is better). Corrupted rows average over the corruption types.", ""]
    for m in doc["models"]:
        t = threshold_check(m)
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines += [f"**{m['name']}: entropy AUROC clean vs severity {t['severity']} = {_f(t['auroc'], 3)} "
                  f"(threshold >= {t['threshold']}: {verdict})**", ""]
    scores = _scores_in(doc)
    lines += ["| model | OOD set | " + " | ".join(SCORE_LABELS[s] for s in scores) + " |",
              "|---|---|" + "---|" * len(scores)]
    for m in doc["models"]:
        for s in doc["severities"]:
            lines.append(f"| {m['name']} | corrupted, severity {s} | "
                         + _detection_cells(m["ood"]["corruption_per_severity"][str(s)], scores) + " |")
        for name, d in m["ood"]["synthetic_and_real"].items():
            lines.append(f"| {m['name']} | {name} | " + _detection_cells(d, scores) + " |")
    lines += ["", "## Plots", "", *[f"![{p}]({p})" for p in pngs], "",
              "All numbers, including per-set OOD figures and reliability bins, are in `report.json`.", ""]
    return "\n".join(lines)


def write_summary_plots(out_dir: Path, doc: dict) -> list[str]:
    """The plots with one line per model (ECE and accuracy against severity, OOD AUROC)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = ["severity_ece.png", "severity_accuracy.png", "ood_auroc.png"]
    severity_plot(doc, "ece", "ECE-15", out_dir / pngs[0])
    severity_plot(doc, "accuracy", "accuracy", out_dir / pngs[1])
    ood_plot(doc, out_dir / pngs[2])
    return pngs


def write_documents(out_dir: Path, doc: dict, pngs: list[str]) -> list[Path]:
    """report.json (with the list of plots) and report.md; returns the files written."""
    doc = {**doc, "pngs": pngs}
    (out_dir / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(doc, pngs))
    return [out_dir / p for p in (*pngs, "report.json", "report.md")]


def write(out_dir: Path, doc: dict, results: list[ModelResults]) -> list[Path]:
    """Write the PNGs, report.json and report.md; returns the files written."""
    pngs = write_summary_plots(out_dir, doc)
    for res in results:
        name = f"reliability_{file_stem(res.name)}.png"
        reliability_plot(res, len(doc["corruptions"]), out_dir / name)
        pngs.append(name)
    return write_documents(out_dir, doc, pngs)
