"""AdaLoRA (Zhang et al., 2023; HF PEFT's AdaLoraConfig): SVD-form updates with a rank budget.

Per target: dW = P diag(lambda) Q * s / r_init with P [out, r] (``lora_B``), lambda [r, 1]
(``lora_E``), Q [r, in] (``lora_A``), s = lora_alpha (or r_init when alpha is 0), as PEFT.
lambda starts at 0 (dW = 0), P and Q ~ N(0, 0.02^2). Pruning a triplet i sets lambda_i = 0;
the rank allocator (``RankAllocator``, driven by the AdaLoraRankAllocator callback) decides
which, from parameter-times-gradient sensitivities smoothed by EMAs. The orthogonality
regulariser ||P^T P - I||^2 + ||Q Q^T - I||^2 (mean over the adapted matrices, times
``orth_reg_weight``) is added to the training loss by :class:`AdaLoraModel`.

A saved adapter keeps only its surviving triplets (``rank_pattern`` in the config): loading
builds each cell at its pruned rank. The scale keeps r_init (PEFT rescales by the pruned rank
after a reload; files written for PEFT carry the factor in lambda, see peft_format).

Model parallel: x (Q * lambda)^T P^T has LoRA's shape, so ``lora_a_matmul`` / ``lora_b_matmul``
take LoRA's strategies (:func:`~mindformers_lora_ext.tuners.sharding.adalora_strategies`);
Q * lambda is elementwise and derived.
"""
from typing import Dict, List, Optional, Tuple

import numpy as np
from mindspore import Parameter, nn
from mindspore.common import dtype as mstype
from mindspore.common.initializer import Normal, Zero, initializer
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from mindformers_lora_ext.tuners.additive import AdditiveLinear, AdditiveModel, DeltaMath
from mindformers_lora_ext.tuners.sharding import adalora_strategies
from mindformers_lora_ext.tuners.targeting import checkpoint_prefix
from mindformers_lora_ext import _boot

PARAMS = ("lora_A", "lora_B", "lora_E")
EPS = 1e-5  # PEFT's guard in s / (r_init + eps)


class AdaLoraMath(DeltaMath):
    """dW = B @ (A * E) * s / (r_init + eps); ``spec.scale`` = s / (r_init + eps)."""

    CELL_PARAMS = PARAMS

    @classmethod
    def out_in(cls, arrays):
        return arrays["lora_B"].shape[0], arrays["lora_A"].shape[1]

    @classmethod
    def expected_shapes(cls, spec, shape_oi):
        (out_dim, in_dim), rank = shape_oi, spec.rank
        return {"lora_A": (rank, in_dim), "lora_B": (out_dim, rank), "lora_E": (rank, 1)}

    @classmethod
    def check_shapes(cls, cell, arrays, spec, shape_oi):
        # A live network keeps all init_r triplets (pruned ones have lambda = 0); files and
        # reloaded cells hold only the kept ones: both are valid.
        rank = arrays["lora_E"].shape[0] if "lora_E" in arrays else spec.rank
        if rank not in (spec.rank, spec.init_r):
            rank = spec.rank
        super().check_shapes(cell, arrays, SimpleSpec(rank), shape_oi)

    @classmethod
    def delta_weight(cls, arrays, spec, shape_oi):
        return (arrays["lora_B"] @ (arrays["lora_A"] * arrays["lora_E"])) * spec.scale


class SimpleSpec:  # pylint: disable=too-few-public-methods
    """Just a rank, for shape checks."""

    def __init__(self, rank):
        self.rank = rank


class AdaLoraLinear(AdditiveLinear):
    """An adopted linear cell plus an AdaLoRA update of (current) rank ``spec.rank``."""

    MATH = AdaLoraMath

    def __init__(self, base, spec, param_init_type=None, compute_dtype=None):
        super().__init__(base, spec, param_init_type, compute_dtype)
        rank = spec.rank
        self.lora_A = Parameter(initializer(Normal(0.02), [rank, self.in_channels], self.param_dtype),
                                name="lora_A")
        self.lora_B = Parameter(initializer(Normal(0.02), [self.out_channels, rank], self.param_dtype),
                                name="lora_B")
        self.lora_E = Parameter(initializer(Zero(), [rank, 1], self.param_dtype), name="lora_E")
        self.param_names = PARAMS
        self.rank = rank
        self.scale = spec.scale
        self.input_dropout = nn.Dropout(p=spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.lora_a_matmul = P.MatMul(transpose_b=True)  # x [N, in] @ (Q * lambda)^T -> [N, r]
        self.lora_b_matmul = P.MatMul(transpose_b=True)  # h [N, r] @ P^T -> [N, out]
        self.shard_ops(base)

    def adapter_strategies(self, base_strategy, transpose_b):
        return adalora_strategies(base_strategy, transpose_b)

    def update(self, x2d):
        scaled_a = self.p("lora_A") * self.p("lora_E")
        hidden = self.lora_a_matmul(self.input_dropout(x2d), scaled_a)
        return self.lora_b_matmul(hidden, self.p("lora_B")) * self.scale

    def orth_penalty(self):
        """||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (float32 scalar)."""
        eye = F.eye(self.rank, self.rank, mstype.float32)
        p = self.cast(self.lora_B, mstype.float32)
        q = self.cast(self.lora_A, mstype.float32)
        pp = F.matmul(p.T, p) - eye
        qq = F.matmul(q, q.T) - eye
        return (pp * pp).sum() + (qq * qq).sum()


class AdaLoraModel(AdditiveModel):
    """``pet_type: adalora``: adds ``orth_reg_weight`` × the mean orthogonality penalty to the
    training loss (the network's first output when it returns a tuple)."""

    LAYER = AdaLoraLinear

    def __init__(self, config, base_model):
        super().__init__(config, base_model)
        self.orth_reg_weight = float(config.orth_reg_weight)
        self.num_orth = 2 * len(self._adapter_layers)
        # auto_prefix=False: a CellList would otherwise rename the layers' parameters
        self.layer_list = nn.CellList(list(self._adapter_layers.values()), auto_prefix=False)
        self.tap_reader_attached = False  # set by AdaLoraRankAllocator.on_train_begin

    def missing_tap_reader(self) -> Optional[str]:
        """Why a training step must not run (no rank allocator reads the gradients), or None."""
        if self.tap_reader_attached:
            return None
        return ("pet_type adalora shrinks ranks only through its rank allocator, and no "
                "AdaLoraRankAllocator callback is attached: add `- type: AdaLoraRankAllocator` to "
                "the YAML's callbacks (without it every cell would train at init_r, a plain SVD-form "
                "LoRA, and no rank_pattern would be saved)")

    def prepare_targets(self, base_model, targets):
        """Cells the rank pattern prunes to rank 0 stay plain base cells (their dW is 0)."""
        pattern = self.config.pet_config.rank_pattern or {}
        cells = dict(base_model.cells_and_names())
        for path in list(targets):
            mask = pattern.get(checkpoint_prefix(path, cells[path]))  # keyed like adapter_names
            if mask is not None and not any(mask):
                targets.remove(path)

    def orth_loss(self):
        total = 0.0
        for layer in self.layer_list:
            total = total + layer.orth_penalty()
        return total / self.num_orth

    def construct(self, *inputs, **kwargs):
        output = self.network(*inputs, **kwargs)
        if self.training and self.orth_reg_weight > 0:
            reg = self.orth_reg_weight * self.orth_loss()
            if isinstance(output, tuple):
                return (output[0] + F.cast(reg, output[0].dtype),) + output[1:]
            return output + F.cast(reg, output.dtype)
        return output

    def adalora_layers(self) -> Dict[str, AdaLoraLinear]:
        return dict(self._adapter_layers)

    def grad_tap_names(self) -> List[str]:
        """Parameters whose gradients the train wrapper copies out for the rank allocator."""
        return [p.name for p in self.adapter_parameters()]


class RankAllocator:
    """AdaLoRA's budget schedule and importance-based masking (numpy, host side).

    ``total_step``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``, ``init_r``,
    ``target_r`` as in PEFT; ``ranks`` maps cell name -> its current rank.
    """

    def __init__(self, config, ranks: Dict[str, int]):
        self.config = config
        self.names = list(ranks)
        self.init_bgt = int(sum(ranks.values()))
        self.target_bgt = int(config.target_r * len(ranks))
        self.ipt: Dict[str, np.ndarray] = {}
        self.exp_avg_ipt: Dict[str, np.ndarray] = {}
        self.exp_avg_unc: Dict[str, np.ndarray] = {}

    def budget_schedule(self, step: int) -> Tuple[int, bool]:
        """(budget, whether to mask at this step): init_r·n until tinit, a cubic decay to
        target_r·n, reached at total_step - tfinal, masking every deltaT steps."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * progress ** 3 + self.target_bgt)
        return budget, step % c.deltaT == 0

    def update_ipt(self, values: Dict[str, np.ndarray], grads: Dict[str, np.ndarray]) -> None:
        """EMA of |p * g| (importance) and of its deviation (uncertainty), per tensor."""
        c = self.config
        for name, value in values.items():
            ipt = np.abs(value * grads[name])
            if name not in self.exp_avg_ipt:
                self.exp_avg_ipt[name] = np.zeros_like(ipt)
                self.exp_avg_unc[name] = np.zeros_like(ipt)
            self.ipt[name] = ipt
            self.exp_avg_ipt[name] = c.beta1 * self.exp_avg_ipt[name] + (1 - c.beta1) * ipt
            self.exp_avg_unc[name] = c.beta2 * self.exp_avg_unc[name] + \
                (1 - c.beta2) * np.abs(ipt - self.exp_avg_ipt[name])

    def triplet_scores(self) -> Dict[str, np.ndarray]:
        """Per cell: score [r] of each triplet = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji),
        with s = smoothed importance x uncertainty, as PEFT."""
        def score(key):
            return self.exp_avg_ipt[key] * self.exp_avg_unc[key]
        out = {}
        for cell in self.names:
            out[cell] = (score(f"{cell}.lora_E").reshape(-1) + score(f"{cell}.lora_A").mean(axis=1)
                         + score(f"{cell}.lora_B").mean(axis=0))
        return out

    def mask_to_budget(self, budget: int) -> Dict[str, List[bool]]:
        """Keep the ``budget`` best triplets over all cells: cell -> keep mask."""
        scores = self.triplet_scores()
        flat = np.concatenate([scores[c] for c in self.names])
        prune = self.init_bgt - budget
        if prune <= 0:
            return {c: [True] * len(scores[c]) for c in self.names}
        threshold = np.partition(flat, prune - 1)[prune - 1]
        return {c: [bool(v) for v in scores[c] > threshold] for c in self.names}


def total_kept(pattern: Optional[Dict[str, List[bool]]]) -> int:
    return sum(sum(mask) for mask in (pattern or {}).values())


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
