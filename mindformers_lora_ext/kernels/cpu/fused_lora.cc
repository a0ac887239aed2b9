// Fused LoRA linear for MindSpore CPU, as ops.Custom(func_type="aot") kernels.
//
//   forward : y = x W^T + s (drop(x) A^T) B^T,   h = drop(x) A^T  (h is kept for backward: N x r;
//             the seed is passed through as a third output for the backward)
//   backward: g = s dy B
//             dx = dy W + (g A) * m     (m = the dropout multiplier of x: 0 or 1/(1-p))
//             dA = g^T drop(x)          (the dropout mask is regenerated, not kept from forward)
//             dB = s dy^T h
// x [N, in], W [out, in] (frozen: no dW), A [r, in], B [out, r], sp = [s, p] (float32),
// seed = [k0, k1] (int32, the Philox key). Inverted dropout on the shrink path: element e of x
// (flat index) is kept iff Philox4x32-10(counter = e / 4, key = seed) word e % 4 >= p * 2^32,
// and kept values are scaled by 1 / (1 - p). All arithmetic is float32 with float32 accumulation.
//
// Entry points (MindSpore AOT ABI): FusedLoraForward / FusedLoraBackward, PhiloxDropoutForward /
// PhiloxDropoutBackward (the same dropout alone, for the composition), their *InferShape and
// *InferType functions (dynamic shapes in graph mode; graphs compiled at run time), and a few
// helpers for Python (ctypes): flk_abi_version, flk_isa, flk_set_isa, flk_philox4x32_10,
// flk_dropout_mask.
// The instruction set (AVX-512 / AVX2+FMA / generic) is picked at run time from CPUID; the
// environment variable MINDFORMERS_LORA_EXT_CPU_ISA=avx2|generic forces a lower one.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "aot_abi.h"
#include "thread_pool.h"

// GCC 12 reports _mm512_mul_epu32's internal _mm512_undefined operand as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define FLK_ABI_VERSION 5

namespace flk {

struct Mat {  // element (i, j) at p[i * rs + j * cs]
  const float* p;
  long rs, cs;
};

struct Dropout {      // inverted dropout of x's elements; flat index = element pointer - base
  const float* base;
  uint32_t k0, k1;    // Philox key (the seed)
  uint32_t thr;       // drop iff u < thr, thr = round(p * 2^32)
  float scale;        // 1 / (1 - p)
  const uint8_t* keep;  // if set: precomputed keep flags by flat index (else Philox)
};

struct Status {
  int failed;
};

// C(M, N) (+)= A(M, K) B(K, N) * b_scale [+ a2_scale * A2(M, K2) B2(K2, N)];
// side product (computed from the packed A blocks): S(M, NS) = side_drop(A) SB(K, NS) * sb_scale.
struct Gemm {
  long M, N, K;
  Mat A, B;
  float b_scale;
  const Dropout* a_drop;  // dropout on A's elements (A a view of x)
  const Dropout* b_drop;  // dropout on B's elements (B a view of x, row-major)
  float* C;
  long c_rs, c_cs;
  bool accumulate;
  long K2;
  Mat A2, B2;
  float a2_scale;
  long NS;
  Mat SB;
  float sb_scale;
  float* S;  // [M, NS] row-major
  const Dropout* side_drop;
  // Transposed side product from the packed A blocks: T(K, NT) = t_scale A^T TB(M, NT)
  // (T row-major, overwritten; dB = s dy^T h inside the dx product, so dy is read once).
  long NT;
  Mat TB;
  float t_scale;
  float* T;
  // If set, the extra segment is masked: C += c2_scale * keep(C element) * (A2 B2), keep flags
  // row-major with row stride c2_keep_rs (dx's LoRA term needs the dropout mask).
  const uint8_t* c2_keep;
  long c2_keep_rs;
  float c2_scale;
  Status* status;
};

// Grow-only scratch memory of the calling thread, one buffer per slot (64-byte aligned).
// Kept between calls: re-allocating the packing buffers on every call costs page faults.
// Slots: 0 packed B panel, 1 packed side operand, 2 per-thread A blocks, 3 split-K partials,
// 4 per-thread partials of the transposed side product.
float* scratch(int slot, size_t floats);

}  // namespace flk

using flk::Dropout;
using flk::Gemm;
using flk::Mat;

#if defined(__x86_64__) || defined(__i386__)
#define FLK_X86 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi2")
#define FLK_NS isa_avx512
#define FLK_VL 16
#define FLK_MR 12
#include "fused_lora_isa.inc"
#undef FLK_NS
#undef FLK_VL
#undef FLK_MR
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FLK_NS isa_avx2
#define FLK_VL 8
#define FLK_MR 6
#include "fused_lora_isa.inc"
#undef FLK_NS
#undef FLK_VL
#undef FLK_MR
#pragma GCC pop_options
#endif

#define FLK_NS isa_generic
#define FLK_VL 4
#define FLK_MR 4
#include "fused_lora_isa.inc"
#undef FLK_NS
#undef FLK_VL
#undef FLK_MR

namespace flk {

struct Scratch {
  float* p[5] = {0, 0, 0, 0, 0};
  size_t n[5] = {0, 0, 0, 0, 0};
  ~Scratch() {
    for (float* q : p) free(q);
  }
};

float* scratch(int slot, size_t floats) {
  static thread_local Scratch s;
  if (floats < 16) floats = 16;  // never null for an empty request
  if (floats > s.n[slot]) {
    free(s.p[slot]);
    const size_t bytes = (floats * sizeof(float) + 4095) / 4096 * 4096;
    s.p[slot] = (float*)aligned_alloc(64, bytes);
    s.n[slot] = s.p[slot] ? bytes / sizeof(float) : 0;
  }
  return s.p[slot];
}

enum Isa { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

static int supported_isa() {
#ifdef FLK_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
  return ISA_GENERIC;
}

static int isa_from_name(const char* name) {
  if (!name) return -1;
  for (int i = 0; i < 3; ++i)
    if (strcmp(name, kIsaNames[i]) == 0) return i;
  return -1;
}

static int g_isa = -1;

static int current_isa() {
  int isa = __atomic_load_n(&g_isa, __ATOMIC_ACQUIRE);
  if (isa >= 0) return isa;
  isa = supported_isa();
  const int forced = isa_from_name(getenv("MINDFORMERS_LORA_EXT_CPU_ISA"));
  if (forced >= 0 && forced < isa) isa = forced;
  __atomic_store_n(&g_isa, isa, __ATOMIC_RELEASE);
  return isa;
}

static int max_threads() { return flk_pool::max_threads(); }

static void make_keep(const Dropout& d, uint64_t n, uint8_t* keep) {
  switch (current_isa()) {
#ifdef FLK_X86
    case ISA_AVX512: isa_avx512::make_keep(d, n, keep, max_threads()); break;
    case ISA_AVX2: isa_avx2::make_keep(d, n, keep, max_threads()); break;
#endif
    default: isa_generic::make_keep(d, n, keep, max_threads()); break;
  }
}

static void drop_range(const Dropout& d, uint64_t n, const float* src, float* dst) {
  switch (current_isa()) {
#ifdef FLK_X86
    case ISA_AVX512: isa_avx512::drop_range(d, n, src, dst, max_threads()); break;
    case ISA_AVX2: isa_avx2::drop_range(d, n, src, dst, max_threads()); break;
#endif
    default: isa_generic::drop_range(d, n, src, dst, max_threads()); break;
  }
}

// split_k: the K range is divided between threads (for long K and a small C), else the rows.
static void gemm(const Gemm& g, bool split_k = false) {
  const int threads = max_threads();
  switch (current_isa()) {
#ifdef FLK_X86
    case ISA_AVX512:
      split_k ? isa_avx512::gemm_split_k(g, threads) : isa_avx512::gemm(g, threads);
      break;
    case ISA_AVX2:
      split_k ? isa_avx2::gemm_split_k(g, threads) : isa_avx2::gemm(g, threads);
      break;
#endif
    default:
      split_k ? isa_generic::gemm_split_k(g, threads) : isa_generic::gemm(g, threads);
      break;
  }
}

static Mat mat(const float* p, long rs, long cs) {
  Mat m;
  m.p = p;
  m.rs = rs;
  m.cs = cs;
  return m;
}

static Gemm plain(long M, long N, long K, Mat A, Mat B, float* C, long c_rs, long c_cs, Status* st) {
  Gemm g;
  memset(&g, 0, sizeof(g));
  g.M = M; g.N = N; g.K = K;
  g.A = A; g.B = B; g.b_scale = 1.0f;
  g.C = C; g.c_rs = c_rs; g.c_cs = c_cs;
  g.a2_scale = 1.0f; g.sb_scale = 1.0f;
  g.status = st;
  return g;
}

enum Err { OK = 0, ERR_NPARAM = 1, ERR_DTYPE = 2, ERR_SHAPE = 3, ERR_DROPOUT = 4, ERR_MEMORY = 5 };

static int make_dropout(const float* x, const float* sp, const int32_t* seed, Dropout* d, bool* active) {
  const float p = sp[1];
  if (!(p >= 0.0f && p < 1.0f)) return ERR_DROPOUT;  // also rejects NaN
  *active = p > 0.0f;
  d->base = x;
  d->keep = 0;
  d->k0 = (uint32_t)seed[0];
  d->k1 = (uint32_t)seed[1];
  const double t = (double)p * 4294967296.0 + 0.5;
  d->thr = t >= 4294967295.0 ? 0xFFFFFFFFu : (uint32_t)t;
  d->scale = (float)(1.0 / (1.0 - (double)p));
  return OK;
}

// y = x W^T + s h B^T, h = drop(x) A^T
static int forward(const float* x, const float* w, const float* a, const float* b, const float* sp,
                   const int32_t* seed, long N, long in, long out, long r, float* y, float* h) {
  Dropout d;
  bool active = false;
  const int err = make_dropout(x, sp, seed, &d, &active);
  if (err) return err;
  Status st = {0};
  if (out == 0) {  // no output columns: h alone
    Gemm gh = plain(N, r, in, mat(x, in, 1), mat(a, 1, in), h, r, 1, &st);
    gh.a_drop = active ? &d : 0;
    flk::gemm(gh);
    return st.failed ? ERR_MEMORY : OK;
  }
  Gemm g = plain(N, out, in, mat(x, in, 1), mat(w, 1, in), y, out, 1, &st);
  g.K2 = r;
  g.A2 = mat(h, r, 1);
  g.a2_scale = sp[0];
  g.B2 = mat(b, 1, r);
  g.NS = r;
  g.SB = mat(a, 1, in);
  g.S = h;
  g.side_drop = active ? &d : 0;
  flk::gemm(g);
  return st.failed ? ERR_MEMORY : OK;
}

// gs = s dy B; dx = dy W + (gs A) * m; dB = s dy^T h (these three in one pass over dy);
// dA = gs^T drop(x)
static int backward(const float* dy, const float* x, const float* w, const float* a, const float* b,
                    const float* h, const float* sp, const int32_t* seed, long N, long in, long out,
                    long r, float* dx, float* da, float* db) {
  Dropout d;
  bool active = false;
  const int err = make_dropout(x, sp, seed, &d, &active);
  if (err) return err;
  const float s = sp[0];
  float* gs = (float*)malloc((size_t)(N > 0 ? N : 1) * (size_t)r * sizeof(float));
  // The mask, regenerated once for dx and dA as byte flags (freed before returning).
  uint8_t* keep = active ? (uint8_t*)malloc((size_t)(N * in > 0 ? N * in : 1)) : 0;
  if (!gs || (active && !keep)) {
    free(gs);
    free(keep);
    return ERR_MEMORY;
  }
  if (active) {
    make_keep(d, (uint64_t)(N * in), keep);
    d.keep = keep;
  }
  Status st = {0};
  Gemm g1 = plain(N, in, out, mat(dy, out, 1), mat(w, in, 1), dx, in, 1, &st);
  g1.K2 = r;
  g1.A2 = mat(gs, r, 1);
  g1.B2 = mat(a, in, 1);
  g1.NS = r;
  g1.SB = mat(b, r, 1);
  g1.sb_scale = s;
  g1.S = gs;
  g1.NT = r;  // dB = s dy^T h from the packed dy blocks
  g1.TB = mat(h, r, 1);
  g1.t_scale = s;
  g1.T = db;
  if (active) {
    g1.c2_keep = keep;
    g1.c2_keep_rs = in;
    g1.c2_scale = d.scale;
  }
  flk::gemm(g1);
  if (N == 0 || in == 0) {  // g1 did not run: gs feeds dA, and dB = s dy^T h is zero (h is)
    memset(gs, 0, sizeof(float) * (size_t)((N > 0 ? N : 1) * r));
    memset(db, 0, sizeof(float) * (size_t)(out * r));
  }
  // dA (r x in) = gs^T drop(x): long K (= N tokens), small C: the threads split K.
  Gemm g2 = plain(r, in, N, mat(gs, 1, r), mat(x, in, 1), da, in, 1, &st);
  g2.b_drop = active ? &d : 0;
  flk::gemm(g2, true);
  free(gs);
  free(keep);
  return st.failed ? ERR_MEMORY : OK;
}

static bool is(const char* dtype, const char* want) { return dtype && strcmp(dtype, want) == 0; }

static long elems(int nd, const int64_t* shape) {
  long n = 1;
  for (int i = 0; i < nd; ++i) n *= (long)shape[i];
  return n;
}

}  // namespace flk

// ------------------------------------------------------------------ MindSpore AOT entry points
// params: x, W, A, B, sp, seed | y, h, seed_out (a copy of seed: the bprop takes the seed from
// the forward's outputs, which MindSpore keeps, so a recomputed seed op cannot change it)
FLK_API int FusedLoraForward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                             void* stream, void* extra) {
  (void)stream;
  (void)extra;
  if (nparam != 9) return flk::ERR_NPARAM;
  for (int i : {0, 1, 2, 3, 4, 6, 7})
    if (!flk::is(dtypes[i], "float32")) return flk::ERR_DTYPE;
  if (!flk::is(dtypes[5], "int32") || !flk::is(dtypes[8], "int32")) return flk::ERR_DTYPE;
  if (ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2 || ndims[3] != 2) return flk::ERR_SHAPE;
  const long N = shapes[0][0], in = shapes[0][1], out = shapes[1][0], r = shapes[2][0];
  if (shapes[1][1] != in || shapes[2][1] != in || shapes[3][0] != out || shapes[3][1] != r || r < 1)
    return flk::ERR_SHAPE;
  if (flk::elems(ndims[4], shapes[4]) != 2 || flk::elems(ndims[5], shapes[5]) != 2) return flk::ERR_SHAPE;
  if (ndims[6] != 2 || shapes[6][0] != N || shapes[6][1] != out) return flk::ERR_SHAPE;
  if (ndims[7] != 2 || shapes[7][0] != N || shapes[7][1] != r) return flk::ERR_SHAPE;
  if (flk::elems(ndims[8], shapes[8]) != 2) return flk::ERR_SHAPE;
  memcpy(params[8], params[5], 2 * sizeof(int32_t));
  return flk::forward((const float*)params[0], (const float*)params[1], (const float*)params[2],
                      (const float*)params[3], (const float*)params[4], (const int32_t*)params[5], N, in, out,
                      r, (float*)params[6], (float*)params[7]);
}

FLK_API std::vector<std::vector<int64_t>> FusedLoraForwardInferShape(int* ndims, int64_t** shapes, AotExtra* extra) {
  (void)extra;
  const int64_t n = (ndims[0] >= 1 && shapes[0][0] >= 0) ? shapes[0][0] : -1;
  const int64_t out = (ndims[1] == 2) ? shapes[1][0] : -1;
  const int64_t r = (ndims[2] == 2) ? shapes[2][0] : -1;
  return {{n, out}, {n, r}, {2}};
}

// C++ type inference (out_dtype=None in Python): MindSpore can only call a Python infer on a
// PrimitivePy, which an mcore base's graph (Morph, compiled at run time) no longer has.
FLK_API MsTypeIds FusedLoraForwardInferType(MsTypeIds in, AotExtra* extra) {
  (void)extra;
  return {in[0], in[0], in[5]};  // y, h like x; seed_out like seed
}

// params: dy, x, W, A, B, h, sp, seed | dx, dA, dB
FLK_API int FusedLoraBackward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                              void* stream, void* extra) {
  (void)stream;
  (void)extra;
  if (nparam != 11) return flk::ERR_NPARAM;
  for (int i : {0, 1, 2, 3, 4, 5, 6, 8, 9, 10})
    if (!flk::is(dtypes[i], "float32")) return flk::ERR_DTYPE;
  if (!flk::is(dtypes[7], "int32")) return flk::ERR_DTYPE;
  for (int i : {0, 1, 2, 3, 4, 5, 8, 9, 10})
    if (ndims[i] != 2) return flk::ERR_SHAPE;
  const long N = shapes[1][0], in = shapes[1][1], out = shapes[2][0], r = shapes[3][0];
  if (shapes[0][0] != N || shapes[0][1] != out || shapes[2][1] != in || shapes[3][1] != in ||
      shapes[4][0] != out || shapes[4][1] != r || shapes[5][0] != N || shapes[5][1] != r || r < 1)
    return flk::ERR_SHAPE;
  if (flk::elems(ndims[6], shapes[6]) != 2 || flk::elems(ndims[7], shapes[7]) != 2) return flk::ERR_SHAPE;
  if (shapes[8][0] != N || shapes[8][1] != in || shapes[9][0] != r || shapes[9][1] != in ||
      shapes[10][0] != out || shapes[10][1] != r)
    return flk::ERR_SHAPE;
  return flk::backward((const float*)params[0], (const float*)params[1], (const float*)params[2],
                       (const float*)params[3], (const float*)params[4], (const float*)params[5],
                       (const float*)params[6], (const int32_t*)params[7], N, in, out, r, (float*)params[8],
                       (float*)params[9], (float*)params[10]);
}

FLK_API std::vector<std::vector<int64_t>> FusedLoraBackwardInferShape(int* ndims, int64_t** shapes, AotExtra* extra) {
  (void)extra;
  std::vector<std::vector<int64_t>> res;
  for (int i : {1, 3, 4}) res.emplace_back(shapes[i], shapes[i] + ndims[i]);
  return res;
}

FLK_API MsTypeIds FusedLoraBackwardInferType(MsTypeIds in, AotExtra* extra) {
  (void)extra;
  return {in[0], in[0], in[0]};
}

// Dropout alone, for the composition: y = drop(x) with the mask the fused op draws for this seed
// (same flat element index, so x [N, in] gets the fused op's mask), and the backward
// dx = drop(dy) regenerates it from the seed: no mask is kept between forward and backward.
//   forward : x (any shape), p [1], seed [2] int32 -> y (x's shape), seed_out [2] (= seed)
//   backward: dy, p, seed -> dx, seed_out (a second output: single-output AOT ops fail in MindSpore
//             2.9's dynamic-shape graphs, see dropped_matmul.cc)
static int dropout_op(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  if (nparam != 5) return flk::ERR_NPARAM;
  if (!flk::is(dtypes[0], "float32") || !flk::is(dtypes[1], "float32") || !flk::is(dtypes[2], "int32") ||
      !flk::is(dtypes[3], "float32"))
    return flk::ERR_DTYPE;
  const long n = flk::elems(ndims[0], shapes[0]);
  if (flk::elems(ndims[1], shapes[1]) != 1 || flk::elems(ndims[2], shapes[2]) != 2 ||
      flk::elems(ndims[3], shapes[3]) != n)
    return flk::ERR_SHAPE;
  const float* src = (const float*)params[0];
  float* dst = (float*)params[3];
  const float sp[2] = {1.0f, *(const float*)params[1]};
  flk::Dropout d;
  bool active = false;
  const int err = flk::make_dropout(src, sp, (const int32_t*)params[2], &d, &active);
  if (err) return err;
  if (!active) {
    if (dst != src) memcpy(dst, src, sizeof(float) * (size_t)n);
    return flk::OK;
  }
  flk::drop_range(d, (uint64_t)n, src, dst);
  return flk::OK;
}

FLK_API int PhiloxDropoutForward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                 void* stream, void* extra) {
  (void)stream;
  (void)extra;
  if (nparam == 5 && (!flk::is(dtypes[4], "int32") || flk::elems(ndims[4], shapes[4]) != 2)) return flk::ERR_SHAPE;
  const int err = dropout_op(nparam, params, ndims, shapes, dtypes);
  if (!err) memcpy(params[4], params[2], 2 * sizeof(int32_t));
  return err;
}

FLK_API std::vector<std::vector<int64_t>> PhiloxDropoutForwardInferShape(int* ndims, int64_t** shapes, AotExtra* extra) {
  (void)extra;
  return {std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]), {2}};
}

FLK_API MsTypeIds PhiloxDropoutForwardInferType(MsTypeIds in, AotExtra* extra) {
  (void)extra;
  return {in[0], in[2]};  // y like x; seed_out like seed
}

FLK_API int PhiloxDropoutBackward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                  void* stream, void* extra) {
  (void)stream;
  (void)extra;
  return PhiloxDropoutForward(nparam, params, ndims, shapes, dtypes, stream, extra);
}

FLK_API std::vector<std::vector<int64_t>> PhiloxDropoutBackwardInferShape(int* ndims, int64_t** shapes, AotExtra* extra) {
  return PhiloxDropoutForwardInferShape(ndims, shapes, extra);
}

FLK_API MsTypeIds PhiloxDropoutBackwardInferType(MsTypeIds in, AotExtra* extra) {
  return PhiloxDropoutForwardInferType(in, extra);
}

namespace flk {
// keep[e] = 1 if element e of an x dropped with (p, seed) is kept, else 0: the mask the fused op and
// PhiloxDropout apply (DoRA's dropped-element kernel, dropped_matmul.cc, regenerates it with this).
int keep_flags(float p, const int32_t* seed, uint64_t n, uint8_t* keep) {
  const float sp[2] = {1.0f, p};
  Dropout d;
  bool active = false;
  if (const int err = make_dropout(0, sp, seed, &d, &active)) return err;
  if (!active) {
    memset(keep, 1, (size_t)n);
    return OK;
  }
  make_keep(d, n, keep);
  return OK;
}
}  // namespace flk

// ------------------------------------------------------------------ helpers for Python (ctypes)
FLK_API int flk_abi_version() { return FLK_ABI_VERSION; }

FLK_API const char* flk_isa() { return flk::kIsaNames[flk::current_isa()]; }

// Force an instruction set ("avx512", "avx2", "generic"); fails (returns 1) if unsupported here.
FLK_API int flk_set_isa(const char* name) {
  const int isa = flk::isa_from_name(name);
  if (isa < 0 || isa > flk::supported_isa()) return 1;
  __atomic_store_n(&flk::g_isa, isa, __ATOMIC_RELEASE);
  return 0;
}

// Philox4x32-10 of one 128-bit counter (the dropout mask uses counter = {e / 4 low, high, 0, 0}).
FLK_API void flk_philox4x32_10(const uint32_t* counter, const uint32_t* key, uint32_t* out) {
  isa_generic::philox10(counter[0], counter[1], counter[2], counter[3], key[0], key[1], out);
}

// The dropout multiplier (0 or 1/(1-p)) of elements [first, first + n) of an x with this seed.
FLK_API int flk_dropout_mask(uint64_t first, long n, float p, const int32_t* seed, float* out) {
  flk::Dropout d;
  bool active = false;
  const float sp[2] = {1.0f, p};
  std::vector<float> ones((size_t)(n > 0 ? n : 0), 1.0f);
  if (flk::make_dropout(ones.data(), sp, seed, &d, &active)) return flk::ERR_DROPOUT;
  if (active) isa_generic::drop_segment(d, first, ones.data(), n, out);
  else memcpy(out, ones.data(), sizeof(float) * ones.size());
  return 0;
}
