"""The fused LoRA kernel (CPU AOT op + dispatch) against numpy float64, and its fallbacks.

The library is built by the package's own cached build (``kernels.build``), here into a
per-module temporary cache; without a C++ compiler every test that needs it is skipped.
"""
# pylint: disable=redefined-outer-name,unused-argument,protected-access
import ast
import ctypes
import json
import logging
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import dtype as mstype

from mindformers_lora_ext.kernels import FusedLoraMatmul, build, dispatch, fused_lora, layer
from mindformers_lora_ext.kernels.cpu_ops import make_cpu_ops
from conftest import run_fresh

HAVE_CXX = shutil.which(os.environ.get("CXX") or "g++") is not None
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler (g++ or $CXX): the CPU kernel cannot be built")
RNG = np.random.default_rng(20240607)
MASK32 = np.uint64(0xFFFFFFFF)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """A fresh kernel cache for this module; the library is built once into it."""
    root = str(tmp_path_factory.mktemp("kernel_cache"))
    old = os.environ.get(build.ENV_CACHE)
    os.environ[build.ENV_CACHE] = root
    dispatch.reset()
    layer._FUNCTIONAL.reset()
    yield root
    if old is None:
        os.environ.pop(build.ENV_CACHE, None)
    else:
        os.environ[build.ENV_CACHE] = old
    dispatch.reset()
    layer._FUNCTIONAL.reset()


@pytest.fixture(scope="module")
def lib_path(kernel_cache):
    if not HAVE_CXX:
        pytest.skip("no C++ compiler (g++ or $CXX): the CPU kernel cannot be built")
    return build.build_cpu_library()


@pytest.fixture(scope="module")
def cpu_ops(lib_path):
    return make_cpu_ops(lib_path)


@pytest.fixture(scope="module")
def clib(lib_path):
    lib = ctypes.CDLL(lib_path)  # the same loaded object MindSpore's kernels use
    lib.flk_isa.restype = ctypes.c_char_p
    lib.flk_set_isa.argtypes = [ctypes.c_char_p]
    return lib


def supported_isas():
    return ["avx512", "avx2", "generic"]


@pytest.fixture(params=supported_isas())
def isa(request, clib):
    """Run the test with the kernel forced to one instruction set (skipped if the CPU lacks it)."""
    best = clib.flk_isa()
    if clib.flk_set_isa(request.param.encode()) != 0:
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    clib.flk_set_isa(best)


@pytest.fixture(params=[ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def mode(request):
    ms.set_context(mode=request.param)
    yield request.param
    ms.set_context(mode=ms.GRAPH_MODE)


class Capture(logging.Handler):
    """Collects the kernels logger's records (the suite runs with -p no:logging)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_log():
    handler = Capture()
    log = logging.getLogger("mindformers_lora_ext.kernels")
    log.addHandler(handler)
    yield handler.messages
    log.removeHandler(handler)


# ----------------------------------------------------------------------------- numpy references
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64 arrays holding 32-bit values (Salmon et al., SC'11)."""
    c = [np.asarray(v, np.uint64) & MASK32 for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0) & MASK32, np.uint64(k1) & MASK32
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & MASK32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & MASK32
    return c


def dropout_multiplier(n_elements, p, seed):
    """The kernel's inverted-dropout multiplier per flat element index (float64)."""
    p32 = float(np.float32(p))
    if p32 == 0:
        return np.ones(n_elements)
    e = np.arange(n_elements, dtype=np.uint64)
    block = e >> np.uint64(2)
    words = philox4x32_10(block & MASK32, block >> np.uint64(32), 0, 0,
                          np.uint32(np.int32(seed[0]).view(np.uint32)), np.uint32(np.int32(seed[1]).view(np.uint32)))
    u = np.choose((e & np.uint64(3)).astype(np.int64), words)
    thr = min(int(p32 * 2.0 ** 32 + 0.5), 2 ** 32 - 1)
    scale = float(np.float32(1.0 / (1.0 - p32)))
    return np.where(u >= thr, scale, 0.0)


def reference(x2d, w, a, b, s, dy, mult):
    """y, dx, dA, dB in float64 for y = x W^T + s (m*x A^T) B^T."""
    xd = x2d * mult
    h = xd @ a.T
    y = x2d @ w.T + s * h @ b.T
    g = s * dy @ b
    return y, dy @ w + (g @ a) * mult, g.T @ xd, s * dy.T @ h


def random_problem(n, d_in, d_out, rank):
    f = lambda *shape: RNG.standard_normal(shape).astype(np.float32)  # noqa: E731
    return f(n, d_in), f(d_out, d_in) * 0.3, f(rank, d_in) * 0.3, f(d_out, rank) * 0.3, f(n, d_out)


def close(actual, expected, rtol=2e-5):
    """Float32 result vs float64 reference: error relative to the reference's scale."""
    actual = np.asarray(actual, np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max()) / scale
    assert err <= rtol, f"max error {err:.3g} (relative to {scale:.3g})"


class RawOp(nn.Cell):
    """The forward op with an explicit seed, as a training step: (y, dx, dA, dB)."""

    def __init__(self, forward, w, a, b, s, p, seed):
        super().__init__()
        self.forward = forward
        self.w = Parameter(Tensor(w), name="w", requires_grad=False)
        self.a = Parameter(Tensor(a), name="a")
        self.b = Parameter(Tensor(b), name="b")
        self.sp = Tensor(np.array([s, p], np.float32))
        self.seed = Tensor(np.array(seed, np.int32))

    def construct(self, x):
        return self.forward(x, self.w, self.a, self.b, self.sp, self.seed)[0]


class TrainStep(nn.Cell):
    """(y, dx, dA, dB) of loss = sum(net(x) * dy) from ONE forward execution."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.grad = ops.value_and_grad(self.loss, grad_position=0, weights=net.trainable_params(), has_aux=True)

    def loss(self, x, dy):
        y = self.net(x)
        return (y * dy).sum(), y

    def construct(self, x, dy):
        (_, y), (dx, (da, db)) = self.grad(x, dy)
        return y, dx, da, db


# ----------------------------------------------------------------------------- build and RNG
@needs_cxx
def test_build_is_cached_private_and_reused(kernel_cache, lib_path):
    assert lib_path.startswith(kernel_cache) and os.path.basename(lib_path) == build.LIB_NAME
    for path in (kernel_cache, os.path.dirname(lib_path)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert not [f for f in os.listdir(os.path.dirname(lib_path)) if f.startswith(".build-")]
    mtime = os.stat(lib_path).st_mtime_ns
    assert build.build_cpu_library() == lib_path
    assert os.stat(lib_path).st_mtime_ns == mtime  # not rebuilt


@needs_cxx
def test_insecure_cache_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "open"
    root.mkdir()
    os.chmod(root, 0o777)
    monkeypatch.setenv(build.ENV_CACHE, str(root))
    with pytest.raises(build.BuildError, match="group/world-writable"):
        build.build_cpu_library()


def test_philox_known_answers(clib):
    """Random123's kat_vectors for philox4x32 10, through the library and the numpy reference."""
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in kat:
        out = (ctypes.c_uint32 * 4)()
        clib.flk_philox4x32_10((ctypes.c_uint32 * 4)(*counter), (ctypes.c_uint32 * 2)(*key), out)
        assert tuple(out) == expected
        assert tuple(int(v) for v in philox4x32_10(*counter, *key)) == expected


def test_dropout_mask_matches_numpy(clib):
    n, p, seed = 4099, 0.3, (123456789, -987654321)
    out = (ctypes.c_float * n)()
    clib.flk_dropout_mask(ctypes.c_uint64(0), ctypes.c_long(n), ctypes.c_float(p), (ctypes.c_int32 * 2)(*seed), out)
    np.testing.assert_array_equal(np.array(out, np.float64), dropout_multiplier(n, p, seed))


# ----------------------------------------------------------------------------- numerics
# odd sizes; K, M and N block edges (KC=256, MC=96, NC=1024); split-K of dA/dB (N >= 512); r > 16
SHAPES = [(7, 13, 5, 3), (300, 257, 130, 16), (600, 40, 24, 8), (40, 1030, 1100, 4), (97, 64, 33, 40)]


@needs_cxx
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s[:3])) + f"r{s[3]}" for s in SHAPES])
def test_op_matches_numpy(shape, p, isa, mode, cpu_ops):
    """y, dx, dA, dB of the raw op (explicit seed) vs float64 numpy with the same mask."""
    n, d_in, d_out, rank = shape
    x, w, a, b, dy = random_problem(n, d_in, d_out, rank)
    seed, s = (11, -7), 1.75
    y, dx, da, db = TrainStep(RawOp(cpu_ops[0], w, a, b, s, p, seed))(Tensor(x), Tensor(dy))
    expected = reference(*(v.astype(np.float64) for v in (x, w, a, b)), s, dy.astype(np.float64),
                         dropout_multiplier(n * d_in, p, seed).reshape(n, d_in))
    for got, want in zip((y, dx, da, db), expected):
        close(got.asnumpy(), want)


@pytest.fixture(params=["avx2", "generic"])
def dropped_workers(request, clib):
    """DoRA's dropped-matmul op with its AVX2 or baseline row workers (AVX2 skipped if absent)."""
    clib.fdm_force_generic.argtypes = [ctypes.c_int]
    used = clib.fdm_force_generic(int(request.param == "generic"))
    if request.param == "avx2" and used != 1:
        clib.fdm_force_generic(0)
        pytest.skip("this CPU has no AVX2 + FMA")
    yield request.param
    clib.fdm_force_generic(0)


# out not a multiple of the 32-output register block, in large enough for several W chunks,
# rows with every element dropped (p 0.9, in 5), nothing dropped (p 0), N = 1
@pytest.mark.parametrize("n,inp,out,p", [(7, 5, 3, 0.5), (33, 1100, 70, 0.05), (1, 64, 96, 0.9),
                                         (40, 5, 33, 0.9), (16, 40, 33, 0.0)])
def test_dropped_matmul_matches_numpy(n, inp, out, p, dropped_workers, lib_path):
    """z = (x * (1 - keep)) W^T and dx = (1 - keep) * (dz W) (DoRA's dropout correction), keep =
    the fused op's (and PhiloxDropout's) mask for (p, seed), regenerated by each kernel."""
    from mindformers_lora_ext.kernels.cpu_ops import make_dropped_matmul
    op = make_dropped_matmul(lib_path)
    x = RNG.standard_normal((n, inp)).astype(np.float32)
    w = RNG.standard_normal((out, inp)).astype(np.float32)
    seed = (21, -4)
    keep = dropout_multiplier(n * inp, p, seed).reshape(n, inp) != 0
    dz = RNG.standard_normal((n, out)).astype(np.float32)
    dropped = 1.0 - keep.astype(np.float64)
    args = (Tensor([p], mstype.float32), Tensor(np.array(seed, np.int32)))

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.op = op

        def construct(self, inp_x):
            return (self.op(inp_x, *args, Tensor(w))[0] * Tensor(dz)).sum()

    z, count = op(Tensor(x), *args, Tensor(w))
    assert count.asnumpy()[0] == (~keep).sum()
    z = z.asnumpy()
    np.testing.assert_allclose(z, (x * dropped) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-4)
    dx = ms.grad(Loss())(Tensor(x)).asnumpy()
    np.testing.assert_allclose(dx, dropped * (dz.astype(np.float64) @ w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 48), (3, 5, 7)], ids=["2d", "3d_odd"])
def test_philox_dropout_is_the_fused_mask_and_regenerates_it(shape, mode, cpu_ops, lib_path, clib):
    """The dropout op alone (the composition's): y = x * mask with the fused op's multiplier for
    the seed (flat element index), bit for bit; dx = dy * the same mask, regenerated from the
    forward's seed; and the fused op's h = drop(x) A^T sees that very mask."""
    from mindformers_lora_ext.kernels.cpu_ops import make_philox_dropout
    op = make_philox_dropout(lib_path)
    p, seed = 0.3, (77, -5)
    x = RNG.standard_normal(shape).astype(np.float32)
    g = RNG.standard_normal(shape).astype(np.float32)
    mult = dropout_multiplier(x.size, p, seed).astype(np.float32).reshape(shape)
    args = (Tensor([p], mstype.float32), Tensor(np.array(seed, np.int32)))
    y, seed_out = op(Tensor(x), *args)
    np.testing.assert_array_equal(y.asnumpy(), x * mult)
    np.testing.assert_array_equal(seed_out.asnumpy(), seed)
    assert 0.2 < (mult == 0).mean() < 0.4

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.op = op

        def construct(self, inp):
            return (self.op(inp, *args)[0] * Tensor(g)).sum()

    np.testing.assert_array_equal(ms.grad(Loss())(Tensor(x)).asnumpy(), g * mult)
    y0 = op(Tensor(x), Tensor([0.0], mstype.float32), args[1])[0]  # p = 0: the identity
    np.testing.assert_array_equal(y0.asnumpy(), x)
    if len(shape) == 2:
        a = RNG.standard_normal((4, shape[1])).astype(np.float32)
        h = cpu_ops[0](Tensor(x), Tensor(np.zeros((2, shape[1]), np.float32)), Tensor(a),
                       Tensor(np.zeros((2, 4), np.float32)), Tensor([1.0, p], mstype.float32), args[1])[1]
        close(h.asnumpy(), (x * mult).astype(np.float64) @ a.T.astype(np.float64))


@needs_cxx
def test_philox_dropout_cell_draws_fresh_masks_in_training_only(lib_path):
    """A new seed every execution (graph mode), keep rate 1 - p, the same masks again after
    ``mindspore.set_seed`` (as nn.Dropout); eval mode is the identity."""
    from mindformers_lora_ext.kernels.cpu_ops import make_philox_dropout
    op = make_philox_dropout(lib_path)
    x = Tensor(np.ones((128, 64), np.float32))
    runs = []
    for _ in range(2):
        ms.set_seed(3)
        cell = layer.PhiloxDropout(0.25, op)
        cell.set_train(True)
        runs.append([cell(x).asnumpy(), cell(x).asnumpy()])
    first, second = runs[0]
    assert set(np.unique(first)) == {0.0, np.float32(1 / 0.75)}
    assert abs((first == 0).mean() - 0.25) < 0.03
    assert (first != second).any()
    np.testing.assert_array_equal(runs[1], runs[0])
    cell.set_train(False)
    np.testing.assert_array_equal(cell(x).asnumpy(), x.asnumpy())
    with pytest.raises(ValueError, match="dropout must be in"):
        layer.PhiloxDropout(0.0, None)


@needs_cxx
def test_op_is_deterministic(cpu_ops):
    """Same inputs and seed, same bits (no order-dependent reductions across threads)."""
    x, w, a, b, dy = random_problem(1200, 300, 200, 16)
    step = TrainStep(RawOp(cpu_ops[0], w, a, b, 0.7, 0.2, (3, 4)))
    first, second = ([t.asnumpy() for t in step(Tensor(x), Tensor(dy))] for _ in range(2))
    for one, two in zip(first, second):
        np.testing.assert_array_equal(one, two)


def lora_net(d_in, d_out, rank, p, use_fused, w, a, b, s):
    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = Parameter(Tensor(w), name="w", requires_grad=False)
            self.a = Parameter(Tensor(a), name="a")
            self.b = Parameter(Tensor(b), name="b")
            self.s = Tensor(s, mstype.float32)
            self.layer = FusedLoraMatmul(d_in, d_out, rank, p, mstype.float32, use_fused=use_fused)

        def construct(self, x):
            return self.layer(x, self.w, self.a, self.b, self.s)
    return Net()


@needs_cxx
def test_cell_fused_equals_composition(mode, lib_path):
    n, d_in, d_out, rank = 64, 48, 40, 8
    x, w, a, b, dy = random_problem(n, d_in, d_out, rank)
    results = {}
    for use_fused in (True, False):
        net = lora_net(d_in, d_out, rank, 0.0, use_fused, w, a, b, 0.5)
        assert net.layer.fused is use_fused and net.layer.backend == ("cpu-aot" if use_fused else "composition")
        results[use_fused] = [t.asnumpy() for t in TrainStep(net)(Tensor(x), Tensor(dy))]
    for fused, comp in zip(results[True], results[False]):
        np.testing.assert_allclose(fused, comp, rtol=1e-5, atol=1e-5)


@needs_cxx
def test_function_3d_input_and_seed_argument(mode, lib_path):
    """fused_lora on [batch, seq, in] with an explicit int seed equals numpy with that mask."""
    x = RNG.standard_normal((2, 5, 13)).astype(np.float32)
    _, w, a, b, _ = random_problem(1, 13, 5, 3)
    y = fused_lora(Tensor(x), Tensor(w), Tensor(a), Tensor(b), 2.0, dropout=0.25, seed=(5 << 31) + 9)
    mult = dropout_multiplier(10 * 13, 0.25, (9, 5)).reshape(10, 13)
    want = reference(x.reshape(10, 13).astype(np.float64), w, a, b, 2.0, np.zeros((10, 5)), mult)[0]
    assert y.shape == (2, 5, 5)
    close(y.asnumpy().reshape(10, 5), want)


@needs_cxx
def test_function_seeds_follow_set_seed(lib_path):
    """fused_lora without a seed: fresh masks per call, the same sequence after mindspore.set_seed."""
    x = Tensor(np.ones((16, 32), np.float32))
    _, w, a, b, _ = random_problem(1, 32, 4, 2)
    runs = []
    for _ in range(2):
        ms.set_seed(4)
        layer._FUNCTIONAL.reset()
        runs.append([fused_lora(x, Tensor(w), Tensor(a), Tensor(b), 1.0, dropout=0.5).asnumpy() for _ in range(2)])
    assert (runs[0][0] != runs[0][1]).any()
    np.testing.assert_array_equal(runs[1], runs[0])


@needs_cxx
def test_dynamic_shape_graph_mode(lib_path):
    """set_inputs with a None dimension: one graph, two different N, forward and gradients."""
    d_in, d_out, rank = 24, 10, 4
    _, w, a, b, _ = random_problem(1, d_in, d_out, rank)
    step = TrainStep(lora_net(d_in, d_out, rank, 0.0, True, w, a, b, 1.5))
    step.set_inputs(Tensor(shape=[None, d_in], dtype=mstype.float32), Tensor(shape=[None, d_out], dtype=mstype.float32))
    for n in (7, 33):
        x, _, _, _, dy = random_problem(n, d_in, d_out, rank)
        expected = reference(x.astype(np.float64), w, a, b, 1.5, dy.astype(np.float64), np.ones((n, d_in)))
        for got, want in zip(step(Tensor(x), Tensor(dy)), expected):
            close(got.asnumpy(), want)


def test_dropout_ops_in_dynamic_shape_graphs(lib_path):
    """set_inputs with a None dimension: the dropout op and DoRA's dropped-element op, forward
    and input gradient, for two N in one graph (their backward ops have two outputs for this)."""
    from mindformers_lora_ext.kernels.cpu_ops import make_dropped_matmul, make_philox_dropout
    p, seed, d_in, d_out = 0.3, (9, 4), 12, 5
    w = RNG.standard_normal((d_out, d_in)).astype(np.float32)
    args = (Tensor([p], mstype.float32), Tensor(np.array(seed, np.int32)))

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.drop, self.dropped, self.w = make_philox_dropout(lib_path), make_dropped_matmul(lib_path), Tensor(w)

        def construct(self, x, g, gz):
            return (self.drop(x, *args)[0] * g).sum() + (self.dropped(x, *args, self.w)[0] * gz).sum()

    class Grad(nn.Cell):
        def __init__(self):
            super().__init__()
            self.grad = ops.value_and_grad(Loss(), grad_position=0)

        def construct(self, x, g, gz):
            return self.grad(x, g, gz)

    step = Grad()
    step.set_inputs(*(Tensor(shape=[None, d], dtype=mstype.float32) for d in (d_in, d_in, d_out)))
    for n in (7, 33):
        x, g = (RNG.standard_normal((n, d_in)).astype(np.float32) for _ in range(2))
        gz = RNG.standard_normal((n, d_out)).astype(np.float32)
        mult = dropout_multiplier(n * d_in, p, seed).reshape(n, d_in)
        dropped = (mult == 0).astype(np.float64)
        value, dx = step(Tensor(x), Tensor(g), Tensor(gz))
        want = (x * mult * g).sum() + ((x * dropped) @ w.T.astype(np.float64) * gz).sum()
        np.testing.assert_allclose(value.asnumpy(), want, rtol=1e-5)
        np.testing.assert_allclose(dx.asnumpy(), g * mult + dropped * (gz.astype(np.float64) @ w), rtol=1e-5, atol=1e-5)


@needs_cxx
def test_dynamic_batch_and_sequence_function(lib_path):
    _, w, a, b, _ = random_problem(1, 16, 8, 2)

    class Net(nn.Cell):
        def construct(self, x):
            return fused_lora(x, Tensor(w), Tensor(a), Tensor(b), 0.5)

    net = Net()
    net.set_inputs(Tensor(shape=[None, None, 16], dtype=mstype.float32))
    for shape in ((2, 3, 16), (1, 9, 16)):
        x = RNG.standard_normal(shape).astype(np.float32)
        want = x.reshape(-1, 16) @ w.T + 0.5 * (x.reshape(-1, 16) @ a.T) @ b.T
        close(net(Tensor(x)).asnumpy().reshape(-1, 8), want)


# ----------------------------------------------------------------------------- fused dropout
def identity_net(width, p):
    """W = 0, A = B = I, s = 1: with x = ones, y is the dropout multiplier itself."""
    eye = np.eye(width, dtype=np.float32)
    return lora_net(width, width, width, p, True, np.zeros((width, width), np.float32), eye, eye, 1.0)


@needs_cxx
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_and_scale(p, mode, lib_path):
    n, width = 2048, 64
    net = identity_net(width, p)
    net.set_train(True)
    y = net(Tensor(np.ones((n, width), np.float32))).asnumpy()
    dropped = float(np.mean(y == 0))
    sigma = np.sqrt(p * (1 - p) / y.size)
    assert abs(dropped - p) < 4 * sigma, (dropped, p, sigma)
    np.testing.assert_array_equal(np.unique(y[y != 0]), np.float32(1.0 / (1.0 - p)))
    net.set_train(False)  # evaluation: no dropout
    np.testing.assert_array_equal(net(Tensor(np.ones((n, width), np.float32))).asnumpy(), 1.0)


@needs_cxx
def test_backward_regenerates_the_forward_mask_and_steps_differ(mode, lib_path):
    """Backward regenerates the mask: with W = 0, A = B = I and x = ones, y is the mask of the
    step, and dA = dy^T drop(x) and dx = (dy B A) * m must use the same one. Two steps:
    different masks."""
    n, width, p = 256, 32, 0.3
    net = identity_net(width, p)
    net.set_train(True)
    step = TrainStep(net)
    x = Tensor(np.ones((n, width), np.float32))
    masks = []
    for _ in range(2):
        dy = RNG.standard_normal((n, width)).astype(np.float32)
        y, dx, da, db = (t.asnumpy().astype(np.float64) for t in step(x, Tensor(dy)))
        assert set(np.unique(y)) <= {0.0, float(np.float32(1 / (1 - p)))}
        close(da, dy.T @ y)
        close(db, dy.T @ y)
        close(dx, dy * y)  # dx = (s dy B A) * m, and m = y here
        masks.append(y != 0)
    assert (masks[0] != masks[1]).mean() > 0.2  # independent masks differ in ~2p(1-p) = 42%


@needs_cxx
def test_recompute_keeps_the_forward_mask(lib_path):
    """Under Cell.recompute() MindSpore re-runs the seed op in backward; the gradients must still
    use the mask of the forward that produced y (the bprop reads the seed from the op's outputs)."""
    n, width, p = 128, 16, 0.4
    inner = identity_net(width, p)

    class Outer(nn.Cell):
        def __init__(self):
            super().__init__()
            self.inner = inner
            self.inner.recompute()

        def construct(self, x):
            return ops.tanh(self.inner(x))

    net = Outer()
    net.set_train(True)
    dy = RNG.standard_normal((n, width)).astype(np.float32)
    y, dx, da, _ = (t.asnumpy().astype(np.float64) for t in TrainStep(net)(Tensor(np.ones((n, width), np.float32)),
                                                                             Tensor(dy)))
    mask = np.arctanh(y)  # the inner output: the dropout multiplier of the step
    g = dy * (1 - y ** 2)
    close(da, g.T @ mask, rtol=1e-4)
    close(dx, g * mask, rtol=1e-4)


@needs_cxx
def test_layers_draw_different_masks_reproduced_by_set_seed(lib_path):
    """Each layer its own stream; ``mindspore.set_seed`` replays them (as for nn.Dropout)."""
    runs = []
    for _ in range(2):
        ms.set_seed(8)
        nets = [identity_net(32, 0.5) for _ in range(2)]
        ys = []
        for net in nets:
            net.set_train(True)
            ys.append(net(Tensor(np.ones((64, 32), np.float32))).asnumpy())
        runs.append(ys)
    assert (runs[0][0] != runs[0][1]).mean() > 0.3
    np.testing.assert_array_equal(runs[1], runs[0])


def test_seed_ops_differ_without_a_global_seed(tmp_path):
    """Without ``mindspore.set_seed`` (MindFormers' Trainer skips it for ``seed: 0``) each layer's
    key op still gets seeds of its own: with (0, 0) everywhere, MindSpore's graph optimizer merged
    the ops, and q, k, v of a Llama layer shared one dropout mask. A fresh interpreter: the suite's
    other tests set a global seed."""
    code = ("import mindspore as ms\n"
            "from mindformers_lora_ext.kernels import layer\n"
            "assert ms.get_seed() is None, ms.get_seed()\n"
            "ops = [layer._seed_op() for _ in range(4)]\n"
            "print('SEEDS', [(int(op.attrs['seed']), int(op.attrs['seed2'])) for op in ops])\n")
    script = tmp_path / "seeds.py"
    script.write_text(code)
    done = run_fresh([str(script)], cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    seeds = ast.literal_eval(done.stdout.split("SEEDS", 1)[1].strip())
    assert len(set(seeds)) == 4 and (0, 0) not in seeds, seeds


# ----------------------------------------------------------------------------- dispatch and fallback
@pytest.fixture
def fresh_dispatch(kernel_cache):
    """Forget the built backend before and after (the test changes the environment)."""
    dispatch.reset()
    layer._FUNCTIONAL.reset()
    yield
    dispatch.reset()
    layer._FUNCTIONAL.reset()


def check_fallback(warnings_log, reason_part):
    n, d_in, d_out, rank = 9, 12, 6, 2
    x, w, a, b, dy = random_problem(n, d_in, d_out, rank)
    nets = [lora_net(d_in, d_out, rank, 0.0, use_fused, w, a, b, 2.0) for use_fused in (True, "auto", True)]
    assert [net.layer.fused for net in nets] == [False] * 3
    assert reason_part in nets[0].layer.reason
    assert len(warnings_log) == 1 and reason_part in warnings_log[0], warnings_log
    expected = reference(x.astype(np.float64), w, a, b, 2.0, dy.astype(np.float64), np.ones((n, d_in)))
    for got, want in zip(TrainStep(nets[0])(Tensor(x), Tensor(dy)), expected):
        close(got.asnumpy(), want)


def test_compile_failure_falls_back_once(fresh_dispatch, warnings_log, tmp_path, monkeypatch):
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo 'error: this compiler always fails' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv(build.ENV_CACHE, str(tmp_path / "cache"))
    check_fallback(warnings_log, "this compiler always fails")


def test_missing_compiler_falls_back_once(fresh_dispatch, warnings_log, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    check_fallback(warnings_log, "no C++ compiler")


def test_broken_library_falls_back_once(fresh_dispatch, warnings_log, tmp_path, monkeypatch):
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"\x7fELF this is not a shared object")
    monkeypatch.setenv(build.ENV_LIB, str(broken))
    check_fallback(warnings_log, "cannot load the kernel library")


@needs_cxx
def test_custom_op_rejected_falls_back_once(fresh_dispatch, warnings_log, lib_path, tmp_path, monkeypatch):
    """MindSpore refuses the library (MS_CUSTOM_AOT_WHITE_LIST elsewhere): composition."""
    monkeypatch.setenv("MS_CUSTOM_AOT_WHITE_LIST", str(tmp_path))
    check_fallback(warnings_log, "legal path")


def test_dispatch_rule(fresh_dispatch, warnings_log):
    assert dispatch.resolve(False, mstype.float32, "CPU") == (None, "use_fused_kernel is False")
    backend, reason = dispatch.resolve("auto", mstype.float16, "CPU")
    assert backend is None and "no fused kernel for float16" in reason and not warnings_log  # auto: silent
    backend, reason = dispatch.resolve(True, mstype.bfloat16, "CPU")
    assert backend is None and len(warnings_log) == 1  # forced: one warning
    backend, reason = dispatch.resolve("auto", mstype.float32, "GPU")
    assert backend is None
    backend, reason = dispatch.resolve(True, mstype.float32, "Ascend")  # no Ascend here: falls back
    assert backend is None and reason
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError):
            dispatch.check_use_fused(bad)
    assert dispatch.check_use_fused("True") is True and dispatch.check_use_fused("auto") == "auto"
    with pytest.raises(ValueError):
        FusedLoraMatmul(4, 4, 2, dropout=1.0)


def test_cpu_auto_rule_file_names_only_measured_instruction_sets():
    """The shipped rule (benchmarks/auto_rule.py writes it) parses; every entry is a threshold or
    null with the whole-step rows it was decided from."""
    with open(dispatch.CPU_AUTO_RULE_FILE, encoding="utf-8") as handle:
        table = json.load(handle)["isa"]
    assert set(table) <= {"avx512", "avx2", "generic"}
    for entry in table.values():
        threshold, rows = entry["min_weight_elements"], entry["rows"]
        assert rows and all({"weight_elements", "fused_ms", "composition_ms", "ratio"} <= set(r) for r in rows)
        winners = [r["weight_elements"] for r in rows if r["ratio"] is not None and r["ratio"] <= entry["goal"]
                   and not r["noisy"]]
        assert threshold is None or threshold in winners
    assert dispatch.cpu_auto_rule() == {isa: entry["min_weight_elements"] for isa, entry in table.items()}


def test_cpu_auto_rule_file_from_the_environment(tmp_path, monkeypatch):
    """MINDFORMERS_LORA_EXT_CPU_AUTO_RULE names a rule file measured on this machine (auto_rule.py
    --output); a file that is not one fails with the variable and the path in the message."""
    mine = tmp_path / "rule.json"
    mine.write_text(json.dumps({"isa": {"avx2": {"min_weight_elements": 4096}, "generic": {"min_weight_elements": None}}}))
    monkeypatch.setenv(dispatch.ENV_CPU_AUTO_RULE, str(mine))
    assert dispatch.cpu_auto_rule_file() == str(mine)
    assert dispatch.cpu_auto_rule() == {"avx2": 4096, "generic": None}
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    monkeypatch.setenv(dispatch.ENV_CPU_AUTO_RULE, str(broken))
    with pytest.raises(ValueError, match=f"{dispatch.ENV_CPU_AUTO_RULE} .*broken.json"):
        dispatch.cpu_auto_rule()
    monkeypatch.delenv(dispatch.ENV_CPU_AUTO_RULE)
    assert dispatch.cpu_auto_rule_file() == dispatch.CPU_AUTO_RULE_FILE


@needs_cxx
def test_cpu_auto_follows_the_whole_step_rule(fresh_dispatch, warnings_log, monkeypatch):
    """auto on CPU: fused only for an instruction set and size the rule names; no build at all
    while no measured instruction set would pick it; True ignores the rule."""
    big, small = 1024 * 1024, 512 * 512
    monkeypatch.setattr(dispatch, "cpu_auto_rule", lambda: {"avx2": None})
    backend, reason = dispatch.resolve("auto", mstype.float32, "CPU", weight_elements=big)
    assert backend is None and "measured no win" in reason and "CPU" not in dispatch._BUILT  # not even built
    isa = dispatch.resolve(True, mstype.float32, "CPU", weight_elements=small)[0].isa  # forced: built
    assert isa in ("avx512", "avx2", "generic")
    monkeypatch.setattr(dispatch, "cpu_auto_rule", lambda: {isa: big})
    assert dispatch.resolve("auto", mstype.float32, "CPU", weight_elements=big)[0].isa == isa
    backend, reason = dispatch.resolve("auto", mstype.float32, "CPU", weight_elements=small)
    assert backend is None and f"fused from {big}" in reason
    other = "generic" if isa != "generic" else "avx2"
    monkeypatch.setattr(dispatch, "cpu_auto_rule", lambda: {other: big})  # measured elsewhere only
    backend, reason = dispatch.resolve("auto", mstype.float32, "CPU", weight_elements=big)
    assert backend is None and f"no win of the fused kernel on {isa}" in reason
    assert not warnings_log  # auto decisions are silent


@needs_cxx
@pytest.mark.slow
def test_concurrent_builds_publish_one_library(tmp_path, monkeypatch):
    """Two processes building into one empty cache (as msrun workers do): both get the same
    complete library, nothing half-written is left behind; a damaged file is rebuilt."""
    env = dict(os.environ, **{build.ENV_CACHE: str(tmp_path)})
    env.pop(build.ENV_LIB, None)
    code = "from mindformers_lora_ext.kernels import build; print(build.build_cpu_library())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [proc.communicate(timeout=600) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    path = paths.pop()
    assert sorted(os.listdir(os.path.dirname(path))) == [".lock", build.LIB_NAME]
    with open(path, "wb") as handle:  # a damaged library in the cache is rebuilt, not trusted
        handle.write(b"garbage")
    monkeypatch.setenv(build.ENV_CACHE, str(tmp_path))
    assert build.build_cpu_library() == path and os.path.getsize(path) > 10000
