// STUB for a host-side 'g++ -fsyntax-only' check of ../op_host and ../op_kernel (see ../stub_check/README.md).
// NOT the CANN header of the same name; never used by the real build (build.sh).
#pragma once
#include "register/tilingdata_base.h"
#include "tiling/platform/platform_ascendc.h"
namespace optiling {
BEGIN_TILING_DATA_DEF(TCubeTiling)
TILING_DATA_FIELD_DEF(int32_t, M);
END_TILING_DATA_DEF;
}
namespace matmul_tiling {
enum class TPosition { GM, VECIN };
enum class CubeFormat { ND, NZ };
enum class DataType { DT_FLOAT16, DT_BF16, DT_FLOAT };
class MatmulApiTiling {
public:
    explicit MatmulApiTiling(const platform_ascendc::PlatformAscendC &p) { (void)p; }
    int32_t SetAType(TPosition, CubeFormat, DataType, bool isTrans = false) { return 0; }
    int32_t SetBType(TPosition, CubeFormat, DataType, bool isTrans = false) { return 0; }
    int32_t SetCType(TPosition, CubeFormat, DataType) { return 0; }
    int32_t SetShape(int32_t, int32_t, int32_t) { return 0; }
    int32_t SetOrgShape(int32_t, int32_t, int32_t) { return 0; }
    int32_t SetBias(bool) { return 0; }
    int32_t SetBufferSpace(int32_t, int32_t, int32_t) { return 0; }
    int64_t GetTiling(optiling::TCubeTiling &t) { (void)t; return 0; }
};
}
