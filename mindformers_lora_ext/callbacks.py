"""Trainer callbacks registered in MindFormerRegister (YAML ``callbacks: - type: <name>``)."""
# pylint: disable=too-many-instance-attributes
import json
import math
import os
from typing import Dict, List, Optional

import numpy as np
from mindspore import Tensor
from mindspore.train.callback import Callback

from mindformers_lora_ext.tuners.base_layer import param_array

OPTIMIZER_NAME = "optimizer.safetensors"


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
        check_frozen (bool): checksum every parameter at the first step and at train end, and report
            which trainable and which frozen parameters changed (costs one pass over the weights).

    Summary keys: ``trainable_params``, ``total_params`` (element counts),
    ``trainable_names``, ``losses`` (one float per step), ``first_loss``, ``last_loss``,
    ``trainable_checksums`` (name -> [sum, sum of squares] at train end, float64), ``rank``,
    and with ``check_frozen``: ``changed_trainable``, ``changed_frozen`` (names).
    ``{rank}`` in ``summary_file`` becomes the process's rank (one file per data-parallel worker).
    """

    def __init__(self, summary_file: Optional[str] = None, check_frozen: bool = False):
        super().__init__()
        self.summary_file = summary_file
        self.check_frozen = bool(check_frozen)
        self.losses: List[float] = []
        self.summary: Dict[str, object] = {}
        self._before: Dict[str, tuple] = {}

    def on_train_step_begin(self, run_context):
        if self.summary:
            return
        # at the first step, not at train begin: other callbacks' on_train_begin may still set
        # weights (DataDrivenInit's residual base weights, a resumed adapter)
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
        self.losses.append(_loss_of(run_context.original_args()))

    def on_train_end(self, run_context):
        network = _network_of(run_context.original_args())
        self.summary.update(losses=self.losses,
                            first_loss=self.losses[0] if self.losses else None,
                            last_loss=self.losses[-1] if self.losses else None)
        after = _checksums(network)
        if self.check_frozen:
            grads = {p.name: p.requires_grad for p in network.get_parameters()}
            changed = [n for n, v in after.items() if v != self._before.get(n)]
            self.summary["changed_trainable"] = [n for n in changed if grads[n]]
            self.summary["changed_frozen"] = [n for n in changed if not grads[n]]
        from mindformers.tools.utils import get_real_rank  # pylint: disable=import-outside-toplevel
        rank = get_real_rank()
        self.summary["rank"] = rank
        trainable_names = set(self.summary["trainable_names"])
        self.summary["trainable_checksums"] = {n: list(v) for n, v in after.items() if n in trainable_names}
        total, trainable = self.summary["total_params"], self.summary["trainable_params"]
        print(f"[mindformers-lora-ext] trainable params {trainable} / {total} "
              f"({100.0 * trainable / max(total, 1):.3f}%), steps {len(self.losses)}, "
              f"loss {self.summary['first_loss']} -> {self.summary['last_loss']}", flush=True)
        if self.summary_file:
            path = self.summary_file.replace("{rank}", str(rank))
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(self.summary, handle, indent=2)


class TrainingDivergedError(RuntimeError):
    """Training stopped after ``nan_patience`` steps with a non-finite loss."""


def adapter_model_of(cb_params, who: str):
    """Our AdapterModel inside the train network (train wrapper -> PetModel -> AdapterModel);
    ``who``: the callback asking, for the error."""
    from mindformers_lora_ext.tuners.model import AdapterModel  # pylint: disable=import-outside-toplevel
    for _, cell in cb_params.train_network.cells_and_names():
        if isinstance(cell, AdapterModel):
            return cell
    raise TypeError(f"{who} needs a model built by one of mindformers-lora-ext's pet "
                    "types (model.model_config.pet_config.pet_type); none found in the train network")


def _loss_of(cb_params) -> float:
    outputs = cb_params.net_outputs
    loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    return float(np.asarray(loss.asnumpy(), np.float64).mean())


class AdapterCheckpoint(Callback):
    """Saves only the adapter, in HF PEFT's layout, to ``<output_dir>/step_<N>/``.

    Args:
        save_steps (int): save every this many global steps (and at train end).
        output_dir (str, optional): default ``<MindFormers output root>/adapters``.
        keep_last (int, optional): keep only the newest this many step directories; older ones
            are deleted after the new one and ``latest`` are on disk.
        resume (bool): before training, load the newest adapter under ``output_dir`` (and its
            optimizer state, if saved) and continue the step count from it.
        nan_patience (int, optional): stop after this many consecutive steps whose loss is not
            finite; nothing is saved from such steps, and training ends with
            :class:`TrainingDivergedError` (so the process exits non-zero).
        merge_on_end (bool): also write ``<output_dir>/merged/model.safetensors``, the full
            network with the adapter merged (a plain base-model checkpoint).
        save_optimizer (bool): also save the adapter's optimizer state (``optimizer.safetensors``,
            not part of PEFT's format) so ``resume`` continues the same trajectory.

    PiSSA/OLoRA/CorDA/LoRA-GA runs (which train on residual base weights) also get
    ``<output_dir>/initial/``, the adapter before the first step (after DataDrivenInit), which
    ``mindformers-lora convert`` needs, and which ``resume`` takes out of the base weights again
    for CorDA / LoRA-GA (their residual cannot be recomputed without the data). Only rank 0
    writes; every rank loads on resume.
    """

    def __init__(self, save_steps: int = 100, output_dir: Optional[str] = None,
                 keep_last: Optional[int] = None, resume: bool = False,
                 nan_patience: Optional[int] = None, merge_on_end: bool = False,
                 save_optimizer: bool = True):
        super().__init__()
        for name, value, low in (("save_steps", save_steps, 1), ("keep_last", keep_last, 1),
                                 ("nan_patience", nan_patience, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"AdapterCheckpoint {name} = {value!r}: expected an integer >= {low}"
                                 + ("" if name == "save_steps" else " or null"))
        self.save_steps = save_steps
        self.output_dir = output_dir
        self.keep_last = keep_last
        self.resume = bool(resume)
        self.nan_patience = nan_patience
        self.merge_on_end = bool(merge_on_end)
        self.save_optimizer = bool(save_optimizer)
        self.step_offset = 0
        self.last_saved: Optional[int] = None
        self._bad_steps = 0
        self._diverged = False
        self._model = None
        self._optimizer = None
        self._initial_due = False  # the initial adapter is written at the first step

    # -- paths and ranks
    def root(self) -> str:
        if self.output_dir:
            return os.path.abspath(self.output_dir)
        from mindformers.tools.utils import get_output_root_path  # pylint: disable=import-outside-toplevel
        return os.path.join(get_output_root_path(), "adapters")

    @staticmethod
    def _is_writer() -> bool:
        from mindformers.tools.utils import get_real_rank  # pylint: disable=import-outside-toplevel
        return get_real_rank() == 0

    # -- optimizer state of the adapter parameters
    def _optimizer_state(self) -> Dict[str, object]:
        if self._optimizer is None:
            return {}
        # Everything the optimizer owns besides the model's weights: moments of the (adapter)
        # parameters it updates, step counters, beta powers.
        model_params = {id(p) for p in self._model.get_parameters()}
        return {p.name: p for p in self._optimizer.get_parameters() if id(p) not in model_params}

    def will_resume(self) -> bool:
        """Whether on_train_begin loads an adapter (``resume`` and a saved step under the root)."""
        from mindformers_lora_ext import adapter_files  # pylint: disable=import-outside-toplevel
        return self.resume and bool(adapter_files.step_dirs(self.root()))

    def on_train_begin(self, run_context):
        cb_params = run_context.original_args()
        self._model = adapter_model_of(cb_params, "AdapterCheckpoint")
        self._optimizer = getattr(cb_params, "optimizer", None) or getattr(cb_params.train_network, "optimizer", None)
        from mindformers_lora_ext import adapter_files  # pylint: disable=import-outside-toplevel
        root = self.root()
        if self._is_writer():
            adapter_files.clean_stale(root)
        if self.resume and adapter_files.step_dirs(root):
            self._resume(root)
        elif self.resume:
            print(f"[mindformers-lora-ext] AdapterCheckpoint: resume requested, no adapter under "
                  f"{root} yet: starting fresh", flush=True)
        # written at the first step: a DataDrivenInit running after us sets the initial adapter
        self._initial_due = self._is_writer()

    def on_train_step_begin(self, run_context):
        if self._initial_due:
            self._initial_due = False
            self._save_initial(self.root())

    def _save_initial(self, root):
        """PiSSA/OLoRA/CorDA/LoRA-GA: keep the adapter as it is before the first step in
        ``<root>/initial``; ``mindformers-lora convert`` needs it to turn the trained adapter into a
        plain LoRA for the original base weights (pissa_to_lora)."""
        # pylint: disable=import-outside-toplevel
        from mindformers_lora_ext.peft_format import save_adapter
        from mindformers_lora_ext.pissa_to_lora import INITIAL_DIR, is_convertible
        if not is_convertible(getattr(self._model.config.pet_config, "init_lora_weights", None)):
            return
        path = os.path.join(root, INITIAL_DIR)
        if self.step_offset:  # resumed: the run's initial adapter was written when it started
            if not os.path.isdir(path):
                print(f"[mindformers-lora-ext] AdapterCheckpoint: no {path} from this run's start: "
                      f"its adapters cannot be converted to plain LoRA", flush=True)
            return
        save_adapter(self._model, path)
        print(f"[mindformers-lora-ext] saved the initial adapter {path} (for `mindformers-lora convert`)",
              flush=True)

    def _resume(self, root):
        # pylint: disable=import-outside-toplevel
        from safetensors.numpy import load_file
        from mindformers_lora_ext import adapter_files
        from mindformers_lora_ext.peft_format import load_adapter
        from mindformers_lora_ext.config import DATA_DRIVEN_INITS
        from mindformers_lora_ext.pissa_to_lora import INITIAL_DIR, is_convertible
        init = getattr(self._model.config.pet_config, "init_lora_weights", None)
        # a residual the data made (CorDA, LoRA-GA; PiSSA/OLoRA recompute theirs from W at build)
        if init in DATA_DRIVEN_INITS and is_convertible(init) and not self._model.has_adapter_values():
            # the base weights are the original ones: the run trained on W - s B0 A0
            initial = os.path.join(root, INITIAL_DIR)
            if not os.path.isdir(initial):
                raise FileNotFoundError(f"AdapterCheckpoint resume: a {init} run trains on residual base weights "
                                        f"W - s B0 A0, and its initial adapter {initial} is missing")
            load_adapter(self._model, initial)
            self._model.subtract_adapters()
        directory = load_adapter(self._model, root)
        self.step_offset = self.last_saved = int(adapter_files.STEP_DIR.fullmatch(
            os.path.basename(directory)).group(1))
        opt_file = os.path.join(directory, OPTIMIZER_NAME)
        restored = 0
        if os.path.isfile(opt_file):
            values = load_file(opt_file)
            for name, param in self._optimizer_state().items():
                if name in values:
                    param.set_data(Tensor(values[name], param.dtype))
                    restored += 1
        print(f"[mindformers-lora-ext] AdapterCheckpoint: resumed from {directory} (step "
              f"{self.step_offset}, {restored} optimizer tensors)", flush=True)

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        step = self.step_offset + cb_params.cur_step_num
        if not math.isfinite(_loss_of(cb_params)):
            self._bad_steps += 1
            if self.nan_patience and self._bad_steps >= self.nan_patience:
                self._diverged = True
                run_context.request_stop()
            return
        self._bad_steps = 0
        if step % self.save_steps == 0:
            self.save(step)

    def on_train_end(self, run_context):
        cb_params = run_context.original_args()
        if self._diverged:
            kept = (f"the last good adapter is step_{self.last_saved} under {self.root()}"
                    if self.last_saved is not None else "no adapter was saved")
            raise TrainingDivergedError(
                f"loss was not finite for {self.nan_patience} consecutive steps (last step "
                f"{self.step_offset + cb_params.cur_step_num}); training stopped, {kept}")
        step = self.step_offset + cb_params.cur_step_num
        if self._bad_steps == 0 and self.last_saved != step:
            self.save(step)
        if self.merge_on_end and self._is_writer():
            self.write_merged(os.path.join(self.root(), "merged", "model.safetensors"))

    def save(self, step: int) -> Optional[str]:
        """Write ``step_<step>`` (rank 0), then ``latest``, then prune; returns the directory."""
        self.last_saved = step
        if not self._is_writer():
            return None
        # pylint: disable=import-outside-toplevel
        from safetensors.numpy import save_file
        from mindformers_lora_ext import adapter_files
        from mindformers_lora_ext.peft_format import save_adapter
        root = self.root()
        state = {n: p.asnumpy() for n, p in self._optimizer_state().items()} if self.save_optimizer else {}

        def extra(tmp):
            if state:
                save_file(state, os.path.join(tmp, OPTIMIZER_NAME))

        directory = save_adapter(self._model, os.path.join(root, f"step_{step}"), extra)
        adapter_files.write_text_atomic(os.path.join(root, adapter_files.LATEST), f"step_{step}\n")
        if self.keep_last:
            adapter_files.prune(root, self.keep_last)
        print(f"[mindformers-lora-ext] saved adapter {directory}: {self._stats()}", flush=True)
        return directory

    def _stats(self) -> str:
        from mindformers_lora_ext.tuners.targeting import layer_index  # pylint: disable=import-outside-toplevel
        groups: Dict[str, float] = {}
        count = 0
        for param in self._model.saved_parameters():
            data = param.asnumpy().astype(np.float64)
            index = layer_index(param.name)
            key = f"L{index}" if index is not None else param.name.rsplit(".", 1)[0]
            groups[key] = groups.get(key, 0.0) + float((data * data).sum())
            count += data.size
        norms = " ".join(f"{k}={math.sqrt(v):.4g}" for k, v in groups.items())
        return f"{count} params; adapter norm per layer: {norms}"

    def write_merged(self, path: str) -> str:
        """The whole network with the adapter merged, as a MindSpore safetensors checkpoint."""
        # pylint: disable=import-outside-toplevel
        from mindformers_lora_ext.merge import is_adapter_tensor, merged_values, save_mindspore_checkpoint
        params = {p.name: p for p in self._model.get_parameters()}
        adapter = {n: param_array(p) for n, p in params.items() if is_adapter_tensor(n)}
        # A and B at the rank in use, as files hold them (EVA allocates more rows than it uses)
        adapter.update({n: v for n, v in self._model.adapter_state_dict().items() if n in adapter})
        merged = merged_values(lambda n: param_array(params[n]) if n in params else None, adapter,
                               self._model.config.pet_config, "network")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_mindspore_checkpoint(((n, merged[n] if n in merged else param_array(p))
                                   for n, p in params.items() if not is_adapter_tensor(n)), path)
        print(f"[mindformers-lora-ext] wrote merged checkpoint {path}", flush=True)
        return path


class AdaLoraRankAllocator(Callback):
    """AdaLoRA's rank budget (``pet_type: adalora``), as HF PEFT's ``update_and_allocate``.

    Every step before ``total_step - tfinal`` it updates the smoothed sensitivities from the
    adapter parameters and their gradients (tapped by ``CpuSafeTrainOneStepCell``); on
    schedule it zeroes the lambda entries of the least important triplets so that the kept
    total follows the cubic budget from ``init_r``·n down to ``target_r``·n; at
    ``total_step - tfinal`` it fixes the final mask, stores it as the config's
    ``rank_pattern`` (saved in adapter files) and keeps applying it afterwards.

    Args:
        log_every (int, optional): print the current budget and kept rank every this many steps.
    """

    def __init__(self, log_every: Optional[int] = None):
        super().__init__()
        self.log_every = log_every
        self.allocator = None
        self.history: List[tuple] = []  # (step, budget, kept) at every masking step
        self._model = None
        self._wrapper = None
        self._final: Optional[Dict[str, List[bool]]] = None

    def on_train_begin(self, run_context):
        # pylint: disable=import-outside-toplevel
        from mindformers_lora_ext.tuners.adalora import AdaLoraModel, RankAllocator
        cb_params = run_context.original_args()
        self._model = adapter_model_of(cb_params, "AdaLoraRankAllocator")
        if not isinstance(self._model, AdaLoraModel):
            raise TypeError("AdaLoraRankAllocator needs pet_type: adalora")
        self._wrapper = cb_params.train_network
        if not hasattr(self._wrapper, "tapped_gradients") or not self._wrapper.tap_index:
            raise TypeError("AdaLoraRankAllocator needs the gradients: set runner_wrapper: "
                            "{type: CpuSafeTrainOneStepCell} (its gradient taps feed the allocator); "
                            f"got {type(self._wrapper).__name__}")
        ranks = {name: layer.rank for name, layer in self._model.adalora_layers().items()}
        self.allocator = RankAllocator(self._model.config.pet_config, ranks)
        self._model.tap_reader_attached = True

    def on_train_step_end(self, run_context):
        step = run_context.original_args().cur_step_num
        config = self._model.config.pet_config
        end = config.total_step - config.tfinal
        if self._final is not None or step > end:
            self._apply(self._final or config.rank_pattern)
            return
        grads = self._wrapper.tapped_gradients()
        values = {p.name: p.asnumpy().astype(np.float64) for p in self._model.adapter_parameters()}
        self.allocator.update_ipt(values, {n: grads[n].astype(np.float64) for n in values})
        budget, mask_now = self.allocator.budget_schedule(step)
        if mask_now or step == end:
            pattern = self.allocator.mask_to_budget(budget)
            self._apply(pattern)
            config.rank_pattern = pattern
            kept = sum(sum(m) for m in pattern.values())
            self.history.append((step, budget, kept))
            if step == end:
                self._final = pattern
            if self.log_every and step % self.log_every == 0:
                print(f"[mindformers-lora-ext] AdaLoRA step {step}: budget {budget}, kept rank {kept}",
                      flush=True)

    def _apply(self, pattern):
        if not pattern:
            return
        for name, layer in self._model.adalora_layers().items():
            mask = np.asarray(pattern[name], bool)
            if mask.size != layer.rank or mask.all():
                continue
            values = layer.lora_E.asnumpy()
            values[~mask] = 0
            layer.lora_E.set_data(Tensor(values, layer.lora_E.dtype))
