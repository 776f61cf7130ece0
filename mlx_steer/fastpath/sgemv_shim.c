/*
 * sgemv_shim.c -- send MLX's one-row cblas_sgemm calls to cblas_sgemv, and few-row
 * ones to a small kernel.
 *
 * MLX's CPU backend computes every matrix product, including the (1 x K) @ (K x N)
 * products of batch-1 decoding, with cblas_sgemm. OpenBLAS's sgemm packs the whole
 * B matrix (the weights) into a scratch buffer on every call, which for a single row
 * costs more than the product itself; sgemv streams the weights once.
 *
 * Preload it IN FRONT of the BLAS it should forward to:
 *     LD_PRELOAD=/path/libmlxsteer_sgemv.so:/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
 * cblas_sgemm then resolves here; the real cblas_sgemm / cblas_sgemv are looked up with
 * dlsym(RTLD_NEXT, ...), i.e. in the libraries loaded after this one (OpenBLAS above, or
 * MLX's bundled BLAS when the shim is preloaded alone). Where none exports them, the
 * prefixed scipy_cblas_sgemm / scipy_cblas_sgemv of PyPI's scipy-openblas32 are used:
 * preloaded behind the shim, that library serves MLX's products only through it.
 *
 * Few-row products (2..SMALL_M_MAX rows times a weight matrix, x @ W^T: batched decoding
 * of a handful of rows) go to a small kernel here that streams each weight row once and
 * reuses it for every input row, split over the cores by output columns; OpenBLAS's
 * sgemm would pack the whole weight matrix first.
 *
 * Small one-row products (up to ONE_ROW_SMALL weights: the attention's per-row, per-head
 * products while decoding) run on the calling thread, in kernels here: OpenBLAS's sgemv
 * splits those from 9216 elements (a context of 144 tokens) over its threads, whose
 * hand-offs then cost more than the products.
 *
 * Quantised twins: a float32 weight matrix that was expanded from affine-quantised
 * blocks (GGUF Q4_0 / Q4_1 / Q8_0: w = scale * q + bias per group of 32 along K) can be
 * registered with its quantised bytes (mlx_steer_twin_register). Products x @ W^T with
 * 1..SMALL_M_MAX rows then read those bytes, 4-8x fewer than W, and rebuild each weight
 * with one fma: scale * q is exact in float32, so the rebuilt weight equals W bit for bit
 * and only the order of the sums changes. A twin is used only while the first and last
 * elements of W still hold the values seen at registration (AVX-512 machines only).
 *
 * MLX's compiled CPU kernels: MLX compiles a fused kernel (mx.compile, e.g. mlx-lm's
 * SwiGLU) at run time with `g++ -std=c++17 -O3 -Wall -fPIC -shared ...` through popen(),
 * without -march: each element calls MLX's scalar exp out of line, and every fma in it is a
 * call into libm. On x86-64, popen() here adds `-march=native -ffp-contract=off
 * -fno-trapping-math -finline-limit=1000` to that command (only to a command starting with
 * exactly that prefix; every other command passes through unchanged): exp is inlined and
 * the loop vectorised (see MLX_JIT_FLAGS). Contraction stays off, so each kernel does the
 * same float operations, each correctly rounded, and its results are bit-identical; only
 * the instructions change (vectors, inline fma). MLX
 * caches each kernel under $TMPDIR/mlx/<version>/cpu by name: a kernel compiled before
 * (without the shim) is reused as it is; delete that folder to recompile.
 *
 * Results: the same sums in another order, so outputs may differ in the last bits of
 * float32 (tests require identical greedy tokens and log-probabilities within 1e-3).
 *
 * Environment: MLX_STEER_SHIM_STATS=1 prints call counts to stderr at exit;
 * MLX_STEER_SHIM_SMALLM=0 turns the few-row and small one-row kernels off; MLX_STEER_SHIM_THREADS=n sets
 * its threads (default: OPENBLAS_NUM_THREADS, else the online CPUs, at most 16);
 * MLX_STEER_SHIM_ISA=avx2|generic caps the kernel's instruction set (for measuring);
 * MLX_STEER_SHIM_TWINS=0 turns quantised twins off; MLX_STEER_SHIM_SPIN=n sets how many
 * times an idle pool thread polls for work before it sleeps (default 1000, 0: never), and
 * MLX_STEER_SHIM_SPIN_BATCH=n the same after a product of several rows (default 30000);
 * MLX_STEER_SHIM_TWIN_SPLIT=n splits twin products over the threads from n rows (default 1);
 * MLX_STEER_SHIM_IDLE=0 runs the pool threads at normal priority instead of SCHED_IDLE;
 * MLX_STEER_SHIM_NATIVE=0 leaves MLX's kernel compilations as they are.
 *
 * Build (mlx_steer.fastpath.build does it):
 *     cc -O3 -shared -fPIC -o libmlxsteer_sgemv.so sgemv_shim.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sched.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* CBLAS enum values (identical in every CBLAS). */
enum { RowMajor = 101, ColMajor = 102 };
enum { NoTrans = 111, Trans = 112, ConjTrans = 113 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

static sgemm_fn real_sgemm;
static void (*pypi_set_threads)(int); /* pending: PyPI OpenBLAS to 1 thread on first call */
static sgemv_fn real_sgemv;
static unsigned long n_gemv, n_gemm, n_small, n_twin, n_row, n_native;
static void pick_kernel(void);
static int stats;
static int smallm = 1;  /* few-row kernel on */
static int nthreads = 1;
static int spin = 1000; /* polls (x86 pause) before a pool thread sleeps */
/* the same after a product of several rows (batched decoding, whose loop waits for each
 * step: the second core is otherwise idle between its products) */
static int spin_batch = 30000;
static int twin_split_rows = 1; /* rows from which twin products are split over threads */
static int idle_workers = 1;    /* pool threads run at SCHED_IDLE (see worker()) */
static int twin_isa; /* quantised twins usable (AVX-512) */
/* add -march=native to MLX's kernel compilations: x86-64 only (g++ for POWER, say, has
 * -mcpu=native instead and would reject the command, failing the compiled function) */
#if defined(__x86_64__)
static int native = 1;
#else
static int native = 0;
#endif

static void report(void) {
    fprintf(stderr, "mlx-steer sgemv shim: %lu one-row products sent to sgemv, "
                    "%lu few-row products to the small kernel, %lu to quantised twins, "
                    "%lu passed to sgemm, %lu small one-row products to the one-row kernel, "
                    "%lu MLX kernel compilations given -march=native\n",
            n_gemv, n_small, n_twin, n_gemm, n_row, n_native);
}

static int env_int(const char *name, int dflt) {
    const char *s = getenv(name);
    if (!s || !*s) return dflt;
    int v = atoi(s);
    return v > 0 ? v : dflt;
}

/* An on/off switch that is on by default: off only when set to exactly "0". */
static int env_off(const char *name) {
    const char *s = getenv(name);
    return s && strcmp(s, "0") == 0;
}

/* A count of polls: unset keeps `dflt`, anything not positive means none. */
static int env_polls(const char *name, int dflt) {
    const char *s = getenv(name);
    if (!s || !*s) return dflt;
    int v = atoi(s);
    return v > 0 ? v : 0;
}

__attribute__((constructor)) static void shim_init(void) {
    real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    real_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
    /* MKL (PyPI's `mkl` wheel) behind us: sequential unless the user chose otherwise. Its
       threads, like the PyPI OpenBLAS's, lost their core to other jobs on a busy 2-core
       machine; the sequential layer also needs no OpenMP runtime. MKL reads the variable
       at its first call, after this constructor. */
    if (real_sgemm && dlsym(RTLD_NEXT, "MKL_Set_Threading_Layer") && !getenv("MKL_NUM_THREADS"))
        setenv("MKL_THREADING_LAYER", "SEQUENTIAL", 0);
    if (!real_sgemm || !real_sgemv) {
        /* PyPI's scipy-openblas32 exports its CBLAS with a prefix (so that it never
           clashes with another BLAS in the process): forward to those. */
        real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "scipy_cblas_sgemm");
        real_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "scipy_cblas_sgemv");
        /* Its threads wait busily between calls: with 2 threads on a busy 2-core machine its
           products ran 4-5x slower than with 1 (which matched Debian's OpenBLAS), so it runs
           on 1 thread unless OPENBLAS_NUM_THREADS says otherwise (set on the first call:
           the library may not be initialised yet while this constructor runs). */
        const char *ob = getenv("OPENBLAS_NUM_THREADS");
        if (real_sgemm && !(ob && *ob))
            pypi_set_threads = (void (*)(int))dlsym(RTLD_NEXT, "scipy_openblas_set_num_threads");
    }
    const char *s = getenv("MLX_STEER_SHIM_STATS");
    static int registered;
    stats = s && *s && strcmp(s, "0") != 0;
    if (stats && !registered) {
        registered = 1;
        atexit(report);
    }
    pick_kernel();
    smallm = !env_off("MLX_STEER_SHIM_SMALLM");
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    nthreads = env_int("MLX_STEER_SHIM_THREADS",
                       env_int("OPENBLAS_NUM_THREADS", ncpu > 0 ? (int)ncpu : 1));
    if (nthreads > 16) nthreads = 16;
    spin = env_polls("MLX_STEER_SHIM_SPIN", spin);
    spin_batch = env_polls("MLX_STEER_SHIM_SPIN_BATCH", spin_batch);
    twin_split_rows = env_int("MLX_STEER_SHIM_TWIN_SPLIT", twin_split_rows);
    if (env_off("MLX_STEER_SHIM_IDLE")) idle_workers = 0;
    if (env_off("MLX_STEER_SHIM_NATIVE")) native = 0;
}

/* Exported so a test can tell that the shim is loaded. */
int mlx_steer_sgemv_shim_active(void) { return real_sgemm != NULL && real_sgemv != NULL; }

static void zero(float *y, int n, int inc) {
    if (inc == 1) {
        memset(y, 0, sizeof(float) * (size_t)n);
    } else {
        for (int i = 0; i < n; i++) y[(size_t)i * inc] = 0.0f;
    }
}

/* ---- few-row kernel: C[m, n] = alpha * dot(A[m, :], B[n, :]) + beta * C[m, n] ---------- */
#define SMALL_M_MAX 12
#define ONE_ROW_SMALL (1L << 18) /* one-row products up to this many weights: here */

typedef float v8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));
typedef float v4 __attribute__((vector_size(16)));

/* Pairwise sum of the lanes of a vector: lane l plus lane l + W/2, then the same on the
 * W/2 sums, down to one (the order _mm512_reduce_add_ps sums in). In registers, halves
 * added as vectors: summing the lanes through memory stalled the one-row products. */
#define HALVES(H, v)                                                                        \
    ({                                                                                      \
        H lo_, hi_;                                                                         \
        memcpy(&lo_, &(v), sizeof lo_);                                                     \
        memcpy(&hi_, (const char *)&(v) + sizeof lo_, sizeof hi_);                          \
        lo_ + hi_;                                                                          \
    })
#define hsum4(v) (((v)[0] + (v)[2]) + ((v)[1] + (v)[3]))
#define hsum8(v) ({ v4 q_ = HALVES(v4, v); hsum4(q_); })
#define hsum16(v) ({ v8 o_ = HALVES(v8, v); hsum8(o_); })

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* hsum16 and hsum8 with the same additions written as register extracts: GCC compiles
 * the memcpy halves above through the stack (a 64-byte store, then 32-byte loads of its
 * halves, which the store cannot forward to), which stalls the few-row kernel. The twin
 * kernels reduce with hsum16_x86 too, in one fixed tree (lower 8 + upper 8, lower 4 +
 * upper 4 of those, then (q0 + q2) + (q1 + q3)) that twin_sum16 reproduces lane by lane. */
__attribute__((target("avx512f,avx512vl,fma"))) static inline float hsum16_x86(v16 v) {
    __m512 z = (__m512)v;
    __m256 o = _mm256_add_ps(_mm512_castps512_ps256(z),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(o), _mm256_extractf128_ps(o, 1));
    return (q[0] + q[2]) + (q[1] + q[3]);
}
__attribute__((target("avx2,fma"))) static inline float hsum8_x86(v8 v) {
    __m256 o = (__m256)v;
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(o), _mm256_extractf128_ps(o, 1));
    return (q[0] + q[2]) + (q[1] + q[3]);
}
#endif

static inline void put(float *c, float s, float alpha, float beta) {
    *c = beta == 0.0f ? alpha * s : alpha * s + beta * *c;
}

/* Output columns [n0, n1) of C = alpha * A B^T + beta * C, A (M x K), B (N x K).
 * Each block of 4 weight rows (B) is read from memory once and reused, from L1, for
 * every pair of input rows (A). VT is a vector of W floats; the body is instantiated
 * per instruction set below and chosen at load time. */
#define SMALLM_COLS(NAME, ATTR, VT, W, HSUM)                                                \
    ATTR static void NAME(int M, int n0, int n1, int K, float alpha, const float *A,       \
                          int lda, const float *B, int ldb, float beta, float *C,          \
                          int ldc) {                                                       \
        const int KW = K - K % W;                                                          \
        int n = n0;                                                                        \
        for (; n + 4 <= n1; n += 4) {                                                      \
            const float *w[4] = {B + (size_t)n * ldb, B + (size_t)(n + 1) * ldb,           \
                                 B + (size_t)(n + 2) * ldb, B + (size_t)(n + 3) * ldb};    \
            for (int m = 0; m < M; m += 2) {                                               \
                const int two = m + 1 < M;                                                 \
                const float *x0 = A + (size_t)m * lda, *x1 = two ? x0 + lda : x0;          \
                VT a0[4] = {{0}}, a1[4] = {{0}};                                           \
                if (two) {                                                                 \
                    for (int k = 0; k < KW; k += W) {                                      \
                        VT x, y, b;                                                        \
                        memcpy(&x, x0 + k, sizeof x);                                      \
                        memcpy(&y, x1 + k, sizeof y);                                      \
                        for (int j = 0; j < 4; j++) {                                      \
                            memcpy(&b, w[j] + k, sizeof b);                                \
                            a0[j] += x * b;                                                \
                            a1[j] += y * b;                                                \
                        }                                                                  \
                    }                                                                      \
                } else { /* a last, odd row (one-row products): the same sums, once */     \
                    for (int k = 0; k < KW; k += W) {                                      \
                        VT x, b;                                                           \
                        memcpy(&x, x0 + k, sizeof x);                                      \
                        for (int j = 0; j < 4; j++) {                                      \
                            memcpy(&b, w[j] + k, sizeof b);                                \
                            a0[j] += x * b;                                                \
                        }                                                                  \
                    }                                                                      \
                }                                                                          \
                for (int j = 0; j < 4; j++) {                                              \
                    float s0 = HSUM(a0[j]), s1 = two ? HSUM(a1[j]) : 0.0f;                 \
                    for (int k = KW; k < K; k++) {                                         \
                        s0 += x0[k] * w[j][k];                                             \
                        if (two) s1 += x1[k] * w[j][k];                                    \
                    }                                                                      \
                    put(C + (size_t)m * ldc + n + j, s0, alpha, beta);                     \
                    if (two) put(C + (size_t)(m + 1) * ldc + n + j, s1, alpha, beta);      \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        for (; n < n1; n++) {                                                              \
            const float *wr = B + (size_t)n * ldb;                                         \
            for (int m = 0; m < M; m++) {                                                  \
                const float *x = A + (size_t)m * lda;                                      \
                VT acc = {0}, u, v;                                                        \
                for (int k = 0; k < KW; k += W) {                                          \
                    memcpy(&u, x + k, sizeof u);                                           \
                    memcpy(&v, wr + k, sizeof v);                                          \
                    acc += u * v;                                                          \
                }                                                                          \
                float t = HSUM(acc);                                                       \
                for (int k = KW; k < K; k++) t += x[k] * wr[k];                            \
                put(C + (size_t)m * ldc + n, t, alpha, beta);                              \
            }                                                                              \
        }                                                                                  \
    }

typedef void (*cols_fn)(int, int, int, int, float, const float *, int, const float *, int,
                        float, float *, int);

/* c[n] = alpha * sum_k x[k] * B[k, n] + beta * c[n] for a small B (K x N, row-major): the
 * attention's probabilities times its values, one row and head at a time. Each column's
 * sum runs over k in order, whatever N. */
#define ROW_TIMES(NAME, ATTR, VT, W)                                                       \
    ATTR static void NAME(int N, int K, float alpha, const float *x, const float *B,       \
                          int ldb, float beta, float *C) {                                 \
        enum { CH = 8 * W };                                                               \
        for (int n0 = 0; n0 < N; n0 += CH) {                                               \
            const int nn = N - n0 < CH ? N - n0 : CH, nv = nn - nn % W;                    \
            VT acc[8] = {{0}};                                                             \
            float tail[W] = {0};                                                           \
            for (int k = 0; k < K; k++) {                                                  \
                const float a = x[k], *b = B + (size_t)k * ldb + n0;                       \
                VT av = a - (VT){0}, v;                                                    \
                for (int j = 0; j < nv; j += W) {                                          \
                    memcpy(&v, b + j, sizeof v);                                           \
                    acc[j / W] += av * v;                                                  \
                }                                                                          \
                for (int j = nv; j < nn; j++) tail[j - nv] += a * b[j];                    \
            }                                                                              \
            float s[CH];                                                                   \
            memcpy(s, acc, sizeof(float) * nv);                                            \
            for (int j = nv; j < nn; j++) s[j] = tail[j - nv];                             \
            for (int j = 0; j < nn; j++) put(C + n0 + j, s[j], alpha, beta);               \
        }                                                                                  \
    }

typedef void (*row_fn)(int, int, float, const float *, const float *, int, float, float *);

SMALLM_COLS(cols_generic, , v8, 8, hsum8)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
SMALLM_COLS(cols_avx2, __attribute__((target("avx2,fma"))), v8, 8, hsum8_x86)
SMALLM_COLS(cols_avx512, __attribute__((target("avx512f,avx512vl,fma"))), v16, 16, hsum16_x86)
#endif
ROW_TIMES(row_generic, , v8, 8)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
ROW_TIMES(row_avx2, __attribute__((target("avx2,fma"))), v8, 8)
/* ROW_TIMES for AVX-512, with the same operations per column (one fma per k, in order,
 * from zero; its tail columns too, where GCC contracts the scalar += into an fma):
 * 64 columns at a time in four registers. ROW_TIMES's accumulators live in an array
 * that GCC keeps on the stack, so each k stored and reloaded them (measured: the values
 * product of a head group's 3 queries took 1.7 us in the model). */
__attribute__((target("avx512f,avx512vl,fma"))) static void row_avx512(
    int N, int K, float alpha, const float *x, const float *B, int ldb, float beta, float *C) {
    for (int n0 = 0; n0 < N; n0 += 64) {
        const int nn = N - n0 < 64 ? N - n0 : 64;
        __mmask16 mask[4];
        for (int v = 0; v < 4; v++) {
            const int left = nn - 16 * v;
            mask[v] = left >= 16 ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        }
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const float *b = B + n0;
        for (int k = 0; k < K; k++, b += ldb) {
            const __m512 xk = _mm512_set1_ps(x[k]);
            a0 = _mm512_fmadd_ps(xk, _mm512_maskz_loadu_ps(mask[0], b), a0);
            a1 = _mm512_fmadd_ps(xk, _mm512_maskz_loadu_ps(mask[1], b + 16), a1);
            a2 = _mm512_fmadd_ps(xk, _mm512_maskz_loadu_ps(mask[2], b + 32), a2);
            a3 = _mm512_fmadd_ps(xk, _mm512_maskz_loadu_ps(mask[3], b + 48), a3);
        }
        float *c = C + n0;
        if (alpha == 1.0f && beta == 0.0f) {
            _mm512_mask_storeu_ps(c, mask[0], a0);
            _mm512_mask_storeu_ps(c + 16, mask[1], a1);
            _mm512_mask_storeu_ps(c + 32, mask[2], a2);
            _mm512_mask_storeu_ps(c + 48, mask[3], a3);
        } else {
            float s[64];
            _mm512_storeu_ps(s, a0);
            _mm512_storeu_ps(s + 16, a1);
            _mm512_storeu_ps(s + 32, a2);
            _mm512_storeu_ps(s + 48, a3);
            for (int j = 0; j < nn; j++) put(c + j, s[j], alpha, beta);
        }
    }
}
#endif

static cols_fn smallm_cols = cols_generic;
static row_fn row_times = row_generic;

static void pick_kernel(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    const char *s = getenv("MLX_STEER_SHIM_ISA"); /* "avx2" or "generic": for measuring */
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
    if (s && strcmp(s, "generic") == 0) avx2 = avx512 = 0;
    if (s && strcmp(s, "avx2") == 0) avx512 = 0;
    smallm_cols = avx512 ? cols_avx512 : avx2 ? cols_avx2 : cols_generic;
    row_times = avx512 ? row_avx512 : avx2 ? row_avx2 : row_generic;
    twin_isa = avx512 && __builtin_cpu_supports("avx512bw");
    if (env_off("MLX_STEER_SHIM_TWINS")) twin_isa = 0;
#endif
}


/* ---- quantised twins ------------------------------------------------------------------- */
#define TWIN_GROUP 32
#define TWIN_SLOTS 16384 /* open-addressing table, a power of two */

struct twin {
    const float *w;             /* the float32 matrix, N x K row-major */
    long tag;                   /* owner, for mlx_steer_twin_unregister */
    int N, K, bits;             /* bits: 4 (two per byte: see twin_group) or 8 */
    const unsigned char *q;     /* N x K/2 or N x K bytes */
    const float *scale, *bias;  /* N x K/32 each */
    unsigned int probe[2];      /* bits of w[0] and w[N*K-1] at registration */
};
static struct twin *twin_table; /* TWIN_SLOTS entries, w == NULL where free */
static int twin_count;
static pthread_rwlock_t twin_lock = PTHREAD_RWLOCK_INITIALIZER;

static unsigned long twin_hash(const float *w) {
    return (((unsigned long)w >> 4) * 0x9E3779B97F4A7C15UL) >> 50; /* 14 bits */
}

static void twin_insert(struct twin t) {
    unsigned long i = twin_hash(t.w);
    while (twin_table[i].w && twin_table[i].w != t.w) i = (i + 1) & (TWIN_SLOTS - 1);
    if (!twin_table[i].w) twin_count++;
    twin_table[i] = t;
}

/* 1 when quantised twins can be used here (x86-64 with AVX-512). */
int mlx_steer_twin_supported(void) { return twin_isa; }

/* Register W (N x K float32) as the expansion of q / scale / bias (4-bit bytes in the
 * order twin_group reads); 1 on success. The caller keeps all four buffers alive until
 * mlx_steer_twin_unregister(tag). */
int mlx_steer_twin_register(const float *w, int N, int K, int bits, const unsigned char *q,
                            const float *scale, const float *bias, long tag) {
    if (!twin_isa || !w || !q || !scale || !bias || N <= 0 || K <= 0 ||
        K % TWIN_GROUP || (bits != 4 && bits != 8))
        return 0;
    struct twin t = {w, tag, N, K, bits, q, scale, bias, {0, 0}};
    memcpy(&t.probe[0], w, 4);
    memcpy(&t.probe[1], w + (size_t)N * K - 1, 4);
    int ok = 0;
    pthread_rwlock_wrlock(&twin_lock);
    if (!twin_table) twin_table = calloc(TWIN_SLOTS, sizeof *twin_table);
    if (twin_table && twin_count < TWIN_SLOTS / 2) {
        twin_insert(t);
        ok = 1;
    }
    pthread_rwlock_unlock(&twin_lock);
    return ok;
}

/* Forget every twin registered with `tag`; returns how many. */
int mlx_steer_twin_unregister(long tag) {
    int gone = 0;
    pthread_rwlock_wrlock(&twin_lock);
    if (twin_table) {
        struct twin *old = twin_table;
        twin_table = calloc(TWIN_SLOTS, sizeof *twin_table);
        twin_count = 0;
        for (int i = 0; i < TWIN_SLOTS; i++) {
            if (!old[i].w) continue;
            if (old[i].tag == tag) gone++;
            else if (twin_table) twin_insert(old[i]);
        }
        free(old);
    }
    pthread_rwlock_unlock(&twin_lock);
    return gone;
}

/* The twin of W, if registered with these sizes and W still holds its probes.
 * Returns with the read lock held when found (released by twin_release). */
static const struct twin *twin_find(const float *w, int N, int K, int ldb) {
    if (!twin_count || ldb != K) return NULL;
    pthread_rwlock_rdlock(&twin_lock);
    if (twin_table) {
        unsigned long i = twin_hash(w);
        for (; twin_table[i].w; i = (i + 1) & (TWIN_SLOTS - 1)) {
            const struct twin *t = &twin_table[i];
            if (t->w != w) continue;
            unsigned int p0, p1;
            memcpy(&p0, w, 4);
            memcpy(&p1, w + (size_t)N * K - 1, 4);
            if (t->N == N && t->K == K && p0 == t->probe[0] && p1 == t->probe[1]) return t;
            break;
        }
    }
    pthread_rwlock_unlock(&twin_lock);
    return NULL;
}

static void twin_release(void) { pthread_rwlock_unlock(&twin_lock); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TWIN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

/* The 32 weights of group g of row n, rebuilt as float32: w0 = elements 0..15, w1 = 16..31.
 * 8 bits: one byte per element, each rebuilt as fma(q, scale, bias). 4 bits: byte j of a
 * group's 16 holds element j in its low nibble and element j + 16 in its high one (GGUF's
 * own order; mlx_steer.fastpath.twins converts MLX's, which pairs neighbours), so the
 * input rows are read as they are; the group's 16 possible weights fma(q, scale, bias),
 * q = 0..15, are computed once and each weight looked up by its nibble (the same values,
 * in fewer instructions: vpermps reads only an index's low 4 bits, so the low nibbles
 * need no mask). */
TWIN_TARGET static inline void twin_group(const struct twin *t, int n, int g, __m512 *w0,
                                          __m512 *w1) {
    const int G = t->K / TWIN_GROUP;
    __m512 sc = _mm512_set1_ps(t->scale[(size_t)n * G + g]);
    __m512 bi = _mm512_set1_ps(t->bias[(size_t)n * G + g]);
    if (t->bits == 4) {
        __m512i e = _mm512_cvtepu8_epi32(
            _mm_loadu_si128((const __m128i *)(t->q + (size_t)n * (t->K / 2) + g * 16)));
        __m512 table = _mm512_fmadd_ps(
            _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), sc, bi);
        *w0 = _mm512_permutexvar_ps(e, table);
        *w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(e, 4), table);
    } else {
        const unsigned char *q = t->q + (size_t)n * t->K + g * 32;
        *w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                  _mm_loadu_si128((const __m128i *)q))), sc, bi);
        *w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                  _mm_loadu_si128((const __m128i *)(q + 16)))), sc, bi);
    }
}

/* Asks for the bytes of row n's groups g .. g+3 (and, at g = 0, its scales and biases)
 * to be brought into the cache. A product of several input rows streams the weights
 * more slowly than the hardware's prefetchers expect: measured in the model at 8 rows,
 * asking TWIN_AHEAD rows ahead made a decode step 10% faster (35.3 -> 31.7 ms); one row
 * does not ask (its kernel is bound by memory, and asking did not help there). */
enum { TWIN_AHEAD = 8 };
TWIN_TARGET static inline void twin_prefetch(const struct twin *t, int n, int g) {
    if (n >= t->N) return;
    const int G = t->K / TWIN_GROUP;
    const char *q = (const char *)t->q + (size_t)n * (t->K / 8 * t->bits) + g * 4 * t->bits;
    _mm_prefetch(q, _MM_HINT_T0);
    if (t->bits == 8) _mm_prefetch(q + 64, _MM_HINT_T0);
    if (g == 0)
        for (int i = 0; i < G; i += 16) {
            _mm_prefetch((const char *)(t->scale + (size_t)n * G + i), _MM_HINT_T0);
            _mm_prefetch((const char *)(t->bias + (size_t)n * G + i), _MM_HINT_T0);
        }
}

/* Rows n .. n+NR-1 of W against MC input rows x[0..MC): a[r][m] holds 16 partial sums of
 * dot(W[n+r], x[m]). Rows past the matrix's end repeat its last row (their sums are not
 * stored). Each sum has one accumulator, taking each group's two halves in turn: the same
 * order whatever NR and MC, so a row's sums do not depend on the rows batched with it.
 * Each input vector is loaded once for the NR weight rows (the empty asm keeps it in a
 * register; GCC would otherwise fold a load into every FMA, and loads, not FMAs, then
 * bound the kernel). */
#define TWIN_ACC(NR, MC)                                                                    \
    const int G = t->K / TWIN_GROUP;                                                       \
    int rows[NR];                                                                          \
    for (int r = 0; r < NR; r++) rows[r] = n + r < t->N ? n + r : t->N - 1;                \
    __m512 a[NR][MC];                                                                      \
    for (int r = 0; r < NR; r++)                                                           \
        for (int m = 0; m < MC; m++) a[r][m] = _mm512_setzero_ps();                        \
    for (int g = 0; g < G; g++) {                                                          \
        __m512 w[NR][2];                                                                   \
        if (MC >= 4 && (g & 3) == 0)                                                       \
            for (int r = 0; r < NR; r++) twin_prefetch(t, rows[r] + TWIN_AHEAD, g);        \
        for (int r = 0; r < NR; r++) twin_group(t, rows[r], g, &w[r][0], &w[r][1]);        \
        for (int m = 0; m < MC; m++) {                                                     \
            __m512 x0 = _mm512_loadu_ps(x[m] + g * 32);                                    \
            __m512 x1 = _mm512_loadu_ps(x[m] + g * 32 + 16);                               \
            __asm__("" : "+v"(x0), "+v"(x1));                                              \
            for (int r = 0; r < NR; r++) {                                                 \
                a[r][m] = _mm512_fmadd_ps(w[r][0], x0, a[r][m]);                           \
                a[r][m] = _mm512_fmadd_ps(w[r][1], x1, a[r][m]);                           \
            }                                                                              \
        }                                                                                  \
    }

/* s[r][m] = dot(W[n+r], x[m]), each accumulator reduced by hsum16_x86. */
#define TWIN_ROWS(NAME, NR, MC)                                                             \
    TWIN_TARGET static void NAME(const struct twin *t, int n, const float *const *x,       \
                                 float s[NR][MC]) {                                        \
        TWIN_ACC(NR, MC)                                                                   \
        for (int r = 0; r < NR; r++)                                                       \
            for (int m = 0; m < MC; m++) s[r][m] = hsum16_x86((v16)a[r][m]);              \
    }
TWIN_ROWS(twin_rows2x1, 2, 1)
TWIN_ROWS(twin_rows2x4, 2, 4)

/* Lane j of the result = hsum16_x86(v[j]) bit for bit (the same pairs added, in the same
 * operand order), but the 16 reductions share their shuffles and adds: 45 instructions
 * instead of about 130 (at 8 rows and K = 576, separate reductions cost a fifth of the
 * kernel). */
TWIN_TARGET static inline __m512 twin_sum16(const __m512 v[16]) {
    __m512 u[8], w[4], z[2];
    for (int p = 0; p < 8; p++) /* [A.lo8 + A.hi8 | B.lo8 + B.hi8] */
        u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xEE));
    for (int q = 0; q < 4; q++) /* per 128-bit block: lower 4 + upper 4 of one sum's 8 */
        w[q] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * q], u[2 * q + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * q], u[2 * q + 1], 0xDD));
    for (int s = 0; s < 2; s++) /* per block: [E0 + E2, E1 + E3, F0 + F2, F1 + F3] */
        z[s] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * s], w[2 * s + 1], 0x44),
                             _mm512_shuffle_ps(w[2 * s], w[2 * s + 1], 0xEE));
    /* per block b: [sum b, sum 4+b, sum 8+b, sum 12+b], then each sum to its own lane */
    __m512 r = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88),
                             _mm512_shuffle_ps(z[0], z[1], 0xDD));
    return _mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

/* Rows n, n+1 of W against 8 input rows, stored: C[m][n + r] = alpha * dot(W[n+r], x[m])
 * + beta * C[m][n + r] for r < nr (1 or 2), through put() unless alpha = 1 and beta = 0. */
TWIN_TARGET static void twin_rows2x8(const struct twin *t, int n, const float *const *x,
                                     int nr, float alpha, float beta, float *C, int ldc) {
    TWIN_ACC(2, 8)
    __m512 v[16];
    for (int m = 0; m < 8; m++) v[2 * m] = a[0][m], v[2 * m + 1] = a[1][m];
    float s[16];
    _mm512_storeu_ps(s, twin_sum16(v)); /* s[2m + r] = dot(W[n+r], x[m]) */
    if (alpha == 1.0f && beta == 0.0f && nr == 2)
        for (int m = 0; m < 8; m++) memcpy(C + (size_t)m * ldc, s + 2 * m, 2 * sizeof(float));
    else
        for (int m = 0; m < 8; m++)
            for (int r = 0; r < nr; r++) put(C + (size_t)m * ldc + r, s[2 * m + r], alpha, beta);
}

/* Output columns [n0, n1) of C = alpha * A W^T + beta * C through the twin of W: blocks
 * of four weight rows, read from memory once for all input rows, two rebuilt per pass
 * (measured: four per pass made one-row products slower in the model). */
static void twin_cols(const struct twin *t, int M, int n0, int n1, float alpha,
                      const float *A, int lda, float beta, float *C, int ldc) {
/* MC input rows from row m against weight rows [n, n+4) (two per pass), stored. */
#define TWIN_PASS(MC, FN)                                                                   \
    for (int i = 0; i < MC; i++) x[i] = A + (size_t)(m + i) * lda;                          \
    for (int h = n; h < n + 4 && h < n1; h += 2) {                                          \
        float s[2][MC];                                                                     \
        FN(t, h, x, s);                                                                     \
        for (int r = 0; r < 2 && h + r < n1; r++)                                           \
            for (int i = 0; i < MC; i++)                                                    \
                put(C + (size_t)(m + i) * ldc + h + r, s[r][i], alpha, beta);               \
    }
    const float *x[8];
    for (int n = n0; n < n1; n += 4) {
        int m = 0;
        for (; m + 8 <= M; m += 8) {
            for (int i = 0; i < 8; i++) x[i] = A + (size_t)(m + i) * lda;
            for (int h = n; h < n + 4 && h < n1; h += 2)
                twin_rows2x8(t, h, x, h + 1 < n1 ? 2 : 1, alpha, beta,
                             C + (size_t)m * ldc + h, ldc);
        }
        for (; m + 4 <= M; m += 4) { TWIN_PASS(4, twin_rows2x4) }
        for (; m < M; m++) { TWIN_PASS(1, twin_rows2x1) }
    }
#undef TWIN_PASS
}
#else
static void twin_cols(const struct twin *t, int M, int n0, int n1, float alpha,
                      const float *A, int lda, float beta, float *C, int ldc) {
    (void)t; (void)M; (void)n0; (void)n1; (void)alpha; (void)A; (void)lda; (void)beta;
    (void)C; (void)ldc;
    abort(); /* unreachable: twins are never registered without AVX-512 */
}
#endif

/* A small pool of persistent workers sharing each product with the calling thread.
 * The output columns are cut into chunks that the threads claim one at a time, so that
 * a worker the scheduler has not run yet (other jobs on the cores) leaves its chunks to
 * the others instead of making the caller wait: the caller waits only for chunks a
 * worker has started. Every column is computed by the same code whoever claims it. */
struct job {
    int M, N, K, lda, ldb, ldc, chunk, chunks;
    float alpha, beta;
    const float *A, *B;
    float *C;
    const struct twin *t; /* set: read the quantised twin of B */
};
static struct job job;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_go = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static unsigned long pool_gen;
/* (generation << 32) | next chunk: a claim is valid only for the job it was made for */
static unsigned long long pool_next;
static int pool_finished; /* chunks of the current job completed */
static int pool_size;     /* workers started */

static void run_chunk(const struct job *j, int c) {
    int n0 = c * j->chunk, n1 = n0 + j->chunk < j->N ? n0 + j->chunk : j->N;
    if (n0 < n1 && j->t)
        twin_cols(j->t, j->M, n0, n1, j->alpha, j->A, j->lda, j->beta, j->C, j->ldc);
    else if (n0 < n1)
        smallm_cols(j->M, n0, n1, j->K, j->alpha, j->A, j->lda, j->B, j->ldb, j->beta, j->C,
                    j->ldc);
}

/* Claim and compute chunks of job generation `gen` until none is left. */
static void run_chunks(const struct job *j, unsigned long gen) {
    for (;;) {
        unsigned long long v = __atomic_load_n(&pool_next, __ATOMIC_ACQUIRE);
        if ((v >> 32) != (gen & 0xFFFFFFFFUL) || (int)(v & 0xFFFFFFFFU) >= j->chunks) return;
        if (!__atomic_compare_exchange_n(&pool_next, &v, v + 1, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;
        run_chunk(j, (int)(v & 0xFFFFFFFFU));
        if (__atomic_add_fetch(&pool_finished, 1, __ATOMIC_ACQ_REL) == j->chunks) {
            pthread_mutex_lock(&pool_mu);
            pthread_cond_broadcast(&pool_done);
            pthread_mutex_unlock(&pool_mu);
        }
    }
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Workers poll for the next job a little (a product every few tens of microseconds while
 * decoding) before sleeping: a futex wake-up costs about as much as a small product, and
 * in this virtual machine the waking thread pays most of it. After a product of several
 * rows they poll longer (spin_batch, ~0.3 ms): batched decoding's loop waits for each step,
 * so the other core is idle between its products, and one step's gaps between products
 * (attention, SwiGLU) are shorter than that; after one-row products (batch-1 decoding,
 * whose loop builds the next token's graph meanwhile) they poll briefly.
 *
 * Workers run at SCHED_IDLE: they take a core only when no other thread wants it. The
 * thread that walks MLX's graph and feeds its stream (Python's) sleeps and wakes hundreds
 * of times per decode step; with a worker polling at normal priority it waited for a core
 * (perf sched, 8-row step: ~6 ms runnable but not running per step), and the stream then
 * ran dry. Measured in one process, interleaved (2-core AMD EPYC, Zen 4): 8-row decode
 * step 50.3 -> 40.7 ms, batch-1 steered decode 48.9 -> 61.8 tok/s. A chunk a worker has
 * claimed still completes when other work fills the cores (SCHED_IDLE threads keep a small
 * share of the CPU): with two busy loops beside it, batch-1 decode 22.8 -> 25.0 tok/s and
 * the 8-row step 86 -> 95 ms. */
static void *worker(void *arg) {
    (void)arg;
    unsigned long seen = 0;
    int polls = spin;
    for (;;) {
        for (int i = 0; i < polls && __atomic_load_n(&pool_gen, __ATOMIC_ACQUIRE) == seen;
             i++)
            cpu_relax();
        pthread_mutex_lock(&pool_mu);
        while (pool_gen == seen) pthread_cond_wait(&pool_go, &pool_mu);
        seen = pool_gen;
        struct job j = job;
        pthread_mutex_unlock(&pool_mu);
        polls = j.M >= 2 ? spin_batch : spin;
        run_chunks(&j, seen);
    }
    return NULL;
}

static void after_fork_child(void) {  /* workers do not survive fork() */
    pthread_mutex_init(&pool_mu, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pthread_cond_init(&pool_go, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_size = 0;
}

static void smallm_gemm(int M, int N, int K, float alpha, const float *A, int lda,
                        const float *B, int ldb, float beta, float *C, int ldc,
                        const struct twin *t) {
    int parts = nthreads;
    if ((long)N * K < 65536L || N < 8 * parts) parts = 1;
    /* Twin products are split from twin_split_rows rows (MLX_STEER_SHIM_TWIN_SPLIT): from
     * one row by default. Measured on 2 cores, quiet: batch-1 decode through mlx-lm's
     * pipelined loop 46.9 tok/s split against 40.5 on the calling thread alone (the graph
     * building of the next token leaves the second core idle most of the time). */
    if (t && M < twin_split_rows) parts = 1;
    if (parts > 1 && pthread_mutex_trylock(&call_mu) == 0) {
        pthread_mutex_lock(&pool_mu);
        static int atfork;
        if (!atfork) {
            atfork = 1;
            pthread_atfork(NULL, NULL, after_fork_child);
        }
        while (pool_size < parts - 1) {
            pthread_t th;
            if (pthread_create(&th, NULL, worker, NULL) != 0) break;
#ifdef SCHED_IDLE
            if (idle_workers) { /* where this fails the worker keeps normal priority */
                struct sched_param idle = {0};
                pthread_setschedparam(th, SCHED_IDLE, &idle);
            }
#endif
            pthread_detach(th);
            pool_size++;
        }
        /* about 4 chunks per thread, whole blocks of 4 columns */
        int chunk = ((N + 4 * parts - 1) / (4 * parts) + 3) & ~3;
        job = (struct job){M, N, K, lda, ldb, ldc, chunk, (N + chunk - 1) / chunk,
                           alpha, beta, A, B, C, t};
        unsigned long gen = pool_gen + 1;
        __atomic_store_n(&pool_finished, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&pool_next, (unsigned long long)(gen & 0xFFFFFFFFUL) << 32,
                         __ATOMIC_RELEASE);
        __atomic_store_n(&pool_gen, gen, __ATOMIC_RELEASE);
        if (pool_size > 0) pthread_cond_broadcast(&pool_go);
        pthread_mutex_unlock(&pool_mu);
        struct job mine = job;
        run_chunks(&mine, gen);
        for (int i = 0; i < spin && __atomic_load_n(&pool_finished, __ATOMIC_ACQUIRE) <
                                        mine.chunks; i++)
            cpu_relax();
        pthread_mutex_lock(&pool_mu);
        while (__atomic_load_n(&pool_finished, __ATOMIC_ACQUIRE) < mine.chunks)
            pthread_cond_wait(&pool_done, &pool_mu);
        pthread_mutex_unlock(&pool_mu);
        pthread_mutex_unlock(&call_mu);
        return;
    }
    if (t)
        twin_cols(t, M, 0, N, alpha, A, lda, beta, C, ldc);
    else
        smallm_cols(M, 0, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* The most elements of B (N x K) for which a product of M rows A B or A B^T (A not
 * transposed) gives each row the bits it gets alone, 0 if none: the attention then
 * batches a head group's queries into one product (mlx_steer.models.attention). */
long mlx_steer_rows_alone(int M) {
    return real_sgemm && real_sgemv && smallm && M >= 1 && M <= SMALL_M_MAX ? ONE_ROW_SMALL : 0;
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta,
                 float *C, int ldc) {
    if (!real_sgemm) shim_init();
    if (!real_sgemm) abort(); /* no BLAS behind us: cannot happen when MLX is loaded */
    if (pypi_set_threads) {
        void (*set)(int) = __atomic_exchange_n(&pypi_set_threads, NULL, __ATOMIC_ACQ_REL);
        if (set) set(1);
    }
    if (order == ColMajor) {
        /* C (col-major M x N) is C^T row-major: C^T = op(B)^T op(A)^T. */
        int t = ta; ta = tb; tb = t;
        t = M; M = N; N = t;
        const float *P = A; A = B; B = P;
        t = lda; lda = ldb; ldb = t;
        order = RowMajor;
    }
    if (real_sgemv && order == RowMajor && K > 0 && (ta == NoTrans || ta == Trans) &&
        (tb == NoTrans || tb == Trans)) {
        if (ta == NoTrans && tb == Trans && M <= SMALL_M_MAX) {
            const struct twin *t = twin_find(B, N, K, ldb);
            if (t) { /* x @ W^T, W registered: read its quantised bytes */
                smallm_gemm(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, t);
                twin_release();
                if (stats) __atomic_fetch_add(&n_twin, 1, __ATOMIC_RELAXED);
                return;
            }
        }
        if (M <= SMALL_M_MAX && ta == NoTrans && smallm && (long)N * K <= ONE_ROW_SMALL) {
            /* A small product of a few rows (attention, per row and head, or a head group's
               queries together): here, on this thread, each row exactly as it would be
               alone, so that grouping rows changes no bit (mlx_steer_rows_alone).
               OpenBLAS's sgemv splits one-row products above 9216 elements (a context of
               144 tokens) over its threads, which then spend more time waiting than
               computing. */
            if (tb == Trans && M == 1)
                smallm_cols(1, 0, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
            else if (tb == Trans) /* split over the threads or not: the same code per column */
                smallm_gemm(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL);
            else
                for (int m = 0; m < M; m++)
                    row_times(N, K, alpha, A + (size_t)m * lda, B, ldb, beta,
                              C + (size_t)m * ldc);
            if (stats) __atomic_fetch_add(M == 1 ? &n_row : &n_small, 1, __ATOMIC_RELAXED);
            return;
        }
        if (M == 1) {
            /* c[n] = alpha * sum_k a[k] * op(B)[k, n] + beta * c[n] */
            int incx = (ta == NoTrans) ? 1 : lda;
            if (beta == 0.0f) zero(C, N, 1); /* C may hold garbage (NaN) */
            if (tb == Trans) /* B is N x K: y = B x */
                real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, incx, beta, C, 1);
            else             /* B is K x N: y = B^T x */
                real_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, A, incx, beta, C, 1);
            if (stats) __atomic_fetch_add(&n_gemv, 1, __ATOMIC_RELAXED);
            return;
        }
        if (N == 1) {
            /* c[m] = alpha * sum_k op(A)[m, k] * b[k] + beta * c[m] */
            int incx = (tb == NoTrans) ? ldb : 1;
            if (beta == 0.0f) zero(C, M, ldc);
            if (ta == NoTrans) /* A is M x K */
                real_sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, incx, beta, C, ldc);
            else               /* A is K x M */
                real_sgemv(RowMajor, Trans, K, M, alpha, A, lda, B, incx, beta, C, ldc);
            if (stats) __atomic_fetch_add(&n_gemv, 1, __ATOMIC_RELAXED);
            return;
        }
        if (smallm && ta == NoTrans && tb == Trans && M <= SMALL_M_MAX && K >= 8 && N >= 4) {
            /* x @ W^T with a few rows: A is M x K, B is N x K, both row-major */
            smallm_gemm(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL);
            if (stats) __atomic_fetch_add(&n_small, 1, __ATOMIC_RELAXED);
            return;
        }
    }
    if (stats) __atomic_fetch_add(&n_gemm, 1, __ATOMIC_RELAXED);
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* ---- MLX's compiled CPU kernels -------------------------------------------------------- */
/* The command MLX 0.32 compiles each fused CPU kernel with (mlx/backend/cpu/compiled.cpp),
 * up to its include flags and file names. Nothing else starts with it. */
static const char MLX_JIT_PREFIX[] = "g++ -std=c++17 -O3 -Wall -fPIC -shared ";
/* -march=native: vector instructions, inline fma. -ffp-contract=off, explicit: no a * b + c
 * is fused into one rounding, so every kernel computes what it computed without -march.
 * -finline-limit=1000: MLX's exp (a template of ~40 operations) is inlined into the kernel's
 * loop instead of being called once per element. -fno-trapping-math: the loop may then be
 * vectorised although exp selects between branches (NaN, overflow, underflow): both sides are
 * computed and one is kept, which GCC may only do when float operations cannot trap.
 * Neither changes a value: no reassociation, no contraction, the same IEEE operations. */
static const char MLX_JIT_FLAGS[] =
    "-march=native -ffp-contract=off -fno-trapping-math -finline-limit=1000 ";

typedef FILE *(*popen_fn)(const char *, const char *);

FILE *popen(const char *command, const char *type) {
    static popen_fn real_popen;
    popen_fn real = __atomic_load_n(&real_popen, __ATOMIC_ACQUIRE);
    if (!real) {
        real = (popen_fn)dlsym(RTLD_NEXT, "popen");
        if (!real) return NULL;
        __atomic_store_n(&real_popen, real, __ATOMIC_RELEASE);
    }
    const size_t np = sizeof MLX_JIT_PREFIX - 1, nf = sizeof MLX_JIT_FLAGS - 1;
    if (!native || !command || strncmp(command, MLX_JIT_PREFIX, np) != 0)
        return real(command, type);
    size_t n = strlen(command);
    char *cmd = malloc(n + nf + 1);
    if (!cmd) return real(command, type);
    memcpy(cmd, command, np);
    memcpy(cmd + np, MLX_JIT_FLAGS, nf);
    memcpy(cmd + np + nf, command + np, n - np + 1);
    FILE *f = real(cmd, type);
    int e = errno;
    free(cmd);
    errno = e;
    if (f && stats) __atomic_fetch_add(&n_native, 1, __ATOMIC_RELAXED);
    return f;
}
