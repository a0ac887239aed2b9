/**
 * Tiling arithmetic of LoraFused / LoraFusedGrad: plain C++, no CANN header.
 *
 * KEEP IN SYNC with mindformers_lora_ext/kernels/ascend/tiling.py (compute_tiling):
 * the same constants, the same integer arithmetic, the same field names.
 * tests/test_ascend_kernel.py parses the constants below and, when a C++ compiler is
 * present, compiles this header and compares every field with tiling.py.
 *
 * Decomposition (see tiling.py for the picture):
 *  - workers = AIV cores (MIX 1:2: two vector cores per cube core). Rows of x are split
 *    into contiguous per-worker ranges of rowsPerWorker rows (a multiple of ROW_ALIGN);
 *    the last used worker may get fewer rows, workers past usedWorkers get none.
 *  - inside a worker: row tiles of tileN rows (last one may be a tail);
 *    column chunks of tileOut (over out) and tileIn (over in), last one may be a tail.
 *  - the rank is padded to rankPad (multiple of RANK_ALIGN) only as the row stride of
 *    the rank-sized workspaces, so that vector copies are 32-byte aligned; the GEMMs use
 *    K = rank / N = rank, padded columns are never read.
 */
#ifndef LORA_FUSED_TILING_CALC_H
#define LORA_FUSED_TILING_CALC_H

#include <cstdint>

namespace lora_fused_calc {

// ---- constants (parsed by tests/test_ascend_kernel.py; keep one per line) ----
constexpr uint32_t ROW_ALIGN = 16;        // rows per worker are a multiple of this (cube M fractal)
constexpr uint32_t RANK_ALIGN = 16;       // rank padding of workspace rows (cube fractal, 32 B in fp16)
constexpr uint32_t COL_ALIGN = 16;        // column chunk alignment
constexpr uint32_t TILE_N_MAX = 128;      // rows per tile
constexpr uint32_t TILE_OUT_MAX = 512;    // out-columns per chunk (forward y, backward dB)
constexpr uint32_t TILE_IN_MAX = 512;     // in-columns per chunk (x mask, backward dx / dA)
constexpr uint32_t VEC_MAX_ELEMS = 2048;  // elements per vector (UB) block, fp32
constexpr uint32_t WS_ALIGN = 512;        // workspace section alignment, bytes
constexpr uint32_t FP32_BYTES = 4;
constexpr uint64_t MAX_DIM = 2147483647;  // in/out/rank/N must fit int32 (GEMM shape fields)

struct Params {
    uint64_t n;           // rows of x (product of all dims but the last)
    uint64_t inF;         // in_features
    uint64_t outF;        // out_features
    uint64_t rank;        // LoRA rank
    uint32_t workerNum;   // vector cores available (2 x cube cores on MIX 1:2 parts)
    uint32_t dtypeBytes;  // 2 (float16/bfloat16) or 4 (float32)
    uint32_t isGrad;      // 0: LoraFused, 1: LoraFusedGrad
};

struct Result {
    uint64_t n, inF, outF, rank, rankPad;
    uint32_t workerNum, usedWorkers, blockDim;
    uint64_t rowsPerWorker;
    uint32_t tileN, tileOut, tileIn, vecMaxElems, dtypeBytes, isGrad;
    // user workspace layout, bytes. Shared section first, then usedWorkers copies of
    // the per-worker section.
    uint64_t wsAccAOff;         // grad: dA accumulator, fp32 [rank, inF]
    uint64_t wsAccBOff;         // grad: dB accumulator, fp32 [outF, rankPad]
    uint64_t wsSharedBytes;
    uint64_t wsXmOff;           // masked x tile, dtype [tileN, inF]
    uint64_t wsT32Off;          // (x*keep) A^T, fp32 [tileN, rankPad]
    uint64_t wsG32Off;          // grad: dy B, fp32 [tileN, rankPad]
    uint64_t wsTsOff;           // s_eff * T rounded to dtype [tileN, rankPad]
    uint64_t wsGsOff;           // grad: s_eff * G rounded to dtype [tileN, rankPad]
    uint64_t wsAccOff;          // fp32 [tileN, accCols]: y chunk (fwd) / dy W chunk (grad)
    uint64_t wsLOff;            // grad: fp32 [tileN, tileIn], Gs A chunk (dropout only)
    uint64_t accCols;           // row stride of the acc section (tileOut fwd, tileIn grad)
    uint64_t wsPerWorkerBytes;
    uint64_t wsUserBytes;       // total user workspace
};

inline uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
inline uint64_t AlignUp(uint64_t a, uint64_t b) { return CeilDiv(a, b) * b; }
inline uint64_t Min64(uint64_t a, uint64_t b) { return a < b ? a : b; }
inline uint64_t Max64(uint64_t a, uint64_t b) { return a > b ? a : b; }

// Returns 0 on success, a negative code on invalid input.
inline int ComputeTiling(const Params &p, Result *r)
{
    if (p.inF == 0 || p.outF == 0 || p.rank == 0 || p.workerNum == 0) {
        return -1;
    }
    if (p.dtypeBytes != 2 && p.dtypeBytes != 4) {
        return -2;
    }
    if (p.n > MAX_DIM || p.inF > MAX_DIM || p.outF > MAX_DIM || p.rank > MAX_DIM) {
        return -3;
    }
    r->n = p.n;
    r->inF = p.inF;
    r->outF = p.outF;
    r->rank = p.rank;
    r->rankPad = AlignUp(p.rank, RANK_ALIGN);
    r->workerNum = p.workerNum;
    r->dtypeBytes = p.dtypeBytes;
    r->isGrad = p.isGrad ? 1 : 0;
    r->vecMaxElems = VEC_MAX_ELEMS;

    // rows: contiguous per-worker ranges, multiples of ROW_ALIGN
    uint64_t rpw = AlignUp(Max64(CeilDiv(p.n, p.workerNum), 1), ROW_ALIGN);
    r->rowsPerWorker = rpw;
    r->usedWorkers = static_cast<uint32_t>(CeilDiv(p.n, rpw));  // 0 when n == 0
    // MIX 1:2: one block = one cube core + two vector cores; launch at least one block
    r->blockDim = static_cast<uint32_t>(Max64(CeilDiv(r->usedWorkers, 2), 1));
    r->tileN = static_cast<uint32_t>(Min64(TILE_N_MAX, rpw));
    r->tileOut = static_cast<uint32_t>(Min64(TILE_OUT_MAX, AlignUp(p.outF, COL_ALIGN)));
    r->tileIn = static_cast<uint32_t>(Min64(TILE_IN_MAX, AlignUp(p.inF, COL_ALIGN)));

    // workspace
    const uint64_t g = r->isGrad;
    uint64_t off = 0;
    r->wsAccAOff = off;
    off += AlignUp(g * p.rank * p.inF * FP32_BYTES, WS_ALIGN);
    r->wsAccBOff = off;
    off += AlignUp(g * p.outF * r->rankPad * FP32_BYTES, WS_ALIGN);
    r->wsSharedBytes = off;

    const uint64_t tn = r->tileN;
    r->accCols = g ? r->tileIn : r->tileOut;
    off = 0;
    r->wsXmOff = off;
    off += AlignUp(tn * p.inF * p.dtypeBytes, WS_ALIGN);
    r->wsT32Off = off;
    off += AlignUp(tn * r->rankPad * FP32_BYTES, WS_ALIGN);
    r->wsG32Off = off;
    off += AlignUp(g * tn * r->rankPad * FP32_BYTES, WS_ALIGN);
    r->wsTsOff = off;
    off += AlignUp(tn * r->rankPad * p.dtypeBytes, WS_ALIGN);
    r->wsGsOff = off;
    off += AlignUp(g * tn * r->rankPad * p.dtypeBytes, WS_ALIGN);
    r->wsAccOff = off;
    off += AlignUp(tn * r->accCols * FP32_BYTES, WS_ALIGN);
    r->wsLOff = off;
    off += AlignUp(g * tn * r->tileIn * FP32_BYTES, WS_ALIGN);
    r->wsPerWorkerBytes = off;
    r->wsUserBytes = r->wsSharedBytes + static_cast<uint64_t>(r->usedWorkers) * r->wsPerWorkerBytes;
    return 0;
}

}  // namespace lora_fused_calc

#endif  // LORA_FUSED_TILING_CALC_H
