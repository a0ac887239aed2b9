"""LoRA-GA (Wang et al., 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation"; HF PEFT's
``init_lora_weights="lora_ga"``).

From G = dL/dW averaged over the calibration batches (the full-weight gradient of the base model,
the adapter being zero), its top 2r singular triplets G ~ U S V^T (randomized SVD with
q = min(4r, min(out, in)) and 4 subspace iterations, as PEFT) give the adapter so that its first
update follows the full fine-tune's direction. ``direction`` picks which triplets go where:
``ArB2r`` A = V_{1..r}^T, B = U_{r+1..2r} S_{r+1..2r} (default); ``A2rBr`` A = V_{r+1..2r}^T,
B = U_{1..r} S_{1..r}; ``ArBr`` A the odd, B the even triplets; ``random`` r of the 2r at random
(a fixed seed per cell: every rank gets the same). ``scale`` then sets B's size: ``stable``
B * out^(1/4) / sqrt(stable_gamma), ``weight_svd`` B * sigma_1(W) / S_B[0], ``gd_scale`` A / s and
B / s, ``unit`` unchanged. The base weight becomes W - s B A, so the adapted cell starts at the
base output (s = the LoRA scaling).
"""
import zlib
from typing import Tuple

import numpy as np

from mindformers_lora_ext.tuners.lora_init import top_singular_triplets
from mindformers_lora_ext import _boot

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
SUBSPACE_ITERATIONS = 4


def _svd(matrix: np.ndarray, rank: int, seed: int):
    """Top ``rank`` triplets, randomized over a q-dim subspace (exact when q covers the matrix)."""
    q = min(4 * rank, min(matrix.shape))
    if q == min(matrix.shape):
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    else:
        u, s, vt = top_singular_triplets(matrix, q, SUBSPACE_ITERATIONS, seed)
    return u[:, :rank], s[:rank], vt[:rank]


def cell_seed(name: str) -> int:
    """The fixed random seed of cell ``name`` (randomized SVD, ``direction: random``)."""
    return zlib.crc32(name.encode())


def factors(grad: np.ndarray, weight: np.ndarray, rank: int, scaling: float, direction: str, scale: str,
            stable_gamma: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) float64 from ``grad`` and ``weight`` [out, in]."""
    if direction not in DIRECTIONS or scale not in SCALES:
        raise ValueError(f"lora_ga direction {direction!r} / scale {scale!r}: expected one of "
                         f"{list(DIRECTIONS)} / {list(SCALES)}")
    if 2 * rank > min(grad.shape):
        raise ValueError(f"LoRA-GA needs 2 * rank <= min(out, in) = {min(grad.shape)}, got rank {rank}")
    u, s, vt = _svd(grad, 2 * rank, seed)
    if direction == "ArB2r":
        a_idx, b_idx = np.arange(rank), np.arange(rank, 2 * rank)
    elif direction == "A2rBr":
        a_idx, b_idx = np.arange(rank, 2 * rank), np.arange(rank)
    elif direction == "ArBr":
        a_idx, b_idx = np.arange(1, 2 * rank, 2), np.arange(0, 2 * rank, 2)
    else:
        a_idx = b_idx = np.random.default_rng(seed).permutation(2 * rank)[:rank]
    lora_a = vt[a_idx]
    s_b = s[b_idx]
    lora_b = u[:, b_idx] * s_b
    if scale == "stable":
        lora_b = lora_b * (grad.shape[0] ** 0.25 / stable_gamma ** 0.5)
    elif scale == "weight_svd":
        top = _svd(weight, 1, seed + 1)[1][0]
        if s_b[0] > 0:
            lora_b = lora_b * (top / s_b[0])
    elif scale == "gd_scale":
        lora_a, lora_b = lora_a / scaling, lora_b / scaling
    return lora_a, lora_b


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
