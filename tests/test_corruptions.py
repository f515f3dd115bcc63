"""CIFAR-10-C corruptions (training/shift/corruptions.py) and their on-disk cache (datasets.py).

Every operation, the 4 validation ones included, is run on real fixture images. The constants are
checked against values quoted from hendrycks/robustness ImageNet-C/create_c/make_cifar_c.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import zoom as scizoom

from training.shift import datasets
from training.shift.corruptions import (
    CIFAR_CONSTANTS,
    CORRUPTIONS,
    SEVERITIES,
    VALIDATION_CORRUPTIONS,
    _clipped_zoom,
    _glass_shuffle,
    corrupt,
    rng_for,
)

ALL = CORRUPTIONS + VALIDATION_CORRUPTIONS
# No random draw at all: the same output for any seed.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression",
                 "gaussian_blur", "saturate"}


@pytest.fixture(scope="module")
def images(sample_data) -> np.ndarray:
    """48 real CIFAR-10 test images (enough that random ops average out their draws)."""
    return np.ascontiguousarray(sample_data.x_test[:48])


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# ---------------------------------------------------------------- names and constants


def test_names_and_order():
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
        "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
        "jpeg_compression")
    assert VALIDATION_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert SEVERITIES == (1, 2, 3, 4, 5)
    assert set(CIFAR_CONSTANTS) == set(ALL)
    assert all(len(CIFAR_CONSTANTS[name]) == 5 for name in ALL)


def test_constants_are_the_cifar_ones():
    """Quoted from make_cifar_c.py; the ImageNet-C values differ (e.g. noise 0.08..0.38, JPEG 25..7)."""
    c = CIFAR_CONSTANTS
    assert c["gaussian_noise"] == (0.04, 0.06, .08, .09, .10)
    assert c["shot_noise"] == (500, 250, 100, 75, 50)
    assert c["impulse_noise"] == (.01, .02, .03, .05, .07)
    assert c["defocus_blur"][3] == (1, 0.2)
    assert c["glass_blur"] == ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
    assert c["motion_blur"][4] == (9, 2.5)
    # the script's float np.arange(1, 1.06, 0.01) also yields 1.06 (and 1.11 for severity 2)
    assert [len(z) for z in c["zoom_blur"]] == [7, 12, 16, 21, 26]
    assert c["zoom_blur"][0][-1] == pytest.approx(1.06)
    assert c["zoom_blur"][4][-1] == pytest.approx(1.25)
    assert c["snow"][0] == (0.1, 0.2, 1, 0.6, 8, 3, 0.95)
    assert c["frost"] == ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
    assert c["fog"][4] == (1.5, 1.75)
    assert c["brightness"] == (.05, .1, .15, .2, .3)
    assert c["contrast"] == (.75, .5, .4, .3, 0.15)
    assert c["elastic_transform"][1] == pytest.approx((32 * 0.05, 32 * 0.2, 32 * 0.07))
    assert c["pixelate"] == (0.95, 0.9, 0.85, 0.75, 0.65)
    assert c["jpeg_compression"] == (80, 65, 58, 50, 40)
    assert c["speckle_noise"] == (.06, .1, .12, .16, .2)
    assert c["gaussian_blur"] == (.4, .6, 0.7, .8, 1)
    assert c["spatter"][3] == (0.65, 0.1, 0.7, 0.69, 0.6, 1)
    assert c["saturate"] == ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))


# ---------------------------------------------------------------- every operation


@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_determinism_and_seed(name, images):
    before = images.copy()
    global_state = np.random.get_state()
    out = corrupt(images, name, 3, seed=7)
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(images, before)  # input untouched
    assert not np.array_equal(out, images)  # it does corrupt
    np.testing.assert_array_equal(corrupt(images, name, 3, seed=7), out)  # same seed, same images
    other = corrupt(images, name, 3, seed=8)
    if name in DETERMINISTIC:
        np.testing.assert_array_equal(other, out)
    else:
        assert not np.array_equal(other, out)
    # the global numpy RNG is neither used nor reseeded
    after = np.random.get_state()
    assert after[0] == global_state[0] and after[2:] == global_state[2:]
    np.testing.assert_array_equal(after[1], global_state[1])


# Mean |corrupted - clean| per severity must grow, except where the CIFAR constants themselves say
# otherwise (checked on 600 fixture images, two seeds, before writing these down):
#   glass_blur: severities 1-3 make one shuffle pass, 4-5 two; a larger sigma smooths the shuffle
#     back towards the clean image, so only "two passes > one pass" holds.
#   frost: the image weight drops 1 -> 0.75 while the frost weight only grows 0.4 -> 0.45 after
#     severity 3 and bright frost clips at 255: the distance peaks at severity 3.
#   motion_blur: severities 3 (6, 2) and 4 (8, 2) share sigma 2; the larger radius only adds kernel
#     taps beyond 3 sigma (under 0.1% of the weight), so the two are equal up to the random angles.
#   elastic_transform: the random affine range shrinks (2.56 -> 0.96 px) faster than the elastic
#     field grows, so the distance falls with severity (3 and 4 nearly tie).
#   spatter: severities 1-3 are water, 4-5 mud (two families, each growing).
#   saturate: 1-2 desaturate (x0.3, x0.1), 3-5 oversaturate (x1.5, x2, x2.5).
def _ordering_holds(name: str, d: list[float]) -> bool:
    up = lambda *s: all(d[a - 1] < d[b - 1] for a, b in zip(s, s[1:]))  # noqa: E731
    special = {
        "glass_blur": max(d[0:3]) < min(d[3:5]),
        "frost": up(1, 2, 3) and d[2] > d[3] and d[2] > d[4],
        "motion_blur": up(1, 2, 3) and abs(d[3] - d[2]) < 0.05 * d[2] and d[4] > max(d[2], d[3]),
        "elastic_transform": d[0] > d[1] > d[2] and d[4] < min(d[2], d[3]),
        "spatter": up(1, 2, 3) and up(4, 5),
        "saturate": up(1, 2) and up(3, 4, 5),
    }
    return special.get(name, up(1, 2, 3, 4, 5))


@pytest.mark.parametrize("name", ALL)
def test_distance_grows_with_severity(name, images):
    d = [distance(corrupt(images, name, s, seed=0), images) for s in SEVERITIES]
    assert _ordering_holds(name, d), f"{name}: mean |x_c - x| by severity = {np.round(d, 2)}"
    assert min(d) > 0.5  # every severity visibly corrupts


# ---------------------------------------------------------------- faithfulness to the script


def test_glass_shuffle_is_the_scripts_loop():
    """The script's loop `x[h, w], x[h', w'] = x[h', w'], x[h, w]` (numpy views: a copy, no swap),
    run literally with the same offsets, gives exactly our one-gather version."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    dy, dx = rng.integers(-1, 1, size=(2, 3, 30, 30))
    expected = x.copy()
    for i in range(3):
        img = expected[i]
        for h in range(31, 1, -1):
            for w in range(31, 1, -1):
                oy, ox = dy[i, h - 2, w - 2], dx[i, h - 2, w - 2]
                img[h, w], img[h + oy, w + ox] = img[h + oy, w + ox], img[h, w]
    np.testing.assert_array_equal(_glass_shuffle(x, dy, dx), expected)


@pytest.mark.parametrize("zoom_factor", [1.0, 1.07, 1.25, 1.75, 2.25])
def test_clipped_zoom_is_the_scripts(zoom_factor):
    rng = np.random.default_rng(0)
    x = rng.random((2, 32, 32, 3)).astype(np.float32)

    def script(img):  # make_cifar_c.py's clipped_zoom, one image
        h = img.shape[0]
        ch = int(np.ceil(h / zoom_factor))
        top = (h - ch) // 2
        img = scizoom(img[top:top + ch, top:top + ch], (zoom_factor, zoom_factor, 1), order=1)
        trim_top = (img.shape[0] - h) // 2
        return img[trim_top:trim_top + h, trim_top:trim_top + h]

    np.testing.assert_allclose(_clipped_zoom(x, zoom_factor), np.stack([script(i) for i in x]), atol=1e-6)


def test_gaussian_noise_and_contrast_match_the_formulas(images):
    x = images / 255.
    noise = rng_for(5, "gaussian_noise", 2).normal(size=x.shape, scale=0.06)
    expected = (np.clip(x + noise, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(corrupt(images, "gaussian_noise", 2, seed=5), expected)
    means = x.mean(axis=(1, 2), keepdims=True)
    expected = (np.clip((x - means) * 0.15 + means, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(corrupt(images, "contrast", 5, seed=0), expected)


def test_pixelate_resolution(images):
    """Severity 5 (0.65) goes through 20x20: BOX-upscaling back to 32 repeats columns."""
    out = corrupt(images, "pixelate", 5, seed=0)
    assert np.unique(out[0], axis=1).shape[1] <= 20 < np.unique(images[0], axis=1).shape[1]


def test_batch_larger_than_a_chunk_is_deterministic(images, monkeypatch):
    import training.shift.corruptions as module

    monkeypatch.setattr(module, "_CHUNK", 10)
    out = corrupt(images, "impulse_noise", 2, seed=1)
    assert out.shape == images.shape
    np.testing.assert_array_equal(corrupt(images, "impulse_noise", 2, seed=1), out)
    assert distance(out[40:], images[40:]) > 0  # the last, partial chunk is corrupted too


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "fog_of_war"}, "unknown corruption"),
    ({"name": "Gaussian Noise"}, "unknown corruption"),
    ({"severity": 0}, "severity"),
    ({"severity": 6}, "severity"),
    ({"severity": 2.0}, "severity"),
    ({"severity": True}, "severity"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_arguments_raise_value_error(images, kwargs, message):
    args = {"name": "contrast", "severity": 1, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        corrupt(images[:2], args["name"], args["severity"], seed=args["seed"])


@pytest.mark.parametrize("bad", [
    np.zeros((2, 32, 32, 3), dtype=np.float32),
    np.zeros((2, 32, 32, 3), dtype=np.int64),
    np.zeros((32, 32, 3), dtype=np.uint8),
    np.zeros((2, 28, 28, 3), dtype=np.uint8),
    np.zeros((2, 32, 32, 1), dtype=np.uint8),
    [[0]],
])
def test_bad_images_raise_value_error(bad):
    with pytest.raises(ValueError, match="images must"):
        corrupt(bad, "contrast", 1, seed=0)


# ---------------------------------------------------------------- the cache


def test_cache_hit_skips_the_build(images, tmp_path, monkeypatch):
    first = datasets.corrupted_set(images, "frost", 2, seed=3, cache_dir=tmp_path, source_checksum="sha256:abc")
    np.testing.assert_array_equal(first, corrupt(images, "frost", 2, seed=3))
    [npy] = tmp_path.glob("*.npy")
    [manifest] = tmp_path.glob("*.json")
    assert json.loads(manifest.read_text())["source_checksum"] == "sha256:abc"
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind
    np.testing.assert_array_equal(np.load(npy, allow_pickle=False), first)

    def no_build(*args, **kwargs):
        raise AssertionError("a cache hit must not rebuild")

    monkeypatch.setattr(datasets, "corrupt", no_build)
    np.testing.assert_array_equal(
        datasets.corrupted_set(images, "frost", 2, seed=3, cache_dir=tmp_path, source_checksum="sha256:abc"), first)
    # any change of key is a miss
    for change in ({"seed": 4}, {"severity": 3}, {"source_checksum": "sha256:def"}):
        args = {"seed": 3, "severity": 2, "source_checksum": "sha256:abc"} | change
        with pytest.raises(AssertionError, match="must not rebuild"):
            datasets.corrupted_set(images, "frost", args["severity"], seed=args["seed"], cache_dir=tmp_path,
                                   source_checksum=args["source_checksum"])
    with pytest.raises(AssertionError, match="must not rebuild"):
        datasets.corrupted_set(images[:10], "frost", 2, seed=3, cache_dir=tmp_path, source_checksum="sha256:abc")


def test_damaged_cache_file_is_rebuilt(images, tmp_path):
    first = datasets.corrupted_set(images, "contrast", 1, seed=0, cache_dir=tmp_path, source_checksum="x")
    [npy] = tmp_path.glob("*.npy")
    npy.write_bytes(b"not a numpy file")
    again = datasets.corrupted_set(images, "contrast", 1, seed=0, cache_dir=tmp_path, source_checksum="x")
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(np.load(npy, allow_pickle=False), first)


def test_no_cache_dir_writes_nothing(images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = datasets.corrupted_set(images, "brightness", 1, seed=0, cache_dir=None, source_checksum="x")
    np.testing.assert_array_equal(out, corrupt(images, "brightness", 1, seed=0))
    assert not list(tmp_path.iterdir())


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CALIB_SHIFT_CACHE", str(tmp_path / "c"))
    assert datasets.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CALIB_SHIFT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert datasets.default_cache_dir() == tmp_path / ".cache" / "calibrated-cifar" / "cifar10-c"
