"""POST /v1/calibration/evaluate: any classifier's logits or probabilities, JSON or .npz (in process)."""

from __future__ import annotations

import numpy as np
import pytest

from models.calibration import compute_metrics, fit_temperature, softmax
from models.calibration.conformal import split_conformal_report
from tests.service_helpers import error_of, npz_bytes

URL = "/v1/calibration/evaluate"


def batch(n: int = 300, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(n, k))
    p = softmax(z, 2.0)
    y = np.minimum((rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1), k - 1)
    return z, y


def test_logits_json_report_fit_and_coverage(app_client):
    z, y = batch()
    r = app_client.post(URL, params=[("fit_temperature", "true"), ("coverage", "0.9"), ("coverage", "0.8"),
                                     ("seed", "3")],
                        json={"logits": z.tolist(), "labels": y.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["kind"], body["n"], body["num_classes"]) == ("logits", 300, 10)
    want_metrics = compute_metrics(z, y).to_dict()
    for key in ("accuracy", "nll", "brier", "ece", "mce", "adaptive_ece", "classwise_ece"):
        assert body["uploaded"][key] == pytest.approx(want_metrics[key]), key
    assert body["uploaded"]["bins"] == want_metrics["bins"]
    t = fit_temperature(z, y)
    assert body["fitted_temperature"] == pytest.approx(t)
    assert body["after_fitted_temperature"]["ece"] == pytest.approx(compute_metrics(z, y, temperature=t).ece)
    want = split_conformal_report(softmax(z), y, [0.8, 0.9], ("lac", "aps", "raps"), seed=3)
    assert body["conformal"]["split"] == {"seed": 3, "calibration_n": 150, "test_n": 150}
    assert [(g["coverage_target"], g["method"], g["coverage"], g["mean_set_size"]) for g in body["conformal"]["results"]] \
        == [(w["coverage_target"], w["method"], w["coverage"], w["mean_set_size"]) for w in want["results"]]


def test_probabilities_npz_and_png(app_client):
    z, y = batch(k=3)
    p = softmax(z).astype(np.float32)
    files = {"file": ("probs.npz", npz_bytes(probs=p, y=y))}
    r = app_client.post(URL, params={"coverage": 0.9, "conformal_method": "aps"}, files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "probabilities"
    assert body["uploaded"]["nll"] == pytest.approx(compute_metrics(z, y).nll, abs=1e-5)
    assert [g["method"] for g in body["conformal"]["results"]] == ["aps"]
    png = app_client.post(URL, params={"format": "png", "fit_temperature": "true"},
                          files={"file": ("l.npz", npz_bytes(logits=z, y=y))})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("k", [2, 1000])
def test_any_k_from_2_to_1000(app_client, k):
    z, y = batch(n=40, k=k)
    r = app_client.post(URL, params={"coverage": 0.5}, files={"file": ("l.npz", npz_bytes(logits=z, y=y))})
    assert r.status_code == 200, r.text
    assert r.json()["num_classes"] == k


def _bad_cases():
    z, y = batch(n=20, k=4)
    nan, inf = z.copy(), z.copy()
    nan[3, 1] = np.nan
    inf[0, 0] = np.inf
    p = softmax(z)
    off = p.copy()
    off[0] *= 1.2
    return [
        ("nan logits", {"logits": nan, "y": y}, "non_finite_value"),
        ("inf logits", {"logits": inf, "y": y}, "non_finite_value"),
        ("length mismatch", {"logits": z, "y": y[:-1]}, "length_mismatch"),
        ("label >= K", {"logits": z, "y": np.where(y == 0, 4, y)}, "label_out_of_range"),
        ("negative label", {"logits": z, "y": np.where(y == 0, -1, y)}, "label_out_of_range"),
        ("rows not summing to 1", {"probs": off, "y": y}, "invalid_probabilities"),
        ("negative probability", {"probs": p - 0.5, "y": y}, "invalid_probabilities"),
        ("K = 1", {"logits": z[:, :1], "y": np.zeros(20, int)}, "invalid_shape"),
        ("K = 1001", {"logits": np.zeros((3, 1001)), "y": np.zeros(3, int)}, "invalid_shape"),
        ("1-D logits", {"logits": z[:, 0], "y": y}, "invalid_shape"),
        ("no labels", {"logits": z}, "missing_labels"),
        ("both", {"logits": z, "probs": p, "y": y}, "invalid_array_file"),
        ("string labels", {"logits": z, "y": y.astype(str)}, "invalid_dtype"),
    ]


@pytest.mark.parametrize("name, arrays, code", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_npz_is_422_with_a_code(app_client, name, arrays, code):
    r = app_client.post(URL, files={"file": ("bad.npz", npz_bytes(**arrays))})
    error_of(r, 422, code)


@pytest.mark.parametrize("name, arrays, code", [c for c in _bad_cases() if c[0] not in ("string labels", "both")],
                         ids=[c[0] for c in _bad_cases() if c[0] not in ("string labels", "both")])
def test_bad_json_is_422_with_a_code(app_client, name, arrays, code):
    body = {("probabilities" if k == "probs" else "labels" if k == "y" else k): v.tolist()
            for k, v in arrays.items()}
    # JSON has no NaN/inf literals in strict parsers; Python's json writes NaN/Infinity, which the
    # service parses (Python json) and must still refuse.
    r = app_client.post(URL, content=_json_dumps(body), headers={"content-type": "application/json"})
    error_of(r, 422, code)


def _json_dumps(body) -> bytes:
    import json

    return json.dumps(body).encode()


@pytest.mark.parametrize("params, code", [({"coverage": 1.0}, "invalid_coverage"), ({"coverage": 0}, "invalid_coverage"),
                                          ({"coverage": -0.5}, "invalid_coverage"),
                                          ({"conformal_method": "lac"}, "needs_coverage"),
                                          ({"coverage": 0.9, "conformal_method": "x"}, "invalid_parameter")])
def test_bad_query_is_422(app_client, params, code):
    z, y = batch(n=10)
    error_of(app_client.post(URL, params=params, json={"logits": z.tolist(), "labels": y.tolist()}), 422, code)


def test_json_needs_exactly_one_of_logits_or_probabilities(app_client):
    z, y = batch(n=10)
    error_of(app_client.post(URL, json={"labels": y.tolist()}), 422, "invalid_request")
    error_of(app_client.post(URL, json={"logits": z.tolist(), "probabilities": softmax(z).tolist(),
                                        "labels": y.tolist()}), 422, "invalid_request")
    # an explicit null is a key sent with no [N, K] array, as the schema says (found by the fuzzer)
    message = error_of(app_client.post(URL, json={"logits": z.tolist(), "probabilities": None,
                                                  "labels": y.tolist()}), 422, "invalid_request")
    assert "exactly one of 'logits' or 'probabilities'" in message


def test_coverage_on_one_row_is_too_few_images(app_client):
    error_of(app_client.post(URL, params={"coverage": 0.9}, json={"logits": [[1.0, 0.0]], "labels": [0]}),
             422, "too_few_images")
