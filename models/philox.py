"""TensorFlow's stateless uniform random numbers (`tf.random.stateless_uniform`, float32, CPU) in NumPy.

Why: the LiteRT serving path (`models.litert_classifier`) has no TensorFlow, yet a seeded MC-dropout
request must draw the same masks as the Keras path (`SplitClassifier._head_sampled`), so the two
runtimes give the same MC answers for the same seed. This reproduces TensorFlow bit for bit:

- `StatelessRandomGetKeyCounter` (GenerateKey in stateless_random_ops.cc): the two int64 seeds,
  as four uint32 words (low, high, low, high), are a Philox counter under a fixed key; one Philox
  call scrambles them into the real key (its words 0, 1) and start counter (0, 0, words 2, 3);
- Philox-4x32-10 (lib/random/philox_random.h): output element i comes from counter + i // 4,
  word i % 4;
- uint32 -> float32 in [0, 1) (random_distributions.h Uint32ToFloat): the 23 mantissa bits under
  exponent 127, minus 1.0.
"""

from __future__ import annotations

import numpy as np

_W32A, _W32B = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)   # key schedule (golden ratio, sqrt(3)-1)
_M4x32A, _M4x32B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_SCRAMBLE_KEY = (0x3EC8F720, 0x02461E29)
_ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32(counter: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
               key: tuple[int, int] | tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """Philox-4x32-10 on a vector of 128-bit counters given as four uint32 word arrays, under one
    key (two ints) or a key per counter (two arrays of the counters' length).

    The words live in uint64 arrays (the products need 64 bits), so a round is a few in-place
    NumPy operations with no dtype conversions."""
    c0, c1, c2, c3 = (np.asarray(c, np.uint32).astype(np.uint64) for c in counter)
    # uint64 scalars, or arrays for a key per counter; a key word stays below 2**32 (masked each round)
    k0, k1 = (np.uint64(int(k)) if np.ndim(k) == 0 else np.asarray(k, np.uint64) for k in key)
    w0, w1 = np.uint64(_W32A), np.uint64(_W32B)
    shift = np.uint64(32)
    p0, p1 = np.empty_like(c0), np.empty_like(c0)
    for r in range(_ROUNDS):
        np.multiply(c0, _M4x32A, out=p0)
        np.multiply(c2, _M4x32B, out=p1)
        # new c0 = hi1 ^ c1 ^ k0; new c1 = lo1; new c2 = hi0 ^ c3 ^ k1; new c3 = lo0
        np.right_shift(p1, shift, out=c0)
        np.bitwise_xor(c0, c1, out=c0)
        np.bitwise_xor(c0, k0, out=c0)
        np.right_shift(p0, shift, out=c2)
        np.bitwise_xor(c2, c3, out=c2)
        np.bitwise_xor(c2, k1, out=c2)
        np.bitwise_and(p1, _MASK32, out=c1)
        np.bitwise_and(p0, _MASK32, out=c3)
        k0, k1 = (k0 + w0) & _MASK32, (k1 + w1) & _MASK32   # uint32 wraps, as in C++
    return [c.astype(np.uint32) for c in (c0, c1, c2, c3)]


def key_counter(seed: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """TensorFlow's seed scrambling: a [2] seed -> the Philox key and start counter."""
    s0, s1 = (int(s) & 0xFFFFFFFFFFFFFFFF for s in seed)   # int64 as uint64
    words = (s0 & 0xFFFFFFFF, s0 >> 32, s1 & 0xFFFFFFFF, s1 >> 32)
    with np.errstate(over="ignore"):
        mix = [int(w[0]) for w in philox4x32(tuple(np.array([v], np.uint32) for v in words), _SCRAMBLE_KEY)]
    return (mix[0], mix[1]), (0, 0, mix[2], mix[3])


def stateless_uniform(shape, seed: tuple[int, int]) -> np.ndarray:
    """float32 uniform [0, 1) of `shape`, equal to `tf.random.stateless_uniform(shape, seed)` on CPU."""
    shape = tuple(int(d) for d in np.atleast_1d(np.asarray(shape, np.int64)))
    n = int(np.prod(shape, dtype=np.int64))
    key, (q0, q1, q2, q3) = key_counter(seed)
    groups = (n + 3) // 4
    # the 128-bit counter plus the group index; the index fits in 64 bits, so the carry stops at word 2
    with np.errstate(over="ignore"):
        low = np.arange(groups, dtype=np.uint64) + np.uint64(q0 | (q1 << 32))
    carry = (low < np.uint64(q0 | (q1 << 32))).astype(np.uint64)
    high = np.uint64(q2 | (q3 << 32)) + carry
    with np.errstate(over="ignore"):
        words = philox4x32(((low & _MASK32).astype(np.uint32), (low >> np.uint64(32)).astype(np.uint32),
                            (high & _MASK32).astype(np.uint32), (high >> np.uint64(32)).astype(np.uint32)),
                           key)
    bits = np.stack(words, axis=1).reshape(-1)[:n]     # element i: group i // 4, word i % 4
    floats = ((bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1.0)
    return floats.reshape(shape)


# Draws are packed into Philox passes of about this many 4-word groups: large enough that the ~200
# NumPy calls of a pass cost little per number, small enough that its arrays stay in the CPU cache
# (one pass over a whole micro-batch was slower than one per request).
BLOCK_GROUPS = 1 << 15


def stateless_uniform_many(draws: list[tuple[tuple[int, ...], tuple[int, int]]],
                           block_groups: int = BLOCK_GROUPS) -> list[np.ndarray]:
    """`[stateless_uniform(shape, seed) for shape, seed in draws]`, bit for bit, with a key per
    counter so that one Philox pass serves several draws: a micro-batch of MC-dropout requests,
    each with its own seed, draws its masks in a few NumPy pipelines instead of one per request
    (whose fixed cost, ~200 small NumPy calls, dominates a one-image request)."""
    out, block, size = [], [], 0
    for draw in draws:
        groups = (int(np.prod(draw[0], dtype=np.int64)) + 3) // 4
        if block and size + groups > block_groups:
            out += _uniform_pass(block)
            block, size = [], 0
        block.append(draw)
        size += groups
    return out + _uniform_pass(block) if block else out


def _uniform_pass(draws: list[tuple[tuple[int, ...], tuple[int, int]]]) -> list[np.ndarray]:
    shapes = [tuple(int(d) for d in np.atleast_1d(np.asarray(shape, np.int64))) for shape, _ in draws]
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    seeds = np.array([[int(s) & 0xFFFFFFFFFFFFFFFF for s in seed] for _, seed in draws], np.uint64)
    # key_counter for every seed at once: the seeds' four uint32 words scrambled under the fixed key
    words = [(seeds[:, i // 2] >> np.uint64(32 * (i % 2))) & _MASK32 for i in range(4)]
    with np.errstate(over="ignore"):
        mix = philox4x32(tuple(w.astype(np.uint32) for w in words), _SCRAMBLE_KEY)
    groups = np.array([(n + 3) // 4 for n in sizes], np.int64)
    # the counter of draw d's group g: (g, 0) as words 0, 1 (start 0) and mix 2, 3 as words 2, 3;
    # g fits in 64 bits, so no carry reaches words 2, 3
    first = np.repeat(np.cumsum(groups) - groups, groups)
    low = np.arange(int(groups.sum()), dtype=np.uint64) - first.astype(np.uint64)
    with np.errstate(over="ignore"):
        out = philox4x32(((low & _MASK32).astype(np.uint32), (low >> np.uint64(32)).astype(np.uint32),
                          np.repeat(mix[2], groups), np.repeat(mix[3], groups)),
                         (np.repeat(mix[0], groups), np.repeat(mix[1], groups)))
    bits = np.stack(out, axis=1)
    floats = ((bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1.0)
    result, row = [], 0
    for shape, n, g in zip(shapes, sizes, groups):
        result.append(floats[row:row + g].reshape(-1)[:n].reshape(shape))
        row += int(g)
    return result
