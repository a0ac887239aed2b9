// DoRA under dropout without a second dense matmul, as ops.Custom(func_type="aot") kernels.
//
// DoRA needs drop(x) W^T as well as x W^T. With inverted dropout drop(x) = k (x * keep),
// k = 1 / (1 - p), and  drop(x) W^T = k (x W^T - z),  z = (x * (1 - keep)) W^T:
// z sums over the DROPPED elements only (a fraction p of x), so it costs p of a dense product.
//
//   forward : z [N, out] = (x * (1 - keep)) W^T          x, keep [N, in], W [out, in]
//   backward: dx [N, in] = (1 - keep) * (dz W)            (only the dropped elements of dx)
//
// keep holds exactly 0 (dropped) or 1 (MindSpore's Dropout mask). Both kernels read W's columns
// as contiguous vectors, chunked by output rows so a chunk stays in L2 across all rows of x:
// W is re-laid out into scratch once per call (W is frozen but may be reloaded at any time, so
// nothing derived from it is cached). Threads split the rows of x.
// float32 throughout, float32 accumulation.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#define FLK_API extern "C" __attribute__((visibility("default")))

class AotExtra;

namespace fdm {

static const long kBlock = 32;  // outputs per register block (4 AVX2 vectors)
static const long kDots = 4;    // dot products of the backward computed together

// 8 floats (GCC/Clang vector extension: AVX2 registers in the avx2 build, SSE pairs otherwise).
// Written out by hand: GCC's loop interchange turned plain accumulator loops into scalar code.
typedef float v8 __attribute__((vector_size(32), aligned(4)));

static inline v8 load8(const float* p) {
  v8 v;
  memcpy(&v, p, sizeof(v));
  return v;
}

static inline float hsum(v8 v) {
  float f[8];
  memcpy(f, &v, sizeof(f));
  return ((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7]));
}

// W's columns in chunks of `width` output rows that stay in L2 while every row of x uses them:
// wtb[c][i][j] = W[c * width + j][i] (j < width; the last chunk padded with zeros).
struct Blocked {
  const float* p;
  long width, chunks, in;
  const float* column(long c, long i) const { return p + (c * in + i) * width; }
};

static Blocked blocked_transpose(const float* w, long out, long in) {
  static thread_local std::vector<float> buffer;  // grow-only: page faults on every call cost
  // a multiple of kBlock (the padding is zeros), at most the padded out
  long width = (64 * 1024) / (in > 0 ? in : 1);  // 256 KiB of float32 per chunk
  width = width < kBlock ? kBlock : (width / kBlock) * kBlock;
  const long out_padded = (out + kBlock - 1) / kBlock * kBlock;
  if (width > out_padded) width = out_padded > 0 ? out_padded : kBlock;
  const long chunks = (out + width - 1) / width;
  if (buffer.size() < (size_t)(chunks * in * width)) buffer.resize((size_t)(chunks * in * width));
  float* wtb = buffer.data();
  // Tasks: (chunk, 8 columns of W). Each reads 8 contiguous floats of every row of the chunk and
  // writes 8 destination rows sequentially (unit stride in j), so both sides stream.
  const long col_groups = (in + 7) / 8;
#pragma omp parallel for schedule(static)
  for (long t = 0; t < chunks * col_groups; ++t) {
    const long c = t / col_groups, i0 = (t % col_groups) * 8;
    const long cols = in - i0 < 8 ? in - i0 : 8;
    float* dst = wtb + (c * in + i0) * width;
    for (long j = 0; j < width; ++j) {
      const long o = c * width + j;
      float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (o < out) memcpy(v, w + o * in + i0, sizeof(float) * (size_t)cols);
      for (long k = 0; k < cols; ++k) dst[k * width + j] = v[k];
    }
  }
  return Blocked{wtb, width, chunks, in};
}

// The dropped columns of rows [n0, n1): idx[start[n - n0] .. start[n - n0 + 1]).
static void dropped_columns(const float* keep, long n0, long n1, long in, std::vector<int32_t>* idx,
                            std::vector<long>* start) {
  idx->clear();
  start->assign(1, 0);
  for (long n = n0; n < n1; ++n) {
    const float* kn = keep + n * in;
    for (long i = 0; i < in; ++i)
      if (kn[i] == 0.0f) idx->push_back((int32_t)i);
    start->push_back((long)idx->size());
  }
}

static void row_range(long N, long* n0, long* n1) {
#ifdef _OPENMP
  const long t = omp_get_thread_num(), T = omp_get_num_threads();
#else
  const long t = 0, T = 1;
#endif
  *n0 = N * t / T;
  *n1 = N * (t + 1) / T;
}

// The row workers. Register blocking: the forward accumulates a block of kBlock outputs of z's
// row in registers over all dropped elements of the row (one load per FMA, one store per block);
// the backward computes kDots dot products at once (dz's chunk loaded once for all of them).
// Compiled once per instruction set (AVX2 + FMA, and the baseline), picked at run time.

#define FDM_WORKERS(SUFFIX, TARGET)                                                                      \
  TARGET static void forward_rows_##SUFFIX(const Blocked& wt, const float* x, long n0, long n1, long in,  \
                                           long out, const int32_t* idx, const long* start, float* z) {   \
    for (long c = 0; c < wt.chunks; ++c) {                                                              \
      const long o0 = c * wt.width;                                                                     \
      for (long n = n0; n < n1; ++n) {                                                                  \
        const float* xn = x + n * in;                                                                   \
        const long e0 = start[n - n0], e1 = start[n - n0 + 1];                                          \
        for (long j0 = 0; j0 < wt.width && o0 + j0 < out; j0 += kBlock) {                               \
          v8 acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};                                            \
          for (long e = e0; e < e1; ++e) {                                                              \
            const float a = xn[idx[e]];                                                                 \
            const float* v = wt.column(c, idx[e]) + j0;                                                 \
            acc0 += a * load8(v);                                                                       \
            acc1 += a * load8(v + 8);                                                                   \
            acc2 += a * load8(v + 16);                                                                  \
            acc3 += a * load8(v + 24);                                                                  \
          }                                                                                             \
          float block[kBlock];                                                                          \
          memcpy(block, &acc0, 32);                                                                     \
          memcpy(block + 8, &acc1, 32);                                                                 \
          memcpy(block + 16, &acc2, 32);                                                                \
          memcpy(block + 24, &acc3, 32);                                                                \
          const long valid = out - o0 - j0 < kBlock ? out - o0 - j0 : kBlock;                           \
          memcpy(z + n * out + o0 + j0, block, sizeof(float) * (size_t)valid);                          \
        }                                                                                               \
      }                                                                                                 \
    }                                                                                                   \
  }                                                                                                     \
  TARGET static void backward_rows_##SUFFIX(const Blocked& wt, const float* dz, long n0, long n1,         \
                                            long in, long out, const int32_t* idx, const long* start,     \
                                            float* dx) {                                                \
    std::vector<float> dzc((size_t)wt.width);                                                           \
    for (long c = 0; c < wt.chunks; ++c) {                                                              \
      const long o0 = c * wt.width, valid = out - o0 < wt.width ? out - o0 : wt.width;                  \
      for (long n = n0; n < n1; ++n) {                                                                  \
        memcpy(dzc.data(), dz + n * out + o0, sizeof(float) * (size_t)valid); /* zero-padded chunk */   \
        const float* u = dzc.data();                                                                    \
        float* dxn = dx + n * in;                                                                       \
        const long e0 = start[n - n0], e1 = start[n - n0 + 1];                                          \
        long e = e0;                                                                                    \
        for (; e + kDots <= e1; e += kDots) {                                                           \
          const float *v0 = wt.column(c, idx[e]), *v1 = wt.column(c, idx[e + 1]);                       \
          const float *v2 = wt.column(c, idx[e + 2]), *v3 = wt.column(c, idx[e + 3]);                   \
          v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                                    \
          for (long j = 0; j < wt.width; j += 8) {                                                      \
            const v8 uj = load8(u + j);                                                                 \
            s0 += uj * load8(v0 + j);                                                                   \
            s1 += uj * load8(v1 + j);                                                                   \
            s2 += uj * load8(v2 + j);                                                                   \
            s3 += uj * load8(v3 + j);                                                                   \
          }                                                                                             \
          dxn[idx[e]] += hsum(s0);                                                                      \
          dxn[idx[e + 1]] += hsum(s1);                                                                  \
          dxn[idx[e + 2]] += hsum(s2);                                                                  \
          dxn[idx[e + 3]] += hsum(s3);                                                                  \
        }                                                                                               \
        for (; e < e1; ++e) {                                                                           \
          const float* v = wt.column(c, idx[e]);                                                        \
          v8 acc = {0};                                                                                 \
          for (long j = 0; j < wt.width; j += 8) acc += load8(u + j) * load8(v + j);                    \
          dxn[idx[e]] += hsum(acc);                                                                     \
        }                                                                                               \
      }                                                                                                 \
    }                                                                                                   \
  }

FDM_WORKERS(generic, )
#if defined(__x86_64__) && defined(__GNUC__)
#define FDM_HAVE_AVX2 1
FDM_WORKERS(avx2, __attribute__((target("avx2,fma"))))
#endif

// -1: not decided yet; MINDFORMERS_LORA_EXT_CPU_ISA=generic forces the baseline (as for the
// fused LoRA kernel), and so does fdm_force_generic(1) (tests).
static int g_avx2 = -1;

static bool use_avx2() {
  int avx2 = __atomic_load_n(&g_avx2, __ATOMIC_ACQUIRE);
  if (avx2 >= 0) return avx2 == 1;
#ifdef FDM_HAVE_AVX2
  __builtin_cpu_init();
  avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  avx2 = 0;
#endif
  const char* forced = getenv("MINDFORMERS_LORA_EXT_CPU_ISA");
  if (forced && strcmp(forced, "generic") == 0) avx2 = 0;
  __atomic_store_n(&g_avx2, avx2, __ATOMIC_RELEASE);
  return avx2 == 1;
}

static void forward_rows(const Blocked& wt, const float* x, long n0, long n1, long in, long out,
                         const int32_t* idx, const long* start, float* z) {
#ifdef FDM_HAVE_AVX2
  if (use_avx2()) return forward_rows_avx2(wt, x, n0, n1, in, out, idx, start, z);
#endif
  forward_rows_generic(wt, x, n0, n1, in, out, idx, start, z);
}

static void backward_rows(const Blocked& wt, const float* dz, long n0, long n1, long in, long out,
                          const int32_t* idx, const long* start, float* dx) {
#ifdef FDM_HAVE_AVX2
  if (use_avx2()) return backward_rows_avx2(wt, dz, n0, n1, in, out, idx, start, dx);
#endif
  backward_rows_generic(wt, dz, n0, n1, in, out, idx, start, dx);
}

static void forward(const float* x, const float* keep, const float* w, long N, long in, long out, float* z) {
  const Blocked wt = blocked_transpose(w, out, in);
#pragma omp parallel
  {
    long n0, n1;
    row_range(N, &n0, &n1);
    std::vector<int32_t> idx;
    std::vector<long> start;
    dropped_columns(keep, n0, n1, in, &idx, &start);
    forward_rows(wt, x, n0, n1, in, out, idx.data(), start.data(), z);
  }
}

static void backward(const float* dz, const float* keep, const float* w, long N, long in, long out,
                     float* dx) {
  const Blocked wt = blocked_transpose(w, out, in);
#pragma omp parallel
  {
    long n0, n1;
    row_range(N, &n0, &n1);
    std::vector<int32_t> idx;
    std::vector<long> start;
    dropped_columns(keep, n0, n1, in, &idx, &start);
    for (long n = n0; n < n1; ++n) memset(dx + n * in, 0, sizeof(float) * (size_t)in);
    backward_rows(wt, dz, n0, n1, in, out, idx.data(), start.data(), dx);
  }
}

static bool is_f32(const char* dtype) { return dtype && strcmp(dtype, "float32") == 0; }

enum Err { OK = 0, ERR_NPARAM = 1, ERR_DTYPE = 2, ERR_SHAPE = 3 };

// Both ops take three 2-D float32 inputs and give a 2-D float32 result plus dropped [1] float32.
static int check_args(int nparam, int* ndims, const char** dtypes) {
  if (nparam != 5) return ERR_NPARAM;
  for (int i = 0; i < 5; ++i)
    if (!is_f32(dtypes[i])) return ERR_DTYPE;
  for (int i = 0; i < 4; ++i)
    if (ndims[i] != 2) return ERR_SHAPE;
  return OK;
}

}  // namespace fdm

// Both ops have a second output, dropped [1] float32 = the number of dropped elements of keep:
// MindSpore 2.9 runs single-output AOT ops in dynamic-shape graphs through a Python type infer
// that fails ("The prim is not a PrimitivePy"); with two outputs the C++ path is taken.
static float count_dropped(const float* keep, long n) {
  long c = 0;
  for (long e = 0; e < n; ++e) c += keep[e] == 0.0f;
  return (float)c;
}

// params: x [N, in], keep [N, in], W [out, in] | z [N, out], dropped [1]
FLK_API int DroppedMatmulForward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                 void* stream, void* extra) {
  (void)stream;
  (void)extra;
  if (const int err = fdm::check_args(nparam, ndims, dtypes)) return err;
  const long N = shapes[0][0], in = shapes[0][1], out = shapes[2][0];
  if (shapes[1][0] != N || shapes[1][1] != in || shapes[2][1] != in || shapes[3][0] != N || shapes[3][1] != out)
    return fdm::ERR_SHAPE;
  fdm::forward((const float*)params[0], (const float*)params[1], (const float*)params[2], N, in, out,
               (float*)params[3]);
  *(float*)params[4] = count_dropped((const float*)params[1], N * in);
  return fdm::OK;
}

FLK_API std::vector<std::vector<int64_t>> DroppedMatmulForwardInferShape(int* ndims, int64_t** shapes,
                                                                         AotExtra* extra) {
  (void)extra;
  const int64_t n = (ndims[0] >= 1 && shapes[0][0] >= 0) ? shapes[0][0] : -1;
  const int64_t out = (ndims[2] == 2) ? shapes[2][0] : -1;
  return {{n, out}, {1}};
}

// params: dz [N, out], keep [N, in], W [out, in] | dx [N, in], dropped [1]
FLK_API int DroppedMatmulBackward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                  void* stream, void* extra) {
  (void)stream;
  (void)extra;
  if (const int err = fdm::check_args(nparam, ndims, dtypes)) return err;
  const long N = shapes[1][0], in = shapes[1][1], out = shapes[2][0];
  if (shapes[0][0] != N || shapes[0][1] != out || shapes[2][1] != in || shapes[3][0] != N || shapes[3][1] != in)
    return fdm::ERR_SHAPE;
  fdm::backward((const float*)params[0], (const float*)params[1], (const float*)params[2], N, in, out,
                (float*)params[3]);
  *(float*)params[4] = count_dropped((const float*)params[1], N * in);
  return fdm::OK;
}

FLK_API std::vector<std::vector<int64_t>> DroppedMatmulBackwardInferShape(int* ndims, int64_t** shapes,
                                                                          AotExtra* extra) {
  (void)extra;
  return {std::vector<int64_t>(shapes[1], shapes[1] + ndims[1]), {1}};
}

// Force (1) or release (0) the baseline row workers; returns the workers now used: 1 = AVX2.
FLK_API int fdm_force_generic(int on) {
  __atomic_store_n(&fdm::g_avx2, -1, __ATOMIC_RELEASE);
  const bool avx2 = fdm::use_avx2();
  __atomic_store_n(&fdm::g_avx2, on ? 0 : (avx2 ? 1 : 0), __ATOMIC_RELEASE);
  return on ? 0 : (avx2 ? 1 : 0);
}
