"""Tiling of the Ascend LoraFused / LoraFusedGrad kernels, and a numpy emulation of them.

KEEP IN SYNC with op_host/lora_fused_tiling_calc.h (constants and compute_tiling) and
with the loops of op_kernel/lora_fused.cpp, op_kernel/lora_fused_grad.cpp and
op_kernel/lora_fused_common.h (worker_rows, row_tiles, col_chunks, vec_row_blocks,
flat_split, finalize_rows, and the GEMM / vector step order of emulate_*).
tests/test_ascend_kernel.py compares the constants with the header, and every tiling
field with the compiled header when a C++ compiler is present.

Decomposition (x [N, in], W [out, in], A [r, in], B [out, r]):

    workers (AIV cores) w = 0..workerNum-1, rows [w*rpw, min(N, (w+1)*rpw))
      row tiles of tileN rows (tail tile last)
        forward:  T  = (x*keep) A^T                      GEMM  [rows, r]     -> ws fp32, ld rankPad
                  Ts = dtype(s_eff * T)                   vector             -> ws dtype
                  per out chunk (tileOut cols, tail last):
                    acc  = x W[c]^T                       GEMM  [rows, cols]  -> ws fp32 (or y if fp32)
                    acc += Ts B[c]^T                      GEMM  K = r, atomic add
                    y[rows, c] = dtype(acc)               vector
        backward: T, Ts as above;  G = dy B, Gs = dtype(s_eff * G)
                  per out chunk: dB_acc[c]    += dy[rows, c]^T Ts         (atomic, fp32)
                  per in chunk:  dA_acc[:, c] += Gs^T (x*keep)[rows, c]   (atomic, fp32)
                  per in chunk:  acc = dy W[:, c]; L = Gs A[:, c]
                                 dx[rows, c] = dtype(acc + keep*L)
      backward only: zero dA_acc/dB_acc before (split over workers), SyncAll,
      ..., SyncAll, then dA = dtype(dA_acc), dB = dtype(dB_acc) (rows split over workers).

The emulation below walks exactly these loops over a model of global memory: inputs,
outputs and every workspace section are flat arrays addressed with the kernel's
offsets and row strides; workspaces start as NaN (uninitialised memory) and every GEMM
operand read is checked to be finite, so a read of memory the kernel never wrote, a
wrong stride or a too-small workspace fails the emulation.
"""
import dataclasses

import numpy as np

from . import rng

# ---- constants: mirror of op_host/lora_fused_tiling_calc.h ----
ROW_ALIGN = 16
RANK_ALIGN = 16
COL_ALIGN = 16
TILE_N_MAX = 128
TILE_OUT_MAX = 512
TILE_IN_MAX = 512
VEC_MAX_ELEMS = 2048
WS_ALIGN = 512
FP32_BYTES = 4
MAX_DIM = 2147483647

CONSTANTS = ("ROW_ALIGN", "RANK_ALIGN", "COL_ALIGN", "TILE_N_MAX", "TILE_OUT_MAX",
             "TILE_IN_MAX", "VEC_MAX_ELEMS", "WS_ALIGN", "FP32_BYTES", "MAX_DIM")

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def ceil_div(a, b):
    return (a + b - 1) // b


def align_up(a, b):
    return ceil_div(a, b) * b


@dataclasses.dataclass(frozen=True)
class LoraTiling:
    """Field for field the `Result` struct of lora_fused_tiling_calc.h."""
    n: int
    inF: int
    outF: int
    rank: int
    rankPad: int
    workerNum: int
    usedWorkers: int
    blockDim: int
    rowsPerWorker: int
    tileN: int
    tileOut: int
    tileIn: int
    vecMaxElems: int
    dtypeBytes: int
    isGrad: int
    wsAccAOff: int
    wsAccBOff: int
    wsSharedBytes: int
    wsXmOff: int
    wsT32Off: int
    wsG32Off: int
    wsTsOff: int
    wsGsOff: int
    wsAccOff: int
    wsLOff: int
    accCols: int
    wsPerWorkerBytes: int
    wsUserBytes: int


class TilingError(ValueError):
    pass


def compute_tiling(n, in_f, out_f, rank, worker_num, dtype_bytes, is_grad):
    """Same arithmetic as lora_fused_calc::ComputeTiling (raises where it returns < 0)."""
    n, in_f, out_f, rank, worker_num = int(n), int(in_f), int(out_f), int(rank), int(worker_num)
    g = 1 if is_grad else 0
    if in_f == 0 or out_f == 0 or rank == 0 or worker_num == 0:
        raise TilingError("in/out/rank/worker_num must be > 0")
    if dtype_bytes not in (2, 4):
        raise TilingError("dtype must be 2 or 4 bytes")
    if max(n, in_f, out_f, rank) > MAX_DIM:
        raise TilingError("dimension exceeds int32")
    rank_pad = align_up(rank, RANK_ALIGN)
    rpw = align_up(max(ceil_div(n, worker_num), 1), ROW_ALIGN)
    used = ceil_div(n, rpw)
    block_dim = max(ceil_div(used, 2), 1)
    tile_n = min(TILE_N_MAX, rpw)
    tile_out = min(TILE_OUT_MAX, align_up(out_f, COL_ALIGN))
    tile_in = min(TILE_IN_MAX, align_up(in_f, COL_ALIGN))

    off = 0
    ws_acc_a = off
    off += align_up(g * rank * in_f * FP32_BYTES, WS_ALIGN)
    ws_acc_b = off
    off += align_up(g * out_f * rank_pad * FP32_BYTES, WS_ALIGN)
    shared = off

    acc_cols = tile_in if g else tile_out
    off = 0
    ws_xm = off
    off += align_up(tile_n * in_f * dtype_bytes, WS_ALIGN)
    ws_t32 = off
    off += align_up(tile_n * rank_pad * FP32_BYTES, WS_ALIGN)
    ws_g32 = off
    off += align_up(g * tile_n * rank_pad * FP32_BYTES, WS_ALIGN)
    ws_ts = off
    off += align_up(tile_n * rank_pad * dtype_bytes, WS_ALIGN)
    ws_gs = off
    off += align_up(g * tile_n * rank_pad * dtype_bytes, WS_ALIGN)
    ws_acc = off
    off += align_up(tile_n * acc_cols * FP32_BYTES, WS_ALIGN)
    ws_l = off
    off += align_up(g * tile_n * tile_in * FP32_BYTES, WS_ALIGN)
    per_worker = off
    return LoraTiling(
        n=n, inF=in_f, outF=out_f, rank=rank, rankPad=rank_pad, workerNum=worker_num,
        usedWorkers=used, blockDim=block_dim, rowsPerWorker=rpw, tileN=tile_n,
        tileOut=tile_out, tileIn=tile_in, vecMaxElems=VEC_MAX_ELEMS, dtypeBytes=dtype_bytes,
        isGrad=g, wsAccAOff=ws_acc_a, wsAccBOff=ws_acc_b, wsSharedBytes=shared,
        wsXmOff=ws_xm, wsT32Off=ws_t32, wsG32Off=ws_g32, wsTsOff=ws_ts, wsGsOff=ws_gs,
        wsAccOff=ws_acc, wsLOff=ws_l, accCols=acc_cols, wsPerWorkerBytes=per_worker,
        wsUserBytes=shared + used * per_worker)


# ---- loop structure: mirror of the kernel's loops (lora_fused_common.h) ----

def worker_rows(t, w):
    """Rows [start, end) of worker w (empty when w >= usedWorkers)."""
    start = min(w * t.rowsPerWorker, t.n)
    end = min(t.n, start + t.rowsPerWorker)
    return start, end


def row_tiles(t, w):
    """(r0, rows) of each row tile of worker w, tail last."""
    start, end = worker_rows(t, w)
    return [(r0, min(t.tileN, end - r0)) for r0 in range(start, end, t.tileN)]


def col_chunks(total, tile):
    """(c0, cols) chunks of a dimension, tail last."""
    return [(c0, min(tile, total - c0)) for c0 in range(0, total, tile)]


def vec_row_blocks(rows, cols, vec_max_elems=VEC_MAX_ELEMS):
    """Row sub-blocks of a [rows, cols] region for one UB buffer (cols padded to COL_ALIGN)."""
    vr = max(1, vec_max_elems // align_up(cols, COL_ALIGN))
    return [(i0, min(vr, rows - i0)) for i0 in range(0, rows, vr)]


def flat_split(total, parts, w, align=8):
    """[start, end) of part w when `total` elements are split in `parts` aligned pieces."""
    per = align_up(ceil_div(total, parts), align) if total else 0
    start = min(w * per, total)
    return start, min(total, start + per)


def finalize_workers(t):
    return max(t.usedWorkers, 1)


def finalize_rows(total_rows, t, w):
    """Rows [start, end) of dA (rank rows) / dB (out rows) cast by worker w."""
    fw = finalize_workers(t)
    per = ceil_div(total_rows, fw)
    start = min(w * per, total_rows)
    return start, min(total_rows, start + per)


# ---- dtype rounding (what the vector Cast with CAST_RINT does) ----

def round_to(dtype, a):
    a = np.asarray(a, dtype=np.float32)
    if dtype == "float32":
        return a.copy()
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        u = a.view(np.uint32).astype(np.uint64)
        rounded = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) & np.uint64(0xFFFF0000)
        out = rounded.astype(np.uint32).view(np.float32)
        return np.where(np.isnan(a), a, out).astype(np.float32)
    raise ValueError(f"unsupported dtype {dtype!r}")


# ---- global-memory model ----

class _Mem:
    """A flat GM buffer of one element type (values held as float32)."""

    def __init__(self, name, n_elems, fill=np.nan, data=None):
        self.name = name
        self.a = np.full(int(n_elems), fill, dtype=np.float32) if data is None else \
            np.ascontiguousarray(data, dtype=np.float32).reshape(-1).copy()

    def _index(self, off, ld, rows, cols):
        if cols > ld and rows > 1:
            raise AssertionError(f"{self.name}: {cols} columns exceed the row stride {ld}")
        idx = off + np.arange(rows)[:, None] * ld + np.arange(cols)[None, :]
        if idx.size and (idx.min() < 0 or idx.max() >= self.a.size):
            raise AssertionError(
                f"{self.name}: access [{idx.min()}, {idx.max()}] outside [0, {self.a.size})")
        return idx

    def read(self, off, ld, rows, cols):
        return self.a[self._index(off, ld, rows, cols)]

    def write(self, off, ld, rows, cols, values, add=False):
        idx = self._index(off, ld, rows, cols)
        if add:
            self.a[idx] = (self.a[idx] + values).astype(np.float32)
        else:
            self.a[idx] = values


def _gemm(c, c_off, ldc, a, a_off, lda, trans_a, b, b_off, ldb, trans_b, m, n, k, atomic):
    """Matmul high-level API call as the kernel issues it (fp32 accumulate, fp32 C)."""
    if m == 0 or n == 0:
        return
    A = a.read(a_off, lda, k, m).T if trans_a else a.read(a_off, lda, m, k)
    B = b.read(b_off, ldb, n, k).T if trans_b else b.read(b_off, ldb, k, n)
    for name, op in ((a.name, A), (b.name, B)):
        if not np.isfinite(op).all():
            raise AssertionError(f"GEMM read uninitialised or non-finite memory of {name}")
    if atomic:
        cur = c.read(c_off, ldc, m, n)
        if not np.isfinite(cur).all():
            raise AssertionError(f"atomic add onto uninitialised memory of {c.name}")
    res = np.matmul(A.astype(np.float32), B.astype(np.float32)).astype(np.float32)
    c.write(c_off, ldc, m, n, res, add=atomic)


class _Trace:
    """Write / contribution counters for the coverage tests."""

    def __init__(self):
        self.counts = {}

    def add(self, name, shape, r0, rows, c0, cols):
        arr = self.counts.setdefault(name, np.zeros(shape, dtype=np.int64))
        arr[r0:r0 + rows, c0:c0 + cols] += 1


def _check_inputs(x, weight, lora_a, lora_b, dtype):
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    x = np.asarray(x, dtype=np.float32)
    in_f = x.shape[-1]
    out_f, in_w = weight.shape
    rank, in_a = lora_a.shape
    if in_w != in_f or in_a != in_f or lora_b.shape != (out_f, rank):
        raise ValueError("shape mismatch")
    return x.reshape(-1, in_f), in_f, out_f, rank


class _Vec:
    """The vector-core routines of lora_fused_common.h (VecTools), on the GM model."""

    def __init__(self, t, dtype, p, seed, offset, s_eff, trace):
        self.t, self.dtype, self.p, self.seed, self.offset = t, dtype, p, seed, offset
        self.s_eff, self.trace = s_eff, trace

    def keep(self, r0, rows, c0, cols):
        return rng.keep_mask_block(r0, rows, c0, cols, self.t.inF, self.p, self.seed,
                                   self.offset).astype(np.float32)

    def mask_block(self, x, xm, r0, rows, c0, cols):
        """xm[i, c0+j] = x[r0+i, c0+j] * keep; both [*, inF] row-major."""
        for i0, vr in vec_row_blocks(rows, cols, self.t.vecMaxElems):
            blk = x.read((r0 + i0) * self.t.inF + c0, self.t.inF, vr, cols)
            out = blk * self.keep(r0 + i0, vr, c0, cols)       # exact in dtype
            xm.write(i0 * self.t.inF + c0, self.t.inF, vr, cols, out)
            self.trace.add("mask_writes", (self.t.n, self.t.inF), r0 + i0, vr, c0, cols)

    def scale_cast(self, src, dst, rows):
        """dst[0:rows*rankPad] = dtype(s_eff * src[...]) in contiguous VEC_MAX_ELEMS chunks."""
        total = rows * self.t.rankPad
        for e0 in range(0, total, self.t.vecMaxElems):
            cnt = min(self.t.vecMaxElems, total - e0)
            v = src.read(e0, cnt, 1, cnt)
            with np.errstate(invalid="ignore"):
                dst.write(e0, cnt, 1, cnt, round_to(self.dtype, np.float32(self.s_eff) * v))

    def cast_out(self, src, s_off, s_ld, dst, d_off, d_ld, rows, cols, name=None, at=(0, 0),
                 shape=None, addend=None, keep_at=None):
        """dst = dtype(src [+ keep * addend]) over a [rows, cols] block, vector row blocks."""
        for i0, vr in vec_row_blocks(rows, cols, self.t.vecMaxElems):
            v = src.read(s_off + i0 * s_ld, s_ld, vr, cols)
            if addend is not None:
                a_mem, a_off, a_ld = addend
                lv = a_mem.read(a_off + i0 * a_ld, a_ld, vr, cols)
                if keep_at is not None:
                    lv = lv * self.keep(keep_at[0] + i0, vr, keep_at[1], cols)
                v = (v + lv).astype(np.float32)
            if not np.isfinite(v).all():
                raise AssertionError("vector epilogue read uninitialised memory")
            dst.write(d_off + i0 * d_ld, d_ld, vr, cols, round_to(self.dtype, v))
            if name is not None:
                self.trace.add(name, shape, at[0] + i0, vr, at[1], cols)


def _setup(x, weight, lora_a, lora_b, scale, p, dtype, worker_num, is_grad, n_override=None):
    x2, in_f, out_f, rank = _check_inputs(x, weight, lora_a, lora_b, dtype)
    n = x2.shape[0] if n_override is None else n_override
    t = compute_tiling(n, in_f, out_f, rank, worker_num, DTYPE_BYTES[dtype], is_grad)
    p32 = float(np.float32(p))
    rng.drop_threshold(p32)  # validates p
    s_eff = rng.effective_scale(scale, p32)
    return x2, t, p32, s_eff


def _worker_ws(t, w, sections):
    """Per-worker workspace sections as separate GM models sized from the layout."""
    nxt = {"wsXmOff": "wsT32Off", "wsT32Off": "wsG32Off", "wsG32Off": "wsTsOff",
           "wsTsOff": "wsGsOff", "wsGsOff": "wsAccOff", "wsAccOff": "wsLOff",
           "wsLOff": "wsPerWorkerBytes"}
    out = {}
    for name, (field, elem_bytes) in sections.items():
        size_bytes = getattr(t, nxt[field]) - getattr(t, field)
        out[name] = _Mem(f"w{w}.{name}", size_bytes // elem_bytes)
    return out


def emulate_forward(x, weight, lora_a, lora_b, scale, p=0.0, seed=0, offset=0,
                    dtype="float32", worker_num=8, trace=None):
    """y as the LoraFused kernel computes it. Inputs: float32 arrays whose values are
    representable in `dtype` (use round_to); returns float32 values rounded to `dtype`."""
    x2, t, p32, s_eff = _setup(x, weight, lora_a, lora_b, scale, p, dtype, worker_num, False)
    trace = trace if trace is not None else _Trace()
    db = DTYPE_BYTES[dtype]
    X = _Mem("x", 0, data=x2)
    W = _Mem("weight", 0, data=weight)
    A = _Mem("lora_a", 0, data=lora_a)
    B = _Mem("lora_b", 0, data=lora_b)
    Y = _Mem("y", t.n * t.outF)
    vec = _Vec(t, dtype, p32, seed, offset, s_eff, trace)
    dropout = p32 > 0.0
    direct = dtype == "float32"   # fp32: the GEMMs accumulate straight into y

    for w in range(t.workerNum):
        if w >= t.usedWorkers:
            assert not row_tiles(t, w)
            continue
        ws = _worker_ws(t, w, {"xm": ("wsXmOff", db), "t32": ("wsT32Off", FP32_BYTES),
                                   "ts": ("wsTsOff", db), "acc": ("wsAccOff", FP32_BYTES)})
        for r0, rows in row_tiles(t, w):
            trace.add("x_rows", (t.n, 1), r0, rows, 0, 1)
            if dropout:
                for c0, cols in col_chunks(t.inF, t.tileIn):
                    vec.mask_block(X, ws["xm"], r0, rows, c0, cols)
                xs, xs_off = ws["xm"], 0
            else:
                xs, xs_off = X, r0 * t.inF
            # T = (x*keep) A^T   [rows, rank] -> t32 (ld rankPad)
            _gemm(ws["t32"], 0, t.rankPad, xs, xs_off, t.inF, False, A, 0, t.inF, True,
                  rows, t.rank, t.inF, False)
            vec.scale_cast(ws["t32"], ws["ts"], rows)
            for c0, cols in col_chunks(t.outF, t.tileOut):
                if direct:
                    c_mem, c_off, ldc = Y, r0 * t.outF + c0, t.outF
                else:
                    c_mem, c_off, ldc = ws["acc"], 0, t.tileOut
                _gemm(c_mem, c_off, ldc, X, r0 * t.inF, t.inF, False, W, c0 * t.inF, t.inF, True,
                      rows, cols, t.inF, False)
                _gemm(c_mem, c_off, ldc, ws["ts"], 0, t.rankPad, False, B, c0 * t.rank, t.rank, True,
                      rows, cols, t.rank, True)
                if direct:
                    trace.add("y_writes", (t.n, t.outF), r0, rows, c0, cols)
                else:
                    vec.cast_out(ws["acc"], 0, t.tileOut, Y, r0 * t.outF + c0, t.outF, rows, cols,
                                 name="y_writes", at=(r0, c0), shape=(t.n, t.outF))
    y = Y.a.reshape(np.asarray(x).shape[:-1] + (t.outF,))
    return y


def emulate_backward(dy, x, weight, lora_a, lora_b, scale, p=0.0, seed=0, offset=0,
                     dtype="float32", worker_num=8, trace=None):
    """(dx, d_lora_a, d_lora_b) as the LoraFusedGrad kernel computes them."""
    x2, t, p32, s_eff = _setup(x, weight, lora_a, lora_b, scale, p, dtype, worker_num, True)
    trace = trace if trace is not None else _Trace()
    db = DTYPE_BYTES[dtype]
    dy2 = np.asarray(dy, dtype=np.float32).reshape(-1, t.outF)
    if dy2.shape[0] != t.n:
        raise ValueError("dy rows differ from x rows")
    X = _Mem("x", 0, data=x2)
    DY = _Mem("dy", 0, data=dy2)
    W = _Mem("weight", 0, data=weight)
    A = _Mem("lora_a", 0, data=lora_a)
    B = _Mem("lora_b", 0, data=lora_b)
    DX = _Mem("dx", t.n * t.inF)
    DA = _Mem("d_lora_a", t.rank * t.inF)
    DB = _Mem("d_lora_b", t.outF * t.rank)
    acc_a = _Mem("accA", (t.wsAccBOff - t.wsAccAOff) // FP32_BYTES)
    acc_b = _Mem("accB", (t.wsSharedBytes - t.wsAccBOff) // FP32_BYTES)
    vec = _Vec(t, dtype, p32, seed, offset, s_eff, trace)
    dropout = p32 > 0.0
    fw = finalize_workers(t)
    launched = 2 * t.blockDim

    # phase 0: zero the accumulators (flat split over the finalize workers), SyncAll
    for w in range(launched):
        if w < fw:
            for mem, total, name in ((acc_a, t.rank * t.inF, "zeroA"),
                                     (acc_b, t.outF * t.rankPad, "zeroB")):
                s, e = flat_split(total, fw, w)
                mem.write(s, max(e - s, 1), 1, e - s, np.zeros(e - s, dtype=np.float32))
                trace.add(name, (1, total), 0, 1, s, e - s)
    # phase 1: per worker, per row tile
    for w in range(launched):
        if w >= t.usedWorkers:
            assert not row_tiles(t, w)
            continue
        ws = _worker_ws(t, w, {"xm": ("wsXmOff", db), "t32": ("wsT32Off", FP32_BYTES),
                                   "g32": ("wsG32Off", FP32_BYTES), "ts": ("wsTsOff", db),
                                   "gs": ("wsGsOff", db), "acc": ("wsAccOff", FP32_BYTES),
                                   "l": ("wsLOff", FP32_BYTES)})
        for r0, rows in row_tiles(t, w):
            trace.add("x_rows", (t.n, 1), r0, rows, 0, 1)
            if dropout:
                for c0, cols in col_chunks(t.inF, t.tileIn):
                    vec.mask_block(X, ws["xm"], r0, rows, c0, cols)
                xs, xs_off = ws["xm"], 0
            else:
                xs, xs_off = X, r0 * t.inF
            _gemm(ws["t32"], 0, t.rankPad, xs, xs_off, t.inF, False, A, 0, t.inF, True,
                  rows, t.rank, t.inF, False)                                  # T = xm A^T
            _gemm(ws["g32"], 0, t.rankPad, DY, r0 * t.outF, t.outF, False, B, 0, t.rank, False,
                  rows, t.rank, t.outF, False)                                 # G = dy B
            vec.scale_cast(ws["t32"], ws["ts"], rows)
            vec.scale_cast(ws["g32"], ws["gs"], rows)
            for c0, cols in col_chunks(t.outF, t.tileOut):                   # dB += dy^T Ts
                _gemm(acc_b, c0 * t.rankPad, t.rankPad, DY, r0 * t.outF + c0, t.outF, True,
                      ws["ts"], 0, t.rankPad, False, cols, t.rank, rows, True)
                trace.add("dB_contrib", (t.n, t.outF), r0, rows, c0, cols)
            for c0, cols in col_chunks(t.inF, t.tileIn):                     # dA += Gs^T xm
                _gemm(acc_a, c0, t.inF, ws["gs"], 0, t.rankPad, True,
                      xs, xs_off + c0, t.inF, False, t.rank, cols, rows, True)
                trace.add("dA_contrib", (t.n, t.inF), r0, rows, c0, cols)
            for c0, cols in col_chunks(t.inF, t.tileIn):                     # dx
                _gemm(ws["acc"], 0, t.tileIn, DY, r0 * t.outF, t.outF, False, W, c0, t.inF, False,
                      rows, cols, t.outF, False)                               # dy W
                if not dropout:
                    _gemm(ws["acc"], 0, t.tileIn, ws["gs"], 0, t.rankPad, False, A, c0, t.inF, False,
                          rows, cols, t.rank, True)                            # += Gs A
                    vec.cast_out(ws["acc"], 0, t.tileIn, DX, r0 * t.inF + c0, t.inF, rows, cols,
                                 name="dx_writes", at=(r0, c0), shape=(t.n, t.inF))
                else:
                    _gemm(ws["l"], 0, t.tileIn, ws["gs"], 0, t.rankPad, False, A, c0, t.inF, False,
                          rows, cols, t.rank, False)                           # L = Gs A
                    vec.cast_out(ws["acc"], 0, t.tileIn, DX, r0 * t.inF + c0, t.inF, rows, cols,
                                 name="dx_writes", at=(r0, c0), shape=(t.n, t.inF),
                                 addend=(ws["l"], 0, t.tileIn), keep_at=(r0, c0))
    # SyncAll; phase 2: cast the accumulators (rows split over the finalize workers)
    for w in range(launched):
        if w >= fw:
            continue
        s, e = finalize_rows(t.rank, t, w)
        for c0, cols in col_chunks(t.inF, t.tileIn):
            vec.cast_out(acc_a, s * t.inF + c0, t.inF, DA, s * t.inF + c0, t.inF, e - s, cols,
                         name="dA_writes", at=(s, c0), shape=(t.rank, t.inF))
        s, e = finalize_rows(t.outF, t, w)
        vec.cast_out(acc_b, s * t.rankPad, t.rankPad, DB, s * t.rank, t.rank, e - s, t.rank,
                     name="dB_writes", at=(s, 0), shape=(t.outF, t.rank))
    dx = DX.a.reshape(np.asarray(x).shape)
    return dx, DA.a.reshape(t.rank, t.inF), DB.a.reshape(t.outF, t.rank)


def new_trace():
    return _Trace()


def reference_forward(x, weight, lora_a, lora_b, scale, p=0.0, seed=0, offset=0):
    """float64 reference of the forward (same keep mask, inverted-dropout scaling)."""
    x = np.asarray(x, dtype=np.float64)
    x2 = x.reshape(-1, x.shape[-1])
    keep = rng.keep_mask(x2.shape[0], x2.shape[1], p, seed, offset)
    s = float(scale) / (1.0 - float(np.float32(p)))
    y = x2 @ np.asarray(weight, np.float64).T + \
        s * ((x2 * keep) @ np.asarray(lora_a, np.float64).T) @ np.asarray(lora_b, np.float64).T
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def reference_backward(dy, x, weight, lora_a, lora_b, scale, p=0.0, seed=0, offset=0):
    """float64 reference of (dx, dA, dB)."""
    x = np.asarray(x, dtype=np.float64)
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = np.asarray(dy, dtype=np.float64).reshape(x2.shape[0], -1)
    W = np.asarray(weight, np.float64)
    A = np.asarray(lora_a, np.float64)
    B = np.asarray(lora_b, np.float64)
    keep = rng.keep_mask(x2.shape[0], x2.shape[1], p, seed, offset)
    s = float(scale) / (1.0 - float(np.float32(p)))
    xm = x2 * keep
    g = dy2 @ B
    dx = dy2 @ W + s * (g @ A) * keep
    da = s * g.T @ xm
    db = s * dy2.T @ (xm @ A.T)
    return dx.reshape(x.shape), da, db
