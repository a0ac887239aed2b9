"""EVA (Paischer et al., 2024, "Explained Variance Adaptation"; HF PEFT's ``init_lora_weights="eva"``).

Each target cell's A rows are the top principal components of its input activations (centred:
the eigenvectors of the scatter matrix sum_i m_i (x_i - mu)(x_i - mu)^T over the tokens whose mask
m_i is 1), B = 0, so training starts at the base model's output. Ranks are redistributed by
explained variance: the budget sum_l r_l of components goes to the globally largest explained
variance ratios, each cell capped at round(r_l * rho) (``rho`` = 1: no redistribution). With
``adjust_scaling_factors`` a cell given rank k keeps the scaling of its configured rank r
(alpha' = alpha * k / r); ``whiten`` divides component i by sqrt(S_i), S_i its singular value.

PEFT fits the components with an incremental, randomized PCA until consecutive batches agree to
cosine ``tau``; here the exact scatter matrix is accumulated (in float32 on the device, then
float64), so the components are those of a full SVD of the stacked activations of the batches
seen, and ``tau`` stops the pass when the components of two consecutive checks agree (checks
after 2, 4, 8, ... batches). Cells whose inputs are identical (legacy Llama's q/k/v) form one
group, as PEFT's input hashing does: their max ranks are the group's largest, and the group's
first cell holds the group's largest rank.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np


@dataclass
class Moments:
    """Masked input statistics of one cell: ``scatter`` = sum m x x^T [in, in], ``total`` =
    sum m x [in], ``count`` = sum m (float64)."""

    scatter: np.ndarray
    total: np.ndarray
    count: float

    def same_as(self, other: "Moments") -> bool:
        """Bitwise-equal statistics: the two cells saw the same inputs."""
        return self.count == other.count and np.array_equal(self.total, other.total) \
            and np.array_equal(self.scatter, other.scatter)


@dataclass
class Components:
    """Principal components of one cell's inputs: ``vectors`` [n, in] (rows, unit norm, the
    largest entry of each positive), ``variances`` [n] (eigenvalues of the centred scatter,
    descending = S^2 of the centred data), ``ratios`` [n] (variances / total variance)."""

    vectors: np.ndarray
    variances: np.ndarray
    ratios: np.ndarray


def principal_components(moments: Moments, n: int) -> Components:
    """The top ``n`` components of ``moments`` (exact eigendecomposition, float64)."""
    if moments.count <= 0:
        raise ValueError("no token passed the mask: EVA has no activations to decompose")
    mean = moments.total / moments.count
    centred = moments.scatter - moments.count * np.outer(mean, mean)
    centred = (centred + centred.T) / 2
    values, vectors = np.linalg.eigh(centred)
    order = np.argsort(values)[::-1][:n]
    values = np.maximum(values[order], 0.0)
    vectors = vectors[:, order].T
    # a fixed sign per component (the largest |entry| positive), so checks can compare them
    flip = np.sign(vectors[np.arange(len(order)), np.argmax(np.abs(vectors), axis=1)])
    vectors = vectors * np.where(flip == 0, 1.0, flip)[:, None]
    total = max(float(np.trace(centred)), np.finfo(np.float64).tiny)
    return Components(vectors, values, values / total)


def equal_input_groups(moments: Dict[str, Moments]) -> List[List[str]]:
    """Cells (in the given order) grouped by identical statistics; singletons included."""
    groups: List[List[str]] = []
    for name, value in moments.items():
        for group in groups:
            if value.same_as(moments[group[0]]):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def max_components(ranks: Dict[str, int], rho: float, groups: Sequence[Sequence[str]],
                   capacity: Dict[str, int]) -> Dict[str, int]:
    """Per cell: round(r * rho), raised to its group's largest, capped at ``capacity`` (the
    rows the cell can hold)."""
    own = {name: int(round(rank * rho)) for name, rank in ranks.items()}
    out = {}
    for group in groups:
        top = max(own[name] for name in group)
        out.update({name: min(top, capacity[name]) for name in group})
    return out


def allocate_ranks(ratios: Dict[str, np.ndarray], ranks: Dict[str, int], limits: Dict[str, int],
                   groups: Sequence[Sequence[str]]) -> Dict[str, int]:
    """EVA's redistribution: the sum of ``ranks`` goes to the largest explained variance ratios
    over all cells (each cell offers its first ``limits`` ratios; ties go to the earlier cell);
    then in each group of identical inputs the first cell takes the group's largest rank."""
    names = list(ratios)
    offers = [(-float(value), order, index, name)
              for order, name in enumerate(names) for index, value in enumerate(ratios[name][:limits[name]])]
    offers.sort()
    budget = sum(ranks.values())
    counts = {name: 0 for name in names}
    for _, _, _, name in offers[:budget]:
        counts[name] += 1
    for group in groups:  # PEFT: the cell that carries the group's SVD holds the largest rank
        leader = group[0]
        for name in group[1:]:
            if counts[name] > counts[leader]:
                counts[name], counts[leader] = counts[leader], counts[name]
    return counts


def converged(previous: Components, current: Components, rank: int, tau: float) -> bool:
    """Whether the first ``rank`` components agree to |cosine| >= ``tau`` between two checks."""
    if rank == 0:
        return True
    if previous is None or len(previous.vectors) < rank or len(current.vectors) < rank:
        return False
    cosine = np.abs(np.sum(previous.vectors[:rank] * current.vectors[:rank], axis=1))
    return bool(np.all(cosine >= tau))


def lora_a(components: Components, rank: int, whiten: bool) -> np.ndarray:
    """A [rank, in] float64: the first ``rank`` components, divided by sqrt(S) with ``whiten``
    (S = sqrt(variance), the singular value of the centred data; HF PEFT's whitening)."""
    vectors = components.vectors[:rank].copy()
    if whiten:
        singular = np.sqrt(components.variances[:rank])
        vectors /= np.sqrt(np.maximum(singular, np.finfo(np.float64).tiny))[:, None]
    return vectors


def scaled_alpha(alpha: float, configured_rank: int, rank: int, adjust: bool) -> float:
    """The lora_alpha of a cell given ``rank`` instead of ``configured_rank`` (PEFT's
    ``adjust_scaling_factors``: alpha * rank / configured_rank, so alpha / r stays)."""
    return alpha * rank / configured_rank if adjust and rank != configured_rank else alpha
