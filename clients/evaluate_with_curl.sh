#!/usr/bin/env bash
# A whole calibration evaluation with curl alone: upload a labelled batch, get the JSON report
# and the reliability diagram.
#
#   clients/evaluate_with_curl.sh DATA [OUTDIR]
#
# DATA: an .npz with x (uint8 [N,32,32,3]) and y (int [N]), or a .tar.gz/.zip of
# <class>/<image> folders. Environment: CALIB_URL (default http://127.0.0.1:8000),
# CALIB_MODEL (default: the first model the service lists), BINS (15), SPLIT (archive
# sub-folder such as "test"), FIT_TEMPERATURE (true).
# Writes OUTDIR/report.json and OUTDIR/diagram.png (OUTDIR defaults to .); exits non-zero and
# prints the service's error body on failure.
set -euo pipefail

data=${1:?usage: evaluate_with_curl.sh DATA [OUTDIR]}
out=${2:-.}
url=${CALIB_URL:-http://127.0.0.1:8000}
bins=${BINS:-15}
fit=${FIT_TEMPERATURE:-true}
mkdir -p "$out"

curl -fsS "$url/health/ready" > /dev/null
model=${CALIB_MODEL:-$(curl -fsS "$url/v1/models" | sed -n 's/^{"models":\[{"name":"\([^"]*\)".*/\1/p')}
if [ -z "$model" ]; then echo "no model loaded at $url" >&2; exit 1; fi

query="bins=$bins&fit_temperature=$fit"
if [ -n "${SPLIT:-}" ]; then query="$query&split=$SPLIT"; fi

curl -sS --fail-with-body -F "file=@$data" "$url/v1/models/$model/evaluate?$query" -o "$out/report.json" \
  || { cat "$out/report.json" >&2; echo >&2; exit 1; }
curl -sS --fail-with-body -F "file=@$data" "$url/v1/models/$model/evaluate?$query&format=png" -o "$out/diagram.png" \
  || { cat "$out/diagram.png" >&2; echo >&2; exit 1; }

echo "model $model: report $out/report.json, reliability diagram $out/diagram.png"
grep -o '"ece":[0-9.e-]*' "$out/report.json" | head -2 | paste -sd' ' - | sed 's/^/before, after T: /'
