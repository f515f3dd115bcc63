"""Debian's `wrk` as the load generator: one fixed POST body, results as a dict.

Why: a Python load generator on the same 2 cores took ~0.4 cores at ~45 req/s and capped what
could be measured; wrk (C, epoll) sends the same keep-alive requests for a fraction of that. The
body is read from a file by a Lua script (`WRK_SCRIPT`), whose `done` hook prints the figures as
one JSON line. `run` reports wrk's own CPU time (this process's children) beside the figures.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

WRK_SCRIPT = r"""
-- POST one fixed body; the body file and the content type come from the environment
local f = assert(io.open(os.getenv("WRK_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE") or "application/json"
local extra = os.getenv("WRK_HEADER")   -- "Name: value", optional
if extra and extra ~= "" then
  local name, value = extra:match("^([^:]+):%s*(.*)$")
  wrk.headers[name] = value
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "status_errors": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "timeouts": %d, "mean_us": %.1f, "p50_us": %d, ' ..
    '"p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


class WrkError(RuntimeError):
    """wrk is missing, failed, or saw failed requests."""


def available() -> bool:
    return shutil.which("wrk") is not None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(url: str, body: bytes, *, connections: int, duration_s: float, threads: int | None = None,
        content_type: str = "application/json", header: str | None = None, timeout_s: float = 30) -> dict:
    """POST `body` to `url` from `connections` keep-alive connections for `duration_s` seconds.

    Returns requests, req_s, p50/p90/p99/mean latency in ms, errors and wrk's CPU in cores;
    raises WrkError if any request failed (non-2xx/3xx, connect, read, write or timeout)."""
    if not available():
        raise WrkError("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    threads = max(1, min(threads or 2, connections))
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        script, body_file = Path(tmp) / "post.lua", Path(tmp) / "body"
        script.write_text(WRK_SCRIPT)
        body_file.write_bytes(body)
        env = {**os.environ, "WRK_BODY_FILE": str(body_file), "WRK_CONTENT_TYPE": content_type,
               "WRK_HEADER": header or ""}
        cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
               f"--timeout={max(1, round(timeout_s))}s", "-s", str(script), url]
        cpu0 = _children_cpu()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration_s + timeout_s + 60)
        cpu = _children_cpu() - cpu0
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        raise WrkError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    r = json.loads(line)
    errors = {k: r[k] for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts") if r[k]}
    if errors:
        raise WrkError(f"{url}: failed requests {errors} of {r['requests']}")
    seconds = r["duration_us"] / 1e6
    return {"requests": r["requests"], "seconds": seconds, "req_s": r["requests"] / seconds,
            "p50_ms": r["p50_us"] / 1e3, "p90_ms": r["p90_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3,
            "mean_ms": r["mean_us"] / 1e3, "max_ms": r["max_us"] / 1e3, "wrk_cpu": cpu / seconds}
