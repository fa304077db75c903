"""Calibrated roofline step-time model: fit on a measured run, evaluate on another GPU.

Per step i with B_i bytes moved and F_i FLOPs per GPU, on a GPU of peak bandwidth BW (B/s) and
dense peak P (FLOP/s):

    t_i = max(B_i / (BW · η_bw), F_i / (P · η_f)) + c

η_bw, η_f: achieved fractions of peak bandwidth and compute; c: a fixed per-step overhead (s) that
does not scale with bytes or FLOPs (kernel launches, small kernels, synchronisation). The fit is
least squares of the relative residuals (model − t)/t (weights 1/t²: a 3 ms batch-1 step counts as much
as a 20 ms batch-128 one) over the measured steps — one run's or, for a joint fit across batch sizes,
several runs' — with a = 1/(BW·η_bw) > 0, b = 1/(P·η_f) > 0, c >= 0.

Identifiability: an efficiency is kept only when the steps pin it, i.e. the standard error of its log
(`_log_slope_sd`: the residual scale over the part of its column that the other parameters' columns do
not explain) is below IDENTIFIED_SD. Steps that all move the same bytes (batch 1 under CUDA graphs) make
the bytes column collinear with the overhead's: η_bw is then the prior (the caller's `eta_bw_prior`, a
physical achievable-bandwidth fraction) and c what remains, and the note says so.

For a given (a, b) the step is memory-bound iff F_i/B_i <= a/b, so sorting the steps by arithmetic
intensity turns the problem into a search over one split point: steps below it are fitted as
a·B + c, steps above as b·F + c (linear least squares from prefix sums). Candidate splits are
scored by the true max() objective, then refined by re-partitioning with the fitted parameters.

An efficiency fitted below MIN_EFFICIENCY (30 %) is not believed: a step whose time grows with its
bytes at 1 % of peak bandwidth is not limited by bandwidth, its time correlates with bytes through
something else (per-token host work in a launch-bound engine). That efficiency is set to its prior
and the rest refitted, so the time is attributed to the overhead c, which does not scale with the
GPU's peaks.

Robustness: a least-squares fit is pulled by a handful of steps no roofline explains (a kernel JIT-
compiled on first use of a shape, a CUDA-graph capture, a GC pause: one 24 ms step among 6 ms ones
turned the decode fit of a real vLLM trace into "η_bw = 2.0 plus 5.5 ms overhead"). So the fit is
redone without the steps whose residual lies more than OUTLIER_MADS robust standard deviations
(1.4826 · MAD) from the median residual, at most MAX_OUTLIER_FRACTION of them; the reported errors
(rmse, mape, r2) are still over every step. An efficiency fitted above 1 is physically impossible
(the byte or FLOP model cannot over-count that much for these kernels): it is held at 1 and the rest
refitted, with a note.

When every step lies on one side of the ridge, the other efficiency is not identified by the data:
the fit reports the bound the data implies (no step may cross the ridge) and uses a prior (a
measured matmul ceiling where the GPU table has one) clipped to that bound; `*_identified` says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, TypedDict

import numpy as np

MAX_FIT_STEPS = 50_000
"""Larger runs are fitted on a fixed-seed random subset of this many steps (the fit is O(n) per
candidate split and 3 parameters need far fewer points)."""

_CANDIDATES = 256

MIN_EFFICIENCY = 0.3
"""An efficiency fitted below this is read as "this resource does not limit the steps" (their time
correlates with bytes or FLOPs through something else, e.g. per-token host work in a launch-bound
engine) rather than as kernels running at a few % of peak; see fit_roofline. 30 %: kernels that a
resource limits reach more of it than that (decode GEMVs 80-90 % of HBM bandwidth, large GEMMs 50-80 % of
the dense peak), while the per-step overhead is fitted apart. At 10 % the joint fit of the H100 vLLM
sweep read vLLM's ~50 ms eager-prefill floor as bytes moved at 14 % of peak, and projected a 1024-token
prefill 18 ms faster on an H200."""


MAX_EFFICIENCY = 1.0
"""No kernel moves more bytes, or does more FLOPs, per second than the GPU's peak."""

OUTLIER_MADS = 3.5
"""Steps whose fit residual is further than this many robust standard deviations from the median
residual are left out of the fit (not out of the projection, where each keeps its own residual)."""

MAX_OUTLIER_FRACTION = 0.2

IDENTIFIED_SD = 0.1
"""An efficiency counts as identified by the data when they pin its log to within this standard error
(±10 %); otherwise the prior is used (see `_log_slope_sd`). A batch-1 CUDA-graph decode trace, where
every step moves the same bytes, pins nothing: η_bw and the per-step overhead are collinear."""

SIGMA_FLOOR = 1e-4
"""Floor of the relative residual scale (robust SD of (model − t)/t) in that test: 0.01 %, the timing
resolution of a millisecond step, so a noiseless fit does not call rounding-level variation of the bytes
informative. Real GPU steps jitter by ~1 %, which is what the test then uses."""


@dataclass(frozen=True)
class RooflineFit:
    """A fitted step-time model. a = 1 / (BW · η_bw) (s per byte), b = 1 / (P · η_f) (s per FLOP)."""

    eta_bw: float
    eta_flops: float
    overhead_s: float
    bandwidth_identified: bool
    flops_identified: bool
    n_steps: int
    memory_bound_fraction: float
    rmse_s: float
    mape: float
    r2: float | None
    bandwidth: float
    peak_flops: float
    eta_bw_bound: float | None = None
    """When η_bw is not identified: the smallest η_bw consistent with every step being compute-bound."""
    eta_flops_bound: float | None = None
    """When η_f is not identified: the smallest η_f consistent with every step being memory-bound."""
    eta_bw_below_floor: float | None = None
    """The η_bw the free fit gave when it fell below the floor (then replaced by the prior)."""
    eta_flops_below_floor: float | None = None
    prior_note: str | None = None
    outliers: int = 0
    """Steps left out of the fit as outliers (see OUTLIER_MADS); the errors above include them."""
    eta_bw_data_sd: float | None = None
    """When the data did not pin η_bw (see IDENTIFIED_SD): the standard error of log η_bw they alone give
    (inf when every step moves the same bytes); the prior was used."""
    eta_flops_data_sd: float | None = None
    host_floor_s: float | None = None
    """Steps launched kernel by kernel (outside CUDA graphs): the host's issue time L (s), a floor on the
    GPU span of a step the GPU starts with the host (see `fit_with_floor`); None when none was fitted."""
    host_paced: int = 0
    """Calibration steps whose span the floor, not the GPU work, explains."""

    def step_time(
        self,
        nbytes: np.ndarray,
        flops: np.ndarray,
        bandwidth: float,
        peak_flops: float,
        head_s: np.ndarray | None = None,
    ) -> np.ndarray:
        """Step GPU time (s) of steps with these per-GPU bytes and FLOPs on a GPU of the given peaks;
        `head_s`: how long the GPU was still busy with earlier steps when each step's host work began
        (with a host floor, max(GPU work, L − head))."""
        work = self.roofline_time(nbytes, flops, bandwidth, peak_flops) + self.overhead_s
        return np.maximum(work, self.floor_time(head_s, len(work)))

    def floor_time(self, head_s: np.ndarray | None, n: int) -> np.ndarray:
        """The host floor of each step, L − head (s; 0 without a floor or a head start record)."""
        if self.host_floor_s is None or head_s is None:
            return np.zeros(n)
        return np.maximum(self.host_floor_s - np.nan_to_num(np.asarray(head_s, dtype=np.float64)), 0.0)

    def roofline_time(
        self, nbytes: np.ndarray, flops: np.ndarray, bandwidth: float, peak_flops: float
    ) -> np.ndarray:
        """The part of the step time that scales with the GPU: max(B/(BW·η_bw), F/(P·η_f)), s."""
        return np.maximum(nbytes / (bandwidth * self.eta_bw), flops / (peak_flops * self.eta_flops))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bandwidth_achieved_bytes_per_s"] = self.eta_bw * self.bandwidth
        d["flops_achieved_per_s"] = self.eta_flops * self.peak_flops
        return d


class FitQuality(TypedDict):
    rmse_s: float
    mape: float
    r2: float | None


def fit_quality(resid: np.ndarray, t: np.ndarray) -> FitQuality:
    """How well predictions with residuals `resid` (s) fit step times `t` (s): RMSE (s), mean absolute
    relative error, and R² (None when the times do not vary)."""
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    return {
        "rmse_s": float(np.sqrt(np.mean(resid**2))),
        "mape": float(np.mean(np.abs(resid) / t)),
        "r2": 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else None,
    }


def join_notes(first: str | None, then: str) -> str:
    """`first; then`, or `then` alone when there is no first note."""
    return f"{first}; {then}" if first else then


def _evaluate(
    a: float, b: float, c: float, B: np.ndarray, F: np.ndarray, t: np.ndarray, w: np.ndarray
) -> float:
    return float(np.sum(w * (np.maximum(a * B, b * F) + c - t) ** 2))


def _split_fits(
    B: np.ndarray,
    F: np.ndarray,
    t: np.ndarray,
    w: np.ndarray,
    ks: np.ndarray,
    a_fix: float | None = None,
    b_fix: float | None = None,
) -> np.ndarray:
    """Weighted least-squares (a, b, c) for each split k (steps [0, k) memory-bound), intensity-sorted
    inputs, weights w; a / b held at a_fix / b_fix when given. Rows are NaN where a split's system is
    singular."""
    zero = np.zeros(1)
    cB2 = np.concatenate([zero, np.cumsum(w * B * B)])
    cB = np.concatenate([zero, np.cumsum(w * B)])
    cBt = np.concatenate([zero, np.cumsum(w * B * t)])
    cF2 = np.concatenate([zero, np.cumsum(w * F * F)])
    cF = np.concatenate([zero, np.cumsum(w * F)])
    cFt = np.concatenate([zero, np.cumsum(w * F * t)])
    n = float(np.sum(w))
    st = float(np.sum(w * t))
    mB2, mB, mBt = cB2[ks], cB[ks], cBt[ks]
    fF2, fF, fFt = cF2[-1] - cF2[ks], cF[-1] - cF[ks], cFt[-1] - cFt[ks]
    # Scale the unknowns to O(1) so the systems are well conditioned (bytes ~1e10, FLOPs ~1e13).
    sB, sF = 1.0 / max(float(np.max(B)), 1e-300), 1.0 / max(float(np.max(F)), 1e-300)
    A = np.zeros((len(ks), 3, 3))
    A[:, 0, 0] = mB2 * sB * sB
    A[:, 0, 2] = A[:, 2, 0] = mB * sB
    A[:, 1, 1] = fF2 * sF * sF
    A[:, 1, 2] = A[:, 2, 1] = fF * sF
    A[:, 2, 2] = n
    rhs = np.stack([mBt * sB, fFt * sF, np.full(len(ks), st)], axis=1)
    # A held parameter moves to the right-hand side (only the c row couples a and b).
    if a_fix is not None:
        rhs[:, 2] -= a_fix * mB
    if b_fix is not None:
        rhs[:, 2] -= b_fix * fF
    free = [i for i, fixed in ((0, a_fix), (1, b_fix)) if fixed is None] + [2]
    A, rhs = A[:, free][:, :, free], rhs[:, free]
    out = np.full((len(ks), 3), np.nan)
    m = len(free)
    ok = np.abs(np.linalg.det(A)) > 1e-12 * np.maximum(1.0, np.abs(A).max(axis=(1, 2)) ** m)
    if ok.any():
        sol = np.linalg.solve(A[ok], rhs[ok][..., None])[..., 0]
        full = np.zeros((int(ok.sum()), 3))
        full[:, free] = sol * np.array([sB, sF, 1.0])[free]
        if a_fix is not None:
            full[:, 0] = a_fix
        if b_fix is not None:
            full[:, 1] = b_fix
        out[ok] = full
    return out


def _one_sided(
    x: np.ndarray, t: np.ndarray, w: np.ndarray, s_fix: float | None = None
) -> tuple[float, float]:
    """Weighted least squares t ≈ s·x + c with s > 0, c >= 0 (c = 0 refit when negative); s held at
    s_fix when given."""
    if s_fix is not None:
        return s_fix, max(0.0, float(np.average(t - s_fix * x, weights=w)))
    if len(x) >= 2 and np.ptp(x) > 0:
        s, c = np.polyfit(x, t, 1, w=np.sqrt(w))
        if s > 0 and c >= 0:
            return float(s), float(c)
    xx = float(np.dot(w * x, x))
    s = float(np.dot(w * x, t) / xx) if xx > 0 else 0.0
    return max(s, 0.0), 0.0


def _fit(
    B: np.ndarray,
    F: np.ndarray,
    t: np.ndarray,
    w: np.ndarray,
    a_fix: float | None = None,
    b_fix: float | None = None,
) -> tuple[float, float, float]:
    """Least squares (a, b, c) of t ≈ max(a·B, b·F) + c over intensity-sorted steps (see module doc)."""
    n = len(t)

    def valid(p: np.ndarray) -> bool:
        return bool(np.isfinite(p[0]) and p[0] > 0 and p[1] > 0 and p[2] >= 0)

    cands: list[tuple[float, float, float]] = []
    a1, c1 = _one_sided(B, t, w, a_fix)
    cands.append((a1, b_fix or 0.0, c1))
    b0, c0 = _one_sided(F, t, w, b_fix)
    cands.append((a_fix or 0.0, b0, c0))
    if a_fix is not None and b_fix is not None:
        c = max(0.0, float(np.average(t - np.maximum(a_fix * B, b_fix * F), weights=w)))
        cands.append((a_fix, b_fix, c))
    ks = np.unique(np.linspace(1, n - 1, min(_CANDIDATES, max(n - 1, 1))).round().astype(np.int64))
    ks = ks[(ks >= 1) & (ks <= n - 1)]
    if len(ks):
        for p in _split_fits(B, F, t, w, ks, a_fix, b_fix):
            if valid(p):
                cands.append((float(p[0]), float(p[1]), float(p[2])))
    best = min(cands, key=lambda p: _evaluate(p[0], p[1], p[2], B, F, t, w))
    best_sse = _evaluate(best[0], best[1], best[2], B, F, t, w)
    # Refine: re-partition by the fitted ridge, refit that split, while the true objective falls.
    for _ in range(30):
        a, b, c = best
        if a <= 0 or b <= 0:
            break
        k = int(np.searchsorted(F / B, a / b, side="right"))
        if k <= 0 or k >= n:
            break
        trial = _split_fits(B, F, t, w, np.array([k]), a_fix, b_fix)[0]
        if not valid(trial):
            break
        sse = _evaluate(float(trial[0]), float(trial[1]), float(trial[2]), B, F, t, w)
        if sse >= best_sse * (1 - 1e-12):
            break
        best, best_sse = (float(trial[0]), float(trial[1]), float(trial[2])), sse
    return best


def fit_roofline(
    nbytes: np.ndarray,
    flops: np.ndarray,
    time_s: np.ndarray,
    *,
    bandwidth: float,
    peak_flops: float,
    eta_bw_prior: float = 0.8,
    eta_flops_prior: float = 0.8,
    min_efficiency: float = MIN_EFFICIENCY,
    seed: int = 0,
) -> RooflineFit:
    """Fit t = max(B/(BW·η_bw), F/(P·η_f)) + c to measured steps (per-GPU bytes and FLOPs, GPU time).

    Steps with non-finite or non-positive inputs are ignored. An efficiency fitted below
    `min_efficiency` means that resource does not limit the steps (their time grows with bytes or
    FLOPs for another reason, e.g. host-bound launches): it is set to its prior and the fit redone,
    so the time goes to the overhead c instead of scaling with the GPU's peak. The priors are also
    used for an efficiency the data cannot identify (see the module doc). Raises ValueError with
    fewer than 3 usable steps.
    """
    B = np.asarray(nbytes, dtype=np.float64)
    F = np.asarray(flops, dtype=np.float64)
    t = np.asarray(time_s, dtype=np.float64)
    keep = np.isfinite(B) & np.isfinite(F) & np.isfinite(t) & (B > 0) & (F > 0) & (t > 0)
    B, F, t = B[keep], F[keep], t[keep]
    if len(t) < 3:
        raise ValueError(f"a roofline fit needs at least 3 steps with bytes, FLOPs and time; got {len(t)}")
    if len(t) > MAX_FIT_STEPS:
        pick = np.random.default_rng(seed).choice(len(t), MAX_FIT_STEPS, replace=False)
        B, F, t = B[pick], F[pick], t[pick]
    order = np.argsort(F / B, kind="stable")
    B, F, t = B[order], F[order], t[order]
    intensity = F / B  # of every step: an unidentified side's bound must hold for the outliers too
    keep = np.ones(len(t), dtype=bool)

    def fit_on(mask: np.ndarray) -> RooflineFit:
        return _fit_steps(
            B[mask],
            F[mask],
            t[mask],
            bandwidth,
            peak_flops,
            eta_bw_prior,
            eta_flops_prior,
            min_efficiency,
            intensity,
        )

    fit = fit_on(keep)
    for _ in range(3):  # leave the outliers of the last fit out and refit, while that set changes
        inliers = _inliers(fit.step_time(B, F, bandwidth, peak_flops) - t, t)
        if np.array_equal(inliers, keep) or inliers.sum() < 3:
            break
        keep = inliers
        fit = fit_on(keep)
    resid = fit.step_time(B, F, bandwidth, peak_flops) - t
    outliers = int(len(t) - keep.sum())
    note = fit.prior_note
    if outliers:
        extra = f"{outliers} of {len(t)} steps left out of the fit as outliers (residual > {OUTLIER_MADS:g} robust SD)"
        note = join_notes(note, extra)
    return replace(
        fit,
        n_steps=len(t),
        memory_bound_fraction=float(
            np.mean(B / (bandwidth * fit.eta_bw) >= F / (peak_flops * fit.eta_flops))
        ),
        **fit_quality(resid, t),
        prior_note=note,
        outliers=outliers,
    )


def _inliers(resid: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Steps whose residual is within OUTLIER_MADS robust SDs of the median residual (at most
    MAX_OUTLIER_FRACTION of the steps are left out: the largest deviations first)."""
    dev = np.abs(resid - np.median(resid))
    # A scale floor (1e-6 of the median step) so an exact fit does not turn float noise into outliers.
    scale = max(1.4826 * float(np.median(dev)), 1e-6 * float(np.median(t)))
    keep = dev <= OUTLIER_MADS * scale
    if keep.mean() < 1 - MAX_OUTLIER_FRACTION:
        keep = dev <= np.quantile(dev, 1 - MAX_OUTLIER_FRACTION)
    return keep


def _log_slope_sd(target: np.ndarray, others: list[np.ndarray], sigma: float) -> float:
    """How well the steps pin one slope of the (relative-residual) least squares: the standard error of
    its log, sigma / ‖target ⊥ others‖, where `target` is ∂(pred/t)/∂log(slope) per step and `others`
    the same for the other free parameters (the overhead's column 1/t, the other side's slope).
    Infinite when the target column lies in their span: e.g. every step moves the same bytes, so the
    bytes' slope and the overhead are collinear."""
    if not target.any():
        return math.inf
    basis = np.stack(others, axis=1) if others else np.zeros((len(target), 0))
    if basis.shape[1]:
        coef, *_ = np.linalg.lstsq(basis, target, rcond=None)
        perp = target - basis @ coef
    else:
        perp = target
    info = float(perp @ perp)
    # Below float resolution of the column the "variation" is rounding, not data.
    if info <= 1e-9 * float(target @ target):
        return math.inf
    return sigma / math.sqrt(info)


def _fit_steps(
    B: np.ndarray,
    F: np.ndarray,
    t: np.ndarray,
    bandwidth: float,
    peak_flops: float,
    eta_bw_prior: float,
    eta_flops_prior: float,
    min_efficiency: float,
    intensity: np.ndarray,
) -> RooflineFit:
    """One least-squares fit (identifiability, floor, cap and priors applied) over intensity-sorted
    steps, relative residuals (weights 1/t²); `intensity` (FLOP/byte) of all steps, for the bound of an
    efficiency the fitted steps do not identify."""
    n = len(t)
    w = 1.0 / (t * t)
    notes = []

    a_fix = b_fix = None
    eta_bw_rejected = eta_fl_rejected = None
    bw_sd = fl_sd = None
    # Free fit; an efficiency the data do not pin, or one below the floor, is replaced by its prior and
    # the fit redone (the other side may then pick up the correlation, so check again).
    for _ in range(6):
        a, b, c = _fit(B, F, t, w, a_fix, b_fix)
        mem_side = (a * B >= b * F) if a > 0 and b > 0 else np.full(n, b <= 0)
        rel = (np.maximum(a * B, b * F) + c - t) / t
        sigma = max(1.4826 * float(np.median(np.abs(rel - np.median(rel)))), SIGMA_FLOOR)
        changed = False
        u = np.where(mem_side, a * B / t, 0.0)  # ∂(pred/t)/∂log a
        v = np.where(mem_side, 0.0, b * F / t)  # ∂(pred/t)/∂log b
        z = 1.0 / t  # ∂(pred/t)/∂c
        if a_fix is None and a > 0 and mem_side.any():
            sd = _log_slope_sd(u, [z] + ([v] if b_fix is None and v.any() else []), sigma)
            if sd > IDENTIFIED_SD:
                bw_sd, a_fix, changed = sd, 1.0 / (bandwidth * eta_bw_prior), True
        if b_fix is None and b > 0 and (~mem_side).any():
            sd = _log_slope_sd(v, [z] + ([u] if a_fix is None and u.any() else []), sigma)
            if sd > IDENTIFIED_SD:
                fl_sd, b_fix, changed = sd, 1.0 / (peak_flops * eta_flops_prior), True
        if changed:
            continue
        if a_fix is None and a > 0 and mem_side.any() and 1.0 / (bandwidth * a) < min_efficiency:
            eta_bw_rejected = 1.0 / (bandwidth * a)
            a_fix = 1.0 / (bandwidth * eta_bw_prior)
            changed = True
        if b_fix is None and b > 0 and (~mem_side).any() and 1.0 / (peak_flops * b) < min_efficiency:
            eta_fl_rejected = 1.0 / (peak_flops * b)
            b_fix = 1.0 / (peak_flops * eta_flops_prior)
            changed = True
        if a_fix is None and a > 0 and mem_side.any() and 1.0 / (bandwidth * a) > MAX_EFFICIENCY:
            notes.append(f"bandwidth efficiency fitted at {1.0 / (bandwidth * a):.3g}, above 1: held at 1")
            a_fix = 1.0 / (bandwidth * MAX_EFFICIENCY)
            changed = True
        if b_fix is None and b > 0 and (~mem_side).any() and 1.0 / (peak_flops * b) > MAX_EFFICIENCY:
            notes.append(f"FLOP efficiency fitted at {1.0 / (peak_flops * b):.3g}, above 1: held at 1")
            b_fix = 1.0 / (peak_flops * MAX_EFFICIENCY)
            changed = True
        if not changed:
            break
    for what, sym, rel_sd, prior, x in (
        ("bandwidth", "η_bw", bw_sd, eta_bw_prior, B),
        ("FLOP", "η_f", fl_sd, eta_flops_prior, F),
    ):
        if rel_sd is not None:
            spread = float(np.std(x) / np.mean(x)) if np.mean(x) > 0 else 0.0
            pinned = "nothing" if math.isinf(rel_sd) else f"±{rel_sd * 100:.0f} %"
            notes.append(
                f"{what} efficiency not identified by these steps (their {'bytes' if sym == 'η_bw' else 'FLOPs'} "
                f"spread {spread * 100:.2g} %, so the per-step overhead and {sym} are collinear; the data alone pin "
                f"{sym} to {pinned}): prior {sym} = {prior:.3g} used, the overhead is what remains"
            )
    for what, value, prior in (
        ("bandwidth", eta_bw_rejected, eta_bw_prior),
        ("FLOP", eta_fl_rejected, eta_flops_prior),
    ):
        if value is not None:
            notes.append(
                f"{what} efficiency fitted at {value:.3g}, below the floor {min_efficiency:g}: that resource "
                f"does not limit these steps; used {prior:.3g} and refitted, the rest of the time is overhead"
            )
    bw_identified = a_fix is None and a > 0 and bool(mem_side.any())
    fl_identified = b_fix is None and b > 0 and bool((~mem_side).any())
    eta_bw_bound = eta_fl_bound = None
    refit_overhead = False
    if not fl_identified and b_fix is None:
        # Every step memory-bound: b·F_i <= a·B_i for all i, so b <= a / max(F/B): a lower bound on η_f.
        eta_fl_bound = 1.0 / (peak_flops * (a / float(intensity.max())))
        eta = max(eta_flops_prior, eta_fl_bound) if eta_fl_bound <= 1 else eta_flops_prior
        refit_overhead |= eta_fl_bound > 1
        b = 1.0 / (peak_flops * eta)
        notes.append(
            f"every step fitted as memory-bound: FLOP efficiency not identified (>= {eta_fl_bound:.3g}); "
            f"used {eta:.3g}"
        )
    if not bw_identified and a_fix is None:
        eta_bw_bound = 1.0 / (bandwidth * b * float(intensity.min()))
        eta = max(eta_bw_prior, eta_bw_bound) if eta_bw_bound <= 1 else eta_bw_prior
        refit_overhead |= eta_bw_bound > 1
        a = 1.0 / (bandwidth * eta)
        notes.append(
            f"every step fitted as compute-bound: bandwidth efficiency not identified (>= {eta_bw_bound:.3g}); "
            f"used {eta:.3g}"
        )
    if refit_overhead:
        # A bound above 1 means the overhead c, not the roofline, carried the steps: with both
        # efficiencies at physical values, c is what remains on average.
        c = max(0.0, float(np.average(t - np.maximum(a * B, b * F), weights=w)))
        notes.append(
            "the implied bound is above 1 (the per-step overhead carries the time): the prior was used"
        )
    pred = np.maximum(a * B, b * F) + c
    resid = pred - t
    return RooflineFit(
        eta_bw=1.0 / (bandwidth * a),
        eta_flops=1.0 / (peak_flops * b),
        overhead_s=c,
        bandwidth_identified=bw_identified,
        flops_identified=fl_identified,
        n_steps=n,
        memory_bound_fraction=float(np.mean(a * B >= b * F)),
        **fit_quality(resid, t),
        bandwidth=bandwidth,
        peak_flops=peak_flops,
        eta_bw_bound=eta_bw_bound,
        eta_flops_bound=eta_fl_bound,
        eta_bw_below_floor=eta_bw_rejected,
        eta_flops_below_floor=eta_fl_rejected,
        prior_note="; ".join(notes) or None,
        eta_bw_data_sd=bw_sd,
        eta_flops_data_sd=fl_sd,
    )


FLOOR_TOL = 0.1
"""In `fit_with_floor`, a step whose floor (L − head) reaches within this fraction of its span may be
host-paced: it is left out of the GPU-work fit for that L."""

FLOOR_LOSS_CAP = 0.5
"""`fit_with_floor` scores each candidate L by squared relative residuals capped at this (50 %): a step
no model explains (a queued step whose span the trace cut short) does not choose the floor."""


def _fit_through(B: np.ndarray, F: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted least squares of y ≈ max(a·B, b·F) with no intercept over intensity-sorted steps: with the
    intercept held, the memory-bound prefix and compute-bound suffix of a split decouple."""
    cBy = np.concatenate([[0.0], np.cumsum(w * B * y)])
    cBB = np.concatenate([[0.0], np.cumsum(w * B * B)])
    cFy = np.concatenate([[0.0], np.cumsum((w * F * y)[::-1])])[::-1]
    cFF = np.concatenate([[0.0], np.cumsum((w * F * F)[::-1])])[::-1]
    best, best_sse = (0.0, 0.0), math.inf
    for k in range(len(y) + 1):
        a = cBy[k] / cBB[k] if cBB[k] > 0 else 0.0
        b = cFy[k] / cFF[k] if cFF[k] > 0 else 0.0
        if a < 0 or b < 0 or (a == 0 and b == 0):
            continue
        sse = float(np.sum(w * (np.maximum(a * B, b * F) - y) ** 2))
        if sse < best_sse:
            best, best_sse = (a, b), sse
    return best


def _held_overhead(
    fit: RooflineFit, B: np.ndarray, F: np.ndarray, t: np.ndarray, overhead: float
) -> RooflineFit:
    """`fit` redone with the overhead held at `overhead` and the efficiencies the steps' side(s) need
    fitted (within [MIN_EFFICIENCY, 1]; a side without steps keeps `fit`'s value)."""
    a, b = _fit_through(B, F, np.maximum(t - overhead, 0.0), 1.0 / (t * t))
    eta_bw, eta_f = fit.eta_bw, fit.eta_flops
    if a > 0:
        eta_bw = min(1.0, max(MIN_EFFICIENCY, 1.0 / (fit.bandwidth * a)))
    if b > 0:
        eta_f = min(1.0, max(MIN_EFFICIENCY, 1.0 / (fit.peak_flops * b)))
    held = replace(fit, eta_bw=eta_bw, eta_flops=eta_f, overhead_s=overhead)
    resid = held.step_time(B, F, fit.bandwidth, fit.peak_flops) - t
    note = (
        f"the GPU work's split between overhead and slope is not identified by these steps: overhead held at "
        f"{overhead * 1e3:.3g} ms (the decode steps' per-step overhead), η fitted"
    )
    return replace(
        held,
        bandwidth_identified=a > 0,
        flops_identified=b > 0,
        **fit_quality(resid, t),
        prior_note=join_notes(fit.prior_note, note),
    )


def fit_with_floor(
    nbytes: np.ndarray,
    flops: np.ndarray,
    time_s: np.ndarray,
    head_s: np.ndarray,
    issue_s: np.ndarray | None = None,
    *,
    bandwidth: float,
    peak_flops: float,
    eta_bw_prior: float = 0.8,
    eta_flops_prior: float = 0.8,
    overhead_prior: float | None = None,
    seed: int = 0,
) -> RooflineFit:
    """Fit t = max(W, L − head), W = max(B/(BW·η_bw), F/(P·η_f)) + c, to steps run kernel by kernel.

    Outside CUDA graphs the host issues every kernel of a step, and the GPU cannot run ahead of it: a step
    the GPU starts with the host (head = 0: nothing earlier still queued) spans at least the host's issue
    time L, whatever its GPU work; a step queued behind earlier work (head > 0) had part of its issue
    hidden behind that work. L is a host property (kept on another GPU), W the GPU's. On the H100 vLLM
    sweep the issue time is 57-75 ms for a step of 1-16 requests (visible where the host returned before
    the GPU finished); a 1,024-token prefill started with its host spans 69 ms, a 569-token step queued
    158 ms behind earlier work spans 25 ms.

    L is chosen among the steps' own spans (t + head, and 0 for no floor) by the capped relative loss
    (FLOOR_LOSS_CAP); for each candidate, W is fitted (`fit_roofline`) on the steps its floor does not
    reach (L − head < (1 − FLOOR_TOL)·t). When those steps cannot split W's overhead from its slope
    (e.g. every one has the same tokens) and `overhead_prior` is given, the overhead is held there (the
    decode steps' per-step overhead: the GPU's fixed cost per step, the host's being L) and the slope fitted,
    instead of the efficiency held at its prior. Returns `fit_roofline`'s fit of all steps when no L helps.

    `issue_s`: the host's issue time where the trace shows it (the host returned while the GPU still had
    more than FLOOR_TOL of the step to run: NaN elsewhere). A floor is only fitted when some step shows it,
    and no higher than (1 + FLOOR_TOL) x the longest shown: an engine whose host waits for every step (HF
    eager) never shows it, and a 160 ms step the host waited for is GPU work, not a 160 ms issue time, when
    every issue time the trace shows is under 110 ms. The candidate search decides which steps the host
    paced; the floor is then their median span (each is a direct reading of the issue time)."""
    B = np.asarray(nbytes, dtype=np.float64)
    F = np.asarray(flops, dtype=np.float64)
    t = np.asarray(time_s, dtype=np.float64)
    h = np.maximum(np.nan_to_num(np.asarray(head_s, dtype=np.float64)), 0.0)
    ok = np.isfinite(B) & np.isfinite(F) & np.isfinite(t) & (B > 0) & (F > 0) & (t > 0)
    issue = np.full(len(ok), np.nan) if issue_s is None else np.asarray(issue_s, dtype=np.float64)
    B, F, t, h, issue = B[ok], F[ok], t[ok], h[ok], issue[ok]
    shown = issue[np.isfinite(issue) & (issue > 0)]

    def work_fit(mask: np.ndarray) -> RooflineFit:
        fit = fit_roofline(
            B[mask],
            F[mask],
            t[mask],
            bandwidth=bandwidth,
            peak_flops=peak_flops,
            eta_bw_prior=eta_bw_prior,
            eta_flops_prior=eta_flops_prior,
            seed=seed,
        )
        unpinned = fit.eta_bw_data_sd is not None or fit.eta_flops_data_sd is not None
        if overhead_prior is not None and unpinned:
            fit = _held_overhead(fit, B[mask], F[mask], t[mask], overhead_prior)
        return fit

    def loss(fit: RooflineFit) -> float:
        rel = (fit.step_time(B, F, bandwidth, peak_flops, h) - t) / t
        return float(np.sum(np.minimum(rel * rel, FLOOR_LOSS_CAP**2)))

    def floor_fit(L: float) -> RooflineFit | None:
        mask = (L - h) < (1 - FLOOR_TOL) * t
        if mask.sum() < 3 or mask.all():
            return None
        return replace(work_fit(mask), host_floor_s=float(L))

    plain = best = work_fit(np.ones(len(t), dtype=bool))
    if not len(shown):
        return plain
    best_loss = loss(best)
    # Only a step the GPU started with the host (its head start under FLOOR_TOL of its span) shows the
    # floor whole: the candidates are their spans, up to what the shown issue times allow.
    started_with_host = h < FLOOR_TOL * t
    cands = t[started_with_host] + h[started_with_host]
    for L in np.unique(cands[cands <= (1 + FLOOR_TOL) * float(shown.max())]):
        fit = floor_fit(float(L))
        if fit is None:
            continue
        value = loss(fit)
        if value < best_loss * (1 - 1e-9):
            best, best_loss = fit, value
    if best.host_floor_s is None:
        return best
    # The candidate search says which steps the host paced; the floor is their median span (each is a
    # direct reading of the issue time, the argmin only one of them).
    paced_mask = best.floor_time(h, len(t)) > best.step_time(B, F, bandwidth, peak_flops)
    if not paced_mask.any():  # a floor that paces no step only dropped steps from the fit: none
        return plain
    L = float(np.median(t[paced_mask] + h[paced_mask]))
    best = replace(best, host_floor_s=L)
    floor = best.floor_time(h, len(t))
    work = best.step_time(B, F, bandwidth, peak_flops)
    paced = int(np.sum(floor > work))
    resid = best.step_time(B, F, bandwidth, peak_flops, h) - t
    note = (
        f"host floor {L * 1e3:.3g} ms (kernels issued one by one outside the CUDA graphs): "
        f"{paced} of {len(t)} steps paced by the host"
    )
    return replace(
        best,
        host_paced=paced,
        n_steps=len(t),
        **fit_quality(resid, t),
        prior_note=join_notes(best.prior_note, note),
    )
