// STUB for a host-side 'g++ -fsyntax-only' check of ../op_host and ../op_kernel (see ../stub_check/README.md).
// NOT the CANN header of the same name; never used by the real build (build.sh).
#pragma once
#include <cstdint>
#include <cstddef>
#include <vector>
namespace ge {
enum DataType { DT_FLOAT16, DT_BF16, DT_FLOAT, DT_INT64 };
enum Format { FORMAT_ND };
using graphStatus = uint32_t;
constexpr graphStatus GRAPH_SUCCESS = 0;
constexpr graphStatus GRAPH_FAILED = 1;
}
namespace gert {
class Shape {
public:
    size_t GetDimNum() const { return 2; }
    int64_t GetDim(size_t i) const { (void)i; return 1; }
    void SetDim(size_t i, int64_t v) { (void)i; (void)v; }
    int64_t GetShapeSize() const { return 1; }
};
class StorageShape { public: const Shape &GetStorageShape() const { return s; } Shape s; };
class CompileTimeTensorDesc { public: ge::DataType GetDataType() const { return ge::DT_FLOAT; } };
class TilingData { public: void *GetData() { return nullptr; } size_t GetCapacity() const { return 0; } void SetDataSize(size_t) {} };
class TilingContext {
public:
    const StorageShape *GetInputShape(size_t) const { return nullptr; }
    const CompileTimeTensorDesc *GetInputDesc(size_t) const { return nullptr; }
    fe::PlatFormInfos *GetPlatformInfo() const { return nullptr; }
    uint32_t SetBlockDim(uint32_t) { return 0; }
    TilingData *GetRawTilingData() { return nullptr; }
    size_t *GetWorkspaceSizes(size_t) { return nullptr; }
};
class InferShapeContext {
public:
    const Shape *GetInputShape(size_t) const { return nullptr; }
    Shape *GetOutputShape(size_t) { return nullptr; }
};
class InferDataTypeContext {
public:
    ge::DataType GetInputDataType(size_t) const { return ge::DT_FLOAT; }
    uint32_t SetOutputDataType(size_t, ge::DataType) { return 0; }
};
}
namespace fe { struct PlatFormInfos {}; }
namespace ops {
enum Option { REQUIRED };
class OpParamDef {
public:
    OpParamDef &ParamType(Option) { return *this; }
    OpParamDef &DataType(std::vector<ge::DataType>) { return *this; }
    OpParamDef &Format(std::vector<ge::Format>) { return *this; }
    OpParamDef &UnknownShapeFormat(std::vector<ge::Format>) { return *this; }
};
using TilingFn = ge::graphStatus (*)(gert::TilingContext *);
class OpAICoreDef {
public:
    OpAICoreDef &SetTiling(TilingFn) { return *this; }
    OpAICoreDef &AddConfig(const char *) { return *this; }
};
class OpDef {
public:
    explicit OpDef(const char *) {}
    OpParamDef &Input(const char *) { return p; }
    OpParamDef &Output(const char *) { return p; }
    OpDef &SetInferShape(ge::graphStatus (*)(gert::InferShapeContext *)) { return *this; }
    OpDef &SetInferDataType(ge::graphStatus (*)(gert::InferDataTypeContext *)) { return *this; }
    OpAICoreDef &AICore() { return a; }
    OpParamDef p; OpAICoreDef a;
};
}
#define OP_ADD(name) static ops::name g_op_##name(#name)
