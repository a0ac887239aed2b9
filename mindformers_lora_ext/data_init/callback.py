"""``DataDrivenInit``: the trainer callback that runs a data-driven initialisation (EVA, CorDA,
LoRA-GA) when training begins, i.e. after MindFormers has built the network, wrapped it and
loaded the base checkpoint, and before the training graph is compiled."""
import statistics as stats_module
import time
from typing import List, Optional

from mindspore.train.callback import Callback

from mindformers_lora_ext.config import DATA_DRIVEN_INITS
from mindformers_lora_ext import _boot

PREFIX = "[mindformers-lora-ext]"


def _print(message: str) -> None:
    from mindformers.tools.utils import get_real_rank  # pylint: disable=import-outside-toplevel
    if get_real_rank() == 0:
        print(message, flush=True)


class DataDrivenInit(Callback):
    """Initialises the adapters of ``init_lora_weights: eva | corda | lora_ga`` from data.

    Args:
        batches (int): the most batches the statistics pass reads (default 16); EVA stops
            earlier once its components converge (``eva_config.tau``).
        dataset_dir (str, optional): a MindRecord file to read instead of the run's training
            dataset, with the training dataset's columns, batched at its batch size (each
            data-parallel rank reads its own shard).
        report_steps (int): after this many training steps, print the pass's wall time divided
            by the median training step time (the cost in steps; default 5, 0: never).

    The pass is skipped when the adapter already holds values: loaded by ``adapter_path``, by
    MindFormers' ``load_checkpoint`` (resume from a run checkpoint), or by an
    ``AdapterCheckpoint`` that resumes (it restores the residual base weights of CorDA / LoRA-GA
    from the run's ``initial/`` adapter). Training without this callback while such an
    initialisation is pending stops with an error when the training graph is compiled.
    """

    def __init__(self, batches: int = 16, dataset_dir: Optional[str] = None, report_steps: int = 5):
        super().__init__()
        for name, value, low in (("batches", batches, 1), ("report_steps", report_steps, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DataDrivenInit {name} = {value!r}: expected an integer >= {low}")
        if dataset_dir is not None and not isinstance(dataset_dir, str):
            raise ValueError(f"DataDrivenInit dataset_dir = {dataset_dir!r}: expected a MindRecord file path")
        self.batches = batches
        self.dataset_dir = dataset_dir
        self.report_steps = report_steps
        self.report = None
        self._step_times: List[float] = []
        self._step_start = None

    def on_train_begin(self, run_context):
        # pylint: disable=import-outside-toplevel
        from mindformers_lora_ext.callbacks import AdapterCheckpoint, adapter_model_of
        from mindformers_lora_ext.data_init import runner
        cb_params = run_context.original_args()
        model = adapter_model_of(cb_params, "DataDrivenInit")
        pending = model.data_init_pending
        if pending is None:
            init = getattr(model.config.pet_config, "init_lora_weights", None)
            if init in DATA_DRIVEN_INITS:
                _print(f"{PREFIX} DataDrivenInit: {init} skipped, the adapter was loaded (adapter_path, or "
                       f"an AdapterCheckpoint that resumed)")
            else:
                _print(f"{PREFIX} DataDrivenInit: nothing to do, init_lora_weights = {init!r} is not "
                       f"data-driven ({', '.join(DATA_DRIVEN_INITS)})")
            return
        resuming = [cb for cb in getattr(cb_params, "list_callback", None) or []
                    if isinstance(cb, AdapterCheckpoint) and cb.will_resume()]
        if resuming:
            _print(f"{PREFIX} DataDrivenInit: {pending} skipped, AdapterCheckpoint resumes the adapter "
                   f"from {resuming[0].root()}")
            return
        if model.has_adapter_values():
            model.finish_data_init()
            _print(f"{PREFIX} DataDrivenInit: {pending} skipped, the adapter already holds values "
                   f"(loaded before it: a resumed run checkpoint or AdapterCheckpoint)")
            return
        _check_parallel_mode(pending)
        dataset, source = self._dataset(cb_params)
        _print(f"{PREFIX} DataDrivenInit: {pending} from up to {self.batches} batches of {source}")
        start = time.perf_counter()
        self.report = runner.initialize(model, cb_params.train_network.network,
                                        dataset.create_tuple_iterator(num_epochs=1), dataset.get_col_names(),
                                        self.batches, _print)
        self.report.total_s = time.perf_counter() - start
        _print(f"{PREFIX} DataDrivenInit: {self.report.line()}; {self.report.total_s:.2f} s in all")

    def _dataset(self, cb_params):
        train = cb_params.train_dataset
        if not self.dataset_dir:
            return train, "the training dataset"
        # pylint: disable=import-outside-toplevel
        import mindspore.dataset as ds
        from mindformers_lora_ext.data_init.statistics import data_parallel_size
        shards = {}
        if data_parallel_size() > 1:
            from mindspore.communication import get_rank
            shards = {"num_shards": data_parallel_size(), "shard_id": get_rank()}
        data = ds.MindDataset(self.dataset_dir, columns_list=train.get_col_names(), shuffle=False, **shards)
        return data.batch(train.get_batch_size(), drop_remainder=True), self.dataset_dir

    def on_train_step_begin(self, run_context):
        self._step_start = time.perf_counter()

    def on_train_step_end(self, run_context):
        if self.report is None or not self.report_steps or self._step_start is None \
                or len(self._step_times) > self.report_steps:
            return
        self._step_times.append(time.perf_counter() - self._step_start)
        if len(self._step_times) == self.report_steps + 1:  # the first step compiles: left out
            step = stats_module.median(self._step_times[1:])
            report = self.report
            warm = ""
            if report.batches > 1:  # the first batch's compute taken as the others' mean
                per_batch = (report.pass_s - report.first_batch_s) / (report.batches - 1)
                warm = f"{(report.total_s - report.first_batch_s + per_batch) / step:.1f} without compiling its graph; "
            _print(f"{PREFIX} DataDrivenInit: the {report.method} pass took {report.total_s:.2f} s = "
                   f"{report.total_s / step:.1f} training steps ({warm}median step {step * 1e3:.1f} ms)")


def _check_parallel_mode(method: str) -> None:
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    mode = ms.get_auto_parallel_context("parallel_mode")
    if mode not in ("stand_alone", "data_parallel"):
        raise ValueError(f"init_lora_weights = {method!r} runs its statistics pass stand-alone or data "
                         f"parallel; parallel_mode {mode!r} shards the weights it decomposes. Initialise "
                         f"in a data-parallel run and load the adapter with adapter_path")


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
