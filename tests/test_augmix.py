"""AugMix on batches: each operation against PIL (the paper's reference uses PIL), seeding,
per-image randomness and the training pipeline switch."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from training.augmix import (OPERATIONS, affine, affine_matrices, augment_step, augmix,
                             autocontrast, equalize, posterize, solarize)
from training.pipeline import training_dataset


@pytest.fixture(scope="module")
def images(sample_data):
    return sample_data.x_train[:64]


def _pil(images, fn):
    return np.stack([np.asarray(fn(Image.fromarray(i))) for i in images]).astype(int)


def test_histogram_operations_match_pil(images):
    x = tf.constant(images)
    assert np.abs(equalize(x).numpy() - _pil(images, ImageOps.equalize)).max() == 0
    # PIL rounds the autocontrast lookup table through a float; at most one level apart
    assert np.abs(autocontrast(x).numpy() - _pil(images, ImageOps.autocontrast)).max() <= 1
    bits = tf.fill([len(images)], 3)
    assert np.array_equal(posterize(x, bits).numpy(), _pil(images, lambda i: ImageOps.posterize(i, 3)))
    threshold = tf.fill([len(images)], 200)
    assert np.array_equal(solarize(x, threshold).numpy(), _pil(images, lambda i: ImageOps.solarize(i, 200)))


def test_translation_matches_pil_and_geometry_is_per_image(images):
    n = len(images)
    translate_x = OPERATIONS.index("translate_x")
    m = affine_matrices(tf.fill([n], translate_x), tf.fill([n], 3.0), tf.ones([n]), 32)
    pil = _pil(images, lambda i: i.transform((32, 32), Image.AFFINE, (1, 0, 3, 0, 1, 0),
                                             resample=Image.BILINEAR))
    assert np.array_equal(affine(tf.constant(images), m).numpy(), pil)
    # a rotation keeps the centre pixel region and blackens corners for a large angle
    rotate = OPERATIONS.index("rotate")
    m = affine_matrices(tf.fill([n], rotate), tf.fill([n], 3.0), tf.ones([n]), 32)
    out = affine(tf.constant(images), m).numpy()
    assert out.shape == images.shape and not np.array_equal(out, images)


def test_augmix_is_seeded_uint8_and_stays_close_to_the_image(images):
    x = tf.constant(images)
    a = augmix(x, tf.constant([1, 2], tf.int64)).numpy()
    b = augmix(x, tf.constant([1, 2], tf.int64)).numpy()
    c = augmix(x, tf.constant([1, 3], tf.int64)).numpy()
    assert a.dtype == np.uint8 and a.shape == images.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    diff = np.abs(a.astype(int) - images).mean(axis=(1, 2, 3))
    assert 0 < diff.mean() < 60          # a mix with the original, not a new image


def test_choices_are_per_image_not_per_batch():
    """The same image repeated 32 times must come out in many different versions."""
    one = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    batch = tf.constant(np.repeat(one, 32, axis=0))
    out = augmix(batch, tf.constant([5, 6], tf.int64)).numpy().reshape(32, -1)
    assert len({row.tobytes() for row in out}) > 25
    inactive = augment_step(batch, tf.constant([1, 1], tf.int64), active=tf.zeros([32], tf.bool))
    assert np.array_equal(inactive.numpy(), batch.numpy())


@pytest.mark.training
def test_pipeline_switch_changes_images_only(images):
    labels = np.arange(len(images)) % 10
    kwargs = dict(batch_size=32, num_classes=10, seed=0, epochs=1)
    plain = next(iter(training_dataset(images, labels, **kwargs)))
    mixed = next(iter(training_dataset(images, labels, augmix=True, **kwargs)))
    assert np.array_equal(plain[1].numpy(), mixed[1].numpy())
    assert mixed[0].dtype == tf.uint8 and not np.array_equal(plain[0].numpy(), mixed[0].numpy())
