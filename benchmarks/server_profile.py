"""`python -m benchmarks.server_profile`: where the server process spends its time under load.

Starts the service (LiteRT runtime, the shipped default model), drives `/v2/models/{name}/infer`
with `wrk` (one-image JSON bodies, as `benchmarks.mlserver_comparison` sends them) and samples the
server with `py-spy record --format raw` meanwhile. Each sample goes under the innermost frame that
matches a category (the model's threads, the HTTP framework's layers, our own routes), so the table
says which part of a request holds the CPU: with `--gil`, only samples where the thread holds the
GIL, which is what serialises the Python side of a 2-core server. Prints, never asserts.

Needs `py-spy` (the `dev` extra) and permission to trace the child process (root, or
`kernel.yama.ptrace_scope` 0).
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from benchmarks import wrk
from benchmarks.mlserver_comparison import infer_body, one_image
from benchmarks.server_process import ServerProcess
from commandline import ArgumentParser, CommandError, command, invoked_as

PROG = invoked_as("benchmarks.server_profile")

# (category, substrings of "function (file)"), tried from the innermost frame outwards; the first
# frame that matches any category names the sample. Order matters only within one frame.
CATEGORIES = (
    ("LiteRT backbone", ("litert_classifier", "interpreter.py", "_pywrap_tensorflow_interpreter")),
    ("MC dropout, head, softmax (NumPy)", ("service/dataplane.py", "models/inference.py",
                                           "models/calibration/")),
    ("micro-batcher", ("service/batching.py",)),
    ("monitoring record and writer", ("service/monitoring", "service/rest/monitoring.py", "service/storage/")),
    ("request parsing (JSON, tensors)", ("json/decoder.py", "json/__init__.py", "service/v2_tensors.py",
                                         "service/inputs.py", "service/v2_binary.py", "pydantic")),
    ("our routes (/v2, /v1)", ("service/rest/v2.py", "service/rest/models.py", "service/rest/requests.py",
                               "service/rest/calibrations.py")),
    ("middlewares (own code)", ("service/rest/request_id.py", "service/rest/limits.py",
                                "service/rest/admission_middleware.py", "service/rest/served_by.py",
                                "service/admission_limits.py", "service/http_metrics.py")),
    ("prometheus-client metrics", ("prometheus_client",)),
    ("FastAPI routing and dependencies", ("fastapi/",)),
    ("Starlette", ("starlette/",)),
    ("h11 (HTTP parsing and writing)", ("h11/", "uvicorn/protocols")),
    ("thread hand-off (anyio, executor, locks)", ("anyio/", "concurrent/futures", "threading.py", "queue.py")),
    ("asyncio event loop", ("asyncio/",)),
)
OTHER = "other"


def categorize(stack: str) -> str:
    """The category of one raw py-spy stack ("outer;...;inner"), innermost match first."""
    for frame in reversed(stack.split(";")):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return OTHER


def tally(raw: str) -> collections.Counter:
    """Samples per category from py-spy's raw (collapsed-stack) output: "stack count" lines."""
    counts: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[categorize(stack)] += int(n)
    return counts


def py_spy_path() -> str:
    """py-spy beside this Python (a venv not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise CommandError("py-spy is not installed (pip install py-spy; it is in the dev extra)")
    return found


def profile(py_spy: str, pid: int, seconds: float, rate: int, gil: bool, out: Path) -> str:
    cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
           "--format", "raw", "--output", str(out), "--nonblocking", "--subprocesses"]
    if gil:
        cmd.append("--gil")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        raise CommandError(f"py-spy failed: {done.stderr.strip()[-400:]}")
    return out.read_text()


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    from service.settings import DEFAULT_MODEL_DIR

    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--model", default="cifar10-augmix")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=12, help="sampling time (wrk runs 4 s longer)")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--all-threads", action="store_true", help="every sample, not only those holding the GIL")
    args = p.parse_args(argv)
    if not wrk.available():
        raise CommandError("wrk is not installed (apt-get install wrk)")
    py_spy = py_spy_path()
    body = infer_body(one_image())
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(args.model_dir, ready_timeout=900,
                                                             runtime="litert") as server:
        url = f"{server.url}/v2/models/{args.model}/infer"
        wrk.run(url, body, connections=args.clients, duration_s=2)   # warm-up
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(
            wrk.run(url, body, connections=args.clients, duration_s=args.seconds + 4)))
        load.start()
        raw = profile(py_spy, server.pid, args.seconds, args.rate, not args.all_threads, Path(tmp) / "raw.txt")
        load.join()
    counts = tally(raw)
    total = sum(counts.values())
    what = "samples with the GIL held" if not args.all_threads else "samples of all threads"
    print(f"py-spy, {args.seconds:g} s at {args.rate} Hz, {args.clients} clients (wrk) on /v2 infer, one image, "
          f"no MC, LiteRT: {total} {what}; wrk {result.get('req_s', float('nan')):.1f} req/s")
    for name, n in counts.most_common():
        print(f"  {n:6d}  {100 * n / max(total, 1):5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
