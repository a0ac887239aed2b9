// STUB of the AscendC kernel API surface used by ../op_kernel, for a host-side
// g++ -fsyntax-only check (see README.md). NOT the CANN header; signatures follow the
// documented API as the kernel author understood it, so it catches typos and internal
// inconsistencies, not misuse of the real API.
#pragma once
#include <cstdint>
#include <cstddef>
#include <type_traits>
#define __aicore__
#define __global__
#define __gm__
typedef uint8_t *GM_ADDR;
struct half { half() {} half(float) {} };
struct bfloat16_t { bfloat16_t() {} bfloat16_t(float) {} };
#define KERNEL_TASK_TYPE_DEFAULT(t) (void)(t)
enum KernelType { KERNEL_TYPE_MIX_AIC_1_2 };
extern bool g_is_aic;
#define ASCEND_IS_AIC (g_is_aic)
#define ASCEND_IS_AIV (!g_is_aic)
enum pipe_t { PIPE_V, PIPE_MTE2, PIPE_MTE3, PIPE_S, PIPE_ALL };
GM_ADDR GetSysWorkSpacePtr();
#define REGIST_MATMUL_OBJ(pipe, ws, ...) (void)(pipe), (void)(ws)
namespace AscendC {
template <typename T, typename U> struct IsSameType { static constexpr bool value = std::is_same<T, U>::value; };
enum class QuePosition { VECIN, VECOUT, VECCALC, GM };
using TPosition = QuePosition;
enum class RoundMode { CAST_NONE, CAST_RINT };
template <typename T> class GlobalTensor {
public:
    void SetGlobalBuffer(__gm__ T *p, uint64_t n = 0) { (void)p; (void)n; }
    GlobalTensor operator[](uint64_t off) const { (void)off; return *this; }
    T GetValue(uint64_t i) const { (void)i; return T(); }
};
template <typename T> class LocalTensor {
public:
    LocalTensor operator[](uint32_t off) const { (void)off; return *this; }
    template <typename U> LocalTensor<U> ReinterpretCast() const { return LocalTensor<U>(); }
    void SetValue(uint32_t i, T v) const { (void)i; (void)v; }
};
template <QuePosition P, int32_t D> class TQue {
public:
    template <typename T> LocalTensor<T> AllocTensor() { return LocalTensor<T>(); }
    template <typename T> void EnQue(const LocalTensor<T> &t) { (void)t; }
    template <typename T> LocalTensor<T> DeQue() { return LocalTensor<T>(); }
    template <typename T> void FreeTensor(LocalTensor<T> &t) { (void)t; }
};
template <QuePosition P = QuePosition::VECCALC> class TBuf {
public:
    template <typename T> LocalTensor<T> Get() { return LocalTensor<T>(); }
};
class TPipe {
public:
    template <QuePosition P, int32_t D> void InitBuffer(TQue<P, D> &q, int32_t num, uint32_t len) { (void)q; (void)num; (void)len; }
    template <QuePosition P> void InitBuffer(TBuf<P> &b, uint32_t len) { (void)b; (void)len; }
};
struct DataCopyExtParams { uint16_t blockCount; uint32_t blockLen; uint32_t srcStride; uint32_t dstStride; uint32_t rsv; };
template <typename T> struct DataCopyPadExtParams { bool isPad; uint8_t leftPadding; uint8_t rightPadding; T paddingValue; };
template <typename T> void DataCopy(const LocalTensor<T> &d, const GlobalTensor<T> &s, uint32_t n);
template <typename T> void DataCopy(const GlobalTensor<T> &d, const LocalTensor<T> &s, uint32_t n);
template <typename T> void DataCopy(const LocalTensor<T> &d, const LocalTensor<T> &s, uint32_t n);
template <typename T> void DataCopyPad(const LocalTensor<T> &d, const GlobalTensor<T> &s, const DataCopyExtParams &p, const DataCopyPadExtParams<T> &pad);
template <typename T> void DataCopyPad(const GlobalTensor<T> &d, const LocalTensor<T> &s, const DataCopyExtParams &p);
template <typename D, typename S> void Cast(const LocalTensor<D> &d, const LocalTensor<S> &s, RoundMode m, uint32_t n);
template <typename T> void Muls(const LocalTensor<T> &d, const LocalTensor<T> &s, T v, int32_t n);
template <typename T> void Adds(const LocalTensor<T> &d, const LocalTensor<T> &s, T v, int32_t n);
template <typename T> void Maxs(const LocalTensor<T> &d, const LocalTensor<T> &s, T v, int32_t n);
template <typename T> void Mins(const LocalTensor<T> &d, const LocalTensor<T> &s, T v, int32_t n);
template <typename T> void Duplicate(const LocalTensor<T> &d, const T &v, int32_t n);
template <typename T> void CreateVecIndex(LocalTensor<T> d, const T &first, uint32_t n);
template <typename T> void Add(const LocalTensor<T> &d, const LocalTensor<T> &a, const LocalTensor<T> &b, int32_t n);
template <typename T> void Sub(const LocalTensor<T> &d, const LocalTensor<T> &a, const LocalTensor<T> &b, int32_t n);
template <typename T> void Mul(const LocalTensor<T> &d, const LocalTensor<T> &a, const LocalTensor<T> &b, int32_t n);
template <typename T> void And(const LocalTensor<T> &d, const LocalTensor<T> &a, const LocalTensor<T> &b, int32_t n);
template <typename T> void Or(const LocalTensor<T> &d, const LocalTensor<T> &a, const LocalTensor<T> &b, int32_t n);
template <typename T> void Not(const LocalTensor<T> &d, const LocalTensor<T> &s, int32_t n);
template <typename T> void ShiftLeft(const LocalTensor<T> &d, const LocalTensor<T> &s, const T &v, int32_t n);
template <typename T> void ShiftRight(const LocalTensor<T> &d, const LocalTensor<T> &s, const T &v, int32_t n);
template <pipe_t P> void PipeBarrier();
template <bool AIV_ONLY = true> void SyncAll();
template <typename T> void InitOutput(GlobalTensor<T> &gm, uint32_t size, T value);
uint32_t GetBlockIdx();
GM_ADDR GetUserWorkspace(GM_ADDR ws);
}  // namespace AscendC
using AscendC::GetBlockIdx;
enum class CubeFormat { ND, NZ };
namespace matmul {
template <AscendC::TPosition P, CubeFormat F, typename T, bool TRANS = false> struct MatmulType { using type = T; };
template <class A, class B, class C, class Bias> class Matmul {
public:
    void SetOrgShape(int32_t m, int32_t n, int32_t ka, int32_t kb, int32_t kc);
    void SetSingleShape(int32_t m, int32_t n, int32_t k);
    void SetTensorA(const AscendC::GlobalTensor<typename A::type> &a, bool t = false);
    void SetTensorB(const AscendC::GlobalTensor<typename B::type> &b, bool t = false);
    void IterateAll(const AscendC::GlobalTensor<typename C::type> &c, uint8_t atomic = 0);
    void End();
};
}  // namespace matmul
using namespace matmul;
using matmul::MatmulType;
using AscendC::TPosition;
