"""The CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) at the five CIFAR severities.

Why our own functions: the published CIFAR-10-C was made by ``make_cifar_c.py``, whose constants
differ a lot from ImageNet-C's (Gaussian noise sigma 0.04-0.10 instead of 0.08-0.38, JPEG quality
80-40 instead of 25-7, ...), and it needs ImageMagick (Wand) for motion blur and snow.
``imagecorruptions`` (PyPI ``imagecorruptions-imaug``) has the ImageNet constants baked into its
functions and draws from the global numpy RNG, so here each operation follows the CIFAR script
line by line, with its constants, vectorised over the batch where the operation allows, drawing
every random number from one ``numpy.random.Generator`` per call. From the library we reuse what
has no CIFAR-specific constant: the frost pictures, ``disk`` (defocus kernel) and the Wand-free
``_motion_blur``.

Source of every constant below: hendrycks/robustness, ``ImageNet-C/create_c/make_cifar_c.py``, read
at commit 8190fe329f5f072a06e3a2aea02bb5dda69aed9f (HEAD, 2022-08-24; the file itself was last
changed in ca360085d57889288c4143fddd8a707bbcae01bd, 2019-01-08).

Faithfulness notes (where "what the script computes" and "what it says" differ, we follow what it
computes, since that is what produced the published data):

* glass blur: ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views copies ``x[h', w']`` into
  ``x[h, w]`` and leaves ``x[h', w']`` unchanged (no swap). With max_delta 1 the offsets are in
  {-1, 0}, so every source pixel is read before the loop reaches it, and one pass is exactly one
  gather: that is what :func:`_glass_shuffle` does, vectorised (tests/test_corruptions.py checks it
  against the literal loop).
* the script's final ``np.uint8(float_image)`` truncates; so does :func:`_to_uint8`.
* motion blur and the snow layer went through an 8-bit PNG in Wand; we round the blurred layer to
  8 bits likewise. Spatter's ``(layer * 255).astype(np.uint8)`` wraps above 255 on x86; we make the
  wrap explicit. A spatter layer that is all zero (0/0 in the script) adds nothing here.
* frost draws ``np.random.randint(5)``: the sixth frost picture is never used for CIFAR.
"""

from __future__ import annotations

import importlib.resources
import io
import zlib
from functools import lru_cache

import cv2
import numpy as np
from imagecorruptions.corruptions import _motion_blur as _motion_blur_lib  # Wand-free MagickMotionBlur
from imagecorruptions.corruptions import disk
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.ndimage import zoom as scizoom
from skimage.color import hsv2rgb, rgb2hsv

__all__ = ["CIFAR_CONSTANTS", "CORRUPTIONS", "SEVERITIES", "VALIDATION_CORRUPTIONS", "corrupt"]

#: The 15 benchmark corruptions, in Hendrycks' order (noise, blur, weather, digital).
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
#: The 4 extra corruptions of the same script, held out of the benchmark (for fitting on validation data).
VALIDATION_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)

IMAGE_SHAPE = (32, 32, 3)
_IMSIZE = 32
#: Images per internal chunk: bounds the float64 temporaries (~25 MB per array) for 10,000-image sets.
_CHUNK = 1000

#: ``c`` per corruption and severity 1..5, copied from make_cifar_c.py (see the module docstring).
CIFAR_CONSTANTS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, .08, .09, .10),                       # sigma
    "shot_noise": (500, 250, 100, 75, 50),                               # photons per unit
    "impulse_noise": (.01, .02, .03, .05, .07),                          # s&p amount
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # radius, alias_blur
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, iters
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),         # radius, sigma
    "zoom_blur": (np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)),   # zoom factors
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95),
             (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),  # loc, scale, zoom, threshold, radius, sigma, blend
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image weight, frost weight
    "fog": ((.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),           # strength, wibble decay
    "brightness": (.05, .1, .15, .2, .3),                                  # added to HSV value
    "contrast": (.75, .5, .4, .3, 0.15),                                   # contrast factor
    "elastic_transform": ((_IMSIZE * 0, _IMSIZE * 0, _IMSIZE * 0.08),
                          (_IMSIZE * 0.05, _IMSIZE * 0.2, _IMSIZE * 0.07),
                          (_IMSIZE * 0.08, _IMSIZE * 0.06, _IMSIZE * 0.06),
                          (_IMSIZE * 0.1, _IMSIZE * 0.04, _IMSIZE * 0.05),
                          (_IMSIZE * 0.1, _IMSIZE * 0.03, _IMSIZE * 0.03)),  # alpha, sigma, affine range
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                             # downscale factor
    "jpeg_compression": (80, 65, 58, 50, 40),                              # JPEG quality
    # validation corruptions
    "speckle_noise": (.06, .1, .12, .16, .2),                              # sigma
    "gaussian_blur": (.4, .6, 0.7, .8, 1),                                 # sigma
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0),
                (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                (0.65, 0.1, 0.5, 0.68, 0.6, 1)),  # loc, scale, sigma, threshold, intensity, mud?
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),      # HSV saturation * a + b
}

_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


# ----------------------------------------------------------------------------------------------
# helpers (batched versions of the script's helpers: axis 0 is the image)


def _blur(x: np.ndarray, sigma: float, *, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian on each image (spatial axes only), i.e. its scipy call, batched."""
    sigmas = (0, sigma, sigma) + (0,) * (x.ndim - 3)
    return gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


@lru_cache(maxsize=None)
def _zoom_matrix(h: int, zoom_factor: float) -> tuple[int, np.ndarray]:
    """(top, A): the script's clipped_zoom along one axis is ``A @ v[top:top + ch]``.

    scipy's order-1 zoom is linear and separable, so zooming the identity gives its matrix; the
    2-D zoom of the script is then ``A @ crop @ A.T``, a few BLAS calls for the whole batch
    instead of a 4-D spline pass per image (about 50x faster, equal to float rounding).
    """
    ch = int(np.ceil(h / zoom_factor))
    top = (h - ch) // 2
    a = scizoom(np.eye(ch), (zoom_factor, 1), order=1)
    trim = (a.shape[0] - h) // 2
    return top, a[trim:trim + h]


def _clipped_zoom(x: np.ndarray, zoom_factor: float) -> np.ndarray:
    """The CIFAR script's clipped_zoom on [N, H, W, C]: crop the centre, zoom back up, trim."""
    top, a = _zoom_matrix(x.shape[1], float(zoom_factor))
    ch = a.shape[1]
    crop = x[:, top:top + ch, top:top + ch]
    return np.einsum("oi,nijc,pj->nopc", a, crop, a, optimize=True).astype(x.dtype, copy=False)


def _plasma_fractal(rng: np.random.Generator, n: int, mapsize: int = 32, wibbledecay: float = 3) -> np.ndarray:
    """The script's diamond-square height map (values 0..1), for n images at once."""
    maparray = np.empty((n, mapsize, mapsize), dtype=np.float64)
    maparray[:, 0, 0] = 0
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array):
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares
        cornerref = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=1)
        squareaccum += np.roll(squareaccum, shift=-1, axis=2)
        maparray[:, half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        # diamonds
        drgrid = maparray[:, half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=2)
        maparray[:, 0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=2) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[:, half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay

    maparray -= maparray.min(axis=(1, 2), keepdims=True)
    return maparray / maparray.max(axis=(1, 2), keepdims=True)


def _glass_shuffle(x: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """One pass of the script's pixel "swap" loop (max_delta 1), as one gather.

    dy, dx: [N, 30, 30] offsets in {-1, 0} for pixels (h, w) = 2..31. The loop runs h and w
    downwards and reads (h + dy, w + dx), never a pixel it has already written (module docstring).
    """
    n = x.shape[0]
    hh, ww = np.meshgrid(np.arange(2, 32), np.arange(2, 32), indexing="ij")
    out = x.copy()
    rows = np.arange(n)[:, None, None]
    out[:, 2:32, 2:32] = x[rows, hh + dy, ww + dx]
    return out


@lru_cache(maxsize=None)
def _frost_picture(index: int) -> np.ndarray:
    """Frost picture ``index`` as the script uses it: resized by 0.2 (cv2 bilinear), RGB."""
    ref = importlib.resources.files("imagecorruptions") / "frost" / _FROST_FILES[index]
    with importlib.resources.as_file(ref) as path:
        bgr = cv2.imread(str(path))
    if bgr is None:
        raise RuntimeError(f"cannot read the frost picture {_FROST_FILES[index]} of imagecorruptions")
    small = cv2.resize(bgr, (0, 0), fx=0.2, fy=0.2)
    return np.ascontiguousarray(small[..., [2, 1, 0]])


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """The script's final ``np.uint8(...)``: truncation of values already in [0, 255]."""
    return np.clip(x, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# the corruptions: each takes uint8 [N, 32, 32, 3], the constants c and the Generator; returns
# float (or uint8) values in [0, 255]


def _gaussian_noise(x, c, rng):
    x = x / 255.
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _shot_noise(x, c, rng):
    x = x / 255.
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def _impulse_noise(x, c, rng):
    # skimage.util.random_noise(mode="s&p", amount=c): each value flipped with probability c, to 0 or 1
    x = x / 255.
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return x * 255


def _speckle_noise(x, c, rng):
    x = x / 255.
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _gaussian_blur(x, c, rng):
    return np.clip(_blur(x / 255., c), 0, 1) * 255


def _glass_blur(x, c, rng):
    sigma, delta, iterations = c
    if delta != 1:  # the gather is exact for max_delta 1 only; every CIFAR severity uses 1
        raise NotImplementedError("glass blur is implemented for max_delta 1 (the CIFAR constants)")
    x = np.uint8(_blur(x / 255., sigma) * 255)
    for _ in range(iterations):
        # np.random.randint(-1, 1) draws -1 or 0
        dy, dx = rng.integers(-delta, delta, size=(2, x.shape[0], 30, 30))
        x = _glass_shuffle(x, dy, dx)
    return np.clip(_blur(x / 255., sigma), 0, 1) * 255


def _defocus_blur(x, c, rng):
    kernel = disk(radius=c[0], alias_blur=c[1])
    x = x / 255.
    out = np.empty_like(x)
    for i in range(x.shape[0]):  # cv2 filters the 3 channels like the script's per-channel loop
        out[i] = cv2.filter2D(x[i], -1, kernel)
    return np.clip(out, 0, 1) * 255


def _motion_blur(x, c, rng):
    angles = rng.uniform(-45, 45, size=x.shape[0])
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(x.shape[0]):
        out[i] = _motion_blur_lib(x[i], radius=c[0], sigma=c[1], angle=angles[i])
    return np.rint(np.clip(out, 0, 255))  # Wand returned an 8-bit PNG



def _zoom_blur(x, c, rng):
    x = (x / 255.).astype(np.float32)
    out = np.zeros_like(x)
    for zoom_factor in c:
        out += _clipped_zoom(x, zoom_factor)
    x = (x + out) / (len(c) + 1)
    return np.clip(x, 0, 1) * 255


def _snow(x, c, rng):
    n = x.shape[0]
    x = np.asarray(x, dtype=np.float32) / 255.
    layer = rng.normal(size=(n, 32, 32, 1), loc=c[0], scale=c[1])
    layer = _clipped_zoom(layer, c[2])
    layer[layer < c[3]] = 0
    layer = (np.clip(layer[..., 0], 0, 1) * 255).astype(np.uint8)  # the PNG handed to Wand
    angles = rng.uniform(-135, -45, size=n)
    blurred = np.empty((n, 32, 32), dtype=np.float64)
    for i in range(n):
        blurred[i] = _motion_blur_lib(layer[i], radius=c[4], sigma=c[5], angle=angles[i])
    snow = (np.rint(np.clip(blurred, 0, 255)) / 255.)[..., np.newaxis]  # Wand's 8-bit PNG, /255
    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # cv2 RGB2GRAY
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray[..., np.newaxis] * 1.5 + 0.5)
    return np.clip(x + snow + np.rot90(snow, k=2, axes=(1, 2)), 0, 1) * 255


def _frost(x, c, rng):
    n = x.shape[0]
    out = np.empty(x.shape, dtype=np.float64)
    indices = rng.integers(len(_FROST_FILES), size=n)
    for i in range(n):
        frost = _frost_picture(int(indices[i]))
        top = rng.integers(0, frost.shape[0] - 32)
        left = rng.integers(0, frost.shape[1] - 32)
        out[i] = c[0] * x[i] + c[1] * frost[top:top + 32, left:left + 32]
    return np.clip(out, 0, 255)


def _fog(x, c, rng):
    x = x / 255.
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x += c[0] * _plasma_fractal(rng, x.shape[0], wibbledecay=c[1])[:, :32, :32, np.newaxis]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def _brightness(x, c, rng):
    x = rgb2hsv(x / 255.)
    x[..., 2] = np.clip(x[..., 2] + c, 0, 1)
    return np.clip(hsv2rgb(x), 0, 1) * 255


def _saturate(x, c, rng):
    x = rgb2hsv(x / 255.)
    x[..., 1] = np.clip(x[..., 1] * c[0] + c[1], 0, 1)
    return np.clip(hsv2rgb(x), 0, 1) * 255


def _contrast(x, c, rng):
    x = x / 255.
    means = np.mean(x, axis=(1, 2), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def _elastic_transform(x, c, rng):
    n = x.shape[0]
    x = np.asarray(x, dtype=np.float32) / 255.
    center_square = np.float32((32, 32)) // 2
    square_size = 32 // 3
    pts1 = np.float32([center_square + square_size,
                       [center_square[0] + square_size, center_square[1] - square_size],
                       center_square - square_size])
    jitter = rng.uniform(-c[2], c[2], size=(n, 3, 2)).astype(np.float32)
    noise = rng.uniform(-1, 1, size=(2, n, 32, 32))
    dx = (_blur(noise[0], c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dy = (_blur(noise[1], c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    gx, gy, gz = np.meshgrid(np.arange(32), np.arange(32), np.arange(3))
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(n):
        m = cv2.getAffineTransform(pts1, pts1 + jitter[i])
        warped = cv2.warpAffine(x[i], m, (32, 32), borderMode=cv2.BORDER_REFLECT_101)
        indices = (np.reshape(gy + dy[i][..., np.newaxis], (-1, 1)),
                   np.reshape(gx + dx[i][..., np.newaxis], (-1, 1)),
                   np.reshape(gz, (-1, 1)))
        out[i] = map_coordinates(warped, indices, order=1, mode="reflect").reshape(IMAGE_SHAPE)
    return np.clip(out, 0, 1) * 255


def _pixelate(x, c, rng):
    side = int(32 * c)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        small = Image.fromarray(x[i]).resize((side, side), Image.BOX)
        out[i] = np.asarray(small.resize((32, 32), Image.BOX))
    return out


def _jpeg_compression(x, c, rng):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(x[i]).save(buf, "JPEG", quality=c)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out


_SPATTER_KERNEL = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)
_WATER = np.array([175, 238, 238], dtype=np.float32) / 255.  # "pale turquoise", added to RGB as written
_MUD = np.array([63, 42, 20], dtype=np.float64) / 255.


def _spatter(x, c, rng):
    n = x.shape[0]
    x = np.asarray(x, dtype=np.float32) / 255.
    liquid = _blur(rng.normal(size=(n, 32, 32), loc=c[0], scale=c[1]), c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:  # water: edges of the liquid blobs, shaded
        layer = (np.floor(liquid * 255).astype(np.int64) % 256).astype(np.uint8)  # astype(uint8) wraps
        out = np.empty_like(x)
        for i in range(n):
            dist = 255 - cv2.Canny(layer[i], 50, 150)
            dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
            _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
            dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
            dist = cv2.equalizeHist(dist)
            dist = cv2.filter2D(dist, cv2.CV_8U, _SPATTER_KERNEL)
            dist = cv2.blur(dist, (3, 3)).astype(np.float32)
            m = layer[i] * dist
            peak = m.max()
            m = m / peak * c[4] if peak > 0 else m
            out[i] = np.clip(x[i] + m[..., np.newaxis] * _WATER, 0, 1)
        return out * 255
    # mud: opaque brown blobs
    m = _blur(np.where(liquid > c[3], 1, 0).astype(np.float32), c[4])
    m[m < 0.8] = 0
    m = m[..., np.newaxis]
    return np.clip(x * (1 - m) + _MUD * m, 0, 1) * 255


_OPS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog,
    "brightness": _brightness, "contrast": _contrast, "elastic_transform": _elastic_transform,
    "pixelate": _pixelate, "jpeg_compression": _jpeg_compression,
    "speckle_noise": _speckle_noise, "gaussian_blur": _gaussian_blur, "spatter": _spatter,
    "saturate": _saturate,
}


def rng_for(seed: int, name: str, severity: int) -> np.random.Generator:
    """The Generator of one (seed, corruption, severity): stable across processes and platforms."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), severity])


def corrupt(images: np.ndarray, name: str, severity: int, *, seed: int) -> np.ndarray:
    """``images`` (uint8 [N, 32, 32, 3], RGB) corrupted by ``name`` at ``severity`` (1..5).

    Deterministic for a seed: every random number comes from :func:`rng_for` (never the global
    numpy RNG). Raises ValueError for an unknown name, a bad severity or seed, or images that are
    not uint8 [N, 32, 32, 3].
    """
    if name not in _OPS:
        raise ValueError(f"unknown corruption {name!r}; expected one of "
                         f"{', '.join(CORRUPTIONS + VALIDATION_CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 numpy array, got "
                         f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"images must have shape [N, 32, 32, 3], got {list(images.shape)}")
    c = CIFAR_CONSTANTS[name][severity - 1]
    op = _OPS[name]
    rng = rng_for(int(seed), name, int(severity))
    out = np.empty_like(images)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = np.ascontiguousarray(images[start:start + _CHUNK])
        out[start:start + _CHUNK] = _to_uint8(op(chunk, c, rng))
    return out
