"""`python -m clients` / `calib-client`: predict on image files, evaluate a dataset, compare two batches, list models,
report the calibration of any classifier's logits (calibrate-evaluate), and manage recalibration profiles
(recalibrate, calibrate, calibrations, calibration, delete-calibration, apply).

Readable tables by default, the server's JSON with --json; errors print one line
(`calib-client: error: ...`, with the service's code and message) and exit 1 (2 for usage
errors, from argparse).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clients.client import DEFAULT_URL, CalibClient
from clients.types import (
    CalibrationProfile,
    ClientError,
    ComparisonReport,
    ConformalResult,
    EvaluationReport,
    OutputsReport,
    PredictResult,
    SelectiveReport,
    ServiceError,
    TransportError,
)

METRICS = ("accuracy", "nll", "brier", "ece", "mce", "adaptive_ece", "classwise_ece")
CONFORMAL_METHODS = ("lac", "aps", "raps")


def _conformal_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coverage", type=float, action="append",
                   help="report conformal prediction sets at this coverage (0 < c < 1; repeatable)")
    p.add_argument("--conformal-method", choices=CONFORMAL_METHODS, action="append",
                   help="the scores to report (repeatable; default all three)")
    p.add_argument("--mondrian", action="store_true", help="class-conditional sets")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calib-client", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=DEFAULT_URL, help=f"service URL (env CALIB_URL; default {DEFAULT_URL})")
    p.add_argument("--model", help="model name (default: the first loaded model)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--api-key", help="API key, if the service has keys (env CALIB_API_KEY, which is "
                                     "safer: a command line is visible to other users in ps)")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the loaded models")
    m.add_argument("--json", action="store_true", help="print the server's JSON")

    pr = sub.add_parser("predict", help="classify image files (PNG/JPEG, or .npy/.npz arrays)")
    pr.add_argument("files", nargs="+", type=Path)
    pr.add_argument("--mc-samples", type=int, help="MC dropout samples (server default 100; 0 = none)")
    pr.add_argument("--seed", type=int, help="seed of the MC samples")
    pr.add_argument("--resize", action="store_true", help="let the server resize non-32x32 images")
    pr.add_argument("--logits", action="store_true", help="also return raw logits")
    pr.add_argument("--coverage", type=float, help="conformal prediction sets at this coverage (0 < c < 1)")
    pr.add_argument("--conformal-method", choices=CONFORMAL_METHODS, help="the sets' score (server default lac)")
    pr.add_argument("--mondrian", action="store_true", help="class-conditional sets")
    pr.add_argument("--calibration", metavar="ID", help="use this recalibration profile instead of the card's "
                                                        "temperature")
    pr.add_argument("--json", action="store_true", help="print the server's JSON")

    ev = sub.add_parser("evaluate", help="ECE report on an .npz (x, y) or an image-folder tree/archive")
    ev.add_argument("data", type=Path, help=".npz, .tar.gz/.zip of <class>/<image>, or such a folder")
    ev.add_argument("--bins", type=int, help="confidence bins (server default 15)")
    ev.add_argument("--fit-temperature", action="store_true", help="also fit T on this batch")
    ev.add_argument("--split", help="sub-folder holding the class folders (e.g. test)")
    ev.add_argument("--resize", action="store_true", help="let the server resize non-32x32 images")
    ev.add_argument("--png", type=Path, help="also save the reliability diagram to this file")
    ev.add_argument("--target-accuracy", type=float, metavar="A",
                    help="also find the lowest confidence threshold whose accepted images reach accuracy A "
                         "(0 < A <= 1), and its coverage")
    ev.add_argument("--risk-coverage-png", type=Path, metavar="FILE",
                    help="also save the risk-coverage curve to this file")
    _conformal_arguments(ev)
    ev.add_argument("--calibration", metavar="ID", help="also report the metrics under this recalibration profile")
    ev.add_argument("--json", action="store_true", help="print the server's JSON")

    ce = sub.add_parser("calibrate-evaluate", help="ECE report, fitted temperature and split-conformal coverage "
                                                   "of any classifier's logits (.npz with logits or probs, and y)")
    ce.add_argument("data", type=Path, help=".npz with `logits` (or `probs`) [N, K] and `y` [N]")
    ce.add_argument("--bins", type=int, help="confidence bins (server default 15)")
    ce.add_argument("--fit-temperature", action="store_true", help="also fit T on this batch (in-sample)")
    ce.add_argument("--seed", type=int, help="seed of the conformal calibration/measured split (default 0)")
    ce.add_argument("--png", type=Path, help="also save the reliability diagram to this file")
    _conformal_arguments(ce)
    ce.add_argument("--json", action="store_true", help="print the server's JSON")

    co = sub.add_parser("compare", help="how well the uncertainty scores tell a suspect batch from an "
                                        "in-distribution one (AUROC, AUPR, FPR@95)")
    co.add_argument("in_distribution", type=Path, help="in-distribution images: .npy/.npz array, a PNG/JPEG, "
                                                       "or a folder of PNG/JPEG images")
    co.add_argument("suspect", type=Path, help="suspect images, in the same forms")
    co.add_argument("--mc-samples", type=int, help="MC dropout samples for the mutual information (>= 2; "
                                                   "default 0: none)")
    co.add_argument("--seed", type=int, help="seed of the MC samples")
    co.add_argument("--resize", action="store_true", help="let the server resize non-32x32 images")
    co.add_argument("--png", type=Path, help="also save the score histograms to this file")
    co.add_argument("--calibration", metavar="ID", help="score under this recalibration profile")
    co.add_argument("--json", action="store_true", help="print the server's JSON")

    def profile_options(sp):
        sp.add_argument("--method", choices=("temperature", "vector", "dirichlet", "auto"),
                        help="the recalibration map (server default temperature; auto: lowest cross-validated NLL)")
        sp.add_argument("--label", help="a free-text name for the domain")
        sp.add_argument("--folds", type=int, help="k of the cross-fitted report (server default 5)")
        sp.add_argument("--json", action="store_true", help="print the server's JSON")

    rc = sub.add_parser("recalibrate", help="fit and store a recalibration profile of --model on a labelled batch "
                                            "(.npz x/y or an image-folder tree/archive)")
    rc.add_argument("data", type=Path)
    rc.add_argument("--split", help="sub-folder holding the class folders (e.g. test)")
    rc.add_argument("--resize", action="store_true", help="let the server resize non-32x32 images")
    profile_options(rc)
    ca = sub.add_parser("calibrate", help="fit and store a model-independent profile from any classifier's "
                                          "labelled logits (.npz with logits or probs, and y)")
    ca.add_argument("data", type=Path)
    profile_options(ca)
    ls = sub.add_parser("calibrations", help="list the profiles of --model, or with --independent the "
                                             "model-independent ones")
    ls.add_argument("--independent", action="store_true")
    ls.add_argument("--json", action="store_true", help="print the server's JSON")
    sh = sub.add_parser("calibration", help="show one profile")
    sh.add_argument("id")
    sh.add_argument("--json", action="store_true", help="print the server's JSON")
    de = sub.add_parser("delete-calibration", help="delete a profile (needs an admin key when keys are on)")
    de.add_argument("id")
    ap = sub.add_parser("apply", help="calibrated probabilities (and prediction sets) of logits under a profile")
    ap.add_argument("id")
    ap.add_argument("data", type=Path, help=".npz with `logits` (or `probs`) [N, K]")
    ap.add_argument("--coverage", type=float, help="prediction sets at this coverage (0 < c < 1)")
    ap.add_argument("--conformal-method", choices=CONFORMAL_METHODS, help="the sets' score (server default lac)")
    ap.add_argument("--mondrian", action="store_true", help="class-conditional sets")
    ap.add_argument("--json", action="store_true", help="print the server's JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with CalibClient(args.url, model=args.model, timeout=args.timeout, api_key=args.api_key) as client:
            return COMMANDS[args.command](client, args)
    except ServiceError as exc:
        return _fail(parser.prog, f"[{exc.code}] (HTTP {exc.status}): {exc.message}")
    except TransportError as exc:
        return _fail(parser.prog, f"cannot reach the service at {args.url} ({exc.__cause__ or exc}); "
                                  "is it running? (--url or CALIB_URL)")
    except (ClientError, OSError, ValueError, TypeError) as exc:
        return _fail(parser.prog, exc)


def _fail(prog: str, message) -> int:
    """One line on stderr, like argparse's usage errors; exit code 1 (argparse's is 2)."""
    text = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 1


def _models(client: CalibClient, args) -> int:
    infos = client.models()
    if args.json:
        print(json.dumps({"models": [i.raw for i in infos]}, indent=2))
        return 0
    print(f"{'model':<24}{'classes':>8}{'T':>9}{'test ECE before':>17}{'after':>9}")
    for i in infos:
        before = i.metrics.get("test_before_temperature", {}).get("ece", float("nan"))
        after = i.metrics.get("test_after_temperature", {}).get("ece", float("nan"))
        print(f"{i.name:<24}{len(i.classes):>8}{i.temperature:>9.4f}{before:>17.4f}{after:>9.4f}")
    return 0


def _predict(client: CalibClient, args) -> int:
    result: PredictResult = client.predict([str(f) for f in args.files], mc_samples=args.mc_samples,
                                           seed=args.seed, return_logits=args.logits, resize=args.resize,
                                           coverage=args.coverage, conformal_method=args.conformal_method,
                                           mondrian=args.mondrian, calibration=args.calibration)
    if args.json:
        print(json.dumps(result.raw, indent=2))
        return 0
    names = _row_names(args.files, len(result.predictions))
    width = max(12, *(len(n) + 2 for n in names))
    print(f"model {result.model}  T={result.temperature:.4f}  MC samples={result.mc_samples}  seed={result.seed}")
    print(f"{'input':<{width}}{'label':<14}{'confidence':>11}{'pred. H':>9}{'exp. H':>9}{'MI':>9}"
          f"{'OOD H':>9}  OOD flag")
    for name, p in zip(names, result.predictions):
        u = p.uncertainty
        cols = (f"{u.predictive_entropy:>9.4f}{u.expected_entropy:>9.4f}{u.mutual_information:>9.4f}"
                if u else f"{'-':>9}{'-':>9}{'-':>9}")
        print(f"{name:<{width}}{p.label:<14}{p.confidence:>11.4f}{cols}{_ood_columns(p.ood)}"
              + (f"  {{{', '.join(p.prediction_set.labels)}}}" if p.prediction_set is not None else ""))
    if args.coverage is not None:
        print(f"prediction sets: coverage {args.coverage:g}, {args.conformal_method or 'lac'}"
              f"{', class-conditional' if args.mondrian else ''}; {{}} = no class is plausible enough")
    return 0


def _ood_columns(ood) -> str:
    """The flag score and the verdict: OOD (abstain), ok, or n/a when the model has no threshold."""
    if ood is None:
        return f"{'-':>9}  -"
    verdict = "n/a" if ood.flag is None else ("OOD" if ood.flag else "ok")
    return f"{ood.value:>9.4f}  {verdict}"


def _row_names(files: list[Path], n: int) -> list[str]:
    if len(files) == n:
        return [f.name for f in files]
    return [f"#{i}" for i in range(n)]  # an array file holds several images


def _evaluate(client: CalibClient, args) -> int:
    report: EvaluationReport = client.evaluate(str(args.data), bins=args.bins, fit_temperature=args.fit_temperature,
                                               resize=args.resize, split=args.split,
                                               target_accuracy=args.target_accuracy, coverage=args.coverage,
                                               conformal_method=args.conformal_method, mondrian=args.mondrian,
                                               calibration=args.calibration)
    if args.png is not None:
        args.png.write_bytes(client.reliability_diagram(str(args.data), bins=args.bins, resize=args.resize,
                                                        split=args.split))
    if args.risk_coverage_png is not None:
        args.risk_coverage_png.write_bytes(client.risk_coverage_diagram(
            str(args.data), resize=args.resize, split=args.split, target_accuracy=args.target_accuracy))
    if args.json:
        print(json.dumps(report.raw, indent=2))
    else:
        print(format_report(report))
        if report.raw.get("after_calibration"):
            m = report.raw["after_calibration"]
            print(f"under profile {args.calibration}: ECE {m['ece']:.4f}  NLL {m['nll']:.4f}  "
                  f"accuracy {m['accuracy']:.4f}")
        for warning in report.warnings:
            print(f"warning [{warning.code}]: {warning.message}")
        if report.selective is not None:
            print(format_selective(report.selective))
        if report.conformal:
            print(format_conformal(report.conformal))
        if args.png is not None:
            print(f"reliability diagram saved to {args.png}")
        if args.risk_coverage_png is not None:
            print(f"risk-coverage curve saved to {args.risk_coverage_png}")
    return 0


def format_report(report: EvaluationReport) -> str:
    columns = [("before T", report.before), (f"T={report.temperature:.4f}", report.after)]
    if report.after_fitted is not None:
        columns.append((f"fitted T={report.fitted_temperature:.4f}", report.after_fitted))
    return metrics_table(f"model {report.model}  N={report.n}  bins={report.n_bins}", columns)


def metrics_table(heading: str, columns: list) -> str:
    """One row per metric, one column per (title, CalibrationMetrics)."""
    lines = [heading, f"{'metric':<16}" + "".join(f"{title:>20}" for title, _ in columns)]
    for metric in METRICS:
        lines.append(f"{metric:<16}" + "".join(f"{getattr(m, metric):>20.4f}" for _, m in columns))
    return "\n".join(lines)


def format_selective(sel: SelectiveReport) -> str:
    """AURC, the coverage table and the threshold for the target accuracy (if one was asked)."""
    lines = ["selective prediction (confidence = largest calibrated probability)",
             f"AURC {sel.aurc:.4f}   E-AURC {sel.e_aurc:.4f}   (oracle {sel.oracle_aurc:.4f})",
             f"{'coverage':>9}{'accepted':>10}{'accuracy':>10}{'risk':>9}{'threshold':>11}"]
    for p in sel.at_coverage:
        lines.append(f"{p.coverage:>9.0%}{p.accepted:>10}{p.accuracy:>10.4f}{p.risk:>9.4f}{p.threshold:>11.4f}")
    t = sel.target
    if t is not None and t.achieved:
        lines.append(f"accuracy >= {t.target_accuracy:g}: confidence >= {t.threshold:.4f} keeps "
                     f"{t.coverage:.2%} ({t.accepted} images, accuracy {t.accuracy:.4f})")
    elif t is not None:
        lines.append(f"accuracy >= {t.target_accuracy:g}: no confidence threshold reaches it (coverage 0)")
    return "\n".join(lines)



def _compare(client: CalibClient, args) -> int:
    batches = (str(args.in_distribution), str(args.suspect))
    report: ComparisonReport = client.compare(*batches, mc_samples=args.mc_samples, seed=args.seed,
                                              resize=args.resize, calibration=args.calibration)
    if args.png is not None:
        args.png.write_bytes(client.ood_histogram(*batches, mc_samples=args.mc_samples, seed=report.seed,
                                                  resize=args.resize))
    if args.json:
        print(json.dumps(report.raw, indent=2))
    else:
        print(format_comparison(report))
        if args.png is not None:
            print(f"score histograms saved to {args.png}")
    return 0


def format_comparison(report: ComparisonReport) -> str:
    mc = f"  MC samples={report.mc_samples}  seed={report.seed}" if report.mc_samples else ""
    lines = [f"model {report.model}  in-distribution N={report.n_in_distribution}  "
             f"suspect N={report.n_suspect}{mc}",
             f"{'score':<20}{'AUROC':>8}{'AUPR':>8}{'FPR@95':>8}{'mean in':>10}{'mean suspect':>14}"]
    for s in report.scores:
        lines.append(f"{s.score:<20}{s.auroc:>8.4f}{s.aupr:>8.4f}{s.fpr_at_95_tpr:>8.4f}"
                     f"{s.mean_in_distribution:>10.4f}{s.mean_suspect:>14.4f}")
    f = report.flagged
    lines.append("OOD flag: the model has no threshold" if f is None else
                 f"OOD flag (entropy > {f['threshold']:.4f}): {f['in_distribution']:.1%} of in-distribution, "
                 f"{f['suspect']:.1%} of suspect flagged")
    return "\n".join(lines)


def format_conformal(results: list[ConformalResult]) -> str:
    lines = [f"conformal prediction sets (thresholds from {results[0].calibration_n} calibration images, "
             f"measured on {results[0].n})",
             f"{'target':>7}{'method':>8}{'coverage':>10}{'mean size':>11}{'single':>8}{'empty':>8}"
             f"{'worst class':>13}"]
    for r in results:
        lines.append(f"{r.coverage_target:>7.0%}{r.method:>8}{r.coverage:>10.4f}{r.mean_set_size:>11.3f}"
                     f"{r.singletons:>8.1%}{r.empty:>8.1%}{r.worst_class['coverage']:>9.4f} (#{r.worst_class['class']})")
    return "\n".join(lines)


def _calibrate_evaluate(client: CalibClient, args) -> int:
    report: OutputsReport = client.calibrate_evaluate(str(args.data), bins=args.bins,
                                                      fit_temperature=args.fit_temperature, coverage=args.coverage,
                                                      conformal_method=args.conformal_method, mondrian=args.mondrian,
                                                      seed=args.seed)
    if args.png is not None:
        args.png.write_bytes(client.calibration_diagram(str(args.data), bins=args.bins,
                                                        fit_temperature=args.fit_temperature))
    if args.json:
        print(json.dumps(report.raw, indent=2))
        return 0
    columns = [("uploaded", report.uploaded)]
    if report.after_fitted is not None:
        columns.append((f"fitted T={report.fitted_temperature:.4f}", report.after_fitted))
    print(metrics_table(f"{report.kind}  N={report.n}  K={report.num_classes}  bins={report.n_bins}", columns))
    if report.conformal:
        print(f"split conformal: seed {report.split['seed']}, {report.split['calibration_n']} rows set the "
              f"thresholds, {report.split['test_n']} are measured")
        print(format_conformal(report.conformal))
    if args.png is not None:
        print(f"reliability diagram saved to {args.png}")
    return 0


COMMANDS = {"models": _models, "predict": _predict, "evaluate": _evaluate, "compare": _compare,
            "calibrate-evaluate": _calibrate_evaluate}


# --- recalibration profiles ----------------------------------------------------------------------

def format_profile(p: CalibrationProfile) -> str:
    owner = f"model {p.model} ({(p.model_sha256 or '')[:12]})" if p.model else "model-independent"
    lines = [f"profile {p.id}  {owner}  method {p.method}  n {p.n}  label {p.label or '-'}  created {p.created_at}"]
    before, after = p.report.get("before", {}), p.report.get("after", {})
    if before and after:
        lines.append(f"{'':<10}{'NLL':>9}{'ECE-15':>9}{'Brier':>9}{'accuracy':>10}   (after: {p.report.get('folds')}-fold "
                     f"cross-fitted)")
        for name, m in (("before", before), ("after", after)):
            lines.append(f"{name:<10}{m['nll']:>9.4f}{m['ece_15']:>9.4f}{m['brier']:>9.4f}{m['accuracy']:>10.4f}")
    if p.conformal_n is not None:
        lines.append(f"conformal calibration: {p.conformal_n} out-of-fold scores")
    return "\n".join(lines)


def _print_profile(profile: CalibrationProfile, as_json: bool) -> int:
    print(json.dumps(profile.raw, indent=2) if as_json else format_profile(profile))
    return 0


def _recalibrate(client: CalibClient, args) -> int:
    return _print_profile(client.create_calibration(str(args.data), method=args.method, label=args.label,
                                                    folds=args.folds, resize=args.resize, split=args.split), args.json)


def _calibrate(client: CalibClient, args) -> int:
    return _print_profile(client.create_logits_calibration(str(args.data), method=args.method, label=args.label,
                                                           folds=args.folds), args.json)


def _calibrations(client: CalibClient, args) -> int:
    model = None if args.independent else client._resolve(args.model)
    profiles = client.calibrations(model=model)
    if args.json:
        print(json.dumps({"calibrations": [p.raw for p in profiles]}, indent=2))
        return 0
    print(f"{'id':<38}{'method':<13}{'n':>7}  {'created':<28}label")
    for p in profiles:
        print(f"{p.id:<38}{p.method:<13}{p.n:>7}  {p.created_at:<28}{p.label or '-'}")
    return 0


def _calibration(client: CalibClient, args) -> int:
    return _print_profile(client.calibration(args.id), args.json)


def _delete_calibration(client: CalibClient, args) -> int:
    client.delete_calibration(args.id)
    print(f"deleted {args.id}")
    return 0


def _apply(client: CalibClient, args) -> int:
    out = client.apply_calibration(args.id, str(args.data), coverage=args.coverage,
                                   conformal_method=args.conformal_method, mondrian=args.mondrian)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    sets = out.get("prediction_sets") or [None] * out["n"]
    print(f"{'row':>5}{'class':>7}{'confidence':>12}  set")
    for i, (p, s) in enumerate(zip(out["probabilities"], sets)):
        k = max(range(len(p)), key=p.__getitem__)
        print(f"{i:>5}{k:>7}{p[k]:>12.4f}  " + ("-" if s is None else "{" + ", ".join(map(str, s["indices"])) + "}"))
    return 0


COMMANDS.update({"recalibrate": _recalibrate, "calibrate": _calibrate, "calibrations": _calibrations,
                 "calibration": _calibration, "delete-calibration": _delete_calibration, "apply": _apply})

