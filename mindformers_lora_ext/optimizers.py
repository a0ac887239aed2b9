"""LoRA+ (Hayou et al., 2024): AdamW with a larger learning rate for the LoRA B side.

YAML: ``optimizer: {type: LoraPlusAdamW, betas: [0.9, 0.999], eps: 1.e-8, weight_decay: 0.0,
loraplus_lr_ratio: 16, loraplus_weight_decay: null}``; the trainer adds ``params`` and
``learning_rate`` (a float or a ``LearningRateSchedule``).
"""
import math
from collections.abc import Iterable
from numbers import Real

import numpy as np
from mindspore import Tensor
from mindspore.common import dtype as mstype
from mindspore.nn.learning_rate_schedule import LearningRateSchedule
from mindformers.core.optim.adamw import AdamW as MFAdamW

from mindformers_lora_ext import _boot

# Last name component of a B-side parameter: ours, and MindFormers' stock ``lora`` pet type.
B_SIDE_NAMES = ("lora_B", "lora_B_bias", "mindpet_delta_lora_b")


def is_lora_b(name: str) -> bool:
    """Whether parameter ``name`` is on the LoRA B side (gets the LoRA+ learning rate)."""
    return name.rsplit(".", 1)[-1] in B_SIDE_NAMES


class _ScaledLR(LearningRateSchedule):
    """``ratio * base(global_step)``: a schedule scaled at every step."""

    def __init__(self, base, ratio):
        super().__init__()
        self.base = base
        self.ratio = float(ratio)

    def construct(self, global_step):
        return self.base(global_step) * self.ratio


def _scaled_lr(lr, ratio):
    """``lr`` (float, Tensor, iterable of floats or schedule) multiplied by ``ratio``."""
    if isinstance(lr, LearningRateSchedule):
        return _ScaledLR(lr, ratio)
    if isinstance(lr, Real) and not isinstance(lr, bool):
        return float(lr) * ratio
    if isinstance(lr, Tensor):
        return Tensor(lr.asnumpy().astype(np.float32) * np.float32(ratio), mstype.float32)
    if isinstance(lr, Iterable) and not isinstance(lr, (str, dict)):
        return Tensor(np.asarray(list(lr), np.float32) * np.float32(ratio), mstype.float32)
    raise TypeError(f"LoraPlusAdamW: unsupported learning rate {lr!r} (type {type(lr).__name__})")


def _real(name, value, minimum, inclusive):
    """``value`` as a float after checking it is a finite real number ``>``/``>=`` ``minimum``."""
    bad = (not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value)
           or (value < minimum if inclusive else value <= minimum))
    if bad:
        rel = ">=" if inclusive else ">"
        raise ValueError(f"LoraPlusAdamW: {name} must be a finite real number {rel} {minimum}, "
                         f"got {value!r}")
    return float(value)


class LoraPlusAdamW(MFAdamW):
    """MindFormers' AdamW where LoRA B-side parameters learn ``loraplus_lr_ratio`` times faster.

    B side: parameters whose last name component is ``lora_B``, ``lora_B_bias`` or
    ``mindpet_delta_lora_b``. Their learning rate is ``loraplus_lr_ratio`` times the base one
    (the group's ``lr`` if it has one, else ``learning_rate``) at every step, schedules included.
    Their weight decay is ``loraplus_weight_decay``, or the group's (else ``weight_decay``) when
    that is None; 1-D B-side parameters get none. Every other parameter is plain AdamW.

    Args:
        params: list of Parameters, or MindSpore group dicts (``params``, ``lr``,
            ``weight_decay``, ``order_params``) as MindFormers' trainer builds them.
        learning_rate: float, Tensor, iterable or ``LearningRateSchedule``. Default 1e-3.
        betas, eps, weight_decay, swap: as in ``mindformers.core.optim.adamw.AdamW``.
        loraplus_lr_ratio: B-side learning rate / base learning rate; a finite real > 0.
        loraplus_weight_decay: B-side weight decay; None to keep the normal one.

    Raises:
        ValueError: a bad ``loraplus_*`` or ``weight_decay`` value, or no B-side parameter.
    """

    def __init__(self, params, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 loraplus_lr_ratio=16.0, loraplus_weight_decay=None, swap=False):
        ratio = _real("loraplus_lr_ratio", loraplus_lr_ratio, 0.0, inclusive=False)
        weight_decay = _real("weight_decay", weight_decay, 0.0, inclusive=True)
        if loraplus_weight_decay is not None:
            loraplus_weight_decay = _real("loraplus_weight_decay", loraplus_weight_decay, 0.0, True)
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        b_groups, other_groups, order = [], [], []
        for group in groups:
            if "order_params" in group:
                order.append(group)
                continue
            members = list(group["params"])
            others = [p for p in members if not is_lora_b(p.name)]
            if others:
                other_groups.append({**group, "params": others})
            base_lr = group.get("lr", learning_rate)
            wd = group.get("weight_decay", weight_decay)
            wd = wd if loraplus_weight_decay is None else loraplus_weight_decay
            for one_d in (False, True):
                picked = [p for p in members if is_lora_b(p.name) and (len(p.shape) == 1) == one_d]
                if picked:
                    b_groups.append({"params": picked, "lr": _scaled_lr(base_lr, ratio),
                                     "weight_decay": 0.0 if one_d else wd})
        if not b_groups:
            names = [p.name for g in groups for p in g.get("params", [])]
            raise ValueError(
                f"LoraPlusAdamW: no LoRA B-side parameter (name ending in {', '.join(B_SIDE_NAMES)}) "
                f"among the {len(names)} trainable parameters, e.g. {names[:5]}; use AdamW instead")
        # B groups first: MFTrainOneStepCell reports the lr of the last parameter, so the log
        # shows the base learning rate whenever any non-B parameter exists.
        super().__init__(b_groups + other_groups + order, learning_rate=learning_rate, betas=betas,
                         eps=eps, weight_decay=weight_decay, swap=swap)
        self.loraplus_lr_ratio = ratio
        self.loraplus_weight_decay = loraplus_weight_decay


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
