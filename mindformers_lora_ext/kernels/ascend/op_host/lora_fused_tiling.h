/**
 * Tiling data of the LoraFused / LoraFusedGrad custom ops (host <-> kernel contract).
 *
 * The arithmetic that fills it lives in lora_fused_tiling_calc.h (plain C++), which is
 * KEPT IN SYNC with mindformers_lora_ext/kernels/ascend/tiling.py; the constants below
 * are re-exported from there so that there is one copy of each number.
 * The kernels (op_kernel/lora_fused*.cpp) read these fields by name through GET_TILING_DATA.
 */
#ifndef LORA_FUSED_TILING_H
#define LORA_FUSED_TILING_H

#include "register/tilingdata_base.h"
#include "tiling/tiling_api.h"
#include "lora_fused_tiling_calc.h"

namespace optiling {
BEGIN_TILING_DATA_DEF(LoraFusedTilingData)
    TILING_DATA_FIELD_DEF(uint64_t, n);
    TILING_DATA_FIELD_DEF(uint64_t, inF);
    TILING_DATA_FIELD_DEF(uint64_t, outF);
    TILING_DATA_FIELD_DEF(uint64_t, rank);
    TILING_DATA_FIELD_DEF(uint64_t, rankPad);
    TILING_DATA_FIELD_DEF(uint64_t, rowsPerWorker);
    TILING_DATA_FIELD_DEF(uint32_t, usedWorkers);
    TILING_DATA_FIELD_DEF(uint32_t, tileN);
    TILING_DATA_FIELD_DEF(uint32_t, tileOut);
    TILING_DATA_FIELD_DEF(uint32_t, tileIn);
    TILING_DATA_FIELD_DEF(uint32_t, vecMaxElems);
    TILING_DATA_FIELD_DEF(uint32_t, colAlign);
    TILING_DATA_FIELD_DEF(uint64_t, wsAccAOff);
    TILING_DATA_FIELD_DEF(uint64_t, wsAccBOff);
    TILING_DATA_FIELD_DEF(uint64_t, wsSharedBytes);
    TILING_DATA_FIELD_DEF(uint64_t, wsXmOff);
    TILING_DATA_FIELD_DEF(uint64_t, wsT32Off);
    TILING_DATA_FIELD_DEF(uint64_t, wsG32Off);
    TILING_DATA_FIELD_DEF(uint64_t, wsTsOff);
    TILING_DATA_FIELD_DEF(uint64_t, wsGsOff);
    TILING_DATA_FIELD_DEF(uint64_t, wsAccOff);
    TILING_DATA_FIELD_DEF(uint64_t, wsLOff);
    TILING_DATA_FIELD_DEF(uint64_t, accCols);
    TILING_DATA_FIELD_DEF(uint64_t, wsPerWorkerBytes);
    // Matmul high-level API tilings, one per (transA, transB) combination in use:
    //   mmNT: A [M,K] x B^T (B stored [N,K])      fwd: shrink, base, expand; grad: shrink
    //   mmNN: A [M,K] x B   (B stored [K,N])      grad: dy B, dy W, Gs A
    //   mmTN: A^T (A stored [K,M]) x B [K,N]      grad: Gs^T xm (dA), dy^T Ts (dB)
    TILING_DATA_FIELD_DEF_STRUCT(TCubeTiling, mmNT);
    TILING_DATA_FIELD_DEF_STRUCT(TCubeTiling, mmNN);
    TILING_DATA_FIELD_DEF_STRUCT(TCubeTiling, mmTN);
END_TILING_DATA_DEF;

REGISTER_TILING_DATA_CLASS(LoraFused, LoraFusedTilingData)
REGISTER_TILING_DATA_CLASS(LoraFusedGrad, LoraFusedTilingData)
}  // namespace optiling

#endif  // LORA_FUSED_TILING_H
