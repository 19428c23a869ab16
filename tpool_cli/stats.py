"""How sure an accuracy is: 95% intervals, exact paired tests, per-image correctness records.

Pure Python (no torch, numpy or pandas), so reports and tests use it anywhere.

* :func:`wilson` — the Wilson score interval of k successes in n trials. On the demo's 360
  images one image is 0.28 points; the interval says how far a top-1 could move on another
  sample of the same size (354/360 = 98.33%, 95% interval 96.41–99.23%).
* :func:`mcnemar` — McNemar's exact test of two classifiers evaluated on the *same* images:
  only the images that flipped count (``b`` right only for A, ``c`` right only for B); under the
  null hypothesis each flip goes either way with probability 1/2, so the two-sided p-value is
  ``min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c)))``, computed exactly in integers.
* :func:`two_proportion` — the unpaired fallback (two-sided z-test with pooled variance) when two
  rows were not evaluated on the same images or one of them has no per-image record.
* :func:`encode_bits` / :func:`decode_bits` — the per-image top-1 correctness of a point, in
  sample order, packed 8 images a byte and base64-encoded (50,000 images: 8.3 kB), stored in a
  result row as ``correct1_bits`` so any two points can be paired later.
"""

from __future__ import annotations

import base64
import math
from typing import Optional, Sequence

Z95 = 1.959963984540054  # two-sided 95% normal quantile
ALPHA = 0.05


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n, as fractions in [0, 1]; (nan, nan) when n is 0."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the edges (rounding would give 0.9999...)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def wilson_pct(k: int, n: int) -> tuple[float, float]:
    """:func:`wilson` in percent, rounded to 2 decimals (the tables' precision)."""
    if n <= 0:
        return float("nan"), float("nan")
    lo, hi = wilson(k, n)
    return round(100.0 * lo, 2), round(100.0 * hi, 2)


def interval_fields(correct1: int, correct5: int, images: int) -> dict[str, list[float]]:
    """``top1_ci`` and ``top5_ci`` of a result row: 95% Wilson intervals in percent."""
    return {"top1_ci": list(wilson_pct(correct1, images)), "top5_ci": list(wilson_pct(correct5, images))}


def mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c`` (1.0 when none)."""
    if b < 0 or c < 0:
        raise ValueError("flip counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    tail, term = 0, 1  # sum of C(n, i) for i <= min(b, c), exactly
    for i in range(min(b, c) + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, (2 * tail) / (1 << n))


def two_proportion(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test (unpaired samples); 1.0 when undefined."""
    if n1 <= 0 or n2 <= 0:
        return float("nan")
    pooled = (k1 + k2) / (n1 + n2)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if var <= 0:
        return 1.0
    z = (k1 / n1 - k2 / n2) / math.sqrt(var)
    return math.erfc(abs(z) / math.sqrt(2))


def encode_bits(bits: Sequence[bool]) -> str:
    """Booleans packed most significant bit first, 8 to a byte, base64 (ASCII, JSON-safe)."""
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i >> 3] |= 0x80 >> (i & 7)
    return base64.b64encode(bytes(out)).decode("ascii")


def decode_bits(text: str, n: int) -> list[bool]:
    """The first ``n`` booleans of :func:`encode_bits`' output."""
    data = base64.b64decode(text)
    if len(data) * 8 < n:
        raise ValueError(f"bit record holds {len(data) * 8} bits, {n} wanted")
    return [bool(data[i >> 3] & (0x80 >> (i & 7))) for i in range(n)]


def correct_bits(predictions: Sequence[int], indices: Sequence[int], labels: Sequence[int]) -> str:
    """Per-image top-1 correctness in sample order: ``predictions[j]`` is the class predicted for
    sample ``indices[j]``, whose true class is ``labels[indices[j]]``."""
    pairs = sorted(zip(indices, predictions))
    return encode_bits([int(p) == int(labels[int(i)]) for i, p in pairs])


def flips(a: str, b: str, n: int) -> tuple[int, int]:
    """(images right for A only, right for B only) between two bit records of the same n images."""
    x = int.from_bytes(base64.b64decode(a), "big")
    y = int.from_bytes(base64.b64decode(b), "big")
    return bin(x & ~y).count("1"), bin(y & ~x).count("1")


def paired_p(a: Optional[str], b: Optional[str], n: int) -> Optional[tuple[int, int, float]]:
    """(A-only, B-only, McNemar p) when both records exist and cover n images; else None."""
    if not isinstance(a, str) or not isinstance(b, str) or n <= 0:
        return None
    if len(base64.b64decode(a)) != (n + 7) // 8 or len(base64.b64decode(b)) != (n + 7) // 8:
        return None
    only_a, only_b = flips(a, b, n)
    return only_a, only_b, mcnemar(only_a, only_b)


def correct_record(result, folder) -> str:
    """:func:`correct_bits` of an evaluation (``keep_predictions=True``) on ``folder``'s samples."""
    labels = [sample.label for sample in folder.samples]
    return correct_bits(result.predictions.tolist(), result.prediction_indices.tolist(), labels)
