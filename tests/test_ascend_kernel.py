"""The Ascend (AscendC) fused-LoRA kernels, as far as they can be checked without Ascend.

No test here runs the AscendC code. What is checked:
- the dropout RNG reference (RNG.md) against Random123's known answers;
- the tiling arithmetic: Python (tiling.py) == C++ header (constants always; every field
  when a C++ compiler is present), invariants, and that the decomposition covers every
  element exactly once;
- the numpy emulation of the kernel loops (same tiles, tails, padding, workspace layout
  and strides, float32 accumulation, dtype rounding) against a float64 reference;
- consistency of the sources that cannot be compiled here (op names, input/output
  names and order, tiling-data fields) between op_host, op_kernel, the JSON and Python;
- the MindSpore registration: build_ops() constructs the ops on CPU (never called),
  is_available() is False here with a reason; build.sh refuses to run without CANN.
"""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from mindformers_lora_ext.kernels import ascend
from mindformers_lora_ext.kernels.ascend import rng
from mindformers_lora_ext.kernels.ascend import tiling as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "mindformers_lora_ext", "kernels", "ascend")
CALC_H = os.path.join(SRC, "op_host", "lora_fused_tiling_calc.h")
TILING_H = os.path.join(SRC, "op_host", "lora_fused_tiling.h")
HOST_CPP = os.path.join(SRC, "op_host", "lora_fused.cpp")
KERNEL_FWD = os.path.join(SRC, "op_kernel", "lora_fused.cpp")
KERNEL_BWD = os.path.join(SRC, "op_kernel", "lora_fused_grad.cpp")
KERNEL_COMMON = os.path.join(SRC, "op_kernel", "lora_fused_common.h")
OP_JSON = os.path.join(SRC, "lora_fused.json")
BUILD_SH = os.path.join(SRC, "build.sh")

# worst-case relative error (to max |reference|) of the emulated kernel per dtype:
# fp32 accumulation; fp16/bf16 add the rounding of the rank-sized intermediate and of
# the output
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------- RNG (RNG.md)

def _threefry_py(c0, c1, k0, k1):
    """Independent pure-Python Threefry-2x32-20 (integers, no numpy)."""
    m = 0xFFFFFFFF
    ks = [k0, k1, (k0 ^ k1 ^ 0x1BD11BDA) & m]
    x0, x1 = (c0 + ks[0]) & m, (c1 + ks[1]) & m
    rot = (13, 15, 26, 6, 17, 29, 16, 24)
    for i in range(20):
        x0 = (x0 + x1) & m
        r = rot[i % 8]
        x1 = ((x1 << r) | (x1 >> (32 - r))) & m
        x1 ^= x0
        if i % 4 == 3:
            s = (i + 1) // 4
            x0 = (x0 + ks[s % 3]) & m
            x1 = (x1 + ks[(s + 1) % 3] + s) & m
    return x0, x1


@pytest.mark.parametrize("ctr, key, expected", rng.KAT_VECTORS)
def test_threefry_known_answers(ctr, key, expected):
    got = rng.threefry2x32(ctr[0], ctr[1], key[0], key[1])
    assert (int(got[0]), int(got[1])) == expected
    assert _threefry_py(ctr[0], ctr[1], key[0], key[1]) == expected


@pytest.mark.parametrize("seed, offset", [(0, 0), (1234, 5), (-7, 2**33 - 9), (2**63 - 1, 2**64 - 6)])
def test_element_words_follow_the_spec(seed, offset):
    """Element g uses pair g >> 1 (low/high counter words) and word g & 1; the offsets
    include the 2^33 boundary where the low counter word wraps (the kernel's scalar path)
    and the 2^64 wrap of g."""
    g = [(offset + i) % 2**64 for i in range(12)]
    words = rng.element_words(np.array(g, dtype=np.uint64), seed)
    s = seed % 2**64
    for gi, w in zip(g, words):
        b = gi >> 1
        pair = _threefry_py(b & 0xFFFFFFFF, b >> 32, s & 0xFFFFFFFF, s >> 32)
        assert int(w) == pair[gi & 1]


def test_keep_mask_properties():
    n, in_f = 64, 257
    assert rng.keep_mask(n, in_f, 0.0, 3, 4).all()
    m = rng.keep_mask(n, in_f, 0.3, 3, 4)
    assert abs(m.mean() - 0.7) < 0.02
    # blocks are slices of the whole mask; the stream continues across rows
    blk = rng.keep_mask_block(5, 7, 100, 50, in_f, 0.3, 3, 4)
    assert np.array_equal(blk, m[5:12, 100:150])
    shifted = rng.keep_mask(n - 1, in_f, 0.3, 3, 4 + in_f)
    assert np.array_equal(shifted, m[1:])
    # other seed or offset: another mask
    assert not np.array_equal(m, rng.keep_mask(n, in_f, 0.3, 4, 4))
    assert not np.array_equal(m, rng.keep_mask(n, in_f, 0.3, 3, 5))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kernel_rng_algorithm_matches_the_spec(p):
    """The lane arithmetic of VecTools::KeepRow (pair/word split, xor from and/or/not on
    the uint16 view, masked word select, clamp instead of compare) gives the spec's mask;
    rows whose low counter word wraps take the scalar path."""
    r = np.random.RandomState(int(p * 10))
    starts = [0, 1, 2**33 - 1, 2**33 - 2, 2**33 - 1100, 2**64 - 1, 2**64 - 700]
    starts += [int(v) for v in r.randint(0, 2**62, size=20, dtype=np.int64)]
    paths = set()
    for g in starts:
        for cols in (1, 16, 17, 512):
            for seed in (0, -1, 123456789012345):
                keep, path = rng.kernel_keep_row(g, cols, p, seed)
                paths.add(path)
                words = rng.element_words(np.arange(cols, dtype=np.uint64) + np.uint64(g), seed)
                want = (words >> np.uint32(8)) >= np.uint32(rng.drop_threshold(p))
                assert np.array_equal(keep, want.astype(np.float32)), (g, cols, seed)
    assert paths == {"vector", "scalar"}


def test_keep_threshold_and_scale():
    assert rng.drop_threshold(0.0) == 0
    assert rng.drop_threshold(0.5) == 1 << 23
    p = np.float32(0.1)
    assert rng.drop_threshold(p) == int(np.ceil(float(p) * 2**24))
    with pytest.raises(ValueError):
        rng.drop_threshold(1.0)
    assert rng.effective_scale(2.0, 0.5) == np.float32(4.0)
    assert rng.effective_scale(np.float32(0.3), np.float32(0.1)).dtype == np.float32


# ---------------------------------------------------------------- tiling: Python vs header

def _header_constants(text):
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"constexpr\s+uint(?:32|64)_t\s+(\w+)\s*=\s*(\d+)\s*;", text)}


def test_header_constants_match_python():
    consts = _header_constants(_read(CALC_H))
    assert set(consts) == set(T.CONSTANTS)
    for name in T.CONSTANTS:
        assert consts[name] == getattr(T, name), name
    # the kernel's own copy of the column alignment
    assert re.search(r"COL_ALIGN_K\s*=\s*(\d+)", _read(KERNEL_COMMON)).group(1) == str(T.COL_ALIGN)


def test_header_result_fields_match_python():
    text = _read(CALC_H)
    body = text[text.index("struct Result {"):]
    body = body[:body.index("};")]
    body = re.sub(r"//.*", "", body)
    fields = set(re.findall(r"\b([a-zA-Z]\w*)\s*(?=[,;])", body))
    assert fields == {f.name for f in T.LoraTiling.__dataclass_fields__.values()}


SHAPES_FOR_TILING = [
    (0, 8, 8, 1), (1, 1, 1, 1), (1, 17, 9, 5), (7, 33, 20, 8), (33, 70, 45, 16), (129, 600, 530, 64),
    (2048, 4096, 4096, 16), (65536, 8192, 1024, 8), (5, 513, 1025, 100), (1000003, 7, 3, 3),
]
WORKERS_FOR_TILING = [1, 2, 3, 8, 40, 48]


def _tiling_cases():
    for n, i, o, r in SHAPES_FOR_TILING:
        for w in WORKERS_FOR_TILING:
            for db in (2, 4):
                for g in (0, 1):
                    yield (n, i, o, r, w, db, g)
    yield (1, 0, 1, 1, 1, 2, 0)     # invalid: in_features 0
    yield (1, 1, 1, 1, 1, 3, 0)     # invalid: dtype size
    yield (1, 1, 1, 1, 0, 2, 0)     # invalid: no workers


def test_compiled_header_tiling_matches_python(tmp_path):
    cxx = shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to compile lora_fused_tiling_calc.h")
    fields = list(T.LoraTiling.__dataclass_fields__)
    prints = "\n".join(f'        printf(" {f}=%llu", (unsigned long long)r.{f});' for f in fields)
    driver = tmp_path / "driver.cpp"
    driver.write_text(f"""
#include <cstdio>
#include "lora_fused_tiling_calc.h"
int main() {{
    unsigned long long n, i, o, k; unsigned w, db, g;
    while (std::scanf("%llu %llu %llu %llu %u %u %u", &n, &i, &o, &k, &w, &db, &g) == 7) {{
        lora_fused_calc::Params p{{n, i, o, k, w, db, g}};
        lora_fused_calc::Result r{{}};
        int rc = lora_fused_calc::ComputeTiling(p, &r);
        std::printf("rc=%d", rc);
        if (rc == 0) {{
{prints}
        }}
        std::printf("\\n");
    }}
    return 0;
}}
""")
    exe = tmp_path / "driver"
    subprocess.run([cxx, "-std=c++17", "-Wall", "-Werror", "-I", os.path.dirname(CALC_H),
                    str(driver), "-o", str(exe)], check=True, capture_output=True, timeout=120)
    cases = list(_tiling_cases())
    out = subprocess.run([str(exe)], input="\n".join(" ".join(map(str, c)) for c in cases),
                         capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    assert len(out) == len(cases)
    for case, line in zip(cases, out):
        items = dict(kv.split("=") for kv in line.split())
        try:
            py = T.compute_tiling(*case)
        except T.TilingError:
            assert int(items["rc"]) < 0, case
            continue
        assert int(items["rc"]) == 0, case
        for f in fields:
            assert int(items[f]) == getattr(py, f), (case, f)


@pytest.mark.parametrize("n, in_f, out_f, rank", SHAPES_FOR_TILING)
@pytest.mark.parametrize("workers", WORKERS_FOR_TILING)
def test_tiling_invariants_and_exact_cover(n, in_f, out_f, rank, workers):
    for db in (2, 4):
        for grad in (False, True):
            t = T.compute_tiling(n, in_f, out_f, rank, workers, db, grad)
            assert t.rankPad % T.RANK_ALIGN == 0 and rank <= t.rankPad < rank + T.RANK_ALIGN
            assert t.rowsPerWorker % T.ROW_ALIGN == 0 and t.tileN % T.ROW_ALIGN == 0
            assert t.usedWorkers <= workers and 2 * t.blockDim >= t.usedWorkers >= 0
            assert t.tileOut % T.COL_ALIGN == 0 and t.tileIn % T.COL_ALIGN == 0
            offs = [t.wsXmOff, t.wsT32Off, t.wsG32Off, t.wsTsOff, t.wsGsOff, t.wsAccOff, t.wsLOff,
                    t.wsPerWorkerBytes]
            assert offs == sorted(offs) and all(o % T.WS_ALIGN == 0 for o in offs)
            assert t.wsAccBOff % T.WS_ALIGN == 0 and t.wsSharedBytes % T.WS_ALIGN == 0
            # rows: every row in exactly one tile of one worker
            rows = np.zeros(n, dtype=np.int64)
            for w in range(2 * t.blockDim):
                tiles = T.row_tiles(t, w)
                assert bool(tiles) == (w < t.usedWorkers) or n == 0
                for r0, nr in tiles:
                    assert 0 < nr <= t.tileN
                    rows[r0:r0 + nr] += 1
            assert (rows == 1).all()
            # columns, vector blocks, flat splits, finalize splits
            for total, tile in ((out_f, t.tileOut), (in_f, t.tileIn)):
                cov = np.zeros(total, dtype=np.int64)
                for c0, cols in T.col_chunks(total, tile):
                    assert 0 < cols <= tile
                    cov[c0:c0 + cols] += 1
                    for i0, vr in T.vec_row_blocks(t.tileN, cols):
                        assert vr * T.align_up(cols, T.COL_ALIGN) <= T.VEC_MAX_ELEMS
                assert (cov == 1).all()
            fw = T.finalize_workers(t)
            for total in (rank * in_f, out_f * t.rankPad):
                if total > 10**7:
                    continue
                cov = np.zeros(total, dtype=np.int64)
                for w in range(fw):
                    s, e = T.flat_split(total, fw, w)
                    assert s % 8 == 0 or s == e
                    cov[s:e] += 1
                assert (cov == 1).all()
            for total in (rank, out_f):
                cov = np.zeros(total, dtype=np.int64)
                for w in range(fw):
                    s, e = T.finalize_rows(total, t, w)
                    cov[s:e] += 1
                assert (cov == 1).all()


def test_vec_row_blocks_cover_tile_rows():
    for rows in (1, 7, 16, 128):
        for cols in (1, 15, 16, 17, 500, 512):
            blocks = T.vec_row_blocks(rows, cols)
            cov = np.zeros(rows, dtype=np.int64)
            for i0, vr in blocks:
                cov[i0:i0 + vr] += 1
            assert (cov == 1).all()


# ---------------------------------------------------------------- emulation vs float64

def _inputs(n, in_f, out_f, rank, dtype, seed=0, lead=None):
    r = np.random.RandomState(seed + 1000 * n + in_f)
    shape = (n, in_f) if lead is None else tuple(lead) + (in_f,)
    x = T.round_to(dtype, r.randn(*shape))
    w = T.round_to(dtype, r.randn(out_f, in_f) / np.sqrt(in_f))
    a = T.round_to(dtype, r.randn(rank, in_f) / np.sqrt(in_f))
    b = T.round_to(dtype, r.randn(out_f, rank))
    dy = T.round_to(dtype, r.randn(*(shape[:-1] + (out_f,))))
    return x, w, a, b, dy


def _rel_err(got, ref):
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(got.astype(np.float64) - ref).max()) / scale


# (N, in, out, rank, dtype, p, workers): tail tiles, rank 5/8/16/64, N = 1, 7, 33, 2048,
# in/out not multiples of 16, several in/out chunks (> 512), several core counts
EMU_CASES = [
    (1, 17, 9, 5, "float32", 0.0, 8),
    (1, 17, 9, 64, "bfloat16", 0.5, 1),
    (7, 33, 20, 8, "float16", 0.25, 3),
    (7, 33, 20, 16, "bfloat16", 0.0, 40),
    (33, 70, 45, 5, "bfloat16", 0.1, 4),
    (33, 70, 45, 64, "float32", 0.3, 2),
    (33, 600, 530, 16, "bfloat16", 0.1, 3),
    (33, 600, 530, 5, "float32", 0.0, 1),
    (129, 40, 1030, 8, "float16", 0.0, 1),
    (129, 1030, 40, 8, "float32", 0.2, 1),
    (2048, 40, 24, 64, "bfloat16", 0.1, 40),
    (2048, 24, 40, 5, "float32", 0.0, 48),
    (2048, 19, 23, 16, "float16", 0.3, 7),
]


@pytest.mark.parametrize("n, in_f, out_f, rank, dtype, p, workers", EMU_CASES)
def test_emulated_forward_matches_reference(n, in_f, out_f, rank, dtype, p, workers):
    x, w, a, b, _ = _inputs(n, in_f, out_f, rank, dtype)
    s, seed, off = 0.75, 99, 12345
    y = T.emulate_forward(x, w, a, b, s, p, seed, off, dtype, workers)
    ref = T.reference_forward(x, w, a, b, s, p, seed, off)
    assert _rel_err(y, ref) <= TOL[dtype]
    assert np.array_equal(y, T.round_to(dtype, y))       # output representable in dtype


@pytest.mark.parametrize("n, in_f, out_f, rank, dtype, p, workers", EMU_CASES)
def test_emulated_backward_matches_reference(n, in_f, out_f, rank, dtype, p, workers):
    x, w, a, b, dy = _inputs(n, in_f, out_f, rank, dtype)
    s, seed, off = 0.75, 99, 12345
    dx, da, db = T.emulate_backward(dy, x, w, a, b, s, p, seed, off, dtype, workers)
    rdx, rda, rdb = T.reference_backward(dy, x, w, a, b, s, p, seed, off)
    assert _rel_err(dx, rdx) <= TOL[dtype]
    assert _rel_err(da, rda) <= TOL[dtype]
    assert _rel_err(db, rdb) <= TOL[dtype]


def test_emulation_is_independent_of_the_core_count():
    """Row ranges change with the core count, the math per row does not (fp32 inputs,
    and the rank-sized intermediate is computed per row)."""
    x, w, a, b, dy = _inputs(33, 70, 45, 5, "float32")
    ys = [T.emulate_forward(x, w, a, b, 0.5, 0.2, 1, 2, "float32", k) for k in (1, 2, 3, 40)]
    for y in ys[1:]:
        np.testing.assert_allclose(y, ys[0], rtol=1e-6, atol=1e-6)
    dxs = [T.emulate_backward(dy, x, w, a, b, 0.5, 0.2, 1, 2, "float32", k)[0] for k in (1, 3, 40)]
    for dx in dxs[1:]:
        np.testing.assert_allclose(dx, dxs[0], rtol=1e-6, atol=1e-6)


def test_emulation_leading_dims_and_dropout_mask():
    x, w, a, b, dy = _inputs(6, 20, 12, 4, "float32", lead=(2, 3))
    y = T.emulate_forward(x, w, a, b, 1.0, 0.5, 5, 0, "float32", 4)
    assert y.shape == (2, 3, 12)
    np.testing.assert_allclose(y, T.reference_forward(x, w, a, b, 1.0, 0.5, 5, 0), rtol=1e-5, atol=1e-5)
    # dropout really is applied: a different seed changes the LoRA term
    y2 = T.emulate_forward(x, w, a, b, 1.0, 0.5, 6, 0, "float32", 4)
    assert not np.allclose(y, y2)
    # backward uses the same mask as forward: with B = I-like probe, dA's columns of
    # dropped x entries only see kept rows
    dx, da, db = T.emulate_backward(dy, x, w, a, b, 1.0, 0.5, 5, 0, "float32", 4)
    ref = T.reference_backward(dy, x, w, a, b, 1.0, 0.5, 5, 0)
    for got, r in zip((dx, da, db), ref):
        np.testing.assert_allclose(got, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n, in_f, out_f, rank, dtype, p, workers", [
    (1, 17, 9, 5, "bfloat16", 0.2, 8), (33, 600, 530, 16, "float32", 0.1, 3),
    (129, 1030, 40, 8, "float16", 0.0, 1), (2048, 40, 24, 64, "bfloat16", 0.1, 40)])
def test_emulated_kernel_writes_every_element_exactly_once(n, in_f, out_f, rank, dtype, p, workers):
    x, w, a, b, dy = _inputs(n, in_f, out_f, rank, dtype)
    tr = T.new_trace()
    T.emulate_forward(x, w, a, b, 0.5, p, 3, 4, dtype, workers, trace=tr)
    c = tr.counts
    assert (c["y_writes"] == 1).all() and c["y_writes"].shape == (n, out_f)
    assert (c["x_rows"] == 1).all()
    if p > 0:
        assert (c["mask_writes"] == 1).all()
    tr = T.new_trace()
    T.emulate_backward(dy, x, w, a, b, 0.5, p, 3, 4, dtype, workers, trace=tr)
    c = tr.counts
    for name, shape in (("dx_writes", (n, in_f)), ("dA_writes", (rank, in_f)), ("dB_writes", (out_f, rank)),
                        ("dA_contrib", (n, in_f)), ("dB_contrib", (n, out_f)), ("x_rows", (n, 1))):
        assert c[name].shape == shape and (c[name] == 1).all(), name
    assert (c["zeroA"] == 1).all() and (c["zeroB"] == 1).all()
    if p > 0:
        assert (c["mask_writes"] == 1).all()


def test_emulation_catches_a_short_workspace(monkeypatch):
    """The GM model is strict: shrink the per-worker acc section and the run fails."""
    real = T.compute_tiling

    def short(*args, **kwargs):
        t = real(*args, **kwargs)
        import dataclasses
        return dataclasses.replace(t, wsLOff=t.wsAccOff + T.WS_ALIGN)
    monkeypatch.setattr(T, "compute_tiling", short)
    x, w, a, b, _ = _inputs(33, 70, 600, 5, "bfloat16")
    with pytest.raises(AssertionError):
        T.emulate_forward(x, w, a, b, 0.5, 0.0, 0, 0, "bfloat16", 1)


def test_emulation_rejects_bad_arguments():
    x, w, a, b, _ = _inputs(4, 8, 6, 2, "float32")
    with pytest.raises(ValueError):
        T.emulate_forward(x, w, a, b, 1.0, 1.0, 0, 0, "float32", 2)      # p must be < 1
    with pytest.raises(ValueError):
        T.emulate_forward(x, w, a.T, b, 1.0, 0.0, 0, 0, "float32", 2)    # shapes
    with pytest.raises(ValueError):
        T.emulate_forward(x, w, a, b, 1.0, 0.0, 0, 0, "int8", 2)


# ---------------------------------------------------------------- source consistency

def _opdef_io(text, cls):
    body = text[text.index(f"class {cls} : public OpDef"):]
    body = body[:body.index("};")]
    return (tuple(re.findall(r'this->Input\("(\w+)"\)', body)),
            tuple(re.findall(r'this->Output\("(\w+)"\)', body)))


def _kernel_params(text, name):
    m = re.search(r'void\s+' + name + r'\s*\(([^)]*)\)', text)
    return tuple(p.split()[-1] for p in m.group(1).split(","))


def test_op_names_and_io_agree_across_sources():
    host = _read(HOST_CPP)
    assert _opdef_io(host, "LoraFused") == (ascend.FORWARD_INPUTS, ascend.FORWARD_OUTPUTS)
    assert _opdef_io(host, "LoraFusedGrad") == (ascend.BACKWARD_INPUTS, ascend.BACKWARD_OUTPUTS)
    assert "OP_ADD(LoraFused);" in host and "OP_ADD(LoraFusedGrad);" in host
    assert ascend.OP_NAME == "aclnn" + ascend.OP_TYPE == "aclnnLoraFused"
    assert ascend.GRAD_OP_NAME == "aclnnLoraFusedGrad"
    # kernel entries: snake_case op type, params = inputs, outputs, workspace, tiling
    fwd = _kernel_params(_read(KERNEL_FWD), "lora_fused")
    bwd = _kernel_params(_read(KERNEL_BWD), "lora_fused_grad")
    assert fwd == ascend.FORWARD_INPUTS + ascend.FORWARD_OUTPUTS + ("workspace", "tiling")
    assert bwd == ascend.BACKWARD_INPUTS + ascend.BACKWARD_OUTPUTS + ("workspace", "tiling")
    # msopgen JSON
    ops = {op["op"]: op for op in json.loads(_read(OP_JSON))}
    for op_type, ins, outs in ((ascend.OP_TYPE, ascend.FORWARD_INPUTS, ascend.FORWARD_OUTPUTS),
                               (ascend.GRAD_OP_TYPE, ascend.BACKWARD_INPUTS, ascend.BACKWARD_OUTPUTS)):
        op = ops[op_type]
        assert tuple(d["name"] for d in op["input_desc"]) == ins
        assert tuple(d["name"] for d in op["output_desc"]) == outs
        for d in op["input_desc"] + op["output_desc"]:
            want = {"scale": ["float"] * 3, "dropout_p": ["float"] * 3,
                    "seed_offset": ["int64"] * 3}.get(d["name"], ["fp16", "bf16", "float"])
            assert d["type"] == want and d["format"] == ["ND"] * 3


def test_tiling_data_fields_agree_between_host_and_kernels():
    decl = set(re.findall(r"TILING_DATA_FIELD_DEF(?:_STRUCT)?\(\s*\w+\s*,\s*(\w+)\)", _read(TILING_H)))
    host = _read(HOST_CPP)
    set_fields = set(re.findall(r"td\.set_(\w+)\(", host))
    assert set_fields == decl - {"mmNT", "mmNN", "mmTN"}
    used = set()
    for path in (KERNEL_FWD, KERNEL_BWD):
        text = _read(path)
        used |= set(re.findall(r"\btd\.(\w+)", text))
        used |= set(re.findall(r"tilingData\.(\w+)", text))
    assert used <= decl, used - decl
    # the fields the kernels take from the tiling are those of tiling.py
    py_fields = set(T.LoraTiling.__dataclass_fields__)
    assert used - {"mmNT", "mmNN", "mmTN"} <= py_fields
    assert "REGISTER_TILING_DATA_CLASS(LoraFused, LoraFusedTilingData)" in _read(TILING_H)
    assert "REGISTER_TILING_DATA_CLASS(LoraFusedGrad, LoraFusedTilingData)" in _read(TILING_H)


STUBS = os.path.join(SRC, "stub_check")


def _cxx():
    return shutil.which("g++") or shutil.which("clang++")


def _kernel_tiling_stub(tmp_path):
    """The kernel-side tiling struct that GET_TILING_DATA yields, from lora_fused_tiling.h."""
    text = _read(TILING_H)
    lines = ["#pragma once", "struct TCubeTiling { int32_t M, N, Ka, Kb; };", "struct LoraFusedTilingData {"]
    lines += [f"    {ty} {name};" for ty, name in
              re.findall(r"TILING_DATA_FIELD_DEF(?:_STRUCT)?\(\s*(\w+)\s*,\s*(\w+)\)", text)]
    lines += ["};", "#define GET_TILING_DATA(name, ptr) LoraFusedTilingData name; (void)(ptr)"]
    path = tmp_path / "tiling_stub.h"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("source", ["lora_fused.cpp", "lora_fused_grad.cpp"])
@pytest.mark.parametrize("dtype", ["half", "bfloat16_t", "float"])
def test_kernel_sources_parse_against_api_stubs(tmp_path, source, dtype):
    """g++ -fsyntax-only on the kernels (all templates instantiated) against stub_check/."""
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    res = subprocess.run(
        [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
         "-I", STUBS, "-include", os.path.join(STUBS, "kernel_operator.h"),
         "-include", _kernel_tiling_stub(tmp_path), f"-DDTYPE_X={dtype}",
         os.path.join(SRC, "op_kernel", source)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_host_sources_parse_against_api_stubs():
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    res = subprocess.run(
        [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
         "-I", STUBS, "-I", os.path.dirname(HOST_CPP), HOST_CPP], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_sources_say_they_are_kept_in_sync():
    for path in (CALC_H, os.path.join(SRC, "tiling.py"), KERNEL_COMMON, KERNEL_FWD, KERNEL_BWD):
        assert "KEEP IN SYNC" in _read(path) or "KEPT IN SYNC" in _read(path), path


# ---------------------------------------------------------------- MindSpore registration

def test_build_ops_constructs_on_cpu_without_calling():
    fwd, bwd = ascend.build_ops()
    assert fwd.func_type == "aot" and bwd.func_type == "aot"
    assert fwd.func_name == "aclnnLoraFused" and bwd.func_name == "aclnnLoraFusedGrad"
    assert tuple(fwd.pure_input_names) == ascend.FORWARD_INPUTS
    assert tuple(bwd.pure_input_names) == ascend.BACKWARD_INPUTS
    assert not fwd.multi_output and bwd.multi_output
    assert callable(fwd.bprop)


def test_reg_info_rows():
    info = ascend.forward_reg_info()
    assert info["op_name"] == "aclnnLoraFused" and info["target"] == "Ascend"
    assert [i["name"] for i in info["inputs"]] == list(ascend.FORWARD_INPUTS)
    assert [o["name"] for o in info["outputs"]] == list(ascend.FORWARD_OUTPUTS)
    rows = info["dtype_format"]
    assert [r[0][0] for r in rows] == ["float16", "bfloat16", "float32"]
    for r in rows:
        assert [c[0] for c in r[4:7]] == ["float32", "float32", "int64"]
        assert r[-1][0] == r[0][0]
    grad = ascend.backward_reg_info()
    assert [o["name"] for o in grad["outputs"]] == list(ascend.BACKWARD_OUTPUTS)
    assert all(len(r) == len(ascend.BACKWARD_INPUTS) + 3 for r in grad["dtype_format"])


def test_out_shape_and_dtype_callables():
    from mindformers_lora_ext.kernels.ascend import _backward_shape, _forward_shape
    assert _forward_shape([2, 3, 16], [24, 16], [4, 16], [24, 4], [1], [1], [2]) == [2, 3, 24]
    assert _backward_shape([6, 24], [6, 16], [24, 16], [4, 16], [24, 4], [1], [1], [2]) == \
        ([6, 16], [4, 16], [24, 4])


def test_bprop_returns_one_gradient_per_input(pynative):
    import mindspore as ms
    calls = []

    def fake_backward(dy, x, w, a, b, s, p, so):
        calls.append(dy)
        return x * 2, a * 3, b * 4
    bprop = ascend.make_bprop(fake_backward)
    t = lambda v, dt=ms.float32: ms.Tensor(np.asarray(v), dt)  # noqa: E731
    x, w, a, b = t(np.ones((2, 3))), t(np.ones((4, 3))), t(np.ones((1, 3))), t(np.ones((4, 1)))
    s, p, so = t([0.5]), t([0.1]), t(np.array([1, 2]), ms.int64)
    grads = bprop(x, w, a, b, s, p, so, None, t(np.ones((2, 4))))
    assert len(grads) == 7 and len(calls) == 1
    assert np.allclose(grads[0].asnumpy(), 2) and np.allclose(grads[2].asnumpy(), 3)
    assert np.allclose(grads[3].asnumpy(), 4)
    for g, ref in zip((grads[1], grads[4], grads[5], grads[6]), (w, s, p, so)):
        assert g.shape == ref.shape and not g.asnumpy().any()


def test_is_available_false_on_cpu_with_reason():
    avail = ascend.is_available()
    assert not avail and not avail.ok
    assert "CPU" in avail.reason and "Ascend" in avail.reason


def test_is_available_needs_package_and_opt_in(tmp_path):
    avail = ascend.is_available(device_target="Ascend", env={})
    assert not avail and "not installed" in avail.reason and "build.sh" in avail.reason
    vendor = tmp_path / "vendors" / ascend.VENDOR
    for f in ascend.PACKAGE_FILES:
        (vendor / f).parent.mkdir(parents=True, exist_ok=True)
        (vendor / f).write_text("")
    env = {"ASCEND_CUSTOM_OPP_PATH": f"/nonexistent:{vendor}"}
    avail = ascend.is_available(device_target="Ascend", env=env)
    assert not avail and ascend.OPT_IN_ENV in avail.reason and avail.package_path == str(vendor)
    avail = ascend.is_available(device_target="Ascend", env=dict(env, **{ascend.OPT_IN_ENV: "1"}))
    assert avail and avail.package_path == str(vendor)
    # the vendors/config.ini route of MindSpore's lookup
    (tmp_path / "vendors" / "config.ini").write_text(f"load_priority=other,{ascend.VENDOR}\n")
    env = {"ASCEND_OPP_PATH": str(tmp_path), ascend.OPT_IN_ENV: "1"}
    assert ascend.find_installed_package(env) == str(vendor)
    assert ascend.is_available(device_target="Ascend", env=env)
    assert ascend.find_installed_package({"ASCEND_OPP_PATH": str(tmp_path / "none")}) is None


def test_build_sh_refuses_without_cann(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    env = {k: v for k, v in os.environ.items()
           if k not in ("ASCEND_HOME_PATH", "ASCEND_CANN_PACKAGE_PATH")}
    env["LORA_FUSED_BUILD_DIR"] = str(tmp_path / "build")
    res = subprocess.run([bash, BUILD_SH], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "CANN toolkit not found" in res.stderr
    assert not (tmp_path / "build").exists()
    env["ASCEND_HOME_PATH"] = str(tmp_path)          # a directory, but not a CANN install
    res = subprocess.run([bash, BUILD_SH], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "op project template" in res.stderr
