"""Trainer callbacks registered in MindFormerRegister (YAML ``callbacks: - type: <name>``)."""
import json
import os
from typing import Dict, List, Optional

import numpy as np
from mindspore.train.callback import Callback


def _network_of(cb_params):
    """The model inside the train-one-step wrapper (PetModel for our pet types)."""
    train_network = cb_params.train_network
    return getattr(train_network, "network", None) or train_network


def _checksums(network) -> Dict[str, tuple]:
    """Parameter name -> (sum, sum of squares) in float64, computed one tensor at a time."""
    sums = {}
    for param in network.get_parameters():
        data = param.asnumpy().astype(np.float64)
        sums[param.name] = (float(data.sum()), float((data * data).sum()))
    return sums


class TrainingSummary(Callback):
    """Records losses and parameter counts; prints one summary line at train end.

    Args:
        summary_file (str, optional): also write the summary as JSON here.
        check_frozen (bool): checksum every parameter at train begin and end, and report which
            trainable and which frozen parameters changed (costs one pass over the weights).

    Summary keys: ``trainable_params``, ``total_params`` (element counts),
    ``trainable_names``, ``losses`` (one float per step), ``first_loss``, ``last_loss``,
    and with ``check_frozen``: ``changed_trainable``, ``changed_frozen`` (names).
    """

    def __init__(self, summary_file: Optional[str] = None, check_frozen: bool = False):
        super().__init__()
        self.summary_file = summary_file
        self.check_frozen = bool(check_frozen)
        self.losses: List[float] = []
        self.summary: Dict[str, object] = {}
        self._before: Dict[str, tuple] = {}

    def on_train_begin(self, run_context):
        network = _network_of(run_context.original_args())
        params = list(network.get_parameters())
        trainable = [p for p in params if p.requires_grad]
        self.summary = {
            "trainable_params": int(sum(p.size for p in trainable)),
            "total_params": int(sum(p.size for p in params)),
            "trainable_names": [p.name for p in trainable],
        }
        if self.check_frozen:
            self._before = _checksums(network)

    def on_train_step_end(self, run_context):
        outputs = run_context.original_args().net_outputs
        loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        self.losses.append(float(np.asarray(loss.asnumpy()).mean()))

    def on_train_end(self, run_context):
        network = _network_of(run_context.original_args())
        self.summary.update(losses=self.losses,
                            first_loss=self.losses[0] if self.losses else None,
                            last_loss=self.losses[-1] if self.losses else None)
        if self.check_frozen:
            after = _checksums(network)
            grads = {p.name: p.requires_grad for p in network.get_parameters()}
            changed = [n for n, v in after.items() if v != self._before.get(n)]
            self.summary["changed_trainable"] = [n for n in changed if grads[n]]
            self.summary["changed_frozen"] = [n for n in changed if not grads[n]]
        total, trainable = self.summary["total_params"], self.summary["trainable_params"]
        print(f"[mindformers-lora-ext] trainable params {trainable} / {total} "
              f"({100.0 * trainable / max(total, 1):.3f}%), steps {len(self.losses)}, "
              f"loss {self.summary['first_loss']} -> {self.summary['last_loss']}", flush=True)
        if self.summary_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.summary_file)), exist_ok=True)
            with open(self.summary_file, "w", encoding="utf-8") as handle:
                json.dump(self.summary, handle, indent=2)
