"""Which channels of a group to remove when the refit will compensate: group OBS order.

The diagonal criterion (prune's ``reconstruction``) scores each channel alone, by the output
energy ``||W[:, c]||^2 Var(x_c)`` it carries into its consumers. But prune then refits every
consumer by least squares (:mod:`onnxslim_cv.reconstruct`), which moves a removed channel's
contribution onto the kept channels that are correlated with it. A channel whose signal the others
also carry is therefore cheap to remove, whatever its energy. The cost of removing a block ``B``
of a consumer's input columns with the others re-solved is the Optimal Brain Surgeon cost

    dE = tr(W_B (Hinv_BB)^-1 W_B^T),   Hinv = H^-1,  H = the consumer's input covariance

(Hassibi & Stork, "Optimal Brain Surgeon", 1993; the block form for structured removal is the
one of Frantar & Alistarh, "Optimal Brain Compression", NeurIPS 2022, and Kurtic et al.,
"ZipLM", NeurIPS 2023). A channel's block is its ``k*k`` columns in a ``k x k`` conv consumer,
its ``H*W`` features in a Flatten-Gemm head. Channels are removed greedily, one at a time: the
costs are summed over the group's consumers (each relative to its own output energy, as in the
diagonal criterion), and after each removal every consumer's weights and ``Hinv`` are updated as
the refit would move them. That gives each group's removal *order*.

How *many* channels each group loses stays the allocation's business: the group's diagonal
scores are handed out again in that order (the first channel removed gets the group's lowest
score, and so on), so a global ranking compares groups exactly as before and only the choice of
channels within a group changes. The greedy OBS costs themselves are not comparable across
groups: they assume a refit on the original inputs, which later layers do not quite get, and as
ranking scores they cost SqueezeNet and ResNet-20 accuracy in a trial.

Consumers the refit cannot solve this way (depthwise and grouped convs, ConvTranspose, more than
``MAX_COLUMNS`` input columns, shared weights) count with their diagonal cost, unchanged by
removals. Memory: one ``D x D`` covariance per consumer, whatever the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import obs
from .depgraph import ChannelGroup, DependencyGraph, Member
from .graph_utils import name_nodes
from .ir import Model
from .sparsity import SparseLayer, as_matrix, sparsifiable_layers

MAX_COLUMNS = 2304
"""Largest consumer (input channels x kernel area) solved with its full covariance (a 256-channel
3x3 conv); a greedy step updates a ``D x D`` inverse, so larger consumers count diagonally."""
MEMORY_BUDGET = 1 << 28
"""float64 elements for all consumers' covariances together (2 GB); the largest go diagonal first."""
GREEDY_STEPS = 256
"""A group of more units than this loses ``len(remaining) // GREEDY_STEPS`` of them per greedy
step (the cheapest ones, removed together): one at a time, a 2048-channel ResNet-50 stage took
minutes. Groups up to this size are exactly greedy."""
DAMP = 1e-2
"""Ridge on the covariance, as a fraction of its mean diagonal: a channel that is a linear
combination of others (rank-deficient H) would otherwise look free to remove."""


@dataclass
class ConsumerCovariance:
    """One consumer weight's input statistics, as the greedy removal needs them."""

    member: Member  # the ``in`` member: the consumer's weight along its input axis
    layer: SparseLayer
    weight: np.ndarray  # [rows, D], columns as :func:`sparsity.as_matrix` orders them
    covariance: np.ndarray  # [D, D] of the inputs, mean removed (the refit also solves the bias)
    energy: float  # mean squared output, the normaliser shared with the diagonal criterion
    _inverse: Optional[np.ndarray] = None

    def inverse(self) -> np.ndarray:
        """``(covariance + ridge)^-1``, computed once (a consumer of a Concat serves several groups)."""
        if self._inverse is None:
            cov = self.covariance
            ridge = DAMP * float(np.mean(np.diag(cov))) or DAMP
            self._inverse = np.linalg.inv(cov + ridge * np.eye(cov.shape[0]))
        return self._inverse

    def columns(self, positions: np.ndarray) -> np.ndarray:
        """Column indices of these input positions (channels, or features of a Gemm)."""
        if self.layer.op == "Conv":
            taps = int(np.prod(self.layer.shape[2:]))
            return (np.arange(taps)[:, None] * self.layer.shape[1] + positions[None, :]).reshape(-1)
        return np.asarray(positions)


def _solvable(layer: Optional[SparseLayer]) -> bool:
    return (
        layer is not None
        and layer.op in ("Conv", "Gemm", "MatMul")
        and layer.groups == 1
        and obs.refittable(layer) is None
        and layer.reduction <= MAX_COLUMNS
    )


def consumer_covariances(model: Model, dg: DependencyGraph, data, *, seed: int = 0,
                         progress=None) -> Dict[int, ConsumerCovariance]:
    """Covariances of the consumers of prunable groups, keyed by the member's index in ``dg.members``.

    One pass of the model over ``data`` (:func:`obs.collect_statistics`), on a copy whose nodes
    all have names (the statistics find their layers by name).
    """
    prunable = {int(u) for group in dg.prunable_groups for u in group.units}
    named = model.copy()
    name_nodes(named.graph)
    position = {id(node): i for i, node in enumerate(model.graph.nodes)}
    layers, _ = sparsifiable_layers(named, include_depthwise=True, include_first=True, include_last=True)
    by_name = {layer.node: layer for layer in layers}
    wanted = []
    for index, member in enumerate(dg.members):
        if member.role != "in" or member.index != 1 or id(member.node) not in position:
            continue
        if not prunable.intersection(dg.find(member.ids).tolist()):
            continue
        twin = named.graph.nodes[position[id(member.node)]]  # the copy keeps the node order
        layer = by_name.get(twin.name) if twin.op == member.node.op else None
        if _solvable(layer):  # depgraph's ``in`` member runs along the weight's input axis
            wanted.append((index, member, layer))
    wanted.sort(key=lambda item: item[2].reduction)
    kept, used = [], 0
    for item in wanted:  # the smallest first, until the memory budget is spent
        cost = 3 * (item[2].reduction + 1) ** 2
        if used + cost > MEMORY_BUDGET:
            break
        kept.append(item)
        used += cost
    fits = {}
    for _, _, layer in kept:
        fits.setdefault(layer.weight, obs.LayerFit(layer, gram_only=True))
    if not fits:
        return {}
    obs.collect_statistics(named, list(fits.values()), data, seed=seed, progress=progress)
    result = {}
    for index, member, layer in kept:
        fit = fits[layer.weight]
        if fit.gram is None or fit.rows == 0:
            continue
        gram = fit.gram[0]
        d = gram.shape[0] - 1
        count = gram[d, d]
        mean = gram[:d, d] / count
        second = gram[:d, :d] / count
        weight = as_matrix(layer, np.asarray(member.node.inputs[1].values)).astype(np.float64)
        energy = float(np.einsum("rd,de,re->", weight, second, weight))
        result[index] = ConsumerCovariance(member, layer, weight, second - np.outer(mean, mean), energy or 1.0)
    return result


class _GreedyState:
    """One consumer during one group's greedy removal: its weights and inverse covariance,
    restricted to the group's columns (the other columns' compensation is already in that block
    of the inverse, and a Schur update of a principal block needs only that block). Removed
    columns are dropped once a fifth of them are gone, so later steps work on smaller matrices.

    Units are the group's unit *indices* ``0..n-1``; ``blocks[i]`` their columns here."""

    def __init__(self, consumer: ConsumerCovariance, blocks: Dict[int, np.ndarray]):
        columns = np.unique(np.concatenate(list(blocks.values())))
        local = np.full(consumer.weight.shape[1], -1)
        local[columns] = np.arange(len(columns))
        self.inverse = consumer.inverse()[np.ix_(columns, columns)].copy()
        self.weight = consumer.weight[:, columns].copy()
        self.energy = consumer.energy
        by_size: Dict[int, List[int]] = {}
        for i, block in blocks.items():
            by_size.setdefault(len(block), []).append(i)
        # per block size: (unit indices [m], their columns [m, k])
        self.classes = [(np.array(ids), np.stack([local[blocks[i]] for i in ids])) for ids in by_size.values()]
        self.alive = np.ones(len(columns), bool)

    def costs(self, count: int) -> np.ndarray:
        """Relative OBS cost of removing each unit next (0 for units this consumer does not read)."""
        result = np.zeros(count)
        for index, blocks in self.classes:
            if not len(index):
                continue
            if blocks.shape[1] == 1:  # one column per unit: w^2 / Hinv_jj
                columns = blocks[:, 0]
                w = self.weight[:, columns]
                result[index] = np.einsum("rn,rn->n", w, w) / np.diagonal(self.inverse)[columns] / self.energy
                continue
            inner = self.inverse[blocks[:, :, None], blocks[:, None, :]]  # [n, k, k]
            w = np.moveaxis(self.weight[:, blocks], 0, -1)  # [n, k, rows]
            solved = np.linalg.solve(inner, w)
            result[index] = np.einsum("nkr,nkr->n", solved, w) / self.energy
        return result

    def remove(self, picked: np.ndarray) -> None:
        """Remove these units together, moving their weights onto the kept columns."""
        found, classes = [], []
        for index, blocks in self.classes:
            gone = np.isin(index, picked)
            found.append(blocks[gone].reshape(-1))
            classes.append((index[~gone], blocks[~gone]))
        self.classes = classes
        block = np.concatenate(found)
        if not len(block):
            return
        inner_inv = np.linalg.inv(self.inverse[np.ix_(block, block)])
        rows = self.inverse[block, :]
        self.weight -= (self.weight[:, block] @ inner_inv) @ rows
        self.inverse -= self.inverse[:, block] @ (inner_inv @ rows)
        self.weight[:, block] = 0.0
        self.alive[block] = False
        if self.alive.sum() < 0.8 * len(self.alive):
            keep = np.nonzero(self.alive)[0]
            local = np.full(len(self.alive), -1)
            local[keep] = np.arange(len(keep))
            self.inverse = self.inverse[np.ix_(keep, keep)]
            self.weight = self.weight[:, keep]
            self.classes = [(index, local[blocks]) for index, blocks in self.classes]
            self.alive = np.ones(len(keep), bool)


def _positions_by_unit(dg: DependencyGraph, member: Member) -> Dict[int, np.ndarray]:
    roots = dg.find(member.ids)
    order = np.argsort(roots, kind="stable")
    units, starts = np.unique(roots[order], return_index=True)
    return {int(u): part for u, part in zip(units, np.split(order, starts[1:]))}


def removal_order(dg: DependencyGraph, group: ChannelGroup, consumers: Sequence[ConsumerCovariance],
                  diagonal: np.ndarray, positions: Optional[Sequence[Dict[int, np.ndarray]]] = None) -> Optional[List[int]]:
    """The group's units in greedy OBS removal order, or None if no consumer of it was solved.

    ``diagonal[u]``: the summed diagonal cost of ``u`` in the consumers *not* in ``consumers``;
    ``positions``: each consumer's input positions per unit (:func:`_positions_by_unit`).
    """
    units = [int(u) for u in group.units]
    if positions is None:
        positions = [_positions_by_unit(dg, consumer.member) for consumer in consumers]
    states = []
    for consumer, by_unit in zip(consumers, positions):
        blocks = {i: consumer.columns(by_unit[unit]) for i, unit in enumerate(units) if unit in by_unit}
        if blocks:
            states.append(_GreedyState(consumer, blocks))
    if not states:
        return None
    base = diagonal[units].astype(np.float64)
    remaining = np.ones(len(units), bool)
    order: List[int] = []
    while remaining.any():
        costs = base.copy()
        for state in states:
            costs += state.costs(len(units))
        candidates = np.nonzero(remaining)[0]
        step = max(1, len(candidates) // GREEDY_STEPS)
        picked = candidates[np.argsort(costs[candidates], kind="stable")[:step]]
        order.extend(units[i] for i in picked)
        remaining[picked] = False
        for state in states:
            state.remove(picked)
    return order


def reorder_scores(dg: DependencyGraph, scores: np.ndarray, consumers: Dict[int, ConsumerCovariance],
                   diagonal_cost: Callable[[Member], Optional[np.ndarray]]) -> np.ndarray:
    """``scores`` (the diagonal criterion's) with each group's values handed out in OBS order.

    ``diagonal_cost(member)``: a consumer member's per-position diagonal cost (None if it has
    none), for the consumers not solved here.
    """
    result = scores.copy()
    solved = {id(c.member) for c in consumers.values()}
    diagonal = np.zeros(len(scores))
    for member in dg.members:
        if member.role == "in" and id(member) not in solved:
            cost = diagonal_cost(member)
            if cost is not None:
                np.add.at(diagonal, dg.find(member.ids), cost)
    solved_list = list(consumers.values())
    positions = [_positions_by_unit(dg, consumer.member) for consumer in solved_list]
    for group in dg.prunable_groups:
        reads = [i for i, by_unit in enumerate(positions) if any(int(u) in by_unit for u in group.units)]
        order = removal_order(dg, group, [solved_list[i] for i in reads], diagonal, [positions[i] for i in reads])
        if order is None:
            continue
        values = np.sort(scores[order])
        result[order] = values
    return result
