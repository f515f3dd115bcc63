"""Predict micro-batching: concurrent requests share backbone passes and get the numbers they
would get alone; big requests bypass it; wait 0 turns it off; failures and cancelled clients
stay contained; shutdown leaves nothing running. Also the lifespan's GC freeze.

Apps run in-process on their own event loop (httpx.AsyncClient over the ASGI transport, lifespan
entered by hand) and share one registry, loaded once for the module, so each test is quick.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest

from tests.service_helpers import MAX_BODY, MAX_EVAL, MAX_INSTANCES, MAX_MC, MODEL, error_of

PREDICT = f"/v1/models/{MODEL}/predict"
N_CLIENTS = 16
T = 30
# A backbone pass on one image may take a different float32 kernel than a pass on several, so
# an image's features agree to float32 rounding, not bit for bit (measured: 1.1e-5 on features of
# magnitude 61 for the tiny model, 4e-6 on magnitude 8 for the shipped one): 1e-6 of the scale.
FEATURE_RTOL_OF_SCALE = 1e-6
PROB_ATOL = 1e-5


def assert_features_close(actual, expected):
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=0, atol=FEATURE_RTOL_OF_SCALE * scale)


@pytest.fixture(scope="module")
def registry(service_model_dir):
    from service.registry import load_registry

    return load_registry(service_model_dir, warmup=True)


@pytest.fixture(scope="module")
def model(registry):
    return registry.get(MODEL)


@pytest.fixture(scope="module")
def images(sample_data):
    return sample_data.x_test[:N_CLIENTS * 2:2].copy()  # 16 distinct images


@pytest.fixture
def shared_registry(registry, monkeypatch):
    """Apps built in this test reuse the module's registry instead of loading it again."""
    import service.app

    monkeypatch.setattr(service.app, "load_registry", lambda *a, **k: registry)
    return registry


@pytest.fixture
def backbone_spy(model, monkeypatch):
    """Records every backbone call: (images in, features out)."""
    clf = model.classifier
    real = clf.features
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    lock = threading.Lock()

    def spy(x, batch_size=500):
        out = real(x, batch_size)
        with lock:
            calls.append((np.array(x), out))
        return out

    monkeypatch.setattr(clf, "features", spy)
    return calls


def settings(service_model_dir, **overrides):
    from service.settings import Settings

    base = dict(model_dir=service_model_dir, max_body_bytes=MAX_BODY, max_instances=MAX_INSTANCES,
                max_eval_images=MAX_EVAL, max_mc_samples=MAX_MC, eval_chunk=128, mc_chunk_rows=1000,
                gc_freeze=False)
    return Settings(**{**base, **overrides})


@contextlib.asynccontextmanager
async def running_app(s):
    import httpx

    from service.app import create_app

    app = create_app(s)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield app, client


async def post_each(client, images, seeds, *, concurrent: bool, mc_samples: int = T):
    async def one(img, seed):
        r = await client.post(PREDICT, json={"instances": [img.tolist()]},
                              params={"mc_samples": mc_samples, "seed": seed, "return_logits": True})
        return r

    if concurrent:
        return await asyncio.gather(*[one(img, s) for img, s in zip(images, seeds)])
    return [await one(img, s) for img, s in zip(images, seeds)]


def rows(responses):
    out = []
    for r in responses:
        assert r.status_code == 200, r.text[:300]
        body = r.json()
        assert len(body["predictions"]) == 1
        out.append(body)
    return out


def assert_same_predictions(a: dict, b: dict, atol: float) -> None:
    assert a["seed"] == b["seed"] and a["mc_samples"] == b["mc_samples"]
    pa, pb = a["predictions"][0], b["predictions"][0]
    assert pa["class_index"] == pb["class_index"]
    for key in ("probabilities", "logits", "uncalibrated_probabilities"):
        np.testing.assert_allclose(pa[key], pb[key], rtol=0, atol=atol)
    ua, ub = pa["uncertainty"], pb["uncertainty"]
    for key in ("mean", "variance", "predictive_entropy", "expected_entropy", "mutual_information"):
        np.testing.assert_allclose(ua[key], ub[key], rtol=0, atol=atol)


# --- the numbers ---------------------------------------------------------------------------------------
def test_backbone_features_alone_and_in_a_batch_agree(model, images):
    clf = model.classifier
    together = clf.features(images)
    alone = np.concatenate([clf.features(images[i:i + 1]) for i in range(len(images))])
    pairs = np.concatenate([clf.features(images[i:i + 2]) for i in range(0, len(images), 2)])
    assert np.abs(together).max() > 0.1
    assert_features_close(alone, together)
    assert_features_close(pairs, together)
    np.testing.assert_array_equal(clf.features(images), together)  # and it is deterministic


def test_dataplane_with_precomputed_features_is_bit_identical(model, images):
    """MC depends only on the features and the seed: handing `predict` the features changes nothing."""
    from service import dataplane

    x = images[:3]
    direct = dataplane.predict(model, x, mc_samples=T, seed=11, mc_chunk_rows=1000)
    given = dataplane.predict(model, x, mc_samples=T, seed=11, mc_chunk_rows=1000,
                              features=model.classifier.features(x))
    for attr in ("logits", "probabilities", "uncalibrated"):
        np.testing.assert_array_equal(getattr(direct, attr), getattr(given, attr))
    for attr in ("mean", "variance", "predictive_entropy", "expected_entropy", "mutual_information"):
        np.testing.assert_array_equal(getattr(direct.mc, attr), getattr(given.mc, attr))
    with pytest.raises(ValueError, match="feature rows"):
        dataplane.predict(model, x, mc_samples=0, seed=None, features=model.classifier.features(x[:2]))


def test_concurrent_requests_share_passes_and_match_sequential(service_model_dir, shared_registry, model,
                                                               images, backbone_spy):
    """16 one-image requests at once: a few backbone passes, and per request the numbers of the
    unbatched path (same seed) up to backbone rounding, and exactly those of its own rows of the
    pass's features and head logits."""
    from service import dataplane

    seeds = [1000 + i for i in range(len(images))]

    async def scenario():
        async with running_app(settings(service_model_dir, batch_wait_ms=150, batch_max_images=64)) as (app, client):
            assert app.state.predictor.batcher(MODEL).running
            concurrent = rows(await post_each(client, images, seeds, concurrent=True))
            metrics = (await client.get("/metrics")).text
        batched_calls = list(backbone_spy)
        async with running_app(settings(service_model_dir, batch_wait_ms=0)) as (_, client):
            sequential = rows(await post_each(client, images, seeds, concurrent=False))
        return concurrent, sequential, metrics, batched_calls

    concurrent, sequential, metrics, batched_calls = asyncio.run(scenario())

    assert sum(len(x) for x, _ in batched_calls) == len(images)
    assert 1 <= len(batched_calls) <= 4, [len(x) for x, _ in batched_calls]  # far fewer than 16
    assert max(len(x) for x, _ in batched_calls) >= 4
    assert f'calib_predict_batch_images_count{{model="{MODEL}"}} {float(len(batched_calls))}' in metrics
    assert f'calib_predict_batch_images_sum{{model="{MODEL}"}} {float(len(images))}' in metrics

    for i, (c, s) in enumerate(zip(concurrent, sequential)):
        assert c["seed"] == s["seed"] == seeds[i]
        assert_same_predictions(c, s, PROB_ATOL)
        # exactly what the dataplane gives for this image's rows of the shared pass
        x_batch, f_batch = next((x, f) for x, f in batched_calls if (x == images[i]).all(axis=(1, 2, 3)).any())
        row = int(np.flatnonzero((x_batch == images[i]).all(axis=(1, 2, 3)))[0])
        ref = dataplane.predict(model, images[i:i + 1], mc_samples=T, seed=seeds[i], mc_chunk_rows=1000,
                                features=f_batch[row:row + 1],
                                logits=model.classifier.head_logits(f_batch)[row:row + 1])
        got = c["predictions"][0]
        assert got["probabilities"] == ref.probabilities[0].tolist()
        assert got["uncertainty"]["mean"] == ref.mc.mean[0].tolist()
        assert got["uncertainty"]["variance"] == ref.mc.variance[0].tolist()
        assert got["uncertainty"]["mutual_information"] == float(ref.mc.mutual_information[0])


def test_large_requests_bypass_the_batcher(service_model_dir, shared_registry, model, images, backbone_spy):
    from service import dataplane

    async def scenario():
        async with running_app(settings(service_model_dir, batch_wait_ms=50, batch_max_images=4)) as (app, client):
            big = await client.post(PREDICT, json={"instances": images[:10].tolist()},
                                    params={"mc_samples": T, "seed": 5})
            small = await client.post(PREDICT, json={"instances": images[:4].tolist()},
                                      params={"mc_samples": T, "seed": 5})
            return big, small

    big, small = asyncio.run(scenario())
    assert big.status_code == 200 and small.status_code == 200
    assert [len(x) for x, _ in backbone_spy] == [10, 4]  # both whole: no splitting into batches of 4
    ref = dataplane.predict(model, images[:10], mc_samples=T, seed=5, mc_chunk_rows=1000)
    preds = big.json()["predictions"]
    assert len(preds) == 10
    np.testing.assert_array_equal([p["probabilities"] for p in preds], ref.probabilities)
    np.testing.assert_array_equal([p["uncertainty"]["mean"] for p in preds], ref.mc.mean)
    np.testing.assert_allclose([p["probabilities"] for p in small.json()["predictions"]],
                               ref.probabilities[:4], rtol=0, atol=PROB_ATOL)


def test_wait_zero_disables_batching(service_model_dir, shared_registry, images, backbone_spy):
    async def scenario():
        async with running_app(settings(service_model_dir, batch_wait_ms=0)) as (app, client):
            predictor = app.state.predictor
            assert not predictor.enabled and predictor.batcher(MODEL) is None
            tasks = {t.get_name() for t in asyncio.all_tasks()}
            assert not any("micro-batcher" in name for name in tasks)
            return rows(await post_each(client, images[:8], range(8), concurrent=True))

    assert len(asyncio.run(scenario())) == 8
    assert [len(x) for x, _ in backbone_spy] == [1] * 8


# --- failures, cancellation, shutdown ----------------------------------------------------------------
def test_forward_failure_is_a_500_for_every_request_and_the_batcher_survives(
        service_model_dir, shared_registry, model, images, monkeypatch):
    clf = model.classifier
    real = clf.features
    fail = {"on": True}

    def flaky(x, batch_size=500):
        if fail["on"]:
            raise RuntimeError("backbone exploded")
        return real(x, batch_size)

    monkeypatch.setattr(clf, "features", flaky)

    async def scenario():
        async with running_app(settings(service_model_dir, batch_wait_ms=100)) as (_, client):
            failed = await post_each(client, images[:4], range(4), concurrent=True)
            fail["on"] = False
            ok = await post_each(client, images[:4], range(4), concurrent=True)
            return failed, ok

    failed, ok = asyncio.run(scenario())
    for r in failed:
        msg = error_of(r, 500, "internal_error")
        assert "BatchForwardError" in msg and "exploded" not in msg
    assert [r.status_code for r in ok] == [200] * 4


def test_cancelled_client_does_not_break_the_batcher(model, images):
    from concurrent.futures import ThreadPoolExecutor

    from service.batching import MicroBatcher

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            batcher = MicroBatcher(model, pool, max_images=8, wait_seconds=0.1)
            batcher.start()
            try:
                tasks = [asyncio.create_task(batcher.features(images[i:i + 1])) for i in range(4)]
                await asyncio.sleep(0.01)  # all queued, batch still open
                tasks[1].cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                after = await batcher.features(images[5:7])
                return results, after
            finally:
                await batcher.aclose()

    results, after = asyncio.run(scenario())
    assert isinstance(results[1], asyncio.CancelledError)
    for i in (0, 2, 3):
        assert_features_close(results[i], model.classifier.features(images[i:i + 1]))
    assert_features_close(after, model.classifier.features(images[5:7]))


def gated_features(clf):
    """(real, gated, entered, release): `gated` stands in for `clf.features`; a pass sets `entered`
    and then waits for `release`, so a test can queue requests while a pass runs."""
    real = clf.features
    entered, release = threading.Event(), threading.Event()

    def gated(x, batch_size=500):
        entered.set()
        release.wait(20)
        return real(x, batch_size)

    return real, gated, entered, release


def test_client_cancelled_during_the_forward_pass(model, images, monkeypatch):
    """The pass goes on for the others; the cancelled entry is skipped, not resolved twice."""
    from concurrent.futures import ThreadPoolExecutor

    from service.batching import MicroBatcher

    clf = model.classifier
    real, slow, entered, release = gated_features(clf)
    monkeypatch.setattr(clf, "features", slow)

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            batcher = MicroBatcher(model, pool, max_images=8, wait_seconds=0.01)
            batcher.start()
            try:
                tasks = [asyncio.create_task(batcher.features(images[i:i + 1])) for i in range(3)]
                assert await asyncio.to_thread(entered.wait, 20)
                tasks[0].cancel()
                await asyncio.sleep(0)
                release.set()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                monkeypatch.setattr(clf, "features", real)
                return results, await batcher.features(images[3:4]), batcher.running
            finally:
                release.set()
                await batcher.aclose()

    results, after, running = asyncio.run(scenario())
    assert isinstance(results[0], asyncio.CancelledError) and running
    for i in (1, 2):
        assert_features_close(results[i], real(images[i:i + 1]))
    assert_features_close(after, real(images[3:4]))


def test_requests_beyond_max_images_wait_for_the_next_batch(model, images):
    from concurrent.futures import ThreadPoolExecutor

    from service.batching import MicroBatcher

    sizes = []

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            batcher = MicroBatcher(model, pool, max_images=5, wait_seconds=0.2,
                                   observer=lambda name, n, k: sizes.append((n, k)))
            batcher.start()
            try:
                parts = [images[0:2], images[2:5], images[5:8], images[8:9]]  # 2+3 | 3+1
                return await asyncio.gather(*[batcher.features(p) for p in parts])
            finally:
                await batcher.aclose()

    results = asyncio.run(scenario())
    assert sizes == [(5, 2), (4, 2)]
    for got, part in zip(results, [images[0:2], images[2:5], images[5:8], images[8:9]]):
        assert got.shape[0] == len(part)
        assert_features_close(got, model.classifier.features(part))


def test_shutdown_leaves_no_pending_tasks(service_model_dir, shared_registry, images, recwarn, caplog):
    async def scenario():
        async with running_app(settings(service_model_dir, batch_wait_ms=5)) as (app, client):
            rows(await post_each(client, images[:4], range(4), concurrent=True))
            batcher = app.state.predictor.batcher(MODEL)
            worker = batcher._worker
            assert worker is not None and not worker.done()
            # a request still queued at shutdown is cancelled, not left hanging
            stuck = asyncio.create_task(batcher.features(images[:1]))
            await asyncio.sleep(0)
        assert worker.done() and not batcher.running
        await asyncio.sleep(0)
        assert stuck.done()
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return leftover

    assert asyncio.run(scenario()) == []
    assert not [w for w in recwarn.list if issubclass(w.category, (RuntimeWarning, ResourceWarning))]
    assert "was destroyed but it is pending" not in caplog.text
    assert "exception was never retrieved" not in caplog.text


def test_lifespan_freezes_the_loaded_models_out_of_the_gc_and_unfreezes_at_shutdown(
        service_model_dir, shared_registry, images):
    import gc

    async def scenario():
        async with running_app(settings(service_model_dir, gc_freeze=True)) as (_, client):
            frozen = gc.get_freeze_count()
            rows(await post_each(client, images[:2], range(2), concurrent=True))
        return frozen

    gc.unfreeze()
    assert asyncio.run(scenario()) > 10_000  # TensorFlow, Keras and the model's objects
    assert gc.get_freeze_count() == 0


# --- the continuous policy and the per-stage profile --------------------------------------------------
def test_continuous_policy_never_waits_and_batches_what_queued_during_a_pass(model, images, monkeypatch):
    """A lone request goes at once (the 10 s window is not used); requests that arrive while a
    pass runs form the next batch together."""
    from concurrent.futures import ThreadPoolExecutor

    from service.batching import MicroBatcher

    clf = model.classifier
    real, gated, entered, release = gated_features(clf)
    sizes = []

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            batcher = MicroBatcher(model, pool, max_images=8, wait_seconds=10.0, continuous=True,
                                   observer=lambda name, n, k: sizes.append((n, k)))
            batcher.start()
            try:
                loop = asyncio.get_running_loop()
                start = loop.time()
                alone = await batcher.features(images[:1])
                alone_s = loop.time() - start
                monkeypatch.setattr(clf, "features", gated)
                first = asyncio.create_task(batcher.features(images[1:2]))
                assert await asyncio.to_thread(entered.wait, 20)  # the pass of `first` runs ...
                rest = [asyncio.create_task(batcher.features(images[i:i + 1])) for i in range(2, 5)]
                await asyncio.sleep(0.05)  # ... while three more queue up
                release.set()
                return alone, alone_s, await first, await asyncio.gather(*rest)
            finally:
                release.set()
                await batcher.aclose()

    alone, alone_s, first, rest = asyncio.run(scenario())
    assert alone_s < 5  # far below the 10 s window
    assert sizes == [(1, 1), (1, 1), (3, 3)]
    assert_features_close(alone, real(images[:1]))
    assert_features_close(first, real(images[1:2]))
    for i, got in zip(range(2, 5), rest):
        assert_features_close(got, real(images[i:i + 1]))


def test_unknown_batch_policy_is_refused(model):
    from concurrent.futures import ThreadPoolExecutor

    from service.batching import BatchedPredictor

    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="batch policy"):
        BatchedPredictor([model], pool, max_images=4, wait_ms=2, policy="greedy")


@pytest.mark.parametrize("policy", ["window", "continuous"])
def test_predict_stage_profile_is_in_the_metrics(service_model_dir, shared_registry, images, policy):
    """Each stage of a batched one-image predict is observed once; their sum fits in the request."""
    from prometheus_client.parser import text_string_to_metric_families

    async def scenario():
        async with running_app(settings(service_model_dir, batch_wait_ms=5, batch_policy=policy)) as (_, client):
            rows(await post_each(client, images[:1], [3], concurrent=False))
            return (await client.get("/metrics")).text

    samples = {(s.name, s.labels.get("stage")): s.value
               for f in text_string_to_metric_families(asyncio.run(scenario())) for s in f.samples
               if s.name.startswith(("calib_predict_stage_seconds", "calib_http_request_duration_seconds"))
               and s.labels.get("model") == MODEL}
    stages = ["read_body", "decode", "batch_queue", "backbone", "wakeup", "head_mc", "respond"]
    for stage in stages:
        assert samples[("calib_predict_stage_seconds_count", stage)] == 1.0, stage
        assert samples[("calib_predict_stage_seconds_sum", stage)] >= 0.0
    assert ("calib_predict_stage_seconds_count", "unbatched") not in samples
    total = samples[("calib_http_request_duration_seconds_sum", None)]
    assert 0 < sum(samples[("calib_predict_stage_seconds_sum", s)] for s in stages) <= total


# --- dispatch at once, and MC dropout drawn once per micro-batch -----------------------------------
@contextlib.asynccontextmanager
async def started_batcher(model, **kwargs):
    """A running MicroBatcher on a 2-thread executor; closed (and the executor shut down) after."""
    from concurrent.futures import ThreadPoolExecutor

    from service.batching import MicroBatcher

    with ThreadPoolExecutor(2) as pool:
        batcher = MicroBatcher(model, pool, **kwargs)
        batcher.start()
        try:
            yield batcher
        finally:
            await batcher.aclose()


def test_window_dispatches_a_lone_request_at_once_and_waits_only_when_others_queue(model, images, monkeypatch):
    """With a 10 s window a lone request still goes at once; requests queued behind a running pass
    form the next batch (it closes when full, not after the window)."""
    clf = model.classifier
    real, gated, entered, release = gated_features(clf)
    sizes = []

    async def scenario():
        try:
            async with started_batcher(model, max_images=3, wait_seconds=10.0,
                                       observer=lambda name, n, k: sizes.append((n, k))) as batcher:
                loop = asyncio.get_running_loop()
                start = loop.time()
                await batcher.features(images[:1])
                alone_s = loop.time() - start
                monkeypatch.setattr(clf, "features", gated)
                first = asyncio.create_task(batcher.features(images[1:2]))
                assert await asyncio.to_thread(entered.wait, 20)
                rest = [asyncio.create_task(batcher.features(images[i:i + 1])) for i in range(2, 5)]
                await asyncio.sleep(0.05)
                release.set()
                start = loop.time()
                await first
                await asyncio.gather(*rest)
                return alone_s, loop.time() - start
        finally:
            release.set()

    alone_s, rest_s = asyncio.run(scenario())
    assert alone_s < 5 and rest_s < 5  # neither waited for the 10 s window
    assert sizes == [(1, 1), (1, 1), (3, 3)]


def row_by_row(clf, monkeypatch):
    """Make the backbone compute each image on its own, so an image's features are the same bit for
    bit alone and in any batch: what is left to compare is the MC step."""
    real = clf.features
    monkeypatch.setattr(clf, "features", lambda x, batch_size=500: np.concatenate(
        [real(x[i:i + 1], batch_size) for i in range(len(x))]))


MIXED = [(1, 30, 7), (2, 30, 8), (1, 0, None), (1, 5, 7), (3, 30, 2**31 - 2), (1, 30, 9)]  # (images, T, seed)


def predict_mixed_batch(model, images, *, concurrent: bool, mc_chunk_rows: int = 1000):
    """MIXED's requests through one batcher: all queued behind a gated pass (one micro-batch), or
    one at a time (each alone)."""
    parts, start = [], 0
    for n, t, seed in MIXED:
        parts.append((images[start:start + n], t, seed))
        start += n
    sizes = []
    real, gated, entered, release = gated_features(model.classifier)

    async def scenario():
        try:
            async with started_batcher(model, max_images=64, wait_seconds=0.2, mc_chunk_rows=mc_chunk_rows,
                                       observer=lambda name, n, k: sizes.append(k)) as batcher:
                if not concurrent:
                    return [await batcher.predict(x, mc_samples=t, seed=s) for x, t, s in parts]
                model.classifier.features = gated
                blocker = asyncio.create_task(batcher.features(images[-1:]))   # holds the backbone ...
                assert await asyncio.to_thread(entered.wait, 20)
                tasks = [asyncio.create_task(batcher.predict(x, mc_samples=t, seed=s)) for x, t, s in parts]
                await asyncio.sleep(0.05)                                       # ... while MIXED queues
                release.set()
                await blocker
                return await asyncio.gather(*tasks)
        finally:
            release.set()
            model.classifier.features = real

    results = asyncio.run(scenario())
    assert sizes == ([1, len(MIXED)] if concurrent else [1] * len(MIXED)), sizes
    return results


@pytest.mark.parametrize("runtime", ["keras", "litert"])
def test_mc_in_a_mixed_micro_batch_is_bit_identical_to_each_request_alone(model, images, tiny_litert_artifact,
                                                                          monkeypatch, runtime):
    """The same seed alone and inside a micro-batch of requests with other seeds, T and sizes: the
    same MC arrays, bit for bit (LiteRT draws the whole batch's MC at once; Keras per request, in
    the batch's one executor call). The deterministic head is one matmul over the batch, whose
    float32 rounding may depend on the batch's size (as before this change)."""
    if runtime == "litert":
        import dataclasses

        from models.litert_classifier import LiteRTClassifier

        model = dataclasses.replace(model, classifier=LiteRTClassifier.from_artifact(tiny_litert_artifact)[1])
        assert model.runtime == "litert"
    row_by_row(model.classifier, monkeypatch)
    alone = predict_mixed_batch(model, images, concurrent=False)
    together = predict_mixed_batch(model, images, concurrent=True)
    for (n, t, seed), a, b in zip(MIXED, alone, together):
        assert a.seed == b.seed == (seed if t else None)
        for attr in ("logits", "probabilities", "uncalibrated"):  # the deterministic head runs on the whole
            np.testing.assert_allclose(getattr(a, attr), getattr(b, attr), rtol=0, atol=1e-6)  # batch: rounding
        if not t:
            assert a.mc is None and b.mc is None
            continue
        assert a.mc.n_samples == b.mc.n_samples == t and len(b.mc.mean) == n
        for attr in ("mean", "variance", "predictive_entropy", "expected_entropy", "mutual_information"):
            np.testing.assert_array_equal(getattr(a.mc, attr), getattr(b.mc, attr))


def test_two_passes_at_once_compute_the_next_batch_while_one_runs(model, images, monkeypatch):
    """CALIB_BATCH_PASSES=2: while a pass is held, the next queued request gets its own pass."""
    clf = model.classifier
    real = clf.features
    entered, release = threading.Event(), threading.Event()

    def first_pass_waits(x, batch_size=500):
        if not entered.is_set():
            entered.set()
            release.wait(20)
        return real(x, batch_size)

    async def scenario():
        try:
            async with started_batcher(model, max_images=8, wait_seconds=0.01, max_passes=2) as batcher:
                monkeypatch.setattr(clf, "features", first_pass_waits)
                held = asyncio.create_task(batcher.features(images[:1]))
                assert await asyncio.to_thread(entered.wait, 20)
                second = await asyncio.wait_for(batcher.features(images[1:2]), 20)  # not behind the held pass
                assert not held.done()
                release.set()
                return await held, second
        finally:
            release.set()

    held, second = asyncio.run(scenario())
    assert_features_close(held, real(images[:1]))
    assert_features_close(second, real(images[1:2]))
