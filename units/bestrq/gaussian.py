"""Standard normal numbers that are the same bits on every machine, for a seed.

BEST-RQ's quantizer is nothing but random matrices, so "the same seed gives the same
quantizer" must hold on any CPU, BLAS and NumPy build. NumPy's ``Generator.standard_normal``
does not promise that: its ziggurat's tails call the C library's ``log``/``exp``, which
glibc dispatches to FMA or non-FMA code by CPU, and NumPy may change a distribution's
algorithm between versions (NEP 19 keeps only the bit generators' streams stable).

So the numbers here are built from what is portable alone:

- the raw 64-bit stream of ``PCG64`` (stable across NumPy versions and platforms, NEP 19),
  seeded through ``SeedSequence`` (integer hashing);
- 53-bit uniforms from it, exactly (a shift and a power-of-two scale);
- Marsaglia's polar method, which needs ``+ - * /``, ``sqrt`` (all correctly rounded in
  IEEE 754, so the same bits everywhere) and one logarithm, which :func:`portable_log`
  computes with those operations only, in a fixed order.

Written by hand for that reason: no library we depend on offers a normal generator whose
bits are defined independently of the machine.
"""

from __future__ import annotations

import numpy as np

_LN2 = 0.6931471805599453  # The double nearest ln 2.
_SQRT_HALF = 0.7071067811865476
#: Terms of the atanh series: |t| <= 0.1716 on [sqrt(1/2), sqrt(2)), so t**2 <= 0.0295 and
#: the 12th term (t**25 / 25) is below 1e-20, far under a double's rounding of ln m.
_ATANH_TERMS = 12
_INVERSE_ODD = [1.0 / (2 * k + 1) for k in range(_ATANH_TERMS)]


def portable_log(x: np.ndarray) -> np.ndarray:
    """The natural logarithm of positive finite doubles, from IEEE-exact operations only.

    ``x = m * 2**e`` with ``m`` in ``[sqrt(1/2), sqrt(2))`` (``frexp``, exact), then
    ``ln x = e ln 2 + 2 atanh((m - 1) / (m + 1))`` with the series summed by Horner's rule in
    a fixed order. Within a few ulps of ``math.log``; what matters is that each step is a
    correctly rounded operation, so the result is the same bits on any IEEE 754 machine.
    """
    x = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(x)  # m in [0.5, 1)
    low = m < _SQRT_HALF
    m = np.where(low, m * 2.0, m)
    e = (e - low).astype(np.float64)
    t = (m - 1.0) / (m + 1.0)
    t2 = t * t
    series = np.full_like(t, _INVERSE_ODD[-1])
    for k in range(_ATANH_TERMS - 2, -1, -1):
        series = series * t2 + _INVERSE_ODD[k]
    return e * _LN2 + 2.0 * t * series


def _uniforms(bits: np.random.PCG64, n: int) -> np.ndarray:
    """``n`` doubles in [0, 1): the top 53 bits of each raw draw, scaled exactly."""
    return (bits.random_raw(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def standard_normal(seed: int, stream: int, count: int) -> np.ndarray:
    """``count`` standard normal doubles for ``(seed, stream)``: the same bits on any machine.

    Args:
        seed: The user's seed (any non-negative integer).
        stream: Which independent sequence of that seed (a projection, a codebook, ...).
        count: How many numbers.

    Returns:
        float64 array of shape ``(count,)``.
    """
    if seed < 0 or stream < 0:
        raise ValueError(f"seed and stream must be >= 0, got {seed}, {stream}")
    bits = np.random.PCG64(np.random.SeedSequence([seed, stream]))
    out = np.empty(count, np.float64)
    filled = 0
    while filled < count:
        # Pairs accepted with probability pi/4: draw a few more than still needed.
        pairs = max(16, int((count - filled) * 0.65) + 16)
        u = _uniforms(bits, 2 * pairs) * 2.0 - 1.0  # Exact: (2k - 2**53) * 2**-53.
        v, w = u[0::2], u[1::2]
        s = v * v + w * w
        keep = (s > 0.0) & (s < 1.0)
        v, w, s = v[keep], w[keep], s[keep]
        factor = np.sqrt(-2.0 * portable_log(s) / s)
        both = np.empty(2 * len(s), np.float64)
        both[0::2], both[1::2] = v * factor, w * factor
        take = min(len(both), count - filled)
        out[filled : filled + take] = both[:take]
        filled += take
    return out
