"""CorDA (Yang et al., 2024, "Context-oriented Decomposition Adaptation"; HF PEFT's
``init_lora_weights="corda"``).

The base weight is decomposed along the input covariance C of the cell (what the model sees on
the calibration data): W C' = U S V_h (SVD), C' = C + damp * mean(diag C) * I with the damping
doubled from 0.01 until ||C' C'^-1 - I||_F < 0.05, and V = (V_h C'^-1)^T, so W = U S V^T exactly.
``corda_method: ipm`` (instruction-previewed) takes the r largest components as the adapter,
``kpm`` (knowledge-preserving) the r smallest, leaving the components that carry the covariance
in the frozen residual. With s the LoRA scaling: A = sqrt(S_r / s) V_r^T [r, in],
B = U_r sqrt(S_r / s) [out, r], and the base weight becomes W - s B A, so the adapted cell starts
at the base output.

C is PEFT's statistic: per forward call, the cell's input rows X (all tokens, no mask) divided by
|max X|, summed as X^T X and averaged over the calls. PEFT's hook assumes one sample per call; a
batch of several samples is normalised as one block of rows here.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np

CORDA_METHODS = ("ipm", "kpm")


@dataclass
class Eigens:
    """A cell's cropped decomposition: ``s`` [r], ``u`` [out, r], ``v`` [in, r] (PEFT's
    S_WC / U_WC / V_WC), float64."""

    s: np.ndarray
    u: np.ndarray
    v: np.ndarray


def damped_covariance(cov: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(C', C'^-1): C damped on the diagonal until its inverse is accurate (PEFT's rule)."""
    eye = np.eye(cov.shape[0])
    damp = 0.01
    mean_diag = float(np.mean(np.diag(cov)))
    while True:
        fixed = cov + eye * (mean_diag * damp)
        inverse = np.linalg.inv(fixed)
        if np.linalg.norm(fixed @ inverse - eye) < 0.05:
            return fixed, inverse
        damp *= 2
        if damp > 1e6:
            raise ValueError("CorDA: the input covariance cannot be inverted even with damping "
                             "(all-zero or non-finite activations?)")


def eigens(weight: np.ndarray, cov: np.ndarray, rank: int, method: str) -> Eigens:
    """The rank-``rank`` decomposition of ``weight`` [out, in] along ``cov`` [in, in] (float64)."""
    if method not in CORDA_METHODS:
        raise ValueError(f"corda_method {method!r}: expected one of {list(CORDA_METHODS)}")
    if not np.all(np.isfinite(cov)):
        raise ValueError("CorDA: the input covariance holds non-finite values")
    fixed, inverse = damped_covariance(cov)
    u, s, vh = np.linalg.svd(weight @ fixed, full_matrices=False)
    v = (vh @ inverse).T
    keep = slice(0, rank) if method == "ipm" else slice(len(s) - rank, len(s))
    return Eigens(s[keep].copy(), u[:, keep].copy(), v[:, keep].copy())


def factors(found: Eigens, scaling: float) -> Tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) float64 with s B A = U_r S_r V_r^T."""
    root = np.sqrt(found.s / scaling)
    return found.v.T * root[:, None], found.u * root
