"""Entropy-coded dithered quantization (ECDQ) of the rotated vector, to a bit budget.

Zamir and Feder, "On universal quantization by randomized uniform/lattice quantizers",
IEEE Trans. Inf. Theory 38(2), 1992, https://doi.org/10.1109/18.119713: its section 1.A
defines the randomized (subtractively dithered) uniform quantizer, whose error is uniform
on a step and independent of the input, and its first theorem gives the rate of entropy
coding its index given the dither, H(Q | U) = I(X; X + N) with N uniform on a step.

Each power-of-two slice z of RHT^k(x) (the rotations of EDEN,
Vargaftik et al., ICML 2022, https://proceedings.mlr.press/v162/vargaftik22a.html, section 4)
is normalized by its RMS sigma (so t = z / sigma is near N(0, 1)), and with a shared dither
u_i uniform on [-1/2, 1/2) that the receiver regenerates from (seed, Purpose.DITHER, i):

    q_i = round(t_i / step + u_i),        t_hat_i = step * (q_i - u_i).

The error t_hat_i - t_i = step * (q_i - (t_i / step + u_i)) is uniform on a step for every
input, so the estimate is unbiased and vNMSE = step^2 / 12 whatever x is. The indices are
entropy-coded with ``constriction``'s ANS coder under the model the receiver can rebuild
without any table: t_i / step + u_i ~ N(u_i, 1 / step^2), integrated over each unit bin,
i.e. the Gaussian the rotation produces, conditioned on the dither. For speed the dither is
split into 64 buckets, each with one categorical model centred on the bucket (the
reconstruction still uses the exact dither: only the code length pays, about 1e-4 bit).
At 2 bits this sits within 0.002 bit of the ideal rate (REFERENCE.md: D about 0.098).

The budget ``bits`` is met on the measured wire bytes, header included: the step is first
taken from the Gaussian's rate function, then corrected by re-encoding until
``len(to_bytes())`` lies in [(1 - tol) * budget, budget] (tol = 0.2%). Any real
``bits`` in [1/16, 8] works, so fractional budgets (0.5, 1.5, 2.5) need nothing else. A
tensor too small for its header to fit the budget (a few hundred coordinates) gets the
step of ``bits`` per coordinate without the header: the wire then exceeds the budget by
the header, and the error stays that of the requested rate.

Wire: scales (step, M, sigma_1 .. sigma_S) with M the largest |q| (the model's support is
-M..M) and one RMS per slice of ``rotation.slice_layout(d)``; section "ans" (the ANS words,
raw 32-bit integers) and, only for near-constant inputs whose code is tiny, section "pad"
(zero bytes that keep the payload above the parser's expansion cap). Entropy coding runs
on the CPU (constriction is a CPU library): CUDA inputs are rotated on their device and
only the indices cross to the host.

Example::

    enc = fq.get_codec("ecdq", bits=2.0).encode(grad, seed=7)   # 2.0 bits/coord on the wire
"""

from __future__ import annotations

import functools
import math

import constriction
import numpy as np
import torch
from scipy.special import ndtr

from fedquant import random as fqr
from fedquant._numba import AVAILABLE, njit
from fedquant.codecs.base import check_input, check_seed, expect_scales, register_codec
from fedquant.codecs.rotated import RotatedCodec, slice_norm
from fedquant.rotation import padded_size, resolve_rotations, rotate, slice_layout
from fedquant.wire import Encoded, Section, WireError

MIN_BITS, MAX_BITS = 1.0 / 16, 8.0
MAX_SYMBOL = 4096  # largest |q| on the wire (the model's support is -M..M: tables <= 4 MB)
BUCKETS = 64  # dither buckets, one entropy model each
MIN_STEP, MAX_STEP = 2.0**-20, 2.0**16
TOLERANCE = 0.002  # accept a payload within 0.2% below the budget
MAX_SEARCH = 12  # encodes tried by the step search before settling
PAD_RATIO = 128  # payloads carry >= numel / PAD_RATIO bytes (1/16 bit per coordinate)


def check_bits(bits: float) -> float:
    """`bits` as a float in [MIN_BITS, MAX_BITS], else ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int | float) or not (
            math.isfinite(bits) and MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"bits must be a real number in [{MIN_BITS}, {MAX_BITS}], "
                         f"got {bits!r}")
    return float(bits)


@functools.lru_cache(maxsize=4096)  # bounded: a long-lived process sees many steps
def gaussian_rate(step: float) -> float:
    """Bits per coordinate of the ideal code of q = round(t / step + u) for t ~ N(0, 1)
    given the dither u ~ U[-1/2, 1/2): E_u H(Q | u), by a 256-point rule in u; below a
    step of 1/8, the high-resolution value h(N(0, 1 + step^2 / 12)) - log2(step) (equal to
    the rule within 1e-12 bit there)."""
    if step < 0.125:
        return 0.5 * math.log2(2 * math.pi * math.e * (1 + step * step / 12)) - math.log2(step)
    u = (np.arange(256) + 0.5) / 256 - 0.5
    k = math.ceil(9.0 / step) + 2
    q = np.arange(-k, k + 1)[:, None]
    p = ndtr((q + 0.5 - u) * step) - ndtr((q - 0.5 - u) * step)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() / u.size)


@functools.lru_cache(maxsize=4096)
def step_for_rate(rate: float) -> float:
    """The step whose Gaussian rate (:func:`gaussian_rate`) is `rate` bits, by bisection
    on log(step) (the rate falls monotonically as the step grows)."""
    lo, hi = math.log(MIN_STEP), math.log(MAX_STEP)
    for _ in range(60):
        mid = (lo + hi) / 2
        if gaussian_rate(math.exp(mid)) > rate:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def rate_slope(step: float) -> float:
    """d rate / d log2(step) of the Gaussian rate (negative; -1 at high resolution)."""
    return (gaussian_rate(step * 2**0.05) - gaussian_rate(step * 2**-0.05)) / 0.1


@njit(cache=True, nogil=True)
def _counting_sort(means, bucket, order, bounds):  # pragma: no cover - jit
    """A stable counting sort of the symbols by bucket min(floor((u + 1/2) * B), B - 1),
    B = bounds.size - 1: `order` and `bounds` (zeros on entry) are filled. The caller
    allocates the arrays: numba's own allocations are not on huge pages."""
    buckets = bounds.size - 1
    for i in range(means.size):
        b = min(np.int64((means[i] + 0.5) * buckets), buckets - 1)  # u >= -1/2: the floor
        bucket[i] = b
        bounds[b + 1] += 1
    for b in range(buckets):
        bounds[b + 1] += bounds[b]
    at = bounds[:-1].copy()
    for i in range(means.size):
        order[at[bucket[i]]] = i
        at[bucket[i]] += 1


def _buckets(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, bounds): the symbols sorted by dither bucket floor((u + 1/2) * BUCKETS)
    (stable), and each bucket's [bounds[b], bounds[b + 1]) in that order."""
    bounds = np.zeros(BUCKETS + 1, dtype=np.int64)
    if not AVAILABLE:
        bucket = np.minimum((means + 0.5) * BUCKETS, BUCKETS - 1).astype(np.uint8)
        np.cumsum(np.bincount(bucket, minlength=BUCKETS), out=bounds[1:])
        return np.argsort(bucket, kind="stable"), bounds
    order = np.empty(means.size, dtype=np.int64)
    _counting_sort(np.ascontiguousarray(means, dtype=np.float64),
                   np.empty(means.size, dtype=np.uint8), order, bounds)
    return order, bounds


def _models(step: float, m: int) -> list:
    """One categorical model over -m..m per dither bucket: N(c_b, 1 / step^2) integrated
    over unit bins, c_b the bucket's centre. The float64 probabilities are rounded to
    multiples of 2^-32 before constriction quantizes them, so that sender and receiver
    build the same integer tables even if their ndtr differ in the last bits."""
    centres = (np.arange(BUCKETS) + 0.5) / BUCKETS - 0.5
    edges = (np.arange(-m, m + 2) - 0.5)[None, :] - centres[:, None]
    p = np.diff(ndtr(edges * step), axis=1)
    p = np.maximum(np.round(p * 2.0**32), 1.0) * 2.0**-32
    return [constriction.stream.model.Categorical(row, perfect=False) for row in p]


def ans_encode(q: np.ndarray, means: np.ndarray, step: float, m: int,
               order_bounds: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """ANS words (uint32) of int32 symbols q in [-m, m], the symbols of each dither bucket
    coded under that bucket's model (:func:`_models`); `order_bounds` is
    ``_buckets(means)``, passed to reuse it across encodes."""
    order, bounds = order_bounds or _buckets(means)
    shifted = (q + m)[order]
    coder = constriction.stream.stack.AnsCoder()
    for b, model in reversed(list(enumerate(_models(step, m)))):
        if bounds[b + 1] > bounds[b]:
            coder.encode_reverse(shifted[bounds[b]: bounds[b + 1]], model)
    return coder.get_compressed()


def ans_decode(words: np.ndarray, means: np.ndarray, step: float, m: int,
               order_bounds: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The int32 symbols of :func:`ans_encode`; WireError if the words are malformed or
    do not decode to exactly ``means.size`` symbols. `order_bounds` as for
    :func:`ans_encode`."""
    order, bounds = order_bounds or _buckets(means)
    shifted = np.empty(means.size, dtype=np.int32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        for b, model in enumerate(_models(step, m)):
            if bounds[b + 1] > bounds[b]:
                shifted[bounds[b]: bounds[b + 1]] = coder.decode(
                    model, int(bounds[b + 1] - bounds[b]))
    except (ValueError, KeyError, RuntimeError) as e:
        raise WireError(f"sections['ans']: malformed ANS data ({e})") from None
    if not coder.is_empty():
        raise WireError("sections['ans']: ANS data left over after the declared count of "
                        "symbols (corrupt or mismatched payload)")
    q = np.empty(means.size, dtype=np.int32)
    q[order] = shifted - m
    return q


@register_codec
class ECDQ(RotatedCodec):
    """Entropy-coded subtractively dithered uniform quantization after RHTs, unbiased, at
    a measured bit budget (Zamir and Feder 1992; see the module docstring).

    Args:
        bits (float, default 2.0): bits per coordinate on the wire, header included, any
            real number in [1/16, 8].
        rotations (int | str, default "auto"): composed RHTs, 0..3 or "auto" (EDEN's
            section 7 check: 1 if the input is already flat, else 2).
    """

    name = "ecdq"
    unbiased = True
    raw_float_dtypes = {"ans": None}  # raw 32-bit words are ANS integers, not floats
    pad_ratio = PAD_RATIO

    def __init__(self, bits: float = 2.0, rotations: str = "auto"):
        self.bits = check_bits(bits)
        self.set_rotations(rotations)

    # ---- shared randomness ---------------------------------------------------------------
    def dither(self, seed: int, n: int, client: int = 0) -> torch.Tensor:
        """The shared dither u in [-1/2, 1/2), float64 on the CPU (exact in float64);
        `client` is used by codecs whose clients share the dither (correlated)."""
        return fqr.uniforms(seed, fqr.Purpose.DITHER, n).to(torch.float64) - 0.5

    def extra_sections(self) -> dict[str, Section]:
        """Sections a subclass adds to every payload (none here)."""
        return {}

    def client_of(self, enc: Encoded) -> int:
        """The sender's index among the round's clients (0 for independent codecs)."""
        return 0

    # ---- sender --------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        flat = check_input(x)
        seed = check_seed(seed)
        d = flat.numel()
        k = resolve_rotations(self.rotations, flat, self.kind) if d else 1
        z = rotate(flat, self.rotation_seed(seed), k).cpu()
        self._check_rotation(z, flat)
        sigmas = [slice_norm(z[s.offset: s.offset + s.size]) / math.sqrt(s.size)
                  for s in slice_layout(d)]
        z = z.to(torch.float64)
        active = self._active(d, sigmas)
        t = torch.cat([z[lo:hi] / sg for lo, hi, sg in active]).numpy() if active else \
            np.zeros(0)
        state = self.coding_state(seed, d, active, getattr(self, "client", 0))

        def build(step: float | None) -> Encoded | None:
            """The encoding at `step` (None: the header alone, with no ANS words); None
            if an index would exceed MAX_SYMBOL."""
            if step is None:
                ans = Section("ans", 32, 0, b"")
                return self._new_encoded(x, seed, rotations=k, scales=(1.0, 1.0, *sigmas),
                                         sections={"ans": ans, **self.extra_sections()})
            coded = self.code(t, state, step) if t.size else (np.zeros(0, np.uint32), 0)
            if coded is None:
                return None
            words, m = coded
            ans = Section.from_raw("ans", torch.from_numpy(words.view(np.int32)))
            return self._padded(self._new_encoded(x, seed, rotations=k,
                                                  scales=(step, float(m), *sigmas),
                                                  sections={"ans": ans,
                                                            **self.extra_sections()}))

        return self._search(build, d, t.size)

    def _active(self, d: int, sigmas: list[float]) -> list[tuple[int, int, float]]:
        """(lo, hi, sigma) of every slice with a non-zero RMS (zero slices send nothing)."""
        return [(s.offset, s.offset + s.size, sg)
                for s, sg in zip(slice_layout(d), sigmas, strict=True) if sg > 0]

    def _means(self, seed: int, d: int, active: list[tuple[int, int, float]],
               client: int = 0) -> np.ndarray:
        """The model means of the coded symbols: the dither of the active coordinates."""
        if not active:
            return np.zeros(0)
        u = self.dither(seed, padded_size(d), client)
        return torch.cat([u[lo:hi] for lo, hi, _ in active]).numpy()

    # ---- the quantizer and its code (a lattice codec overrides these four) --------------
    def coding_state(self, seed: int, d: int, active: list[tuple[int, int, float]],
                     client: int = 0):
        """What both sides derive from the seed before coding: the dither of the active
        coordinates and its bucket order."""
        means = self._means(seed, d, active, client)
        return means, _buckets(means)

    def code(self, t: np.ndarray, state, step: float) -> tuple[np.ndarray, int] | None:
        """(ANS words, M) of the normalized coordinates t at `step`; None if an index
        would exceed MAX_SYMBOL."""
        means, order_bounds = state
        q = np.rint(t * (1.0 / step) + means).astype(np.int32)
        m = int(np.abs(q).max())
        if m > MAX_SYMBOL:
            return None
        return ans_encode(q, means, step, max(m, 1), order_bounds), m

    def values(self, words: np.ndarray, state, step: float, m: int) -> np.ndarray:
        """The receiver's normalized coordinates t_hat (float64) from the ANS words."""
        means, order_bounds = state
        return (ans_decode(words, means, step, max(m, 1), order_bounds) - means) * step

    def first_step(self, rate: float) -> float:
        """The step whose ideal rate on N(0, 1) is `rate` bits per coordinate."""
        return step_for_rate(rate)

    def slope(self, step: float) -> float:
        """d rate / d log2(step) near `step` (negative)."""
        return rate_slope(step)

    def _padded(self, enc: Encoded) -> Encoded:
        """Add zero bytes when the payload is below numel / PAD_RATIO bytes, so that the
        parser's expansion cap (fedquant.wire.MAX_EXPANSION) admits it."""
        short = -(-enc.numel // self.pad_ratio) - enc.nbytes
        if short > 0:
            enc.sections["pad"] = Section("pad", 8, short, bytes(short))
        return enc

    def _search(self, build, d: int, coded: int) -> Encoded:
        """The encoding with the finest step whose wire size meets the budget (see the
        module docstring): a Gaussian first guess, then corrections from measured sizes."""
        budget = math.floor(self.bits * d / 8)
        if coded == 0:
            return build(1.0)
        header = build(None).nbytes + 6  # + the ANS words' length prefix and final word
        step = self.first_step(max(8.0 * (budget - header) / coded, 1e-3))
        best = None
        for _ in range(MAX_SEARCH):
            enc = build(step)
            if enc is None:  # an index beyond MAX_SYMBOL: coarser
                step = min(step * 2, MAX_STEP)
                continue
            size = enc.nbytes
            if size <= budget and (best is None or enc.scales[0] < best.scales[0]):
                best = enc
            if budget * (1 - TOLERANCE) <= size <= budget:
                break
            # bits per symbol to shed (or to spend), aiming at the middle of the window
            excess = 8.0 * (size - budget * (1 - TOLERANCE / 2)) / coded
            slope = min(self.slope(step), -0.05)
            factor = 2 ** min(max(-excess / slope, -8.0), 8.0)
            step = min(max(step * factor, MIN_STEP), MAX_STEP)
        if best is not None:
            return best
        # the header alone (nearly) fills the budget (a tensor of a few hundred
        # coordinates): spend `bits` per coordinate on the payload and exceed the budget by
        # the header, rather than send a step so coarse that the estimate is useless
        step, enc = self.first_step(self.bits), None
        while enc is None and step <= MAX_STEP:
            enc = build(step)
            step *= 2
        return enc if enc is not None else build(MAX_STEP)

    # ---- receiver ------------------------------------------------------------------------
    def validate(self, enc: Encoded) -> None:
        super().validate(enc)
        expect_scales(enc, 2 + len(slice_layout(enc.numel)))
        step, m = enc.scales[0], enc.scales[1]
        if not MIN_STEP <= step <= MAX_STEP:
            raise WireError(f"scales[0] (step): must be in [2^-20, 2^16], got {step}")
        if not (m == int(m) and 0 <= m <= MAX_SYMBOL):
            raise WireError(f"scales[1] (largest index M): must be an integer in "
                            f"0..{MAX_SYMBOL}, got {m}")
        if any(s < 0 for s in enc.scales[2:]):
            raise WireError("scales: a slice RMS (entries 2..) is negative")
        ans = enc.section("ans")
        if ans.bits != 32:
            raise WireError(f"sections['ans'].bits: expected 32, got {ans.bits}")
        if not any(s > 0 for s in enc.scales[2:]) and ans.count:
            raise WireError("sections['ans']: data for a payload whose slices are all zero")
        if "pad" in enc.sections:
            pad = enc.sections["pad"]
            if pad.bits != 8 or any(pad.data):
                raise WireError("sections['pad']: must be zero bytes (bits=8)")
        extra = set(enc.sections) - {"ans", "pad", *self.extra_sections()}
        if extra:
            raise WireError(f"sections: unexpected {sorted(extra)} for codec '{self.name}'")

    def decode_rotated(self, enc: Encoded, device=None) -> torch.Tensor:
        """(q - u) * step * sigma per slice, float32, in the rotated domain."""
        d = enc.numel
        step, m = enc.scales[0], int(enc.scales[1])
        sigmas = list(enc.scales[2:])
        out = torch.zeros(padded_size(d), dtype=torch.float64)
        active = self._active(d, sigmas)
        if active:
            state = self.coding_state(enc.seed, d, active, self.client_of(enc))
            words = enc.section("ans").raw("int").numpy().view(np.uint32)
            values = self.values(words, state, step, m)
            pos = 0
            for lo, hi, sg in active:
                out[lo:hi] = torch.from_numpy(values[pos: pos + hi - lo]) * sg
                pos += hi - lo
        return out.to(device=device, dtype=torch.float32)

    def stats(self, enc: Encoded) -> dict[str, float]:
        return {"step": enc.scales[0]}


__all__ = ["ECDQ", "ans_decode", "ans_encode", "gaussian_rate", "step_for_rate"]
