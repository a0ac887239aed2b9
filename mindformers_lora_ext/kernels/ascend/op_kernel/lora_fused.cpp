/**
 * LoraFused forward kernel:  y = x W^T + s_eff * ((x * keep) A^T) B^T,  s_eff = s / (1 - p)
 *   x [N, in], weight W [out, in], lora_a A [r, in], lora_b B [out, r], scale s f32 [1],
 *   dropout_p f32 [1], seed_offset i64 [2] (RNG.md), y [N, out].
 *
 * NOT YET COMPILED OR RUN ON ASCEND HARDWARE (see README). The loop structure is
 * mirrored step for step by tiling.py::emulate_forward, which is tested on CPU.
 *
 * Per worker (vector core) and row tile [r0, r0 + rows):
 *   1. dropout only: xm = x * keep  (vector, RNG regenerated from (seed, offset))
 *   2. T  = xm A^T            GEMM [rows, r], K = in          -> ws t32 (fp32, ld rankPad)
 *   3. Ts = dtype(s_eff T)    vector                          -> ws ts
 *   4. per out chunk c (tileOut columns, tail last):
 *        acc  = x W[c]^T      GEMM [rows, cols], K = in       -> ws acc (fp32; y itself if fp32)
 *        acc += Ts B[c]^T     GEMM K = r, atomic add (the LoRA term as an extra K segment)
 *        y[rows, c] = dtype(acc)   vector epilogue (skipped for fp32)
 * KEEP IN SYNC with tiling.py (emulate_forward) and op_host/lora_fused_tiling_calc.h.
 */
#include "lora_fused_common.h"

namespace lora_fused_impl {

template <typename T>
class LoraFusedKernel {
public:
    using ATypeN = MatmulType<TPosition::GM, CubeFormat::ND, T, false>;
    using BTypeT = MatmulType<TPosition::GM, CubeFormat::ND, T, true>;
    using CType = MatmulType<TPosition::GM, CubeFormat::ND, float>;
    using BiasType = MatmulType<TPosition::GM, CubeFormat::ND, float>;
    Matmul<ATypeN, BTypeT, CType, BiasType> mmNT;

    __aicore__ inline LoraFusedKernel() {}

    template <class TilingT>
    __aicore__ inline void Init(GM_ADDR x, GM_ADDR weight, GM_ADDR loraA, GM_ADDR loraB, GM_ADDR scale,
                                GM_ADDR dropoutP, GM_ADDR seedOffset, GM_ADDR y, GM_ADDR userWs,
                                const TilingT &td, TPipe *pipe)
    {
        n_ = td.n;
        inF_ = td.inF;
        outF_ = td.outF;
        rank_ = td.rank;
        rankPad_ = td.rankPad;
        rowsPerWorker_ = td.rowsPerWorker;
        usedWorkers_ = td.usedWorkers;
        tileN_ = td.tileN;
        tileOut_ = td.tileOut;
        tileIn_ = td.tileIn;

        xGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(x), n_ * inF_);
        wGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(weight), outF_ * inF_);
        aGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(loraA), rank_ * inF_);
        bGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(loraB), outF_ * rank_);
        yGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(y), n_ * outF_);
        yF32Gm_.SetGlobalBuffer(reinterpret_cast<__gm__ float *>(y), n_ * outF_);   // used when T == float

        worker_ = GetBlockIdx();   // vector core index
        GM_ADDR base = userWs + td.wsSharedBytes + static_cast<uint64_t>(worker_) * td.wsPerWorkerBytes;
        xmGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(base + td.wsXmOff), tileN_ * inF_);
        t32Gm_.SetGlobalBuffer(reinterpret_cast<__gm__ float *>(base + td.wsT32Off), tileN_ * rankPad_);
        tsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(base + td.wsTsOff), tileN_ * rankPad_);
        accGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float *>(base + td.wsAccOff), tileN_ * td.accCols);

        Scalars s = ReadScalars(scale, dropoutP, seedOffset);
        vec_.Init(pipe, td.vecMaxElems, tileIn_, inF_, s.p, s.seed, s.offset, s.sEff);
    }

    __aicore__ inline void Process()
    {
        if (worker_ < usedWorkers_) {
            uint64_t rowStart;
            uint64_t rowEnd;
            WorkerRows(n_, rowsPerWorker_, worker_, rowStart, rowEnd);
            for (uint64_t r0 = rowStart; r0 < rowEnd; r0 += tileN_) {
                const uint32_t rows = static_cast<uint32_t>(MinU(tileN_, rowEnd - r0));
                ProcessTile(r0, rows);
            }
        }
        mmNT.End();   // idle workers too, so that the cube core's service loop ends
    }

private:
    __aicore__ inline void ProcessTile(uint64_t r0, uint32_t rows)
    {
        // 1. x * keep -> xm (dropout only); the GEMM below reads xm or x
        GlobalTensor<T> xs = xGm_[r0 * inF_];
        if (vec_.Dropout()) {
            for (uint64_t c0 = 0; c0 < inF_; c0 += tileIn_) {
                const uint32_t cols = static_cast<uint32_t>(MinU(tileIn_, inF_ - c0));
                vec_.MaskBlock(xGm_, xmGm_, r0, rows, c0, cols);
            }
            xs = xmGm_;
        }
        GmFence();
        // 2. T = xs A^T  [rows, rank] (ld rankPad)
        Gemm(mmNT, t32Gm_, rankPad_, xs, inF_, false, aGm_, inF_, true, rows, static_cast<uint32_t>(rank_),
             static_cast<uint32_t>(inF_), false);
        GmFence();
        // 3. Ts = dtype(s_eff * T)
        vec_.ScaleCast(t32Gm_, tsGm_, static_cast<uint64_t>(rows) * rankPad_);
        GmFence();
        // 4. out chunks
        for (uint64_t c0 = 0; c0 < outF_; c0 += tileOut_) {
            const uint32_t cols = static_cast<uint32_t>(MinU(tileOut_, outF_ - c0));
            if constexpr (IsSameType<T, float>::value) {
                GlobalTensor<float> c = yF32Gm_[r0 * outF_ + c0];
                Gemm(mmNT, c, outF_, xGm_[r0 * inF_], inF_, false, wGm_[c0 * inF_], inF_, true, rows, cols,
                     static_cast<uint32_t>(inF_), false);
                Gemm(mmNT, c, outF_, tsGm_, rankPad_, false, bGm_[c0 * rank_], rank_, true, rows, cols,
                     static_cast<uint32_t>(rank_), true);
            } else {
                Gemm(mmNT, accGm_, tileOut_, xGm_[r0 * inF_], inF_, false, wGm_[c0 * inF_], inF_, true, rows,
                     cols, static_cast<uint32_t>(inF_), false);
                Gemm(mmNT, accGm_, tileOut_, tsGm_, rankPad_, false, bGm_[c0 * rank_], rank_, true, rows, cols,
                     static_cast<uint32_t>(rank_), true);
                GmFence();
                vec_.CastOut(accGm_, tileOut_, yGm_[r0 * outF_ + c0], outF_, rows, cols);
                GmFence();
            }
        }
    }

    GlobalTensor<T> xGm_;
    GlobalTensor<T> wGm_;
    GlobalTensor<T> aGm_;
    GlobalTensor<T> bGm_;
    GlobalTensor<T> yGm_;
    GlobalTensor<float> yF32Gm_;
    GlobalTensor<T> xmGm_;
    GlobalTensor<float> t32Gm_;
    GlobalTensor<T> tsGm_;
    GlobalTensor<float> accGm_;
    VecTools<T> vec_;
    uint64_t n_ = 0;
    uint64_t inF_ = 0;
    uint64_t outF_ = 0;
    uint64_t rank_ = 0;
    uint64_t rankPad_ = 0;
    uint64_t rowsPerWorker_ = 0;
    uint32_t usedWorkers_ = 0;
    uint32_t tileN_ = 0;
    uint32_t tileOut_ = 0;
    uint32_t tileIn_ = 0;
    uint32_t worker_ = 0;
};

}  // namespace lora_fused_impl

extern "C" __global__ __aicore__ void lora_fused(GM_ADDR x, GM_ADDR weight, GM_ADDR lora_a, GM_ADDR lora_b,
                                                 GM_ADDR scale, GM_ADDR dropout_p, GM_ADDR seed_offset, GM_ADDR y,
                                                 GM_ADDR workspace, GM_ADDR tiling)
{
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
    GET_TILING_DATA(tilingData, tiling);
    GM_ADDR userWs = AscendC::GetUserWorkspace(workspace);
    AscendC::TPipe pipe;
    lora_fused_impl::LoraFusedKernel<DTYPE_X> op;
    // On the cube core this serves the vector cores' Matmul requests until they End().
    REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mmNT, &tilingData.mmNT);
    if ASCEND_IS_AIC {
        return;
    }
    op.Init(x, weight, lora_a, lora_b, scale, dropout_p, seed_offset, y, userWs, tilingData, &pipe);
    op.Process();
}
