"""`python -m benchmarks.dashboard_screenshot`: docs/dashboard.png, the /ui dashboard in headless
Chromium on a real `python -m service` process with the shipped models.

It fits one calibration profile through the API (temperature, on the labelled images of --data,
by default the repository's fixture: CIFAR-10's test split when --data is a CIFAR-10 folder),
opens /ui, uploads the same images as an .npz to the evaluate form, waits for the report and
both reliability diagrams, and saves a full-page screenshot. Needs the dev extra (selenium) and
Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import headless_chromium
from benchmarks.server_process import ServerProcess
from commandline import ArgumentParser, UsageError, command, invoked_as, setup_tensorflow

PROG = invoked_as("benchmarks.dashboard_screenshot")
REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "cifar10-fixture"
WAIT_S = 300


def labelled_npz(data: Path, n: int) -> tuple[bytes, int]:
    from training.data import load_cifar10

    d = load_cifar10(str(data))
    rng = np.random.default_rng(0)
    index = np.sort(rng.permutation(len(d.y_test))[:n])
    buf = io.BytesIO()
    np.savez(buf, x=d.x_test[index], y=d.y_test[index])
    return buf.getvalue(), len(index)


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    setup_tensorflow()
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "shipped")
    parser.add_argument("--model", default="cifar10-augmix", help="the model the page shows (default cifar10-augmix)")
    parser.add_argument("--data", type=Path, default=FIXTURE, help="a CIFAR-10 image folder or archive "
                                                                   "(default: the repository's fixture)")
    parser.add_argument("--images", type=int, default=1000, help="labelled test images to use (at most)")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args(argv)
    problem = headless_chromium.missing()
    if problem:
        raise UsageError(problem)
    import httpx
    from selenium.webdriver.support.ui import Select, WebDriverWait

    body, n = labelled_npz(args.data, args.images)
    with tempfile.TemporaryDirectory() as tmp, \
            ServerProcess(args.model_dir, data_dir=tmp, default_model=args.model, log_level="warning") as server:
        upload = Path(tmp) / f"labelled-{n}.npz"
        upload.write_bytes(body)
        r = httpx.post(f"{server.url}/v1/models/{args.model}/calibrations",
                       params={"method": "temperature", "label": f"{args.data.name}, {n} images"},
                       files={"file": (upload.name, body)}, timeout=WAIT_S)
        r.raise_for_status()
        profile = r.json()["id"]
        serve_with_feedback(server.url, args.model, body)
        driver = headless_chromium.chromium(args.width, 1000)
        try:
            wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.3)
            driver.get(f"{server.url}/ui")
            wait.until(lambda d: profile in d.find_element("id", "profiles-table").text)
            Select(driver.find_element("id", "model-select")).select_by_value(args.model)
            loaded = ("return (i => !i.hidden && i.complete && i.naturalWidth > 0)"
                      "(document.getElementById(arguments[0]))")
            wait.until(lambda d: d.execute_script(loaded, "card-diagram"))
            wait.until(lambda d: d.find_elements("css selector", "#timeline svg"))
            driver.find_element("id", "evaluate-file").send_keys(str(upload))
            driver.find_element("id", "evaluate-fit").click()
            driver.find_element("id", "evaluate-submit").click()
            wait.until(lambda d: d.execute_script(loaded, "evaluate-diagram"))
            png = headless_chromium.full_page_png(driver)
        finally:
            driver.quit()
    args.output.write_bytes(png)
    print(f"{args.output}: {len(png):,} bytes ({args.model}, {n} images of {args.data})")
    return 0


def serve_with_feedback(url: str, model: str, npz_body: bytes, batch: int = 100, share: float = 0.5) -> None:
    """Predict the labelled images in batches and send the labels of `share` of them back, so the
    monitoring panel has a window and a timeline with observed accuracy to show."""
    import io

    import httpx
    import numpy as np

    with np.load(io.BytesIO(npz_body)) as npz:
        x, y = npz["x"], npz["y"]
    rng = np.random.default_rng(0)
    for start in range(0, len(x), batch):
        r = httpx.post(f"{url}/v1/models/{model}/predict", params={"mc_samples": 0},
                       json={"instances": x[start:start + batch].tolist()}, timeout=WAIT_S)
        r.raise_for_status()
        ids = [p["prediction_id"] for p in r.json()["predictions"]]
        chosen = [i for i in range(len(ids)) if rng.random() < share]
        if chosen:
            httpx.post(f"{url}/v1/feedback", timeout=WAIT_S, json={"feedback": [
                {"prediction_id": ids[i], "label": int(y[start + i])} for i in chosen]}).raise_for_status()


if __name__ == "__main__":
    raise SystemExit(main())
