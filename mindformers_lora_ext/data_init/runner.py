"""One data-driven initialisation: run the statistics pass its method needs over calibration
batches, compute each target cell's adapter (data_init.eva / corda / lora_ga) and set it.

``initialize(model, network, batches, columns, max_batches, printer)``: ``model`` is the
AdapterModel, ``network`` what the train step calls with a batch (the wrapper's ``network``: it
returns the loss), ``batches`` an iterable of dataset rows (tuples of Tensors, ``columns`` their
names). Runs in graph mode, stand-alone or data parallel (statistics summed over the ranks).
"""
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Sequence

import numpy as np

from mindformers_lora_ext.data_init import corda, eva, lora_ga
from mindformers_lora_ext.data_init.statistics import (COVARIANCE, MOMENTS, ForwardPass, GradientSum,
                                                       InputStatistics, Progress, TokenMask, column_arrays,
                                                       data_parallel_size, summed_over_ranks, token_mask)
from mindformers_lora_ext import _boot


@dataclass
class LayerInit:
    """What one cell gets: A [k, in], B [out, k] (float64); ``alpha`` its new lora_alpha (EVA's
    redistribution) or None; ``residual``: the base weight becomes W - s B A."""

    lora_a: np.ndarray
    lora_b: np.ndarray
    alpha: Optional[float] = None
    residual: bool = False


@dataclass
class Report:
    """What a pass did: batches read, seconds (the first batch compiles the pass's graph),
    seconds of the decomposition, tokens seen (EVA: after the mask), ranks (EVA)."""

    method: str
    batches: int = 0
    pass_s: float = 0.0
    first_batch_s: float = 0.0
    decompose_s: float = 0.0
    tokens: float = 0.0
    ranks: Dict[str, int] = field(default_factory=dict)
    source: str = "statistics pass"
    total_s: float = 0.0  # the whole initialisation, set by the caller

    def line(self) -> str:
        """A one-line summary."""
        if self.batches == 0:
            return f"{self.method}: from {self.source}, decomposition {self.decompose_s:.2f} s"
        ranks = ""
        if self.ranks:
            values = list(self.ranks.values())
            ranks = f", ranks {min(values)}..{max(values)} (sum {sum(values)})"
        return (f"{self.method}: {self.batches} batches x {data_parallel_size()} rank(s) in {self.pass_s:.2f} s "
                f"(first batch, with graph compile, {self.first_batch_s:.2f} s), decomposition "
                f"{self.decompose_s:.2f} s{ranks}")


class Pass:
    """Reads calibration batches through ``network`` with the target layers instrumented."""

    def __init__(self, model, network, layers: Dict[str, object], batches: Iterable, columns: Sequence[str],
                 max_batches: int, printer: Callable[[str], None], report: Report):
        self.model, self.network, self.layers = model, network, layers
        self.batches, self.columns, self.max_batches = batches, list(columns), max_batches
        self.printer, self.report = printer, report
        config = model.config  # the base model's config: sequence length and pad id
        self.seq_length = int(config.seq_length)
        self.pad_token_id = getattr(config, "pad_token_id", None)
        self.labels_shifted = any(getattr(layer, "parallel", False) for layer in layers.values())

    def inputs(self, mode: str, label_mask_value: Optional[int] = None, float16: bool = False,
               check: Optional[Callable[[int, Callable], bool]] = None) -> Dict[str, Dict[str, np.ndarray]]:
        """Input statistics (statistics.InputStatistics ``mode``) of every layer, summed over the
        ranks; ``check(batches done, read)`` after a batch returns True to stop early (``read()``
        gives the statistics so far)."""
        # pylint: disable=import-outside-toplevel
        from mindspore.common import dtype as mstype
        mask = TokenMask()
        cells = {}
        for name, layer in self.layers.items():
            cell = InputStatistics(name, layer.in_channels, mode,
                                   mask.seq_major if layer.parallel else mask.batch_major,
                                   mstype.float16 if float16 else mstype.float32)
            layer.input_statistics = cell
            cell.rename(name)
            cells[name] = cell
        mask.batch_major.name, mask.seq_major.name = "data_init.token_mask_bs", "data_init.token_mask_sb"

        def read():
            names = list(cells)
            flat = [(n, k, v) for n in names for k, v in cells[n].buffers().items()]
            summed = summed_over_ranks([v for _, _, v in flat])
            out: Dict[str, Dict[str, np.ndarray]] = {n: {} for n in names}
            for (name, key, _), value in zip(flat, summed):
                out[name][key] = value
            return out

        try:
            self._run(ForwardPass(self.network), lambda cols: mask.set(token_mask(
                cols, self.seq_length, self.pad_token_id, label_mask_value, self.labels_shifted)), check, read)
            return read()
        finally:
            for layer in self.layers.values():
                layer.input_statistics = None

    def gradients(self) -> Dict[str, np.ndarray]:
        """dL/dW [out, in] of every layer's base weight (its stored layout transposed as needed),
        averaged over the batches of every rank, float64."""
        summer = GradientSum(self.network, [layer.weight for layer in self.layers.values()])
        self._run(summer, None, None, None)
        total = self.report.batches * data_parallel_size()
        grads = summed_over_ranks(summer.buffers())
        return {name: (g if layer.transpose_b else g.T) / total
                for (name, layer), g in zip(self.layers.items(), grads)}

    def _run(self, cell, before, check, read):
        cell.set_train(True)
        progress = Progress(f"[mindformers-lora-ext] {self.report.method} statistics", self.max_batches, self.printer)
        self.model.collecting_statistics = True
        try:
            for batch in self.batches:
                if self.report.batches >= self.max_batches:
                    break
                if before is not None:
                    before(column_arrays(self.columns, batch))
                cell(*batch)
                self.report.batches += 1
                progress.step(self.report.batches)
                if check is not None and check(self.report.batches, read):
                    break
        finally:
            self.model.collecting_statistics = False
        if self.report.batches == 0:
            raise ValueError(f"{self.report.method}: the calibration data gave no batch")
        self.report.pass_s = progress.elapsed()
        self.report.first_batch_s = progress.first_batch_s or 0.0


def _eva(model, layers, config, run: Pass, report: Report) -> Dict[str, LayerInit]:
    options = config.eva_config
    ranks = {name: layer.configured_rank for name, layer in layers.items()}
    capacity = {name: layer.rank for name, layer in layers.items()}
    state = {"previous": None, "stopped": False}

    def decompose(stats):
        moments = {n: eva.Moments(s["scatter"], s["total"], float(s["count"][0])) for n, s in stats.items()}
        groups = eva.equal_input_groups(moments)
        limits = eva.max_components(ranks, options["rho"], groups, capacity)
        components = {g[0]: eva.principal_components(moments[g[0]], max(limits[n] for n in g)) for g in groups}
        of = {n: components[g[0]] for g in groups for n in g}
        allocated = eva.allocate_ranks({n: of[n].ratios for n in layers}, ranks, limits, groups)
        return moments, of, allocated

    def check(done, read):
        if done & (done - 1):  # checks after 2, 4, 8, ... batches
            return False
        _, components, allocated = decompose(read())
        previous, state["previous"] = state["previous"], components
        if previous is None:
            return False
        done_all = all(eva.converged(previous[n], components[n], allocated[n], options["tau"]) for n in layers)
        state["stopped"] = done_all
        return done_all

    stats = run.inputs(MOMENTS, options["label_mask_value"] if options["use_label_mask"] else None, check=check)
    start = time.perf_counter()
    moments, components, allocated = decompose(stats)
    inits = {}
    for name, layer in layers.items():
        k = allocated[name]
        alpha = eva.scaled_alpha(layer.configured_alpha, ranks[name], k, options["adjust_scaling_factors"])
        inits[name] = LayerInit(eva.lora_a(components[name], k, options["whiten"]),
                                np.zeros((layer.out_channels, k)), alpha=alpha)
    report.decompose_s = time.perf_counter() - start
    report.ranks = dict(allocated)
    report.tokens = float(next(iter(moments.values())).count) if moments else 0.0
    if not state["stopped"]:
        run.printer(f"[mindformers-lora-ext] eva: the components had not converged to tau = {options['tau']} "
                    f"within {report.batches} batches (raise DataDrivenInit batches for more); using them")
    return inits


def _corda(model, layers, config, run: Pass, report: Report) -> Dict[str, LayerInit]:
    # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext.data_init import cache_files
    options = config.corda_config
    found = cache_files.read_eigens(options["cache_file"], layers)
    if found is not None:
        report.source = f"cache_file {options['cache_file']}"
    else:
        covariances = cache_files.read_covariances(options["covariance_file"], layers)
        if covariances is not None:
            report.source = f"covariance_file {options['covariance_file']}"
        else:
            stats = run.inputs(COVARIANCE, float16=options["use_float16_for_covariance"])
            covariances = {n: s["scatter"] / max(float(s["count"][0]), 1.0) for n, s in stats.items()}
            cache_files.write_arrays(options["covariance_file"], covariances)
        start = time.perf_counter()
        found = {}
        for index, (name, layer) in enumerate(layers.items()):
            found[name] = corda.eigens(layer.weight_array(), covariances[name], layer.configured_rank,
                                       options["corda_method"])
            if options["verbose"]:
                run.printer(f"[mindformers-lora-ext] corda: decomposed {index + 1}/{len(layers)} {name}")
        report.decompose_s = time.perf_counter() - start
        cache_files.write_eigens(options["cache_file"], found)
    return {name: LayerInit(*corda.factors(found[name], layer.scaling), residual=True)
            for name, layer in layers.items()}


def _lora_ga(model, layers, config, run: Pass, report: Report) -> Dict[str, LayerInit]:
    options = config.lora_ga_config
    grads = run.gradients()
    start = time.perf_counter()
    inits = {}
    for name, layer in layers.items():
        a, b = lora_ga.factors(grads[name], layer.weight_array(), layer.configured_rank, layer.scaling,
                               options["direction"], options["scale"], options["stable_gamma"],
                               lora_ga.cell_seed(name))
        inits[name] = LayerInit(a, b, residual=True)
    report.decompose_s = time.perf_counter() - start
    return inits


METHODS = {"eva": _eva, "corda": _corda, "lora_ga": _lora_ga}


def initialize(model, network, batches: Iterable, columns: Sequence[str], max_batches: int,
               printer: Callable[[str], None]) -> Report:
    """Run ``model``'s pending data-driven initialisation (module docstring); returns its Report."""
    config = model.config.pet_config
    method = config.init_lora_weights
    layers = model.data_init_layers()
    report = Report(method)
    run = Pass(model, network, layers, batches, columns, max_batches, printer, report)
    inits = METHODS[method](model, layers, config, run, report)
    apply(model, layers, inits)
    return report


def apply(model, layers: Dict[str, object], inits: Dict[str, LayerInit]) -> None:
    """Set every layer's adapter (and residual base weight); EVA's ranks and alphas also go to
    the config (``record_ranks``), which files write as PEFT's rank_pattern / alpha_pattern."""
    ranks = {}
    for name, init in inits.items():
        layers[name].apply_data_init(init.lora_a, init.lora_b, init.alpha, init.residual)
        if init.alpha is not None:
            ranks[name] = (layers[name].effective_rank, init.alpha)
    if ranks:
        model.config.pet_config.record_ranks(ranks)
        model.ranks_changed()
    model.finish_data_init()


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
