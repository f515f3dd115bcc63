"""Every command reports an expected error as one line on stderr with exit code 2 (usage) or 1
(runtime), no traceback, and keeps TensorFlow's start-up notices off stderr.

The commands run as a new user runs them (`python -m ...` in a subprocess, no TF_* or CALIB_*
variables set); the error cases exit before TensorFlow is imported, so each takes about a second.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from commandline import (CommandError, UsageError, _stderr_filtered, command,
                          is_tensorflow_noise, one_line)
from training.config import validation_size
from training.data import CIFAR10_CLASSES, DataSourceError

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "shipped" / "cifar10-resnet"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TF_CPP_", "TF_ENABLE_ONEDNN", "CALIB_"))}
    return {**env, **extra}


def run(module: str, *args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(out: subprocess.CompletedProcess, code: int, prog: str, *fragments: str) -> str:
    lines = out.stderr.splitlines()
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == code, out.stderr
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# --- small fake inputs ------------------------------------------------------------------------

def image_tree(root: Path, per_class: int) -> Path:
    """A CIFAR-10 image-folder tree (train/ and test/, all ten classes) of random 32x32 JPEGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


@pytest.fixture
def corrupt_archive(tmp_path) -> Path:
    path = tmp_path / "cifar10.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(200))   # a gzip header, then nothing sensible
    return path


@pytest.fixture
def truncated_artifact(tmp_path) -> Path:
    """A model card whose checksum the (truncated) model file no longer matches."""
    folder = tmp_path / "truncated"
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"PK\x03\x04 first bytes of a zip")
    card = {"name": "truncated", "temperature": 1.5, "model_file": "model.keras",
            "model_sha256": hashlib.sha256(b"the whole file").hexdigest(), "classes": list(CIFAR10_CLASSES),
            "training": {"config": {"data": "keras"}}}
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder


# --- training.train -----------------------------------------------------------------------------

def test_train_missing_data_path(tmp_path):
    out = run("training.train", "--data", tmp_path / "nonexistent", "--output", tmp_path / "out")
    assert_one_line_error(out, 1, "python -m training.train", "does not exist", "nonexistent")
    assert not (tmp_path / "out").exists()


def test_train_corrupt_archive(tmp_path, corrupt_archive):
    out = run("training.train", "--data", corrupt_archive, "--output", tmp_path / "out")
    assert_one_line_error(out, 1, "python -m training.train", "corrupt", "cifar10.tar.gz")


def test_train_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    out = run("training.train", "--data", tmp_path / "empty", "--output", tmp_path / "out")
    assert_one_line_error(out, 1, "python -m training.train", "no .jpg", "empty")


def test_train_data_too_small(tmp_path):
    tree = image_tree(tmp_path / "tiny", per_class=1)    # 10 training images: 10% is 1, too few
    out = run("training.train", "--data", tree, "--output", tmp_path / "out")
    assert_one_line_error(out, 1, "python -m training.train", "data too small", "10 training images")


def test_train_explicit_n_validation_too_large_is_a_usage_error(tmp_path):
    tree = image_tree(tmp_path / "tiny", per_class=2)
    out = run("training.train", "--data", tree, "--output", tmp_path / "out", "--n-validation", "5000")
    assert_one_line_error(out, 2, "python -m training.train", "--n-validation 5000", "has 20")


def test_train_argparse_errors_are_one_line_too(tmp_path):
    out = run("training.train", "--n-validation", "1")
    assert_one_line_error(out, 2, "python -m training.train", "--n-validation must be at least 2", "--help")


def test_train_refuses_an_existing_output_before_training(tmp_path):
    out = run("training.train", "--data", tmp_path / "nonexistent", "--output", tmp_path)
    assert_one_line_error(out, 2, "python -m training.train", "already exists", "--overwrite")


def test_validation_size_defaults_to_ten_percent_of_small_data():
    assert validation_size(None, 50_000) == 5000        # CIFAR-10: the usual 45,000/5,000
    assert validation_size(None, 1000) == 100           # the 2,000-image sample's 1,000 train images
    assert validation_size(200, 1000) == 200
    with pytest.raises(CommandError, match="data too small"):
        validation_size(None, 19)
    with pytest.raises(UsageError, match="--n-validation 1000"):
        validation_size(1000, 1000)


# --- training.evaluate / training.benchmark ------------------------------------------------------

def test_evaluate_missing_artifact(tmp_path):
    tree = image_tree(tmp_path / "tiny", per_class=1)
    out = run("training.evaluate", tmp_path / "nonexistent", "--data", tree)
    assert_one_line_error(out, 1, "python -m training.evaluate", "not an artifact folder")


def test_evaluate_truncated_artifact(truncated_artifact, tmp_path):
    tree = image_tree(tmp_path / "tiny", per_class=1)
    out = run("training.evaluate", truncated_artifact, "--data", tree)
    assert_one_line_error(out, 1, "python -m training.evaluate", "checksum mismatch", "model.keras")


def test_evaluate_model_file_missing(truncated_artifact):
    (truncated_artifact / "model.keras").unlink()
    out = run("training.evaluate", truncated_artifact)
    assert_one_line_error(out, 1, "python -m training.evaluate", "model file missing")


def test_evaluate_corrupt_data(corrupt_archive):
    out = run("training.evaluate", SHIPPED, "--data", corrupt_archive)
    assert_one_line_error(out, 1, "python -m training.evaluate", "corrupt")


@pytest.mark.parametrize("value", ["0", "1.5", "nan"])
def test_evaluate_bad_target_accuracy(value):
    out = run("training.evaluate", SHIPPED, "--target-accuracy", value)
    assert_one_line_error(out, 2, "python -m training.evaluate", "--target-accuracy must be in (0, 1]")


def test_benchmark_truncated_artifact(truncated_artifact):
    out = run("training.benchmark", truncated_artifact)
    assert_one_line_error(out, 1, "python -m training.benchmark", "checksum mismatch")


# --- training.lab ---------------------------------------------------------------------------------

def test_lab_missing_data(tmp_path):
    out = run("training.lab", "dropout", "--data", tmp_path / "nonexistent", "--out", tmp_path / "lab")
    assert_one_line_error(out, 1, "python -m training.lab", "does not exist")


def test_lab_bad_artifact(truncated_artifact, tmp_path):
    out = run("training.lab", "dropout", "--artifact", truncated_artifact, "--out", tmp_path / "lab")
    assert_one_line_error(out, 1, "python -m training.lab", "checksum mismatch")


# --- service and benchmarks.mc_and_http_cost ------------------------------------------------------

def test_service_bad_setting_names_the_variable():
    out = run("service", env=clean_env(CALIB_PORT="99999", CALIB_LOG_LEVEL="loud"))
    line = assert_one_line_error(out, 2, "python -m service", "CALIB_PORT='99999'", "CALIB_LOG_LEVEL='loud'")
    assert "65535" in line


def test_service_missing_model_dir(tmp_path):
    out = run("service", env=clean_env(CALIB_MODEL_DIR=str(tmp_path / "nonexistent")))
    assert_one_line_error(out, 1, "python -m service", "does not exist", "CALIB_MODEL_DIR")


def test_service_benchmark_missing_model_dir(tmp_path):
    out = run("benchmarks.mc_and_http_cost", "--model-dir", tmp_path / "nonexistent")
    assert_one_line_error(out, 1, "python -m benchmarks.mc_and_http_cost", "does not exist")


def test_mlserver_comparison_without_mlserver_or_model(tmp_path):
    out = run("benchmarks.mlserver_comparison", "--mlserver-venv", tmp_path / "no-venv")
    assert_one_line_error(out, 1, "python -m benchmarks.mlserver_comparison", "no MLServer", "--mlserver-venv")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "mlserver").touch()
    out = run("benchmarks.mlserver_comparison", "--mlserver-venv", venv, "--model-dir", tmp_path, "--model", "nope")
    assert_one_line_error(out, 1, "python -m benchmarks.mlserver_comparison", "no model 'nope'")


def test_v2_binary_savings_missing_model(tmp_path):
    out = run("benchmarks.v2_binary_savings", "--model-dir", tmp_path, "--model", "nope")
    assert_one_line_error(out, 1, "python -m benchmarks.v2_binary_savings", "no model 'nope'")


# --- the client -----------------------------------------------------------------------------------

def test_client_unreachable_server():
    out = run("clients", "--url", "http://127.0.0.1:9", "models")
    assert_one_line_error(out, 1, "calib-client", "cannot reach the service at http://127.0.0.1:9")


def test_client_bad_file(tmp_path):
    out = run("clients", "--url", "http://127.0.0.1:9", "--model", "m", "predict", tmp_path / "nope.png")
    assert_one_line_error(out, 1, "calib-client", "No such file", "nope.png")


@pytest.fixture
def error_server():
    """A loopback HTTP server answering every request with the service's 404 error body."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"error": {"code": "unknown_model", "status": 404,
                                         "message": "no model 'nope'\nloaded: cifar10-resnet"}}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_client_http_4xx(error_server):
    out = run("clients", "--url", error_server, "models")
    assert_one_line_error(out, 1, "calib-client", "[unknown_model] (HTTP 404)", "no model 'nope'; loaded")


# --- the shared helper, in process ----------------------------------------------------------------

def test_command_maps_expected_errors_to_exit_codes(capsys):
    def failing(exc):
        @command("prog")
        def main(argv=None):
            raise exc
        return main

    assert failing(UsageError("bad\nflag"))() == 2
    assert capsys.readouterr().err == "prog: error: bad; flag\n"
    assert failing(DataSourceError("no such archive"))() == 1
    assert failing(FileNotFoundError(2, "No such file", "x.png"))() == 1
    assert capsys.readouterr().err.count("prog: error: ") == 2
    with pytest.raises(ZeroDivisionError):   # a bug keeps its traceback
        failing(ZeroDivisionError("bug"))()
    assert one_line("a\n\n  b  \n") == "a; b"


def test_tensorflow_noise_lines_are_recognised():
    preinit = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    info = "I0000 00:00:1796135805.914991    6180 cudart_stub.cc:31] Could not find cuda drivers\n"
    error = "E0000 00:00:1796136384.736874   11132 cuda_platform.cc:52] failed call to cuInit\n"
    assert is_tensorflow_noise(preinit, 3) and is_tensorflow_noise(info, 1) and is_tensorflow_noise(error, 3)
    assert not is_tensorflow_noise(error, 2) and not is_tensorflow_noise(info, 0)
    assert not is_tensorflow_noise("UserWarning: something real\n", 3)


def test_stderr_filter_keeps_what_is_not_noise(capfd):
    with _stderr_filtered(3):
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
                    b"I0000 00:00:1796135805.914530    6180 port.cc:153] oneDNN custom operations are on.\n"
                    b"a real warning\n")
    assert capfd.readouterr().err == "a real warning\n"


# --- TensorFlow's start-up noise on a normal run ------------------------------------------------

def test_a_normal_run_prints_no_tensorflow_noise(tmp_path):
    """The shipped model on ten generated images: TensorFlow is imported and runs, stderr stays empty
    (before: 7 lines of absl/oneDNN/CUDA notices)."""
    tree = image_tree(tmp_path / "tiny", per_class=1)
    out = run("training.evaluate", SHIPPED, "--data", tree, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ece" in out.stdout
    assert out.stderr == ""
