"""Low-rank factorizations of one weight layer, optionally in the metric of its inputs.

A layer ``y = W x`` (``W`` ``[Cout, D]``, a conv's ``D`` = Cin x kh x kw patch flattened in the
weight's own order ``(c, y, x)``) is replaced by layers whose composition is ``A Phi``:
``Phi`` ``[F, D]`` is what the leading factor layers compute from one patch, ``A``
``[Cout, F]`` the last layer. Three forms:

- ``svd``: a layer with the original kernel into ``r`` channels, then a 1x1 / Gemm / MatMul
  back to ``Cout``: truncated SVD of ``W`` (for a k x k conv this is Zhang et al.,
  "Accelerating Very Deep Convolutional Networks for Classification and Detection", TPAMI
  2016; for Gemm / MatMul / 1x1 conv the plain two-factor SVD);
- ``spatial``: a k x 1 conv into ``r`` channels, then a 1 x k conv (Jaderberg et al., "Speeding
  up Convolutional Neural Networks with Low Rank Expansions", BMVC 2014, scheme 2), from the SVD
  of ``W`` reshaped ``[(Cin, kh), (Cout, kw)]``;
- ``tucker2``: a 1x1 into ``r1`` channels, a k x k core ``r1 -> r2``, a 1x1 back to ``Cout``
  (Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
  Applications", ICLR 2016); ``r2 = Cout`` leaves out the last 1x1.

Data-aware (a metric ``M = E[x x^T]`` of the layer's input patches): the error minimised is
the output error ``tr((W - W') M (W - W')^T)``, not the weight error. ``svd`` truncates
``W L`` (``M = L L^T``, the whitened SVD: the optimum of that error, as in Zhang et al. and
SVD-LLM, Wang et al. 2024); the structured forms whiten the input channels (the per-pixel
channel moment) to choose their leading factors, and every form's last factor is the exact
least-squares optimum given the leading ones. Without data ``M = I`` and all of this is the
plain weight-space decomposition.

Every candidate's error is relative: ``tr(dW M dW^T) / tr(W M W^T)`` (``1 -`` the energy kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FORMS = ("svd", "spatial", "tucker2")
MAX_GRID = 32  # ranks tried per factor dimension (multiples of round_to, evenly spread)
MAX_TUCKER_INPUT_RANKS = 12  # each Tucker-2 input rank costs a projection and an SVD
JITTER = 1e-10

# Single-thread onnxruntime CPU time of one Conv / Gemm / MatMul node, in microseconds:
#   NODE + MAC * macs + IM2COL * im2col elements + OUT * output elements + IN * input elements
# fit by ``python tools/fit_latency_model.py`` (254 conv shapes, median error 8%). Only ratios
# matter: the model tells a factorization that would be slower than its layer (a 16-channel
# 3x3 conv split into a 3x3 and a 1x1 pays a second node and the same im2col) from one that
# is faster, which MACs alone cannot.
LATENCY_NODE = 6.0
LATENCY_MAC = 14.2e-6
LATENCY_IM2COL = 126e-6
LATENCY_OUT = 223e-6
LATENCY_IN = 244e-6


def node_latency(cin: int, cout: int, area: int, in_positions: int, out_positions: int, im2col: bool) -> float:
    """Estimated microseconds of one conv-like node (see the constants above)."""
    macs = cin * cout * area * out_positions
    columns = cin * area * out_positions if im2col else 0
    return (LATENCY_NODE + LATENCY_MAC * macs + LATENCY_IM2COL * columns + LATENCY_OUT * cout * out_positions
            + LATENCY_IN * cin * in_positions)


@dataclass(frozen=True)
class LayerShape:
    """What MACs of a layer and of its factors depend on."""

    op: str  # Conv | Gemm | MatMul
    cout: int
    cin: int
    kernel: Tuple[int, int] = (1, 1)
    strides: Tuple[int, int] = (1, 1)
    in_hw: Tuple[int, int] = (1, 1)  # conv input size (unpadded)
    out_hw: Tuple[int, int] = (1, 1)
    positions: int = 1  # Gemm / MatMul output rows per sample

    @property
    def area(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def columns(self) -> int:
        return self.cin * self.area

    @property
    def out_positions(self) -> int:
        return self.out_hw[0] * self.out_hw[1] * self.positions

    @property
    def macs(self) -> int:
        return self.cout * self.columns * self.out_positions

    @property
    def params(self) -> int:
        return self.cout * self.columns

    @property
    def in_positions(self) -> int:
        return self.in_hw[0] * self.in_hw[1] * self.positions

    def _im2col(self, area: int, strided: bool) -> bool:
        return self.op == "Conv" and (area > 1 or strided)

    def latency(self) -> float:
        """Estimated microseconds of the layer itself."""
        strided = self.strides != (1, 1)
        return node_latency(self.cin, self.cout, self.area, self.in_positions, self.out_positions, self._im2col(self.area, strided))

    def candidate_latency(self, form: str, ranks: Tuple[int, ...]) -> float:
        """Estimated microseconds of the factor layers."""
        out, inp = self.out_positions, self.in_positions
        kh, kw = self.kernel
        strided = self.strides != (1, 1)
        if form == "svd":
            (r,) = ranks
            return (node_latency(self.cin, r, self.area, inp, out, self._im2col(self.area, strided))
                    + node_latency(r, self.cout, 1, out, out, False))
        if form == "spatial":
            (r,) = ranks
            middle = self.out_hw[0] * self.in_hw[1]
            return (node_latency(self.cin, r, kh, inp, middle, True)
                    + node_latency(r, self.cout, kw, middle, out, True))
        if form == "tucker2":
            r1, r2 = ranks
            total = node_latency(self.cin, r1, 1, inp, inp, False)
            total += node_latency(r1, r2, self.area, inp, out, True)
            if r2 < self.cout:
                total += node_latency(r2, self.cout, 1, out, out, False)
            return total
        raise ValueError(f"unknown form {form!r}")

    def forms(self) -> Tuple[str, ...]:
        if self.op != "Conv" or self.area == 1:
            return ("svd",)
        if self.kernel[0] > 1 and self.kernel[1] > 1:
            return FORMS
        return ("svd", "tucker2")

    def candidate_cost(self, form: str, ranks: Tuple[int, ...]) -> Tuple[int, int]:
        """(MACs, params) of the factor layers."""
        out = self.out_positions
        kh, kw = self.kernel
        if form == "svd":
            (r,) = ranks
            return r * self.columns * out + self.cout * r * out, r * self.columns + self.cout * r
        if form == "spatial":
            (r,) = ranks
            # the k x 1 conv keeps the input width (no horizontal stride or padding)
            first = r * self.cin * kh * self.out_hw[0] * self.in_hw[1]
            return first + self.cout * r * kw * out, r * self.cin * kh + self.cout * r * kw
        if form == "tucker2":
            r1, r2 = ranks
            macs = r1 * self.cin * self.in_hw[0] * self.in_hw[1] + r2 * r1 * self.area * out
            params = r1 * self.cin + r2 * r1 * self.area
            if r2 < self.cout:
                macs += self.cout * r2 * out
                params += self.cout * r2
            return macs, params
        raise ValueError(f"unknown form {form!r}")


@dataclass
class Candidate:
    """One way to factor a layer, with its cost and relative error."""

    form: str
    ranks: Tuple[int, ...]
    macs: int
    params: int
    error: float
    latency: float = 0.0  # estimated microseconds (see node_latency)

    def label(self) -> str:
        return f"{self.form}({','.join(str(r) for r in self.ranks)})"

    def to_dict(self) -> Dict[str, object]:
        return {"form": self.form, "ranks": list(self.ranks), "macs": int(self.macs), "params": int(self.params),
                "error": float(self.error), "latency_us": round(float(self.latency), 2)}


@dataclass
class Factors:
    """The factor layers' weights and their composition ``A @ Phi``.

    ``leading``: ONNX weights of the layers before the last (their kernels follow from the
    form); ``last``: the last layer's weight as ``[Cout, F]``; ``features``: ``Phi`` ``[F, D]``.
    """

    candidate: Candidate
    leading: List[np.ndarray]
    last: np.ndarray
    features: np.ndarray = field(repr=False)

    def composed(self) -> np.ndarray:
        return self.last @ self.features


def rank_grid(full: int, round_to: int, *, limit: int = MAX_GRID) -> List[int]:
    """Ranks below ``full`` to try: multiples of ``round_to`` (all ranks when ``full`` is small)."""
    step = max(1, int(round_to))
    if full <= step:
        step = 1
    ranks = list(range(step, full, step))
    if len(ranks) > limit:
        picks = np.unique(np.round(np.linspace(0, len(ranks) - 1, limit)).astype(int))
        ranks = [ranks[i] for i in picks]
    return ranks


def _chol(m: np.ndarray) -> np.ndarray:
    scale = float(np.trace(m)) / max(1, m.shape[0])
    try:
        return np.linalg.cholesky(m)
    except np.linalg.LinAlgError:
        return np.linalg.cholesky(m + np.eye(m.shape[0]) * max(scale, 1.0) * 1e-6)


def _solve_psd(m: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``m^-1 rhs`` for a positive semi-definite ``m`` (a little jitter keeps it solvable)."""
    scale = float(np.trace(m)) / max(1, m.shape[0]) or 1.0
    return np.linalg.solve(m + np.eye(m.shape[0]) * scale * JITTER, rhs)


class LayerFactorizer:
    """All candidate factorizations of one layer, their errors, and their factors.

    ``weight``: ``[Cout, D]`` in the natural order ``(c, y, x)``; ``metric``: ``[D, D]``
    positive definite input moment in the same order (None: the weight metric, ``I``).
    """

    def __init__(self, shape: LayerShape, weight: np.ndarray, metric: Optional[np.ndarray] = None,
                 forms: Optional[Sequence[str]] = None):
        self.shape = shape
        self.weight = np.asarray(weight, dtype=np.float64).reshape(shape.cout, shape.columns)
        self.metric = None if metric is None else np.asarray(metric, dtype=np.float64)
        self.forms = tuple(f for f in shape.forms() if forms is None or f in forms)
        self._wm = self.weight if self.metric is None else self.weight @ self.metric  # W M
        self.energy = float(np.sum(self._wm * self.weight)) or 1.0
        self._cache: Dict[Tuple, object] = {}

    # -------------------------------------------------------------------- metric helpers
    def _project(self, phi: np.ndarray) -> Tuple[np.ndarray, float]:
        """The optimal last factor ``A`` for features ``phi`` and its relative error."""
        gram = phi @ phi.T if self.metric is None else phi @ self.metric @ phi.T
        cross = self._wm @ phi.T  # W M Phi^T
        a = _solve_psd(gram, cross.T).T
        return a, max(0.0, 1.0 - float(np.sum(a * cross)) / self.energy)

    def _whitened_svd(self, w: np.ndarray, metric: Optional[np.ndarray]):
        """``U, s, B`` with ``w ~ U_r diag(s_r) B_r`` optimal in ``metric`` (``B = V^T L^-1``)."""
        if metric is None:
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            return u, s, vt
        lower = _chol(metric)
        u, s, vt = np.linalg.svd(w @ lower, full_matrices=False)
        return u, s, np.linalg.solve(lower.T, vt.T).T

    def _channel_metric(self) -> Optional[np.ndarray]:
        """The per-pixel input-channel moment ``[Cin, Cin]`` (mean over kernel taps)."""
        if self.metric is None:
            return None
        c, k = self.shape.cin, self.shape.area
        return np.einsum("akbk->ab", self.metric.reshape(c, k, c, k)) / k

    # -------------------------------------------------------------------- the three forms
    def _svd(self):
        if ("svd",) not in self._cache:
            self._cache[("svd",)] = self._whitened_svd(self.weight, self.metric)
        return self._cache[("svd",)]

    def _input_projection(self, r1: int) -> np.ndarray:
        """``P`` ``[r1, Cin]``: the input-channel subspace the weight uses most (whitened)."""
        if ("inproj",) not in self._cache:
            c, k = self.shape.cin, self.shape.area
            unfolded = self.weight.reshape(self.shape.cout, c, k).transpose(1, 0, 2).reshape(c, -1)
            moment = self._channel_metric()
            if moment is None:
                q, _, _ = np.linalg.svd(unfolded, full_matrices=False)
                self._cache[("inproj",)] = (q, None)
            else:
                lower = _chol(moment)
                q, _, _ = np.linalg.svd(lower.T @ unfolded, full_matrices=False)
                self._cache[("inproj",)] = (q, lower)
        q, lower = self._cache[("inproj",)]
        basis = q[:, :r1]
        return basis.T if lower is None else np.linalg.solve(lower.T, basis).T  # Q^T L^-1

    def _tucker_core(self, r1: int):
        key = ("tucker", r1)
        if key not in self._cache:
            p = self._input_projection(r1)
            projection = np.kron(p, np.eye(self.shape.area))  # [r1*k, D], (q, y, x) order
            gram = projection @ projection.T if self.metric is None else projection @ self.metric @ projection.T
            core = _solve_psd(gram, (self._wm @ projection.T).T).T  # [Cout, r1*k], optimal given P
            # without data P has orthonormal rows, gram is I and this is the plain SVD
            u, s, b = self._whitened_svd(core, None if self.metric is None else gram)
            self._cache[key] = (p, projection, core, u, s, b)
        return self._cache[key]

    def _spatial_basis(self):
        """Vertical filters ``V`` ``[R, Cin, kh]`` ordered by importance (whitened channels)."""
        if ("spatial",) not in self._cache:
            cout, cin = self.shape.cout, self.shape.cin
            kh, kw = self.shape.kernel
            w = self.weight.reshape(cout, cin, kh, kw)
            moment = self._channel_metric()
            lower = None if moment is None else _chol(moment)
            if lower is not None:
                w = np.einsum("ca,ocyx->oayx", lower, w)
            matrix = w.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)
            u, _, _ = np.linalg.svd(matrix, full_matrices=False)
            vertical = u.T.reshape(-1, cin, kh)  # in whitened channels
            if lower is not None:
                vertical = np.einsum("ray,ac->rcy", vertical, np.linalg.inv(lower))
            full = vertical.shape[0]
            phi = np.zeros((full, kw, cin, kh, kw))
            for x in range(kw):
                phi[:, x, :, :, x] = vertical
            phi = phi.reshape(full * kw, -1)
            gram = phi @ phi.T if self.metric is None else phi @ self.metric @ phi.T
            cross = self._wm @ phi.T
            self._cache[("spatial",)] = (vertical, phi, gram, cross)
        return self._cache[("spatial",)]

    # -------------------------------------------------------------------- public
    def candidates(self, round_to: int = 4) -> List[Candidate]:
        """Every form at a grid of ranks, with MACs, params and relative error."""
        shape = self.shape
        result: List[Candidate] = []
        if "svd" in self.forms:
            _, s, _ = self._svd()
            kept = np.cumsum(np.square(s))
            for r in rank_grid(min(shape.cout, shape.columns), round_to):
                macs, params = shape.candidate_cost("svd", (r,))
                result.append(Candidate("svd", (r,), macs, params, max(0.0, 1.0 - float(kept[r - 1]) / self.energy),
                                        shape.candidate_latency("svd", (r,))))
        if "spatial" in self.forms:
            _, _, gram, cross = self._spatial_basis()
            kw = shape.kernel[1]
            full = gram.shape[0] // kw
            for r in rank_grid(full, round_to):
                n = r * kw
                a = _solve_psd(gram[:n, :n], cross[:, :n].T).T
                error = max(0.0, 1.0 - float(np.sum(a * cross[:, :n])) / self.energy)
                macs, params = shape.candidate_cost("spatial", (r,))
                result.append(Candidate("spatial", (r,), macs, params, error, shape.candidate_latency("spatial", (r,))))
        if "tucker2" in self.forms:
            for r1 in rank_grid(shape.cin, round_to, limit=MAX_TUCKER_INPUT_RANKS) + [shape.cin]:
                _, _, core, _, s, _ = self._tucker_core(r1)
                kept = np.cumsum(np.square(s))
                total = float(kept[-1]) if kept.size else 0.0
                for r2 in rank_grid(min(shape.cout, core.shape[1]), round_to) + [shape.cout]:
                    if r1 == shape.cin and r2 >= shape.cout:
                        continue  # the layer itself
                    if r1 == shape.cin and "svd" in self.forms:
                        continue  # that is the svd form
                    energy = total if r2 >= shape.cout else float(kept[min(r2, kept.size) - 1])
                    macs, params = shape.candidate_cost("tucker2", (r1, r2))
                    result.append(Candidate("tucker2", (r1, r2), macs, params, max(0.0, 1.0 - energy / self.energy),
                                            shape.candidate_latency("tucker2", (r1, r2))))
        return result

    def factors(self, candidate: Candidate) -> Factors:
        """The factor weights of ``candidate``; the last factor is optimal in the metric."""
        shape = self.shape
        cout, cin = shape.cout, shape.cin
        kh, kw = shape.kernel
        if candidate.form == "svd":
            (r,) = candidate.ranks
            u, s, b = self._svd()
            phi = b[:r]
            last = u[:, :r] * s[:r]
            return Factors(candidate, [phi.reshape(r, cin, kh, kw)], last, phi)
        if candidate.form == "spatial":
            (r,) = candidate.ranks
            vertical, phi_all, gram, cross = self._spatial_basis()
            n = r * kw
            phi = phi_all[:n]
            last = _solve_psd(gram[:n, :n], cross[:, :n].T).T
            return Factors(candidate, [vertical[:r].reshape(r, cin, kh, 1)], last, phi)
        if candidate.form == "tucker2":
            r1, r2 = candidate.ranks
            p, projection, core, u, s, b = self._tucker_core(r1)
            first = p.reshape(r1, cin, 1, 1)
            if r2 >= cout:
                return Factors(candidate, [first], core, projection)
            middle = b[:r2]  # [r2, r1*k]
            return Factors(candidate, [first, middle.reshape(r2, r1, kh, kw)], u[:, :r2] * s[:r2], middle @ projection)
        raise ValueError(f"unknown form {candidate.form!r}")

    def relative_error(self, composed: np.ndarray) -> float:
        diff = self.weight - composed
        value = diff @ self.metric if self.metric is not None else diff
        return float(np.sum(value * diff)) / self.energy


def pareto(candidates: Sequence[Candidate]) -> List[Candidate]:
    """Candidates no other beats on both MACs and error, by ascending MACs."""
    front: List[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.macs, c.error)):
        if not front or candidate.error < front[-1].error - 1e-12:
            front.append(candidate)
    return front


def best_within(front: Sequence[Candidate], macs: float) -> Optional[Candidate]:
    """The lowest-error candidate with at most ``macs`` MACs (None if none is that cheap)."""
    fitting = [c for c in front if c.macs <= macs]
    return min(fitting, key=lambda c: (c.error, c.macs)) if fitting else None


def cheapest_within(front: Sequence[Candidate], error: float) -> Optional[Candidate]:
    """The fewest-MACs candidate with at most ``error`` relative error."""
    fitting = [c for c in front if c.error <= error + 1e-12]
    return min(fitting, key=lambda c: (c.macs, c.error)) if fitting else None
