/**
 * LoraFusedGrad backward kernel (no dW: the base weight is frozen). With s_eff = s / (1 - p),
 * xm = x * keep (keep regenerated from (seed, offset), RNG.md):
 *   dx = dy W + s_eff ((dy B) A) * keep
 *   dA = s_eff (dy B)^T xm               [r, in]
 *   dB = s_eff dy^T (xm A^T)             [out, r]
 * inputs: dy [N, out], x [N, in], weight [out, in], lora_a [r, in], lora_b [out, r],
 *         scale f32 [1], dropout_p f32 [1], seed_offset i64 [2]
 * outputs: dx [N, in], d_lora_a [r, in], d_lora_b [out, r]
 *
 * NOT YET COMPILED OR RUN ON ASCEND HARDWARE (see README). Mirrored step for step by
 * tiling.py::emulate_backward, which is tested on CPU.
 *
 * Phases (all vector cores, SyncAll between phases):
 *   0. zero the fp32 accumulators dA_acc [r, in], dB_acc [out, rankPad] (flat split)
 *   1. per worker, per row tile [r0, r0 + rows):
 *        xm (dropout only); T = xm A^T; G = dy B; Ts = dtype(s_eff T); Gs = dtype(s_eff G)
 *        per out chunk:  dB_acc[c, :r]  += dy[rows, c]^T Ts          (atomic)
 *        per in chunk:   dA_acc[:, c]   += Gs^T xm[rows, c]          (atomic)
 *        per in chunk:   acc = dy W[:, c];  L = Gs A[:, c] (into acc when p == 0)
 *                        dx[rows, c] = dtype(acc + keep * L)
 *   2. dA = dtype(dA_acc), dB = dtype(dB_acc[:, :r]) (rows split over workers)
 * The accumulation order of the atomic adds is not deterministic across runs.
 * KEEP IN SYNC with tiling.py (emulate_backward) and op_host/lora_fused_tiling_calc.h.
 */
#include "lora_fused_common.h"

namespace lora_fused_impl {

template <typename T>
class LoraFusedGradKernel {
public:
    using ATypeN = MatmulType<TPosition::GM, CubeFormat::ND, T, false>;
    using ATypeT = MatmulType<TPosition::GM, CubeFormat::ND, T, true>;
    using BTypeN = MatmulType<TPosition::GM, CubeFormat::ND, T, false>;
    using BTypeT = MatmulType<TPosition::GM, CubeFormat::ND, T, true>;
    using CType = MatmulType<TPosition::GM, CubeFormat::ND, float>;
    using BiasType = MatmulType<TPosition::GM, CubeFormat::ND, float>;
    Matmul<ATypeN, BTypeT, CType, BiasType> mmNT;   // xm A^T
    Matmul<ATypeN, BTypeN, CType, BiasType> mmNN;   // dy B, dy W, Gs A
    Matmul<ATypeT, BTypeN, CType, BiasType> mmTN;   // Gs^T xm, dy^T Ts

    __aicore__ inline LoraFusedGradKernel() {}

    template <class TilingT>
    __aicore__ inline void Init(GM_ADDR dy, GM_ADDR x, GM_ADDR weight, GM_ADDR loraA, GM_ADDR loraB,
                                GM_ADDR scale, GM_ADDR dropoutP, GM_ADDR seedOffset, GM_ADDR dx, GM_ADDR dA,
                                GM_ADDR dB, GM_ADDR userWs, const TilingT &td, TPipe *pipe)
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

        dyGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(dy), n_ * outF_);
        xGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(x), n_ * inF_);
        wGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(weight), outF_ * inF_);
        aGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(loraA), rank_ * inF_);
        bGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(loraB), outF_ * rank_);
        dxGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(dx), n_ * inF_);
        dAGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(dA), rank_ * inF_);
        dBGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(dB), outF_ * rank_);

        accAGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float *>(userWs + td.wsAccAOff), rank_ * inF_);
        accBGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float *>(userWs + td.wsAccBOff), outF_ * rankPad_);

        worker_ = GetBlockIdx();
        GM_ADDR base = userWs + td.wsSharedBytes + static_cast<uint64_t>(worker_) * td.wsPerWorkerBytes;
        xmGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(base + td.wsXmOff), tileN_ * inF_);
        t32Gm_.SetGlobalBuffer(reinterpret_cast<__gm__ float *>(base + td.wsT32Off), tileN_ * rankPad_);
        g32Gm_.SetGlobalBuffer(reinterpret_cast<__gm__ float *>(base + td.wsG32Off), tileN_ * rankPad_);
        tsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(base + td.wsTsOff), tileN_ * rankPad_);
        gsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(base + td.wsGsOff), tileN_ * rankPad_);
        accGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float *>(base + td.wsAccOff), tileN_ * td.accCols);
        lGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float *>(base + td.wsLOff), tileN_ * tileIn_);

        Scalars s = ReadScalars(scale, dropoutP, seedOffset);
        vec_.Init(pipe, td.vecMaxElems, tileIn_, inF_, s.p, s.seed, s.offset, s.sEff);
    }

    __aicore__ inline void Process()
    {
        const uint64_t fw = MaxU(usedWorkers_, 1);   // workers that zero / finalize
        // phase 0: zero the accumulators
        if (worker_ < fw) {
            uint64_t s;
            uint64_t e;
            FlatSplit(rank_ * inF_, fw, worker_, 8, s, e);
            if (e > s) {
                GlobalTensor<float> z = accAGm_[s];
                InitOutput<float>(z, static_cast<uint32_t>(e - s), 0.0f);
            }
            FlatSplit(outF_ * rankPad_, fw, worker_, 8, s, e);
            if (e > s) {
                GlobalTensor<float> z = accBGm_[s];
                InitOutput<float>(z, static_cast<uint32_t>(e - s), 0.0f);
            }
        }
        GmFence();
        SyncAll();
        // phase 1
        if (worker_ < usedWorkers_) {
            uint64_t rowStart;
            uint64_t rowEnd;
            WorkerRows(n_, rowsPerWorker_, worker_, rowStart, rowEnd);
            for (uint64_t r0 = rowStart; r0 < rowEnd; r0 += tileN_) {
                const uint32_t rows = static_cast<uint32_t>(MinU(tileN_, rowEnd - r0));
                ProcessTile(r0, rows);
            }
        }
        GmFence();
        SyncAll();
        // phase 2: cast the accumulators
        if (worker_ < fw) {
            uint64_t s;
            uint64_t e;
            SplitRows(rank_, fw, worker_, s, e);
            for (uint64_t c0 = 0; c0 < inF_; c0 += tileIn_) {
                const uint32_t cols = static_cast<uint32_t>(MinU(tileIn_, inF_ - c0));
                vec_.CastOut(accAGm_[s * inF_ + c0], inF_, dAGm_[s * inF_ + c0], inF_,
                             static_cast<uint32_t>(e - s), cols);
            }
            SplitRows(outF_, fw, worker_, s, e);
            vec_.CastOut(accBGm_[s * rankPad_], rankPad_, dBGm_[s * rank_], rank_, static_cast<uint32_t>(e - s),
                         static_cast<uint32_t>(rank_));
        }
        mmNT.End();
        mmNN.End();
        mmTN.End();
    }

private:
    __aicore__ inline void ProcessTile(uint64_t r0, uint32_t rows)
    {
        const uint32_t rank = static_cast<uint32_t>(rank_);
        const uint32_t inF = static_cast<uint32_t>(inF_);
        const uint32_t outF = static_cast<uint32_t>(outF_);
        GlobalTensor<T> xs = xGm_[r0 * inF_];
        if (vec_.Dropout()) {
            for (uint64_t c0 = 0; c0 < inF_; c0 += tileIn_) {
                const uint32_t cols = static_cast<uint32_t>(MinU(tileIn_, inF_ - c0));
                vec_.MaskBlock(xGm_, xmGm_, r0, rows, c0, cols);
            }
            xs = xmGm_;
        }
        GmFence();
        GlobalTensor<T> dyRows = dyGm_[r0 * outF_];
        // T = xm A^T, G = dy B   [rows, rank] (ld rankPad)
        Gemm(mmNT, t32Gm_, rankPad_, xs, inF_, false, aGm_, inF_, true, rows, rank, inF, false);
        Gemm(mmNN, g32Gm_, rankPad_, dyRows, outF_, false, bGm_, rank_, false, rows, rank, outF, false);
        GmFence();
        vec_.ScaleCast(t32Gm_, tsGm_, static_cast<uint64_t>(rows) * rankPad_);
        vec_.ScaleCast(g32Gm_, gsGm_, static_cast<uint64_t>(rows) * rankPad_);
        GmFence();
        // dB_acc[c0 : c0 + cols, :rank] += dy[rows, c]^T Ts
        for (uint64_t c0 = 0; c0 < outF_; c0 += tileOut_) {
            const uint32_t cols = static_cast<uint32_t>(MinU(tileOut_, outF_ - c0));
            Gemm(mmTN, accBGm_[c0 * rankPad_], rankPad_, dyGm_[r0 * outF_ + c0], outF_, true, tsGm_, rankPad_, false,
                 cols, rank, rows, true);
        }
        // dA_acc[:, c0 : c0 + cols] += Gs^T xm[rows, c]
        for (uint64_t c0 = 0; c0 < inF_; c0 += tileIn_) {
            const uint32_t cols = static_cast<uint32_t>(MinU(tileIn_, inF_ - c0));
            Gemm(mmTN, accAGm_[c0], inF_, gsGm_, rankPad_, true, xs[c0], inF_, false, rank, cols, rows, true);
        }
        // dx[rows, c] = dtype(dy W[:, c] + keep * (Gs A[:, c]))
        for (uint64_t c0 = 0; c0 < inF_; c0 += tileIn_) {
            const uint32_t cols = static_cast<uint32_t>(MinU(tileIn_, inF_ - c0));
            Gemm(mmNN, accGm_, tileIn_, dyRows, outF_, false, wGm_[c0], inF_, false, rows, cols, outF, false);
            if (!vec_.Dropout()) {
                Gemm(mmNN, accGm_, tileIn_, gsGm_, rankPad_, false, aGm_[c0], inF_, false, rows, cols, rank, true);
                GmFence();
                vec_.CastOut(accGm_, tileIn_, dxGm_[r0 * inF_ + c0], inF_, rows, cols);
            } else {
                Gemm(mmNN, lGm_, tileIn_, gsGm_, rankPad_, false, aGm_[c0], inF_, false, rows, cols, rank, false);
                GmFence();
                vec_.CastOut(accGm_, tileIn_, dxGm_[r0 * inF_ + c0], inF_, rows, cols, true, &lGm_, tileIn_, true,
                             r0, c0);
            }
            GmFence();
        }
    }

    GlobalTensor<T> dyGm_;
    GlobalTensor<T> xGm_;
    GlobalTensor<T> wGm_;
    GlobalTensor<T> aGm_;
    GlobalTensor<T> bGm_;
    GlobalTensor<T> dxGm_;
    GlobalTensor<T> dAGm_;
    GlobalTensor<T> dBGm_;
    GlobalTensor<float> accAGm_;
    GlobalTensor<float> accBGm_;
    GlobalTensor<T> xmGm_;
    GlobalTensor<float> t32Gm_;
    GlobalTensor<float> g32Gm_;
    GlobalTensor<T> tsGm_;
    GlobalTensor<T> gsGm_;
    GlobalTensor<float> accGm_;
    GlobalTensor<float> lGm_;
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

extern "C" __global__ __aicore__ void lora_fused_grad(GM_ADDR dy, GM_ADDR x, GM_ADDR weight, GM_ADDR lora_a,
                                                      GM_ADDR lora_b, GM_ADDR scale, GM_ADDR dropout_p,
                                                      GM_ADDR seed_offset, GM_ADDR dx, GM_ADDR d_lora_a,
                                                      GM_ADDR d_lora_b, GM_ADDR workspace, GM_ADDR tiling)
{
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
    GET_TILING_DATA(tilingData, tiling);
    GM_ADDR userWs = AscendC::GetUserWorkspace(workspace);
    AscendC::TPipe pipe;
    lora_fused_impl::LoraFusedGradKernel<DTYPE_X> op;
    REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mmNT, &tilingData.mmNT, op.mmNN, &tilingData.mmNN, op.mmTN,
                      &tilingData.mmTN);
    if ASCEND_IS_AIC {
        return;
    }
    op.Init(dy, x, weight, lora_a, lora_b, scale, dropout_p, seed_offset, dx, d_lora_a, d_lora_b, userWs,
            tilingData, &pipe);
    op.Process();
}
