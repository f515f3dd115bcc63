"""`python -m benchmarks.v2_binary_savings`: what Triton's binary tensor data extension saves on
/v2 infer against JSON tensors, for one batch of `--batch` images.

A real server on loopback; `tritonclient[http]` sends the same UINT8 batch and asks for
`probabilities` (and with `--mc-samples` the MC outputs too), once as JSON both ways
(`binary_data=False`) and once binary both ways (tritonclient's defaults). Printed per mode: request
and response body bytes and the median client-side time over `--repeats` calls, then the ratios.
The answers are checked to be equal. Prints, never asserts.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.server_process import ServerError, ServerProcess
from commandline import ArgumentParser, CommandError, command, invoked_as

PROG = invoked_as("benchmarks.v2_binary_savings")
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "cifar10-fixture"
MC_OUTPUTS = ["mc_mean", "mc_variance", "predictive_entropy", "expected_entropy", "mutual_information"]


def images(n: int) -> np.ndarray:
    from PIL import Image

    paths = sorted((SAMPLE / "test").rglob("*.jpg"))[:n]
    return np.stack([np.asarray(Image.open(p).convert("RGB"), np.uint8) for p in paths])


class _Recorder:
    """Wraps tritonclient's HTTP client to record the bytes of the last request and response."""

    def __init__(self, client):
        self.client, self.sent, self.received = client, 0, 0
        post = client._post

        def recording_post(request_uri, request_body, headers, query_params):
            response = post(request_uri, request_body, headers, query_params)
            self.sent = len(request_body)
            body = response.read()
            self.received = len(body)
            response.read = lambda length=-1, _body=body, _pos=[0]: _read(_body, _pos, length)
            return response

        client._post = recording_post


def _read(body: bytes, pos: list[int], length: int) -> bytes:
    start = pos[0]
    pos[0] = len(body) if length == -1 else start + length
    return body[start:pos[0]]


def infer_once(client, model: str, x: np.ndarray, binary: bool, outputs: list[str], parameters: dict):
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("images", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x, binary_data=binary)
    requested = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return client.infer(model, [tensor], outputs=requested, parameters=parameters or None)


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    from service.settings import DEFAULT_MODEL_DIR

    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--model", default="cifar10-augmix")
    p.add_argument("--runtime", choices=("auto", "keras", "litert"), default="litert")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mc-samples", type=int, default=0, help="also ask for the MC outputs (T), 0: no MC")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if not (args.model_dir / args.model).is_dir():
        raise CommandError(f"no model {args.model!r} in {args.model_dir}")
    try:
        import tritonclient.http as httpclient
    except ImportError:
        raise CommandError("tritonclient is not installed (pip install 'tritonclient[http]')") from None

    x = images(args.batch)
    outputs = ["probabilities", *(MC_OUTPUTS if args.mc_samples else [])]
    parameters = {"mc_samples": args.mc_samples, "seed": 0} if args.mc_samples else {}
    results, answers = {}, {}
    try:
        with ServerProcess(args.model_dir, ready_timeout=900, runtime=args.runtime,
                           max_instances=max(args.batch, 64)) as server:
            client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=300)
            recorder = _Recorder(client)
            for binary in (False, True):   # warm-up: both paths, every output
                infer_once(client, args.model, x, binary, outputs, parameters)
            times = {False: [], True: []}
            for _ in range(args.repeats):   # alternate, so drift in machine load hits both alike
                for binary in (False, True):
                    start = time.perf_counter()
                    result = infer_once(client, args.model, x, binary, outputs, parameters)
                    times[binary].append(time.perf_counter() - start)
                    answers[binary] = {name: result.as_numpy(name) for name in outputs}
                    results[binary] = (recorder.sent, recorder.received)
            client.close()
    except ServerError as exc:
        raise CommandError(exc) from None
    for name in outputs:
        if not np.array_equal(answers[False][name], answers[True][name]):
            raise CommandError(f"binary and JSON answers differ for {name!r}")
    print(f"model {args.model}, runtime {args.runtime}, batch of {args.batch} UINT8 images, outputs {outputs}, "
          f"{args.repeats} calls each (median), tritonclient[http] on loopback; answers equal")
    for binary, label in ((False, "JSON"), (True, "binary")):
        sent, received = results[binary]
        print(f"  {label:<7} request {sent:>9,} B   response {received:>7,} B   "
              f"{1e3 * statistics.median(times[binary]):7.1f} ms")
    (js, jr), (bs, br) = results[False], results[True]
    tj, tb = statistics.median(times[False]), statistics.median(times[True])
    print(f"  binary / JSON: request {bs / js:.2f}x ({js - bs:,} B saved), response {br / jr:.2f}x "
          f"({jr - br:,} B saved), time {tb / tj:.2f}x ({1e3 * (tj - tb):.1f} ms saved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
