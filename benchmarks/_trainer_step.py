"""What ``run_mindformer.py``'s ``main()`` and MindFormers' trainer build before the first step,
shared by the step-time benchmarks: the network (with its pet type), optimizer and train wrapper."""
import os
import resource
import statistics
import time

import mindspore as ms
from mindformers.core.context import build_context
from mindformers.core.lr import build_lr
from mindformers.core.optim import build_optim
from mindformers.core.parallel_config import build_parallel_config
from mindformers.models.build_model import build_network
from mindformers.tools.register import MindFormerConfig
from mindformers.trainer.optimizer_grouped_parameters import get_optimizer_grouped_parameters
from mindformers.wrapper import build_wrapper
from mindformers.wrapper.wrapper import DataOrderWrapperCell

try:
    from mindformers.tools import set_output_path
except ImportError:  # MindFormers 1.9.0
    from mindformers.utils.file_utils import set_output_path


TINY_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "tiny", "lora_ext.yaml")


def sized_config(dims: dict) -> MindFormerConfig:
    """The tiny CPU config (its pet_config included) with the model dims and batch size of
    ``dims``; MindFormers' outputs go to ./output."""
    config = MindFormerConfig(TINY_CONFIG)
    config.output_dir = os.path.join(os.getcwd(), "output")
    config.runner_config.batch_size = config.train_dataset.batch_size = dims["batch_size"]
    for key, value in dims.items():
        config.model.model_config[key] = value
    return config


def build_train_step(config, total_steps: int, threads: int = 0, construct_args_key=None):
    """(network, wrapper) for a MindFormerConfig, in the trainer's order; ``threads`` > 0 sets
    MindSpore's CPU kernel threads.

    ``construct_args_key`` (e.g. ``["input_ids", "labels"]``, the dataset's ``input_columns``):
    the wrapper's network is then ``DataOrderWrapperCell(construct_args_key, network)``, which
    passes the step's inputs to the network by keyword, as ``BaseTrainer.training_process``
    wraps it. mcore models need it (their ``construct`` takes ``position_ids`` second, so a
    positional ``labels`` would land there); the legacy Llama takes ``(input_ids, labels)``
    positionally and the step-time scripts leave it None (no wrapper cell). The returned
    ``network`` is the unwrapped one in both cases."""
    set_output_path(config.output_dir)
    build_context(config)
    if threads:
        ms.device_context.cpu.op_tuning.threads_num(threads)
    build_parallel_config(config)
    network = build_network(config.model, default_args={
        "parallel_config": config.parallel_config, "moe_config": config.moe_config,
        "dataset_config": config.train_dataset, "calculate_per_token_loss": False,
        "batch_size": config.runner_config.batch_size})
    network.set_train(True)
    train_network = network
    if construct_args_key is not None:
        train_network = DataOrderWrapperCell(list(construct_args_key), network)  # auto_prefix=False
        train_network.set_train(True)
    config.lr_schedule.total_steps = total_steps
    lr_schedule = build_lr(config.lr_schedule)
    group_params = get_optimizer_grouped_parameters(
        model=train_network, weight_decay=config.optimizer.weight_decay, dynamic_lr_schedule=lr_schedule,
        optimizer_type=config.optimizer.type)
    optimizer = build_optim(config.optimizer, default_args={"params": group_params,
                                                            "learning_rate": lr_schedule})
    wrapper = build_wrapper(config.runner_wrapper, default_args={
        "network": train_network, "optimizer": optimizer, "parallel_config": config.parallel_config,
        "calculate_per_token_loss": False, "global_norm_spike_threshold": 1.0,
        "print_separate_loss": True, "use_skip_data_by_global_norm": False,
        "lr_scheduler": lr_schedule, "grouped_lr_scheduler": None})
    wrapper.set_train(True)
    return network, wrapper


def arch_of(network) -> str:
    """``<network class>/<model class>``, and for adapted models which kernels their cells run
    (``AdapterModel.kernel_summary``): what a row measured, printed beside it."""
    inner = getattr(network, "network", network)  # PetModel keeps the adapted model in .network
    arch = f"{type(network).__name__}/{type(inner).__name__}"
    summary = getattr(inner, "kernel_summary", None)
    return f"{arch}; {summary()}" if summary else arch


def time_steps(wrapper, input_ids, labels, warmup: int, total_steps: int) -> dict:
    """Run ``total_steps`` steps of ``wrapper(input_ids, labels)``, each synchronised on its
    loss; the first ``warmup`` are untimed (the first compiles). Returns the first step's
    seconds, the median / p10 / p90 ms of the timed steps, the median CPU ms of the process per
    step (all its threads: time the host gave to other guests is not in it, but the spin-waits
    of MindSpore's idle workers are, so ops on MindSpore's threads count about twice their wall
    time and our kernels' about once: compare it only between setups of the same kind), their
    count, the steps the overflow check skipped, the first and last loss and the process's peak
    RSS (MB)."""
    times, cpu_times, losses, skipped, first = [], [], [], 0, None
    for step in range(total_steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = wrapper(input_ids, labels)
        loss = float(out[0].asnumpy().reshape(-1)[0])  # waits for the step
        elapsed = time.perf_counter() - start
        if step == 0:
            first = elapsed
        if step >= warmup:
            times.append(elapsed * 1e3)
            cpu_times.append((time.process_time() - cpu_start) * 1e3)
            skipped += int(bool(out[1].asnumpy()))
        losses.append(loss)
    times_sorted = sorted(times)
    return {
        "first_step_s": first,
        "median_ms": statistics.median(times),
        "median_cpu_ms": statistics.median(cpu_times),
        "p10_ms": times_sorted[int(0.1 * (len(times) - 1))],
        "p90_ms": times_sorted[int(round(0.9 * (len(times) - 1)))],
        "steps": len(times), "skipped": skipped,
        "loss_first": losses[0], "loss_last": losses[-1],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
