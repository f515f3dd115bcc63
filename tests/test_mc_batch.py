"""MC dropout for a micro-batch of requests at once (LiteRT runtime): the same numbers, bit for bit,
as each request's own call. Philox with a key per counter (`stateless_uniform_many`) and the
batched head and summary (`LiteRTClassifier.mc_summaries_from_features`)."""

from __future__ import annotations

import numpy as np
import pytest

from models.philox import stateless_uniform, stateless_uniform_many

SUMMARY_FIELDS = ("mean", "variance", "predictive_entropy", "expected_entropy", "mutual_information")


@pytest.mark.parametrize("block_groups", [1, 7, 1 << 15, 1 << 30])
def test_many_draws_equal_each_draw_alone(block_groups):
    draws = [((30, 16), (5, 7919)), ((3, 16), (2**31 - 2, 7920)), ((7,), (-1, 2**40)), ((0, 4), (1, 1)),
             ((5,), (2**63 - 1, -2**63)), ((2, 3, 5), (0, 0)), ((30, 16), (5, 7919))]
    for (shape, seed), got in zip(draws, stateless_uniform_many(draws, block_groups)):
        expected = stateless_uniform(shape, seed)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    assert stateless_uniform_many([]) == []


@pytest.fixture(scope="module")
def litert(tiny_litert_artifact):
    from models.litert_classifier import LiteRTClassifier

    card, clf = LiteRTClassifier.from_artifact(tiny_litert_artifact)
    return card["temperature"], clf


@pytest.mark.parametrize("chunk_rows", [65_536, 100])
def test_batched_mc_equals_each_request_alone(litert, sample_data, chunk_rows):
    """Requests of 1..12 images, T 2..40 and different seeds, some equal in shape (one stacked
    group), with chunks when T x images is over `chunk_rows`."""
    temperature, clf = litert
    features = clf.features(sample_data.x_test[:40])
    requests = [(0, 1, 30, 11), (1, 2, 30, 12), (2, 3, 30, 11), (3, 15, 40, 2**31 - 2), (15, 16, 2, 0),
                (16, 20, 7, 99), (20, 40, 30, 5)]
    together = clf.mc_summaries_from_features(features, requests, temperature, chunk_rows)
    assert len(together) == len(requests)
    for (start, stop, t, seed), got in zip(requests, together):
        alone = clf.mc_summary_from_features(features[start:stop], t, seed, temperature, chunk_rows)
        assert got.n_samples == t and len(got.mean) == stop - start
        for field in SUMMARY_FIELDS:
            np.testing.assert_array_equal(getattr(got, field), getattr(alone, field), err_msg=field)
    # rows 0 and 2 share T and seed but not the image; rows 0 and 1 share the image count, not the seed
    assert not np.array_equal(together[0].mean, together[1].mean)
