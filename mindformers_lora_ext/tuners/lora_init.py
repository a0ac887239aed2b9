"""Initial values of LoRA's A [r, in] and B [out, r], by ``init_lora_weights`` (HF PEFT's names).

- ``True`` (kaiming): A kaiming-uniform (a = sqrt(5), bound 1/sqrt(in)), B = 0.
- ``False``: A and B both kaiming-uniform (B's bound 1/sqrt(r)): the adapter starts non-zero.
- ``"gaussian"``: A ~ N(0, (1/r)^2), B = 0.
- ``"pissa"`` / ``"pissa_niter_N"``: from the top-r singular triplets of W (exact SVD, or a
  randomized SVD with N subspace iterations): B = U_r sqrt(S_r/s), A = sqrt(S_r/s) V_r^T.
- ``"olora"``: W = QR; B = Q[:, :r], A = R[:r].

PiSSA and OLoRA also replace the base weight by the residual W - s B A, so the adapted
cell's initial output equals the base output; they read W when MindSpore materialises A and B
(see FromBase), so they see a checkpoint the trainer loads after wrapping. Random schemes
follow MindSpore's seed. ``eva``, ``corda`` and ``lora_ga`` start with A = B = 0 (placeholders:
the adapter acts as none) until the DataDrivenInit callback sets them from the training data
(data_init/).
"""
import math
from typing import Callable, Optional, Tuple

import numpy as np
from mindspore.common.initializer import HeUniform, Initializer, Normal, Zero

from mindformers_lora_ext.config import DATA_DRIVEN_INITS, pissa_niter
from mindformers_lora_ext import _boot


class FromBase(Initializer):
    """An initializer whose values are computed from the base weight when MindSpore
    materialises the Parameter: at construction normally, or after the trainer has loaded
    the base checkpoint when the network was built under ``no_init_parameters`` (what
    MindFormers does whenever ``load_checkpoint`` is set)."""

    def __init__(self, compute: Callable[[], np.ndarray]):
        super().__init__()
        self.compute = compute

    def _initialize(self, arr):
        arr[...] = self.compute()


class DataDrivenFactors:
    """PiSSA / OLoRA factors of one layer, computed once from its base weight; computing
    them also replaces the base weight by its residual W - s B A."""

    def __init__(self, layer, init, rank: int, scaling: float):
        self.layer, self.init, self.rank, self.scaling = layer, init, rank, scaling
        self._factors: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def get(self) -> Tuple[np.ndarray, np.ndarray]:
        """(A [r, in], B [out, r]) as float64."""
        if self._factors is None:
            weight = self.layer.weight_array()
            lora_a, lora_b = _factorize(self.init, weight, self.rank, self.scaling)
            self.layer.set_weight_array(weight - self.scaling * (lora_b @ lora_a))
            self._factors = (lora_a, lora_b)
        return self._factors


def lora_initializers(init, layer, rank: int, scaling: float) -> Tuple[Initializer, Initializer]:
    """Initializers of (A, B) for scheme ``init`` on ``layer`` (an AdoptedLinear)."""
    if init is True:
        return HeUniform(negative_slope=math.sqrt(5)), Zero()
    if init is False:
        return HeUniform(negative_slope=math.sqrt(5)), HeUniform(negative_slope=math.sqrt(5))
    if init == "gaussian":
        return Normal(sigma=1.0 / rank), Zero()
    if init in DATA_DRIVEN_INITS:
        return Zero(), Zero()
    if rank > min(layer.in_channels, layer.out_channels):
        raise ValueError(f"init_lora_weights={init!r} needs rank <= min(out, in) = "
                         f"{min(layer.in_channels, layer.out_channels)}, got rank {rank}")
    factors = DataDrivenFactors(layer, init, rank, scaling)
    return FromBase(lambda: factors.get()[0]), FromBase(lambda: factors.get()[1])


def _factorize(init, weight, rank, scaling):
    if init == "olora":
        q, r = np.linalg.qr(weight)
        return r[:rank], q[:, :rank]
    u, s, vt = top_singular_triplets(weight, rank, pissa_niter(init))
    root = np.sqrt(s / scaling)
    return root[:, None] * vt, u * root


def top_singular_triplets(weight, rank, niter, seed=0):
    """(U_r [out, r], S_r [r], V_r^T [r, in]): exact SVD if ``niter`` is None, else a
    randomized range finder of ``rank`` columns with ``niter`` subspace iterations (fixed
    ``seed``: reproducible)."""
    if niter is None:
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(weight @ rng.standard_normal((weight.shape[1], rank)))
    for _ in range(niter):
        basis, _ = np.linalg.qr(weight.T @ basis)
        basis, _ = np.linalg.qr(weight @ basis)
    u_small, s, vt = np.linalg.svd(basis.T @ weight, full_matrices=False)
    return basis @ u_small, s, vt


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
