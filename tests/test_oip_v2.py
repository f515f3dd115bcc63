"""The Open Inference Protocol (/v2) REST API.

Over a real socket it is driven by NVIDIA's `tritonclient[http]`, a client written against the
protocol by others: what it sends and parses is what a third-party client does. Its answers must
equal /v1 predict's for the same images. The error cases run in-process (TestClient): every one is
a 4xx with the protocol's `{"error": "<message>"}` body.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.service_helpers import MAX_BODY, MAX_INSTANCES, MAX_MC, MODEL, png_bytes

SHAPE = [32, 32, 3]


def v2_error(response, status: int) -> str:
    """Assert the protocol's error object; return its message."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    assert response.headers["x-request-id"]
    return body["error"]


def pixels_request(x: np.ndarray, datatype: str = "UINT8", **extra) -> dict:
    data = x.astype(np.float32 if datatype == "FP32" else np.uint8).reshape(-1).tolist()
    return {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": datatype, "data": data}], **extra}


def bytes_request(encoded: list[str], **extra) -> dict:
    return {"inputs": [{"name": "images", "shape": [len(encoded)], "datatype": "BYTES", "data": encoded}],
            **extra}


def b64_png(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def outputs_of(body: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]}


@pytest.fixture(scope="module")
def images(sample_data) -> np.ndarray:
    return sample_data.x_test[:5]


@pytest.fixture(scope="module")
def version() -> str:
    return "1"   # the flat layout is version 1 (docs/model-versions.md)


@pytest.fixture(scope="module")
def sha_version(service_model_dir) -> str:
    card = json.loads((service_model_dir / MODEL / "model_card.json").read_text())
    return card["model_sha256"][:12]


# --- tritonclient over a real socket --------------------------------------------------------------
@pytest.fixture(scope="module")
def server(service_model_dir, tmp_path_factory):
    from benchmarks.server_process import ServerError, ServerProcess

    log = tmp_path_factory.mktemp("server-v2") / "server.log"
    try:
        with ServerProcess(service_model_dir, log_path=log, ready_timeout=120,
                           max_instances=MAX_INSTANCES, max_mc_samples=MAX_MC) as running:
            yield running
    except ServerError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def v1_prediction(server, images):
    """/v1 predict on the same images, MC dropout with T=20 and seed 11."""
    import httpx

    response = httpx.post(f"{server.url}/v1/models/{MODEL}/predict", params={"mc_samples": 20, "seed": 11},
                          json={"instances": images.tolist()}, timeout=60)
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    return {"probabilities": np.array([r["probabilities"] for r in rows]),
            "mc_mean": np.array([r["uncertainty"]["mean"] for r in rows]),
            "mutual_information": np.array([r["uncertainty"]["mutual_information"] for r in rows])}


def _pixels_input(x: np.ndarray, datatype: str):
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("images", list(x.shape), datatype)
    tensor.set_data_from_numpy(x.astype(np.uint8 if datatype == "UINT8" else np.float32), binary_data=False)
    return tensor


@pytest.mark.server
def test_tritonclient_health_and_metadata(triton, version):
    from tritonclient.utils import InferenceServerException

    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, version)
    assert not triton.is_model_ready(MODEL, "0" * 12) and not triton.is_model_ready("no-such-model")

    server_meta = triton.get_server_metadata()
    assert server_meta["name"] == "calibrated-cifar10" and server_meta["version"]
    assert server_meta["extensions"] == ["binary_tensor_data", "calibrated_uncertainty"]

    meta = triton.get_model_metadata(MODEL)
    assert meta == triton.get_model_metadata(MODEL, version)
    assert meta["name"] == MODEL and meta["versions"] == [version] and meta["platform"]
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["probabilities"] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    assert outputs["mc_variance"]["shape"] == [-1, 10] and outputs["mutual_information"]["shape"] == [-1]

    with pytest.raises(InferenceServerException) as exc:
        triton.get_model_metadata("no-such-model")
    assert exc.value.status() == "404" and "no-such-model" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        triton.get_model_metadata(MODEL, "0" * 12)
    assert exc.value.status() == "404" and version in exc.value.message()


@pytest.mark.server
def test_tritonclient_uint8_fp32_and_png_bytes_equal_v1(triton, images, v1_prediction, version):
    import tritonclient.http as httpclient

    uint8 = triton.infer(MODEL, [_pixels_input(images, "UINT8")], request_id="req-1")
    response = uint8.get_response()
    assert response["id"] == "req-1" and response["model_name"] == MODEL
    assert response["model_version"] == version
    assert [o["name"] for o in response["outputs"]] == ["probabilities"]  # no MC unless asked for
    probs = uint8.as_numpy("probabilities")
    assert probs.shape == (5, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, v1_prediction["probabilities"], atol=1e-5)

    fp32 = triton.infer(MODEL, [_pixels_input(images, "FP32")], model_version=version)
    np.testing.assert_allclose(fp32.as_numpy("probabilities"), v1_prediction["probabilities"], atol=1e-5)

    encoded = np.array([base64.b64encode(png_bytes(img)) for img in images], dtype=np.object_)
    png = httpclient.InferInput("images", [len(images)], "BYTES")
    png.set_data_from_numpy(encoded, binary_data=False)
    result = triton.infer(MODEL, [png])
    np.testing.assert_allclose(result.as_numpy("probabilities"), v1_prediction["probabilities"], atol=1e-5)


@pytest.mark.server
def test_tritonclient_mc_outputs_subset_and_seed(triton, images, v1_prediction):
    import tritonclient.http as httpclient

    def run(seed: int, names: list[str]):
        outputs = [httpclient.InferRequestedOutput(n) for n in names]  # binary_data=True: JSON is answered
        return triton.infer(MODEL, [_pixels_input(images, "UINT8")], outputs=outputs,
                            parameters={"mc_samples": 20, "seed": seed})

    first = run(11, ["mc_mean", "mutual_information"])
    assert [o["name"] for o in first.get_response()["outputs"]] == ["mc_mean", "mutual_information"]
    assert first.as_numpy("probabilities") is None
    params = first.get_response()["parameters"]
    assert params["mc_samples"] == 20 and params["seed"] == 11 and params["temperature"] > 0
    mean, mi = first.as_numpy("mc_mean"), first.as_numpy("mutual_information")
    assert mean.shape == (5, 10) and mi.shape == (5,)
    np.testing.assert_allclose(mean, v1_prediction["mc_mean"], atol=1e-5)
    np.testing.assert_allclose(mi, v1_prediction["mutual_information"], atol=1e-5)

    again = run(11, ["mutual_information", "mc_mean"])
    np.testing.assert_array_equal(again.as_numpy("mc_mean"), mean)
    np.testing.assert_array_equal(again.as_numpy("mutual_information"), mi)
    other = run(12, ["mc_mean"])
    assert not np.allclose(other.as_numpy("mc_mean"), mean)

    full = triton.infer(MODEL, [_pixels_input(images, "UINT8")], parameters={"mc_samples": 20})
    names = [o["name"] for o in full.get_response()["outputs"]]
    assert names == ["probabilities", "mc_mean", "mc_variance", "predictive_entropy", "expected_entropy",
                     "mutual_information"]
    assert isinstance(full.get_response()["parameters"]["seed"], int)  # drawn, and returned to replay
    assert (full.as_numpy("mc_variance") >= 0).all()


@pytest.mark.server
def test_tritonclient_errors_are_exceptions_with_the_message(triton, images):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as exc:
        triton.infer(MODEL, [_pixels_input(images, "UINT8")], parameters={"mc_samples": 0})
    assert exc.value.status() == "400" and "mc_samples" in exc.value.message()
    tensor = httpclient.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images).set_shape([len(images) + 1, *SHAPE])  # binary, one image short
    with pytest.raises(InferenceServerException) as exc:
        triton.infer(MODEL, [tensor])
    assert exc.value.status() == "400" and "binary_data_size" in exc.value.message()


# --- the binary tensor data extension, with tritonclient's defaults --------------------------------
def _binary_input(images: np.ndarray, datatype: str, binary: bool):
    import tritonclient.http as httpclient

    if datatype == "BYTES":  # binary BYTES elements are the files themselves, JSON ones base64 text
        files = [png_bytes(img) for img in images]
        x = np.array(files if binary else [base64.b64encode(f) for f in files], dtype=np.object_)
    else:
        x = images.astype(np.uint8 if datatype == "UINT8" else np.float32)
    tensor = httpclient.InferInput("images", list(x.shape), datatype)
    return tensor.set_data_from_numpy(x) if binary else tensor.set_data_from_numpy(x, binary_data=False)


@pytest.mark.parametrize("datatype", ["UINT8", "FP32", "BYTES"])
def test_tritonclient_binary_defaults_give_the_json_answers(triton, images, datatype):
    """`set_data_from_numpy(x)` and `InferRequestedOutput(name)` (binary by default) against the same
    request in JSON: the same arrays, bit for bit."""
    import tritonclient.http as httpclient

    names = ["probabilities", "mc_mean", "mutual_information"]
    params = {"mc_samples": 20, "seed": 11}
    binary = triton.infer(MODEL, [_binary_input(images, datatype, True)], parameters=params,
                          outputs=[httpclient.InferRequestedOutput(n) for n in names])
    as_json = triton.infer(MODEL, [_binary_input(images, datatype, False)], parameters=params,
                           outputs=[httpclient.InferRequestedOutput(n, binary_data=False) for n in names])
    sent = {o["name"]: o for o in binary.get_response()["outputs"]}
    assert sent["probabilities"]["parameters"] == {"binary_data_size": len(images) * 10 * 4}
    assert "data" not in sent["mc_mean"] and "data" in as_json.get_response()["outputs"][0]
    for name in names:
        np.testing.assert_array_equal(binary.as_numpy(name), as_json.as_numpy(name))
    # no outputs named: tritonclient asks for all in binary (binary_data_output), the default outputs
    default = triton.infer(MODEL, [_binary_input(images, datatype, True)])
    assert [o["name"] for o in default.get_response()["outputs"]] == ["probabilities"]
    assert default.get_response()["outputs"][0]["parameters"]["binary_data_size"] == len(images) * 40
    np.testing.assert_array_equal(default.as_numpy("probabilities"), as_json.as_numpy("probabilities"))


def _binary_body(header: dict, *tensors: bytes, header_length: int | None = None) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    length = len(text) if header_length is None else header_length
    return text + b"".join(tensors), {"Inference-Header-Content-Length": str(length)}


def test_binary_requests_and_mixed_outputs_in_process(app_client, images):
    x = images[:2]
    raw = x.tobytes()
    body, headers = _binary_body({"inputs": [{"name": "images", "shape": [2, *SHAPE], "datatype": "UINT8",
                                              "parameters": {"binary_data_size": len(raw)}}],
                                  "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]},
                                 raw)
    as_json = app_client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert as_json.status_code == 200 and "inference-header-content-length" not in as_json.headers
    expected = outputs_of(as_json.json())["probabilities"]
    reference = app_client.post(f"/v2/models/{MODEL}/infer", json=pixels_request(x)).json()
    np.testing.assert_array_equal(expected, outputs_of(reference)["probabilities"])

    answer = app_client.post(f"/v2/models/{MODEL}/infer", json=pixels_request(
        x, parameters={"binary_data_output": True, "mc_samples": 5, "seed": 3},
        outputs=[{"name": "probabilities"}, {"name": "mutual_information", "parameters": {"binary_data": False}},
                 {"name": "mc_mean"}]))
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
    n = int(answer.headers["inference-header-content-length"])
    header = json.loads(answer.content[:n])
    probs, mi, mean = header["outputs"]
    assert probs["parameters"] == {"binary_data_size": 80} and "data" not in probs
    assert len(mi["data"]) == 2 and mean["parameters"] == {"binary_data_size": 80}
    assert len(answer.content) == n + 160
    np.testing.assert_array_equal(np.frombuffer(answer.content[n:n + 80], "<f4").reshape(2, 10), expected)


def _malformed_binary(images: np.ndarray) -> dict[str, tuple[bytes, dict]]:
    raw = images[:1].tobytes()
    one = {"name": "images", "shape": [1, *SHAPE], "datatype": "UINT8", "parameters": {"binary_data_size": len(raw)}}
    png = png_bytes(images[0])
    bytes_in = {"name": "images", "shape": [1], "datatype": "BYTES"}
    ok_header = json.dumps({"inputs": [one]}).encode()
    return {
        "header length not a number": (ok_header + raw, {"Inference-Header-Content-Length": "abc"}),
        "header length zero": _binary_body({"inputs": [one]}, raw, header_length=0),
        "header length past the body": _binary_body({"inputs": [one]}, raw, header_length=len(ok_header) + len(raw) + 1),
        "header length cuts the JSON": _binary_body({"inputs": [one]}, raw, header_length=len(ok_header) - 1),
        "size larger than the tail": _binary_body({"inputs": [one]}, raw[:-1]),
        "bytes left over": _binary_body({"inputs": [one]}, raw + b"\0"),
        "tail without any binary input": _binary_body(pixels_request(images[:1]), raw),
        "size without the header": (json.dumps({"inputs": [one]}).encode(), {}),
        "negative size": _binary_body({"inputs": [{**one, "parameters": {"binary_data_size": -1}}]}),
        "size not an integer": _binary_body({"inputs": [{**one, "parameters": {"binary_data_size": "3072"}}]}, raw),
        "data and size": _binary_body({"inputs": [{**one, "data": [0] * 3072}]}, raw),
        "no data and no size": _binary_body({"inputs": [{k: v for k, v in one.items() if k != "parameters"}]}),
        "size does not fit the shape": _binary_body(
            {"inputs": [{**one, "shape": [2, *SHAPE]}]}, raw),
        "FP32 size of UINT8 bytes": _binary_body({"inputs": [{**one, "datatype": "FP32"}]}, raw),
        "FP32 NaN": _binary_body({"inputs": [{**one, "datatype": "FP32", "parameters": {"binary_data_size": 4 * 3072}}]},
                                 np.full(3072, np.nan, "<f4").tobytes()),
        "BYTES length cut off": _binary_body({"inputs": [{**bytes_in, "parameters": {"binary_data_size": 2}}]},
                                             b"\1\0"),
        "BYTES length past the end": _binary_body(
            {"inputs": [{**bytes_in, "parameters": {"binary_data_size": 4 + 10}}]},
            len(png).to_bytes(4, "little") + png[:10]),
        "BYTES count off": _binary_body(
            {"inputs": [{**bytes_in, "parameters": {"binary_data_size": 2 * (4 + len(png))}}]},
            *[len(png).to_bytes(4, "little") + png] * 2),
        "BYTES not an image": _binary_body(
            {"inputs": [{**bytes_in, "parameters": {"binary_data_size": 8}}]}, b"\4\0\0\0abcd"),
        "binary_data not a boolean": _binary_body(
            {"inputs": [one], "outputs": [{"name": "probabilities", "parameters": {"binary_data": 1}}]}, raw),
        "binary_data_output not a boolean": _binary_body(
            {"inputs": [one], "parameters": {"binary_data_output": "yes"}}, raw),
    }


def test_malformed_binary_requests_are_400_with_the_protocols_error(app_client, images):
    for case, (body, headers) in _malformed_binary(images).items():
        response = app_client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
        assert response.status_code == 400, (case, response.status_code, response.text[:300])
        assert "Traceback" not in v2_error(response, 400), case


# --- in-process: the protocol's shapes and every error ---------------------------------------------
def test_health_routes_and_nested_data(app_client, images, version):
    assert app_client.get("/v2/health/live").json() == {"live": True}
    assert app_client.get("/v2/health/ready").json() == {"ready": True}
    assert app_client.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert app_client.get(f"/v2/models/{MODEL}/versions/{version}/ready").json()["ready"] is True

    flat = app_client.post(f"/v2/models/{MODEL}/infer", json=pixels_request(images[:2]))
    nested = app_client.post(f"/v2/models/{MODEL}/versions/{version}/infer", json={"inputs": [
        {"name": "images", "shape": [2, *SHAPE], "datatype": "FP32", "data": images[:2].tolist()}]})
    assert flat.status_code == nested.status_code == 200, (flat.text, nested.text)
    assert "id" not in flat.json()  # the request had none
    np.testing.assert_allclose(outputs_of(flat.json())["probabilities"], outputs_of(nested.json())["probabilities"],
                               atol=1e-6)


@pytest.mark.parametrize("path", ["/v2/models/no-such-model", "/v2/models/no-such-model/ready",
                                  "/v2/models/{model}/versions/000000000000",
                                  "/v2/models/{model}/versions/2/ready", "/v2/nothing-here"])
def test_unknown_model_version_or_route_is_404(app_client, path):
    assert "no" in v2_error(app_client.get(path.format(model=MODEL)), 404).lower()


def test_a_version_is_its_folder_number_or_its_sha256_prefix(app_client, images, sha_version):
    assert app_client.get(f"/v2/models/{MODEL}").json()["versions"] == ["1"]
    for version in ("1", sha_version):
        r = app_client.post(f"/v2/models/{MODEL}/versions/{version}/infer", json=pixels_request(images[:1]))
        assert r.status_code == 200 and r.json()["model_version"] == "1"


def test_unknown_model_or_version_on_infer_is_404(app_client, images):
    body = pixels_request(images[:1])
    assert "no-such-model" in v2_error(app_client.post("/v2/models/no-such-model/infer", json=body), 404)
    v2_error(app_client.post(f"/v2/models/{MODEL}/versions/abc/infer", json=body), 404)
    # /v1 keeps the house envelope
    assert app_client.get("/v1/models/no-such-model").json()["error"]["code"] == "unknown_model"


def _bad_requests(x: np.ndarray) -> dict[str, dict]:
    one = pixels_request(x[:1])
    tensor = one["inputs"][0]
    return {
        "datatype INT64": {"inputs": [{**tensor, "datatype": "INT64"}]},
        "datatype FP64": {"inputs": [{**tensor, "datatype": "FP64"}]},
        "shape without channels": {"inputs": [{**tensor, "shape": [1, 32, 32]}]},
        "channels first": {"inputs": [{**tensor, "shape": [1, 3, 32, 32]}]},
        "data too short": {"inputs": [{**tensor, "shape": [2, *SHAPE]}]},
        "data too long": {"inputs": [{**tensor, "data": tensor["data"] + [0]}]},
        "nested unlike the shape": {"inputs": [{**tensor, "data": [tensor["data"][:3072]]}]},
        "ragged": {"inputs": [{**tensor, "data": [[1, 2], [3]]}]},
        "UINT8 fractions": {"inputs": [{**tensor, "data": [0.5] * 3072}]},
        "UINT8 256": {"inputs": [{**tensor, "data": [256] * 3072}]},
        "FP32 negative": {"inputs": [{**tensor, "datatype": "FP32", "data": [-1.0] * 3072}]},
        "FP32 normalised": {"inputs": [{**tensor, "datatype": "FP32", "data": [0.25] * 3072}]},
        "booleans": {"inputs": [{**tensor, "data": [True] + tensor["data"][1:]}]},
        "strings as pixels": {"inputs": [{**tensor, "data": ["1"] * 3072}]},
        "wrong input name": {"inputs": [{**tensor, "name": "input0"}]},
        "two inputs": {"inputs": [tensor, tensor]},
        "no inputs": {"inputs": []},
        "empty batch": {"inputs": [{**tensor, "shape": [0, *SHAPE], "data": []}]},
        "too many images": {"inputs": [{**tensor, "shape": [MAX_INSTANCES + 1, *SHAPE]}]},
        "mc_samples 0": {**one, "parameters": {"mc_samples": 0}},
        "mc_samples 1": {**one, "parameters": {"mc_samples": 1}},
        "mc_samples huge": {**one, "parameters": {"mc_samples": MAX_MC + 1}},
        "mc_samples string": {**one, "parameters": {"mc_samples": "20"}},
        "mc_samples bool": {**one, "parameters": {"mc_samples": True}},
        "mc_samples float": {**one, "parameters": {"mc_samples": 20.0}},
        "seed string": {**one, "parameters": {"mc_samples": 5, "seed": "7"}},
        "seed negative": {**one, "parameters": {"mc_samples": 5, "seed": -1}},
        "seed huge": {**one, "parameters": {"mc_samples": 5, "seed": 2**31}},
        "resize string": {**one, "parameters": {"resize": "yes"}},
        "parameter null": {**one, "parameters": {"mc_samples": None}},
        "unknown output": {**one, "outputs": [{"name": "logits"}]},
        "MC output without mc_samples": {**one, "outputs": [{"name": "mc_variance"}]},
        "output twice": {**one, "outputs": [{"name": "probabilities"}, {"name": "probabilities"}]},
        "no outputs": {**one, "outputs": []},
        "bad base64": bytes_request(["not base64!"]),
        "undecodable image": bytes_request([base64.b64encode(b"GIF89a not really").decode()]),
        "wrong image size": bytes_request([base64.b64encode(png_bytes(np.zeros((8, 8, 3)))).decode()]),
        "BYTES number": bytes_request([5]),
        "BYTES shape": {"inputs": [{"name": "images", "shape": [1, 32], "datatype": "BYTES", "data": ["x"]}]},
        "BYTES length": {"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                     "data": [b64_png(x[0])]}]},
        "id not a string": {**one, "id": 42},
        "no inputs key": {"id": "x"},
        "shape negative": {"inputs": [{**tensor, "shape": [-1, *SHAPE]}]},
        "data not a list": {"inputs": [{**tensor, "data": "abc"}]},
    }


def test_bad_requests_are_400_with_the_protocols_error(app_client, images):
    for case, body in _bad_requests(images).items():
        response = app_client.post(f"/v2/models/{MODEL}/infer", json=body)
        assert response.status_code == 400, (case, response.status_code, response.text[:300])
        message = v2_error(response, 400)
        assert "Traceback" not in message, case


def test_messages_name_the_problem(app_client, images):
    def message(body) -> str:
        return v2_error(app_client.post(f"/v2/models/{MODEL}/infer", json=body), 400)

    one = pixels_request(images[:1])
    assert "3073 elements" in message({"inputs": [{**one["inputs"][0], "data": one["inputs"][0]["data"] + [1]}]})
    assert f"2..{MAX_MC}" in message({**one, "parameters": {"mc_samples": 0}})
    assert "logits" in message({**one, "outputs": [{"name": "logits"}]})
    assert "base64" in message(bytes_request(["%%%"]))
    assert f"at most {MAX_INSTANCES}" in message(
        {"inputs": [{**one["inputs"][0], "shape": [MAX_INSTANCES + 1, *SHAPE]}]})


def test_malformed_bodies_and_size_limits(app_client, images):
    url = f"/v2/models/{MODEL}/infer"
    assert "JSON" in v2_error(app_client.post(url, content=b"{not json",
                                              headers={"content-type": "application/json"}), 400)
    v2_error(app_client.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    v2_error(app_client.post(url, content=b""), 400)
    big = b'{"inputs": [], "pad": "' + b"x" * MAX_BODY + b'"}'
    assert "limit" in v2_error(app_client.post(url, content=big, headers={"content-type": "application/json"}), 413)
    # tritonclient sends no Content-Type: JSON is assumed
    ok = app_client.post(url, content=json.dumps(pixels_request(images[:1])).encode())
    assert ok.status_code == 200, ok.text


def test_request_id_echo_and_defaults(app_client, images):
    body = pixels_request(images[:3], id="my-request", parameters={"binary_data_output": False, "other": "x"})
    answer = app_client.post(f"/v2/models/{MODEL}/infer", json=body).json()
    assert answer["id"] == "my-request" and answer["model_name"] == MODEL
    assert len(answer["parameters"].pop("prediction_ids").split(",")) == 3   # monitoring's ids, batch order
    assert answer["parameters"] == {"temperature": pytest.approx(answer["parameters"]["temperature"]),
                                    "calibration": "card", "calibration_method": "temperature"}
    (probs,) = answer["outputs"]
    assert probs["name"] == "probabilities" and probs["datatype"] == "FP32" and probs["shape"] == [3, 10]
    np.testing.assert_allclose(np.asarray(probs["data"]).reshape(3, 10).sum(axis=1), 1.0, atol=1e-5)


def test_api_keys_guard_v2_like_v1(service_settings):
    """Without the lifespan (no model loaded): a keyless request is 401, a keyed one reaches the
    route (503 not ready); health stays open. Both errors in the protocol's shape."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    from service.settings import Settings

    app = create_app(Settings(model_dir=service_settings.model_dir, api_keys="k1-secret-key-0123"))
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 503
    assert "API key" in v2_error(client.get(f"/v2/models/{MODEL}"), 401)
    v2_error(client.get("/v2"), 401)
    v2_error(client.post(f"/v2/models/{MODEL}/infer", json={}), 401)
    v2_error(client.get(f"/v2/models/{MODEL}", headers={"Authorization": "Bearer k1-secret-key-0123"}), 503)
    assert client.get("/v1/models", headers={"X-API-Key": "k1-secret-key-0123"}).json()["error"]["code"] == "not_ready"


def test_openapi_documents_v2(app_client):
    doc = app_client.get("/openapi.json").json()
    for path in ["/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
                 "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}",
                 "/v2/models/{name}/versions/{version}/ready", "/v2/models/{name}/versions/{version}/infer"]:
        assert path in doc["paths"], path
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    body = infer["requestBody"]["content"]["application/json"]
    assert body["schema"]["required"] == ["inputs"] and "$defs" not in json.dumps(body["schema"])
    assert infer["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorV2")
    assert infer["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/InferenceResponse")
    example = app_client.post(f"/v2/models/{MODEL}/infer", json=body["example"])  # the documented example works
    assert example.status_code == 200, example.text
    assert [o["name"] for o in example.json()["outputs"]] == ["probabilities", "mutual_information"]
