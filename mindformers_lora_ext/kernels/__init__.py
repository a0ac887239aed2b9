"""Fused LoRA kernels: y = x W^T + s * (dropout(x) A^T) B^T as one op, forward and backward.

Public API:
    fused_lora(x, weight, lora_a, lora_b, scaling, dropout=0.0, seed=None) -> y
    FusedLoraMatmul(in_channels, out_channels, rank, dropout, dtype, use_fused) (an nn.Cell)
    PhiloxDropout(p, op) (an nn.Cell: the fused op's dropout alone, for the composition)
    resolve(use_fused, dtype, device) -> (Backend | None, reason)   (the dispatch rule)
    build_cpu_library() -> path of the compiled CPU library (cached build, see ``build``)

Modules: ``build`` (compile cache, standard library only), ``cpu_ops`` (the ops.Custom primitives),
``dispatch`` (fused or composition, the rule and its benchmark; the Ascend hook), ``layer``
(cell and function; dropout seeding), ``cpu/`` (C++ sources), ``ascend/`` (AscendC kernels).

CPU kernel threads: a small pool of the library's own (``cpu/thread_pool.h``) whose idle workers
sleep, so they do not take the cores MindSpore's next ops need (libgomp's spin did); its size is
``MINDFORMERS_LORA_EXT_CPU_THREADS``, else ``OMP_NUM_THREADS`` if set, else the CPUs the process
may use. With several training processes
per machine (msrun) give each its share.
The instruction set is chosen at run time (``MINDFORMERS_LORA_EXT_CPU_ISA=avx2|generic`` forces
a lower one). Environment: ``MINDFORMERS_LORA_EXT_KERNEL_CACHE`` (cache root),
``MINDFORMERS_LORA_EXT_CPU_LIB`` (a prebuilt library, no build), ``CXX`` (compiler).
"""
from mindformers_lora_ext.kernels.build import BuildError, build_cpu_library
from mindformers_lora_ext.kernels.dispatch import USE_FUSED_CHOICES, Backend, check_use_fused, resolve
from mindformers_lora_ext.kernels.layer import FusedLoraMatmul, PhiloxDropout, fused_lora

__all__ = ["fused_lora", "FusedLoraMatmul", "PhiloxDropout", "resolve", "check_use_fused", "Backend", "BuildError",
           "build_cpu_library", "USE_FUSED_CHOICES"]
