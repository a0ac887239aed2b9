/**
 * Host side of the LoraFused / LoraFusedGrad custom ops: op registration (OpDef),
 * shape / dtype inference and the tiling function.
 *
 * NOT YET BUILT WITH CANN OR RUN ON ASCEND HARDWARE (see README).
 *
 * Op names: the OpDef type "LoraFused" yields the aclnn entry points
 * aclnnLoraFusedGetWorkspaceSize / aclnnLoraFused that MindSpore calls for
 * ops.Custom("aclnnLoraFused", func_type="aot", reg_info=CustomRegOp("aclnnLoraFused")...);
 * likewise "LoraFusedGrad". Input / output names and order here MUST equal the
 * CustomRegOp in mindformers_lora_ext/kernels/ascend/__init__.py and lora_fused.json
 * (tests/test_ascend_kernel.py checks all three).
 *
 * The tiling arithmetic is lora_fused_tiling_calc.h, KEPT IN SYNC with tiling.py.
 */
#include <cstdint>
#include <vector>

#include "lora_fused_tiling.h"
#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"
#include "tiling/tiling_api.h"

namespace {
// input indices
constexpr size_t FWD_X = 0;          // LoraFused: x, weight, lora_a, lora_b, scale, dropout_p, seed_offset
constexpr size_t GRAD_DY = 0;        // LoraFusedGrad: dy, then the forward inputs
constexpr size_t GRAD_X = 1;
constexpr size_t OFF_WEIGHT = 1;     // relative to x
constexpr size_t OFF_LORA_A = 2;
constexpr size_t OFF_LORA_B = 3;
}  // namespace

namespace optiling {

static bool ToMatmulType(ge::DataType dt, matmul_tiling::DataType &out, uint32_t &bytes)
{
    switch (dt) {
        case ge::DT_FLOAT16:
            out = matmul_tiling::DataType::DT_FLOAT16;
            bytes = 2;
            return true;
        case ge::DT_BF16:
            out = matmul_tiling::DataType::DT_BF16;
            bytes = 2;
            return true;
        case ge::DT_FLOAT:
            out = matmul_tiling::DataType::DT_FLOAT;
            bytes = 4;
            return true;
        default:
            return false;
    }
}

// Single-core Matmul API tiling for one (transA, transB) combination. Each vector core
// issues its own GEMMs with SetOrgShape / SetSingleShape / SetTail, so the tiling is
// computed once for the largest shape of that combination.
static bool MakeMatmulTiling(const platform_ascendc::PlatformAscendC &plat, matmul_tiling::DataType dt, bool transA,
                             bool transB, int32_t m, int32_t n, int32_t k, TCubeTiling &out)
{
    matmul_tiling::MatmulApiTiling mm(plat);
    mm.SetAType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt, transA);
    mm.SetBType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt, transB);
    mm.SetCType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, matmul_tiling::DataType::DT_FLOAT);
    mm.SetShape(m, n, k);
    mm.SetOrgShape(m, n, k);
    mm.SetBias(false);
    mm.SetBufferSpace(-1, -1, -1);
    return mm.GetTiling(out) != -1;
}

static int32_t I32(uint64_t v) { return static_cast<int32_t>(v); }

template <bool IS_GRAD>
static ge::graphStatus LoraFusedTilingFunc(gert::TilingContext *context)
{
    const size_t xi = IS_GRAD ? GRAD_X : FWD_X;
    const gert::StorageShape *xs = context->GetInputShape(xi);
    const gert::StorageShape *ws = context->GetInputShape(xi + OFF_WEIGHT);
    const gert::StorageShape *as = context->GetInputShape(xi + OFF_LORA_A);
    const gert::StorageShape *bs = context->GetInputShape(xi + OFF_LORA_B);
    if (xs == nullptr || ws == nullptr || as == nullptr || bs == nullptr) {
        return ge::GRAPH_FAILED;
    }
    const gert::Shape &x = xs->GetStorageShape();
    const gert::Shape &w = ws->GetStorageShape();
    const gert::Shape &a = as->GetStorageShape();
    const gert::Shape &b = bs->GetStorageShape();
    const size_t xd = x.GetDimNum();
    if (xd < 2 || w.GetDimNum() != 2 || a.GetDimNum() != 2 || b.GetDimNum() != 2) {
        return ge::GRAPH_FAILED;
    }
    uint64_t n = 1;
    for (size_t i = 0; i + 1 < xd; ++i) {
        n *= static_cast<uint64_t>(x.GetDim(i));
    }
    const uint64_t inF = static_cast<uint64_t>(x.GetDim(xd - 1));
    const uint64_t outF = static_cast<uint64_t>(w.GetDim(0));
    const uint64_t rank = static_cast<uint64_t>(a.GetDim(0));
    if (static_cast<uint64_t>(w.GetDim(1)) != inF || static_cast<uint64_t>(a.GetDim(1)) != inF ||
        static_cast<uint64_t>(b.GetDim(0)) != outF || static_cast<uint64_t>(b.GetDim(1)) != rank) {
        return ge::GRAPH_FAILED;
    }
    if (IS_GRAD) {
        const gert::StorageShape *dys = context->GetInputShape(GRAD_DY);
        if (dys == nullptr || static_cast<uint64_t>(dys->GetStorageShape().GetShapeSize()) != n * outF) {
            return ge::GRAPH_FAILED;
        }
    }
    matmul_tiling::DataType mmType;
    uint32_t dtypeBytes = 0;
    if (!ToMatmulType(context->GetInputDesc(xi)->GetDataType(), mmType, dtypeBytes)) {
        return ge::GRAPH_FAILED;
    }

    auto plat = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
    lora_fused_calc::Params p{n, inF, outF, rank, plat.GetCoreNumAiv(), dtypeBytes, IS_GRAD ? 1u : 0u};
    lora_fused_calc::Result r{};
    if (lora_fused_calc::ComputeTiling(p, &r) != 0) {
        return ge::GRAPH_FAILED;
    }

    LoraFusedTilingData td;
    td.set_n(r.n);
    td.set_inF(r.inF);
    td.set_outF(r.outF);
    td.set_rank(r.rank);
    td.set_rankPad(r.rankPad);
    td.set_rowsPerWorker(r.rowsPerWorker);
    td.set_usedWorkers(r.usedWorkers);
    td.set_tileN(r.tileN);
    td.set_tileOut(r.tileOut);
    td.set_tileIn(r.tileIn);
    td.set_vecMaxElems(r.vecMaxElems);
    td.set_colAlign(lora_fused_calc::COL_ALIGN);
    td.set_wsAccAOff(r.wsAccAOff);
    td.set_wsAccBOff(r.wsAccBOff);
    td.set_wsSharedBytes(r.wsSharedBytes);
    td.set_wsXmOff(r.wsXmOff);
    td.set_wsT32Off(r.wsT32Off);
    td.set_wsG32Off(r.wsG32Off);
    td.set_wsTsOff(r.wsTsOff);
    td.set_wsGsOff(r.wsGsOff);
    td.set_wsAccOff(r.wsAccOff);
    td.set_wsLOff(r.wsLOff);
    td.set_accCols(r.accCols);
    td.set_wsPerWorkerBytes(r.wsPerWorkerBytes);

    // Matmul tilings for the largest GEMM of each (transA, transB) combination
    const uint64_t tn = r.tileN;
    bool ok;
    if (!IS_GRAD) {
        // shrink [tn, rank] K=in; base [tn, tileOut] K=in; expand [tn, tileOut] K=rank
        ok = MakeMatmulTiling(plat, mmType, false, true, I32(tn), I32(lora_fused_calc::Max64(rank, r.tileOut)),
                              I32(lora_fused_calc::Max64(inF, rank)), td.mmNT);
        // mmNN / mmTN stay zero: the forward kernel registers mmNT only
    } else {
        // NT: shrink [tn, rank] K=in
        ok = MakeMatmulTiling(plat, mmType, false, true, I32(tn), I32(rank), I32(inF), td.mmNT);
        // NN: dy B [tn, rank] K=out; dy W [tn, tileIn] K=out; Gs A [tn, tileIn] K=rank
        ok = ok && MakeMatmulTiling(plat, mmType, false, false, I32(tn), I32(lora_fused_calc::Max64(rank, r.tileIn)),
                                    I32(lora_fused_calc::Max64(outF, rank)), td.mmNN);
        // TN: dy^T Ts [tileOut, rank] K=tn; Gs^T xm [rank, tileIn] K=tn
        ok = ok && MakeMatmulTiling(plat, mmType, true, false, I32(lora_fused_calc::Max64(rank, r.tileOut)),
                                    I32(lora_fused_calc::Max64(rank, r.tileIn)), I32(tn), td.mmTN);
    }
    if (!ok) {
        return ge::GRAPH_FAILED;
    }

    context->SetBlockDim(r.blockDim);   // cube cores; each drives two vector-core workers (MIX 1:2)
    td.SaveToBuffer(context->GetRawTilingData()->GetData(), context->GetRawTilingData()->GetCapacity());
    context->GetRawTilingData()->SetDataSize(td.GetDataSize());
    size_t *workspaces = context->GetWorkspaceSizes(1);
    workspaces[0] = static_cast<size_t>(plat.GetLibApiWorkSpaceSize()) + static_cast<size_t>(r.wsUserBytes);
    return ge::GRAPH_SUCCESS;
}

}  // namespace optiling

namespace ge {

static graphStatus LoraFusedInferShape(gert::InferShapeContext *context)
{
    const gert::Shape *x = context->GetInputShape(0);
    const gert::Shape *w = context->GetInputShape(1);
    gert::Shape *y = context->GetOutputShape(0);
    if (x == nullptr || w == nullptr || y == nullptr || x->GetDimNum() < 2) {
        return GRAPH_FAILED;
    }
    *y = *x;
    y->SetDim(x->GetDimNum() - 1, w->GetDim(0));   // [..., in] -> [..., out]
    return GRAPH_SUCCESS;
}

static graphStatus LoraFusedInferDataType(gert::InferDataTypeContext *context)
{
    context->SetOutputDataType(0, context->GetInputDataType(0));
    return GRAPH_SUCCESS;
}

static graphStatus LoraFusedGradInferShape(gert::InferShapeContext *context)
{
    // dx like x, d_lora_a like lora_a, d_lora_b like lora_b
    const gert::Shape *x = context->GetInputShape(1);
    const gert::Shape *a = context->GetInputShape(3);
    const gert::Shape *b = context->GetInputShape(4);
    if (x == nullptr || a == nullptr || b == nullptr) {
        return GRAPH_FAILED;
    }
    *context->GetOutputShape(0) = *x;
    *context->GetOutputShape(1) = *a;
    *context->GetOutputShape(2) = *b;
    return GRAPH_SUCCESS;
}

static graphStatus LoraFusedGradInferDataType(gert::InferDataTypeContext *context)
{
    const ge::DataType dt = context->GetInputDataType(1);
    context->SetOutputDataType(0, dt);
    context->SetOutputDataType(1, dt);
    context->SetOutputDataType(2, dt);
    return GRAPH_SUCCESS;
}

}  // namespace ge

namespace ops {

// one column per supported dtype combination: float16, bfloat16, float32
static const std::vector<ge::DataType> kTypes = {ge::DT_FLOAT16, ge::DT_BF16, ge::DT_FLOAT};
static const std::vector<ge::DataType> kF32 = {ge::DT_FLOAT, ge::DT_FLOAT, ge::DT_FLOAT};
static const std::vector<ge::DataType> kI64 = {ge::DT_INT64, ge::DT_INT64, ge::DT_INT64};
static const std::vector<ge::Format> kNd = {ge::FORMAT_ND, ge::FORMAT_ND, ge::FORMAT_ND};

class LoraFused : public OpDef {
public:
    explicit LoraFused(const char *name) : OpDef(name)
    {
        this->Input("x").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("weight").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("lora_a").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("lora_b").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("scale").ParamType(REQUIRED).DataType(kF32).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("dropout_p").ParamType(REQUIRED).DataType(kF32).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("seed_offset").ParamType(REQUIRED).DataType(kI64).Format(kNd).UnknownShapeFormat(kNd);
        this->Output("y").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);

        this->SetInferShape(ge::LoraFusedInferShape).SetInferDataType(ge::LoraFusedInferDataType);
        this->AICore().SetTiling(optiling::LoraFusedTilingFunc<false>);
        // MIX (cube + vector) kernel: parts with separate AIC / AIV cores only
        this->AICore().AddConfig("ascend910b");
        this->AICore().AddConfig("ascend910_93");
    }
};

class LoraFusedGrad : public OpDef {
public:
    explicit LoraFusedGrad(const char *name) : OpDef(name)
    {
        this->Input("dy").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("x").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("weight").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("lora_a").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("lora_b").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("scale").ParamType(REQUIRED).DataType(kF32).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("dropout_p").ParamType(REQUIRED).DataType(kF32).Format(kNd).UnknownShapeFormat(kNd);
        this->Input("seed_offset").ParamType(REQUIRED).DataType(kI64).Format(kNd).UnknownShapeFormat(kNd);
        this->Output("dx").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);
        this->Output("d_lora_a").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);
        this->Output("d_lora_b").ParamType(REQUIRED).DataType(kTypes).Format(kNd).UnknownShapeFormat(kNd);

        this->SetInferShape(ge::LoraFusedGradInferShape).SetInferDataType(ge::LoraFusedGradInferDataType);
        this->AICore().SetTiling(optiling::LoraFusedTilingFunc<true>);
        this->AICore().AddConfig("ascend910b");
        this->AICore().AddConfig("ascend910_93");
    }
};

OP_ADD(LoraFused);
OP_ADD(LoraFusedGrad);

}  // namespace ops
