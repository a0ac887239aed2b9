/**
 * Shared device code of LoraFused (lora_fused.cpp) and LoraFusedGrad (lora_fused_grad.cpp).
 *
 * NOT YET COMPILED OR RUN ON ASCEND HARDWARE. Written against the Ascend C API as
 * documented (kernel_operator.h, lib/matmul_intf.h); see the package README for what
 * was verified on CPU (the tiling arithmetic and a numpy emulation of these loops).
 *
 * KEEP IN SYNC with mindformers_lora_ext/kernels/ascend/tiling.py: worker_rows,
 * row_tiles, col_chunks, vec_row_blocks, flat_split, finalize_rows mirror the loops
 * here, and emulate_forward / emulate_backward mirror the GEMM / vector step order.
 * The dropout RNG follows RNG.md (Threefry-2x32-20).
 *
 * Execution model: MIX kernel, 1 cube core (AIC) : 2 vector cores (AIV). Each AIV is a
 * "worker": it owns a contiguous range of rows, drives its own Matmul objects (the AIC
 * serves the requests) and runs the vector steps (dropout mask, scale + cast, epilogues).
 * GEMMs read and write global memory (inputs, outputs and the user workspace) and
 * accumulate in float32.
 */
#ifndef LORA_FUSED_COMMON_H
#define LORA_FUSED_COMMON_H

#include "kernel_operator.h"
#include "lib/matmul_intf.h"

namespace lora_fused_impl {

using namespace AscendC;
using namespace matmul;

constexpr int32_t BUFFER_NUM = 2;       // double buffering of the vector copy-in/copy-out queues
constexpr uint32_t BLOCK_BYTES = 32;    // UB block
constexpr uint32_t COL_ALIGN_K = 16;    // == COL_ALIGN of the tiling
constexpr uint32_t THREEFRY_PARITY = 0x1BD11BDA;
constexpr uint32_t THREEFRY_ROUNDS = 20;

__aicore__ inline uint64_t CeilDivU(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
__aicore__ inline uint64_t AlignUpU(uint64_t a, uint64_t b) { return CeilDivU(a, b) * b; }
__aicore__ inline uint64_t MinU(uint64_t a, uint64_t b) { return a < b ? a : b; }
__aicore__ inline uint64_t MaxU(uint64_t a, uint64_t b) { return a > b ? a : b; }

__aicore__ inline uint32_t ThreefryRot(uint32_t i)
{
    switch (i & 7) {
        case 0: return 13;
        case 1: return 15;
        case 2: return 26;
        case 3: return 6;
        case 4: return 17;
        case 5: return 29;
        case 6: return 16;
        default: return 24;
    }
}

// Scalar Threefry-2x32-20 (RNG.md); used for the rare row segment whose counter wraps.
__aicore__ inline void ThreefryScalar(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1,
                                      uint32_t &o0, uint32_t &o1)
{
    uint32_t ks[3] = {k0, k1, k0 ^ k1 ^ THREEFRY_PARITY};
    uint32_t x0 = c0 + ks[0];
    uint32_t x1 = c1 + ks[1];
    for (uint32_t i = 0; i < THREEFRY_ROUNDS; ++i) {
        uint32_t r = ThreefryRot(i);
        x0 += x1;
        x1 = (x1 << r) | (x1 >> (32 - r));
        x1 ^= x0;
        if ((i & 3) == 3) {
            uint32_t s = (i + 1) >> 2;
            x0 += ks[s % 3];
            x1 += ks[(s + 1) % 3] + s;
        }
    }
    o0 = x0;
    o1 = x1;
}

// Rows [start, end) of worker w (tiling.py: worker_rows).
__aicore__ inline void WorkerRows(uint64_t n, uint64_t rowsPerWorker, uint64_t w, uint64_t &start,
                                  uint64_t &end)
{
    start = MinU(w * rowsPerWorker, n);
    end = MinU(n, start + rowsPerWorker);
}

// [start, end) of part w of `total` elements split in `parts` pieces aligned to `align`
// (tiling.py: flat_split).
__aicore__ inline void FlatSplit(uint64_t total, uint64_t parts, uint64_t w, uint64_t align,
                                 uint64_t &start, uint64_t &end)
{
    uint64_t per = total ? AlignUpU(CeilDivU(total, parts), align) : 0;
    start = MinU(w * per, total);
    end = MinU(total, start + per);
}

// Rows [start, end) of worker w when `total` rows are split over `parts` workers
// (tiling.py: finalize_rows).
__aicore__ inline void SplitRows(uint64_t total, uint64_t parts, uint64_t w, uint64_t &start,
                                 uint64_t &end)
{
    uint64_t per = CeilDivU(total, parts);
    start = MinU(w * per, total);
    end = MinU(total, start + per);
}

// Make every GM write of this core visible before a GEMM (on the cube core) or a later
// copy-in reads it. Coarse but simple; used only at step boundaries.
__aicore__ inline void GmFence()
{
    PipeBarrier<PIPE_ALL>();
}

/**
 * C[m, n] (+)= op(A)[m, k] * op(B)[k, n] through the Matmul high-level API, operands in
 * global memory with explicit row strides (elements):
 *   A not transposed: stored [m, k], row stride lda;  transposed: stored [k, m], stride lda
 *   B not transposed: stored [k, n], row stride ldb;  transposed: stored [n, k], stride ldb
 *   C: stored [m, n], row stride ldc.
 * SetOrgShape takes the storage widths (orgKc = width of C). `atomicAdd` accumulates
 * into C (IterateAll enAtomic = 1).
 */
template <class MM, typename T>
__aicore__ inline void Gemm(MM &mm, const GlobalTensor<float> &c, uint64_t ldc,
                            const GlobalTensor<T> &a, uint64_t lda, bool transA,
                            const GlobalTensor<T> &b, uint64_t ldb, bool transB,
                            uint32_t m, uint32_t n, uint32_t k, bool atomicAdd)
{
    if (m == 0 || n == 0 || k == 0) {
        return;
    }
    int32_t orgM = static_cast<int32_t>(transA ? lda : m);
    int32_t orgKa = static_cast<int32_t>(transA ? k : lda);
    int32_t orgN = static_cast<int32_t>(transB ? n : ldb);
    int32_t orgKb = static_cast<int32_t>(transB ? ldb : k);
    mm.SetOrgShape(orgM, orgN, orgKa, orgKb, static_cast<int32_t>(ldc));
    mm.SetSingleShape(static_cast<int32_t>(m), static_cast<int32_t>(n), static_cast<int32_t>(k));
    mm.SetTensorA(a, transA);
    mm.SetTensorB(b, transB);
    mm.IterateAll(c, atomicAdd ? 1 : 0);
}

/**
 * Vector-core routines (one instance per worker). T: input/output element type
 * (half, bfloat16_t or float); all arithmetic in float32.
 */
template <typename T>
class VecTools {
public:
    __aicore__ inline VecTools() {}

    __aicore__ inline void Init(TPipe *pipe, uint32_t vecMaxElems, uint32_t rngLanes, uint64_t inF,
                                float dropoutP, int64_t seed, int64_t offset, float sEff)
    {
        vecMaxElems_ = vecMaxElems;
        rngLanes_ = static_cast<uint32_t>(AlignUpU(rngLanes, COL_ALIGN_K));
        inF_ = inF;
        sEff_ = sEff;
        dropout_ = dropoutP > 0.0f;
        uint64_t s = static_cast<uint64_t>(seed);
        k0_ = static_cast<uint32_t>(s & 0xFFFFFFFFULL);
        k1_ = static_cast<uint32_t>(s >> 32);
        offset_ = static_cast<uint64_t>(offset);
        // thr = ceil(p * 2^24); p * 2^24 is exact in float32
        float scaled = dropoutP * 16777216.0f;
        uint32_t thr = static_cast<uint32_t>(scaled);
        if (static_cast<float>(thr) < scaled) {
            thr += 1;
        }
        thr_ = thr;
        oneMinusThr_ = 1.0f - static_cast<float>(thr);   // exact: thr < 2^24

        pipe->InitBuffer(inQ_, BUFFER_NUM, vecMaxElems_ * sizeof(float));
        pipe->InitBuffer(in2Q_, BUFFER_NUM, vecMaxElems_ * sizeof(float));
        pipe->InitBuffer(outQ_, BUFFER_NUM, vecMaxElems_ * sizeof(float));
        pipe->InitBuffer(f32Buf_, vecMaxElems_ * sizeof(float));
        pipe->InitBuffer(keepBuf_, rngLanes_ * sizeof(float));
        pipe->InitBuffer(idxBuf_, rngLanes_ * sizeof(int32_t));
        pipe->InitBuffer(x0Buf_, rngLanes_ * sizeof(uint32_t));
        pipe->InitBuffer(x1Buf_, rngLanes_ * sizeof(uint32_t));
        pipe->InitBuffer(t1Buf_, rngLanes_ * sizeof(uint32_t));
        pipe->InitBuffer(t2Buf_, rngLanes_ * sizeof(uint32_t));
        pipe->InitBuffer(laneBuf_, rngLanes_ * sizeof(int32_t));
    }

    __aicore__ inline bool Dropout() const { return dropout_; }

    /** xm[i, c0 + j] = x[r0 + i, c0 + j] * keep(r0 + i, c0 + j) for i < rows, j < cols;
     *  x is [*, inF] (pointer at row 0), xm is the worker's [tileN, inF] tile. */
    __aicore__ inline void MaskBlock(const GlobalTensor<T> &x, const GlobalTensor<T> &xm, uint64_t r0,
                                     uint32_t rows, uint64_t c0, uint32_t cols)
    {
        const uint32_t colsPad = static_cast<uint32_t>(AlignUpU(cols, COL_ALIGN_K));
        const uint32_t vr = static_cast<uint32_t>(MaxU(1, vecMaxElems_ / colsPad));
        for (uint32_t i0 = 0; i0 < rows; i0 += vr) {
            const uint32_t nr = static_cast<uint32_t>(MinU(vr, rows - i0));
            CopyInRows<T>(inQ_, x[(r0 + i0) * inF_ + c0], inF_, nr, cols, colsPad);
            LocalTensor<T> xin = inQ_.DeQue<T>();
            LocalTensor<float> xf = f32Buf_.Get<float>();
            ToFloat(xf, xin, nr * colsPad);
            inQ_.FreeTensor(xin);
            for (uint32_t i = 0; i < nr; ++i) {
                KeepRow(offset_ + (r0 + i0 + i) * inF_ + c0, cols);
                LocalTensor<float> keep = keepBuf_.Get<float>();
                Mul(xf[i * colsPad], xf[i * colsPad], keep, cols);
                PipeBarrier<PIPE_V>();
            }
            LocalTensor<T> out = outQ_.AllocTensor<T>();
            FromFloat(out, xf, nr * colsPad);
            outQ_.EnQue(out);
            CopyOutRows<T>(outQ_, xm[i0 * inF_ + c0], inF_, nr, cols, colsPad);
        }
    }

    /** dst[0 : rows*ld] = dtype(sEff * src[...]); contiguous, ld = rankPad (padded columns
     *  carry whatever src had; the GEMMs never read them). */
    __aicore__ inline void ScaleCast(const GlobalTensor<float> &src, const GlobalTensor<T> &dst,
                                     uint64_t total)
    {
        for (uint64_t e0 = 0; e0 < total; e0 += vecMaxElems_) {
            const uint32_t cnt = static_cast<uint32_t>(MinU(vecMaxElems_, total - e0));
            LocalTensor<float> in = inQ_.AllocTensor<float>();
            DataCopy(in, src[e0], cnt);          // cnt * 4 bytes is a multiple of 64 (rankPad % 16 == 0)
            inQ_.EnQue(in);
            LocalTensor<float> v = inQ_.DeQue<float>();
            LocalTensor<float> f = f32Buf_.Get<float>();
            Muls(f, v, sEff_, cnt);
            PipeBarrier<PIPE_V>();
            inQ_.FreeTensor(v);
            LocalTensor<T> out = outQ_.AllocTensor<T>();
            FromFloat(out, f, cnt);
            outQ_.EnQue(out);
            LocalTensor<T> o = outQ_.DeQue<T>();
            DataCopy(dst[e0], o, cnt);
            outQ_.FreeTensor(o);
        }
    }

    /** dst[rows, cols] (ld dstLd) = dtype(src[rows, cols] (ld srcLd)
     *                                     [+ keep(keepRow0 + i, keepCol0 + j) * add[rows, cols] (ld addLd)]). */
    __aicore__ inline void CastOut(const GlobalTensor<float> &src, uint64_t srcLd, const GlobalTensor<T> &dst,
                                   uint64_t dstLd, uint32_t rows, uint32_t cols, bool withAdd = false,
                                   const GlobalTensor<float> *add = nullptr, uint64_t addLd = 0,
                                   bool masked = false, uint64_t keepRow0 = 0, uint64_t keepCol0 = 0)
    {
        if (rows == 0 || cols == 0) {
            return;
        }
        const uint32_t colsPad = static_cast<uint32_t>(AlignUpU(cols, COL_ALIGN_K));
        const uint32_t vr = static_cast<uint32_t>(MaxU(1, vecMaxElems_ / colsPad));
        for (uint32_t i0 = 0; i0 < rows; i0 += vr) {
            const uint32_t nr = static_cast<uint32_t>(MinU(vr, rows - i0));
            CopyInRows<float>(inQ_, src[i0 * srcLd], srcLd, nr, cols, colsPad);
            LocalTensor<float> acc = inQ_.DeQue<float>();
            if (withAdd) {
                CopyInRows<float>(in2Q_, (*add)[i0 * addLd], addLd, nr, cols, colsPad);
                LocalTensor<float> l = in2Q_.DeQue<float>();
                if (masked) {
                    for (uint32_t i = 0; i < nr; ++i) {
                        KeepRow(offset_ + (keepRow0 + i0 + i) * inF_ + keepCol0, cols);
                        LocalTensor<float> keep = keepBuf_.Get<float>();
                        Mul(l[i * colsPad], l[i * colsPad], keep, cols);
                        PipeBarrier<PIPE_V>();
                    }
                }
                Add(acc, acc, l, nr * colsPad);
                PipeBarrier<PIPE_V>();
                in2Q_.FreeTensor(l);
            }
            LocalTensor<T> out = outQ_.AllocTensor<T>();
            FromFloat(out, acc, nr * colsPad);
            outQ_.EnQue(out);
            inQ_.FreeTensor(acc);
            CopyOutRows<T>(outQ_, dst[i0 * dstLd], dstLd, nr, cols, colsPad);
        }
    }

private:
    // GM [nr, cols] (row stride ld elements) -> UB [nr, colsPad] through queue q.
    template <typename U, class Q>
    __aicore__ inline void CopyInRows(Q &q, const GlobalTensor<U> &src, uint64_t ld, uint32_t nr,
                                      uint32_t cols, uint32_t colsPad)
    {
        LocalTensor<U> dst = q.template AllocTensor<U>();
        const uint32_t rowBytes = cols * sizeof(U);
        const uint32_t ubRowBytes = colsPad * sizeof(U);
        DataCopyExtParams params{static_cast<uint16_t>(nr), rowBytes,
                                 static_cast<uint32_t>((ld - cols) * sizeof(U)),                // GM gap, bytes
                                 (ubRowBytes - static_cast<uint32_t>(AlignUpU(rowBytes, BLOCK_BYTES))) /
                                     BLOCK_BYTES,                                              // UB gap, blocks
                                 0};
        DataCopyPadExtParams<U> pad{false, 0, 0, static_cast<U>(0)};
        DataCopyPad(dst, src, params, pad);
        q.EnQue(dst);
    }

    // UB [nr, colsPad] (queued in q) -> GM [nr, cols] (row stride ld elements).
    template <typename U, class Q>
    __aicore__ inline void CopyOutRows(Q &q, const GlobalTensor<U> &dst, uint64_t ld, uint32_t nr,
                                       uint32_t cols, uint32_t colsPad)
    {
        LocalTensor<U> src = q.template DeQue<U>();
        const uint32_t rowBytes = cols * sizeof(U);
        const uint32_t ubRowBytes = colsPad * sizeof(U);
        DataCopyExtParams params{static_cast<uint16_t>(nr), rowBytes,
                                 (ubRowBytes - static_cast<uint32_t>(AlignUpU(rowBytes, BLOCK_BYTES))) /
                                     BLOCK_BYTES,                                              // UB gap, blocks
                                 static_cast<uint32_t>((ld - cols) * sizeof(U)),                // GM gap, bytes
                                 0};
        DataCopyPad(dst, src, params);
        q.FreeTensor(src);
    }

    __aicore__ inline void ToFloat(const LocalTensor<float> &dst, const LocalTensor<T> &src, uint32_t cnt)
    {
        if constexpr (IsSameType<T, float>::value) {
            DataCopy(dst, src, cnt);
        } else {
            Cast(dst, src, RoundMode::CAST_NONE, cnt);
        }
        PipeBarrier<PIPE_V>();
    }

    __aicore__ inline void FromFloat(const LocalTensor<T> &dst, const LocalTensor<float> &src, uint32_t cnt)
    {
        if constexpr (IsSameType<T, float>::value) {
            DataCopy(dst, src, cnt);
        } else {
            Cast(dst, src, RoundMode::CAST_RINT, cnt);   // round to nearest even
        }
        PipeBarrier<PIPE_V>();
    }

    // ---- dropout RNG (RNG.md) ----

    // keepBuf_[0, cols) = 1.0f / 0.0f for the elements with global indices gStart + j.
    __aicore__ inline void KeepRow(uint64_t gStart, uint32_t cols)
    {
        const uint64_t b = gStart >> 1;
        const uint32_t par = static_cast<uint32_t>(gStart & 1);
        const uint32_t bLo = static_cast<uint32_t>(b & 0xFFFFFFFFULL);
        const uint32_t bHi = static_cast<uint32_t>(b >> 32);
        // pair index of lane j: b + ((par + j) >> 1); its low word wraps iff
        // bLo + ((par + cols - 1) >> 1) > 0xFFFFFFFF
        const uint64_t lastPairDelta = (static_cast<uint64_t>(par) + cols - 1) >> 1;
        if (static_cast<uint64_t>(bLo) + lastPairDelta > 0xFFFFFFFFULL) {
            KeepRowScalar(gStart, cols);     // once per 2^33 elements
        } else {
            KeepRowVector(par, bLo, bHi, cols);
        }
    }

    __aicore__ inline void KeepRowScalar(uint64_t gStart, uint32_t cols)
    {
        PipeBarrier<PIPE_ALL>();
        LocalTensor<float> keep = keepBuf_.Get<float>();
        for (uint32_t j = 0; j < cols; ++j) {
            uint64_t g = gStart + j;
            uint64_t b = g >> 1;
            uint32_t o0;
            uint32_t o1;
            ThreefryScalar(static_cast<uint32_t>(b & 0xFFFFFFFFULL), static_cast<uint32_t>(b >> 32), k0_, k1_,
                           o0, o1);
            uint32_t word = (g & 1) ? o1 : o0;
            keep.SetValue(j, (word >> 8) >= thr_ ? 1.0f : 0.0f);
        }
        PipeBarrier<PIPE_ALL>();
    }

    // a ^= b on uint32 lanes, through the uint16 view: a ^ b = (a | b) & ~(a & b)
    __aicore__ inline void XorInPlace(const LocalTensor<uint32_t> &a, const LocalTensor<uint32_t> &b,
                                      const LocalTensor<uint32_t> &tmp1, const LocalTensor<uint32_t> &tmp2,
                                      uint32_t n)
    {
        LocalTensor<uint16_t> a16 = a.template ReinterpretCast<uint16_t>();
        LocalTensor<uint16_t> b16 = b.template ReinterpretCast<uint16_t>();
        LocalTensor<uint16_t> t16 = tmp1.template ReinterpretCast<uint16_t>();
        LocalTensor<uint16_t> u16 = tmp2.template ReinterpretCast<uint16_t>();
        And(t16, a16, b16, 2 * n);
        Or(u16, a16, b16, 2 * n);
        PipeBarrier<PIPE_V>();
        Not(t16, t16, 2 * n);
        PipeBarrier<PIPE_V>();
        And(a16, u16, t16, 2 * n);
        PipeBarrier<PIPE_V>();
    }

    // x = rotl32(x, r)
    __aicore__ inline void RotlInPlace(const LocalTensor<uint32_t> &x, uint32_t r, const LocalTensor<uint32_t> &tmp1,
                                       const LocalTensor<uint32_t> &tmp2, uint32_t n)
    {
        ShiftLeft(tmp1, x, r, n);
        ShiftRight(tmp2, x, static_cast<uint32_t>(32 - r), n);
        PipeBarrier<PIPE_V>();
        Or(x.template ReinterpretCast<uint16_t>(), tmp1.template ReinterpretCast<uint16_t>(),
           tmp2.template ReinterpretCast<uint16_t>(), 2 * n);
        PipeBarrier<PIPE_V>();
    }

    __aicore__ inline void KeepRowVector(uint32_t par, uint32_t bLo, uint32_t bHi, uint32_t cols)
    {
        const uint32_t n = cols;
        LocalTensor<int32_t> idx = idxBuf_.Get<int32_t>();
        LocalTensor<int32_t> lane = laneBuf_.Get<int32_t>();
        LocalTensor<uint32_t> x0 = x0Buf_.Get<uint32_t>();
        LocalTensor<uint32_t> x1 = x1Buf_.Get<uint32_t>();
        LocalTensor<uint32_t> t1 = t1Buf_.Get<uint32_t>();
        LocalTensor<uint32_t> t2 = t2Buf_.Get<uint32_t>();
        LocalTensor<int32_t> x0i = x0.template ReinterpretCast<int32_t>();
        LocalTensor<int32_t> x1i = x1.template ReinterpretCast<int32_t>();
        LocalTensor<int32_t> t1i = t1.template ReinterpretCast<int32_t>();
        LocalTensor<uint32_t> idxu = idx.template ReinterpretCast<uint32_t>();

        // idx = par + j; pair delta d = idx >> 1; lane = idx - 2 d (word 0 or 1)
        CreateVecIndex(idx, static_cast<int32_t>(par), n);
        PipeBarrier<PIPE_V>();
        ShiftRight(t1, idxu, static_cast<uint32_t>(1), n);
        PipeBarrier<PIPE_V>();
        ShiftLeft(t2, t1, static_cast<uint32_t>(1), n);
        PipeBarrier<PIPE_V>();
        Sub(lane, idx, t2.template ReinterpretCast<int32_t>(), n);
        // counter (c0, c1) = (bLo + d, bHi); x = c + k
        Adds(x0i, t1i, static_cast<int32_t>(bLo + k0_), n);
        Duplicate(x1i, static_cast<int32_t>(bHi + k1_), n);
        PipeBarrier<PIPE_V>();
        const uint32_t ks[3] = {k0_, k1_, k0_ ^ k1_ ^ THREEFRY_PARITY};
        for (uint32_t i = 0; i < THREEFRY_ROUNDS; ++i) {
            Add(x0i, x0i, x1i, n);                             // x0 += x1 (mod 2^32)
            PipeBarrier<PIPE_V>();
            RotlInPlace(x1, ThreefryRot(i), t1, t2, n);        // x1 = rotl(x1, R)
            XorInPlace(x1, x0, t1, t2, n);                     // x1 ^= x0
            if ((i & 3) == 3) {
                uint32_t s = (i + 1) >> 2;
                Adds(x0i, x0i, static_cast<int32_t>(ks[s % 3]), n);
                Adds(x1i, x1i, static_cast<int32_t>(ks[(s + 1) % 3] + s), n);
                PipeBarrier<PIPE_V>();
            }
        }
        // word = lane ? x1 : x0  ==  (x0 & ~m) | (x1 & m), m = -lane
        LocalTensor<int32_t> m = idx;     // idx no longer needed
        Duplicate(t1i, static_cast<int32_t>(0), n);
        PipeBarrier<PIPE_V>();
        Sub(m, t1i, lane, n);
        PipeBarrier<PIPE_V>();
        LocalTensor<uint16_t> m16 = m.template ReinterpretCast<uint16_t>();
        LocalTensor<uint16_t> x016 = x0.template ReinterpretCast<uint16_t>();
        LocalTensor<uint16_t> x116 = x1.template ReinterpretCast<uint16_t>();
        LocalTensor<uint16_t> t116 = t1.template ReinterpretCast<uint16_t>();
        And(x116, x116, m16, 2 * n);
        Not(t116, m16, 2 * n);
        PipeBarrier<PIPE_V>();
        And(x016, x016, t116, 2 * n);
        PipeBarrier<PIPE_V>();
        Or(x016, x016, x116, 2 * n);
        PipeBarrier<PIPE_V>();
        // u24 = word >> 8 (logical); keep = clamp(u24 - thr + 1, 0, 1)  (exact in float32)
        ShiftRight(t2, x0, static_cast<uint32_t>(8), n);
        PipeBarrier<PIPE_V>();
        LocalTensor<float> keep = keepBuf_.Get<float>();
        Cast(keep, t2.template ReinterpretCast<int32_t>(), RoundMode::CAST_NONE, n);
        PipeBarrier<PIPE_V>();
        Adds(keep, keep, oneMinusThr_, n);
        PipeBarrier<PIPE_V>();
        Maxs(keep, keep, 0.0f, n);
        PipeBarrier<PIPE_V>();
        Mins(keep, keep, 1.0f, n);
        PipeBarrier<PIPE_V>();
    }

    TQue<QuePosition::VECIN, BUFFER_NUM> inQ_;
    TQue<QuePosition::VECIN, BUFFER_NUM> in2Q_;
    TQue<QuePosition::VECOUT, BUFFER_NUM> outQ_;
    TBuf<QuePosition::VECCALC> f32Buf_;
    TBuf<QuePosition::VECCALC> keepBuf_;
    TBuf<QuePosition::VECCALC> idxBuf_;
    TBuf<QuePosition::VECCALC> laneBuf_;
    TBuf<QuePosition::VECCALC> x0Buf_;
    TBuf<QuePosition::VECCALC> x1Buf_;
    TBuf<QuePosition::VECCALC> t1Buf_;
    TBuf<QuePosition::VECCALC> t2Buf_;
    uint32_t vecMaxElems_ = 0;
    uint32_t rngLanes_ = 0;
    uint64_t inF_ = 0;
    float sEff_ = 1.0f;
    bool dropout_ = false;
    uint32_t k0_ = 0;
    uint32_t k1_ = 0;
    uint64_t offset_ = 0;
    uint32_t thr_ = 0;
    float oneMinusThr_ = 1.0f;
};

// Reads the three scalar tensors: scale (f32 [1]), dropout_p (f32 [1]), seed_offset (i64 [2]).
struct Scalars {
    float scale;
    float p;
    int64_t seed;
    int64_t offset;
    float sEff;    // scale / (1 - p), float32 (RNG.md, "Scaling")
};

__aicore__ inline Scalars ReadScalars(GM_ADDR scale, GM_ADDR dropoutP, GM_ADDR seedOffset)
{
    GlobalTensor<float> sGm;
    GlobalTensor<float> pGm;
    GlobalTensor<int64_t> soGm;
    sGm.SetGlobalBuffer(reinterpret_cast<__gm__ float *>(scale), 1);
    pGm.SetGlobalBuffer(reinterpret_cast<__gm__ float *>(dropoutP), 1);
    soGm.SetGlobalBuffer(reinterpret_cast<__gm__ int64_t *>(seedOffset), 2);
    Scalars s;
    s.scale = sGm.GetValue(0);
    s.p = pGm.GetValue(0);
    s.seed = soGm.GetValue(0);
    s.offset = soGm.GetValue(1);
    if (!(s.p > 0.0f)) {      // p <= 0 (or NaN): no dropout
        s.p = 0.0f;
    }
    s.sEff = s.scale / (1.0f - s.p);
    return s;
}

}  // namespace lora_fused_impl

#endif  // LORA_FUSED_COMMON_H
