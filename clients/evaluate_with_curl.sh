#!/usr/bin/env bash
# A whole calibration evaluation with curl alone: upload a labelled batch, get the JSON report
# and the reliability diagram.
#
#   clients/evaluate_with_curl.sh DATA [OUTDIR]
#
# DATA: an .npz with x (uint8 [N,32,32,3]) and y (int [N]), or a .tar.gz/.zip of
# <class>/<image> folders. Environment: CALIB_URL (default http://127.0.0.1:8000),
# CALIB_MODEL (default: the first model the service lists), BINS (15), SPLIT (archive
# sub-folder such as "test"), FIT_TEMPERATURE (true), CALIB_API_KEY (sent as a bearer token
# when set; it goes to curl through a pipe, never on a command line that ps could show),
# TARGET_ACCURACY (e.g. 0.99: also report the lowest confidence threshold reaching that
# accuracy, and its coverage), RISK_COVERAGE_PNG (true: also fetch the risk-coverage curve;
# one more pass of the model over the batch).
# Writes OUTDIR/report.json, OUTDIR/diagram.png and, when asked, OUTDIR/risk_coverage.png
# (OUTDIR defaults to .); exits non-zero and prints the service's error body on failure.
#
# Out-of-distribution check (optional): SUSPECT=other.npz (or .npy, a PNG/JPEG) also compares the
# images of DATA (which must then be an .npz; its labels are not used) with the suspect batch on
# POST /v1/models/NAME/compare, writing OUTDIR/compare.json (AUROC, AUPR, FPR@95 per uncertainty
# score, and the share of each batch the model's OOD flag marks) and OUTDIR/ood-histogram.png.
# MC_SAMPLES (default 0; >= 2 adds the MC mutual information) and SEED (default 0) go with it.
set -euo pipefail

data=${1:?usage: evaluate_with_curl.sh DATA [OUTDIR]}
out=${2:-.}
url=${CALIB_URL:-http://127.0.0.1:8000}
bins=${BINS:-15}
fit=${FIT_TEMPERATURE:-true}
mkdir -p "$out"

# curl with the API key header (if any) read from a process substitution: printf is a
# shell builtin, so the key never appears in an argument list.
api_curl() {
  if [ -n "${CALIB_API_KEY:-}" ]; then
    curl -H @<(printf 'Authorization: Bearer %s\n' "$CALIB_API_KEY") "$@"
  else
    curl "$@"
  fi
}

curl -fsS "$url/health/ready" > /dev/null
model=${CALIB_MODEL:-}
if [ -z "$model" ]; then
  listing=$(api_curl -sS --fail-with-body "$url/v1/models") || { echo "$listing" >&2; exit 1; }
  model=$(printf '%s' "$listing" | sed -n 's/^{"models":\[{"name":"\([^"]*\)".*/\1/p')
fi
if [ -z "$model" ]; then echo "no model loaded at $url" >&2; exit 1; fi

query="bins=$bins&fit_temperature=$fit"
if [ -n "${SPLIT:-}" ]; then query="$query&split=$SPLIT"; fi
if [ -n "${TARGET_ACCURACY:-}" ]; then query="$query&target_accuracy=$TARGET_ACCURACY"; fi

api_curl -sS --fail-with-body -F "file=@$data" "$url/v1/models/$model/evaluate?$query" -o "$out/report.json" \
  || { cat "$out/report.json" >&2; echo >&2; exit 1; }
api_curl -sS --fail-with-body -F "file=@$data" "$url/v1/models/$model/evaluate?$query&format=png" -o "$out/diagram.png" \
  || { cat "$out/diagram.png" >&2; echo >&2; exit 1; }

if [ "${RISK_COVERAGE_PNG:-false}" = true ]; then
  api_curl -sS --fail-with-body -F "file=@$data" "$url/v1/models/$model/evaluate?$query&format=risk_coverage_png" \
    -o "$out/risk_coverage.png" || { cat "$out/risk_coverage.png" >&2; echo >&2; exit 1; }
  echo "risk-coverage curve $out/risk_coverage.png"
fi

echo "model $model: report $out/report.json, reliability diagram $out/diagram.png"
grep -o '"ece":[0-9.e-]*' "$out/report.json" | head -2 | paste -sd' ' - | sed 's/^/before, after T: /'
# The selective block: AURC, then the threshold for TARGET_ACCURACY (the JSON is compact, one line).
grep -o '"aurc":[0-9.e-]*,"e_aurc":[0-9.e-]*' "$out/report.json" | sed 's/^/selective: /' || true
grep -o '"target":{[^}]*}' "$out/report.json" | sed 's/^/selective: /' || true

if [ -n "${SUSPECT:-}" ]; then
  cq="mc_samples=${MC_SAMPLES:-0}&seed=${SEED:-0}"   # one seed: the JSON and the PNG show the same samples
  api_curl -sS --fail-with-body -F "in_distribution=@$data" -F "suspect=@$SUSPECT" \
    "$url/v1/models/$model/compare?$cq" -o "$out/compare.json" || { cat "$out/compare.json" >&2; echo >&2; exit 1; }
  api_curl -sS --fail-with-body -F "in_distribution=@$data" -F "suspect=@$SUSPECT" \
    "$url/v1/models/$model/compare?$cq&format=png" -o "$out/ood-histogram.png" \
    || { cat "$out/ood-histogram.png" >&2; echo >&2; exit 1; }
  echo "compare $data vs $SUSPECT: $out/compare.json, histograms $out/ood-histogram.png"
  grep -o '"score":"[a-z_]*","auroc":[0-9.e-]*' "$out/compare.json" | sed 's/"score":"\([a-z_]*\)","auroc":/AUROC \1: /'
  grep -o '"flagged":{[^}]*}' "$out/compare.json" || echo "OOD flag: the model has no threshold"
fi
