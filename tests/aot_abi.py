"""The CPU kernels' AOT entry points called from numpy through ctypes, with MindSpore's ABI
(``int f(nparam, params, ndims, shapes, dtypes, stream, extra)``): no MindSpore in the process."""
import ctypes

import numpy as np


def bind(lib, name, inputs, outputs):
    """A no-argument callable running the AOT kernel ``name`` (MindSpore's ABI) on numpy arrays,
    its arguments marshalled once (outputs are filled in place on every call)."""
    arrays = [np.ascontiguousarray(a) for a in inputs] + list(outputs)
    n = len(arrays)
    shapes = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    args = (n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]), (ctypes.c_int * n)(*[a.ndim for a in arrays]),
            (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in shapes]),
            (ctypes.c_char_p * n)(*[str(a.dtype).encode() for a in arrays]), None, None)
    function = getattr(lib, name)

    def call():
        rc = function(*args)
        assert rc == 0, (name, rc)
    call.arrays = arrays  # keeps the marshalled buffers alive with the callable
    return call


def aot(lib, name, inputs, outputs):
    """Call an AOT kernel (MindSpore's ABI) on numpy arrays; outputs are filled in place."""
    bind(lib, name, inputs, outputs)()
    return outputs


def fused_forward(lib, x, w, a, b, s, p, seed):
    """FusedLoraForward: (y [N, out], h [N, r]) for float32 x, w, a, b, sp = (s, p), int32 seed."""
    n, out, r = x.shape[0], w.shape[0], a.shape[0]
    return aot(lib, "FusedLoraForward",
               [x, w, a, b, np.array([s, p], np.float32), np.array(seed, np.int32)],
               [np.zeros((n, out), np.float32), np.zeros((n, r), np.float32), np.zeros(2, np.int32)])[:2]


def problem(n, d_in, d_out, r, seed=0):
    """Random float32 x [n, in], W [out, in], A [r, in], B [out, r]."""
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(np.float32)
                 for shape in ((n, d_in), (d_out, d_in), (r, d_in), (d_out, r)))
