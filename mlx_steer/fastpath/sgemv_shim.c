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
 * MLX's bundled BLAS when the shim is preloaded alone).
 *
 * Few-row products (2..SMALL_M_MAX rows times a weight matrix, x @ W^T: batched decoding
 * of a handful of rows) go to a small kernel here that streams each weight row once and
 * reuses it for every input row, split over the cores by output columns; OpenBLAS's
 * sgemm would pack the whole weight matrix first.
 *
 * Results: the same sums in another order, so outputs may differ in the last bits of
 * float32 (tests require identical greedy tokens and log-probabilities within 1e-3).
 *
 * Environment: MLX_STEER_SHIM_STATS=1 prints call counts to stderr at exit;
 * MLX_STEER_SHIM_SMALLM=0 turns the few-row kernel off; MLX_STEER_SHIM_THREADS=n sets
 * its threads (default: OPENBLAS_NUM_THREADS, else the online CPUs, at most 16);
 * MLX_STEER_SHIM_ISA=avx2|generic caps the kernel's instruction set (for measuring).
 *
 * Build (mlx_steer.fastpath.build does it):
 *     cc -O3 -shared -fPIC -o libmlxsteer_sgemv.so sgemv_shim.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* CBLAS enum values (identical in every CBLAS). */
enum { RowMajor = 101, ColMajor = 102 };
enum { NoTrans = 111, Trans = 112, ConjTrans = 113 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static unsigned long n_gemv, n_gemm, n_small;
static void pick_kernel(void);
static int stats;
static int smallm = 1;  /* few-row kernel on */
static int nthreads = 1;

static void report(void) {
    fprintf(stderr, "mlx-steer sgemv shim: %lu one-row products sent to sgemv, "
                    "%lu few-row products to the small kernel, %lu passed to sgemm\n",
            n_gemv, n_small, n_gemm);
}

static int env_int(const char *name, int dflt) {
    const char *s = getenv(name);
    if (!s || !*s) return dflt;
    int v = atoi(s);
    return v > 0 ? v : dflt;
}

__attribute__((constructor)) static void shim_init(void) {
    real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    real_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
    const char *s = getenv("MLX_STEER_SHIM_STATS");
    static int registered;
    stats = s && *s && strcmp(s, "0") != 0;
    if (stats && !registered) {
        registered = 1;
        atexit(report);
    }
    pick_kernel();
    s = getenv("MLX_STEER_SHIM_SMALLM");
    smallm = !(s && strcmp(s, "0") == 0);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    nthreads = env_int("MLX_STEER_SHIM_THREADS",
                       env_int("OPENBLAS_NUM_THREADS", ncpu > 0 ? (int)ncpu : 1));
    if (nthreads > 16) nthreads = 16;
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

typedef float v8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));

/* Pairwise sum of the W lanes of a vector. */
#define hsum(v, W)                                                                          \
    ({                                                                                      \
        float t_[W];                                                                        \
        memcpy(t_, &(v), sizeof t_);                                                        \
        for (int h_ = (W) / 2; h_ >= 1; h_ /= 2)                                            \
            for (int l_ = 0; l_ < h_; l_++) t_[l_] += t_[l_ + h_];                          \
        t_[0];                                                                              \
    })

static inline void put(float *c, float s, float alpha, float beta) {
    *c = beta == 0.0f ? alpha * s : alpha * s + beta * *c;
}

/* Output columns [n0, n1) of C = alpha * A B^T + beta * C, A (M x K), B (N x K).
 * Each block of 4 weight rows (B) is read from memory once and reused, from L1, for
 * every pair of input rows (A). VT is a vector of W floats; the body is instantiated
 * per instruction set below and chosen at load time. */
#define SMALLM_COLS(NAME, ATTR, VT, W)                                                      \
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
                for (int k = 0; k < KW; k += W) {                                          \
                    VT x, y, b;                                                            \
                    memcpy(&x, x0 + k, sizeof x);                                          \
                    memcpy(&y, x1 + k, sizeof y);                                          \
                    for (int j = 0; j < 4; j++) {                                          \
                        memcpy(&b, w[j] + k, sizeof b);                                    \
                        a0[j] += x * b;                                                    \
                        a1[j] += y * b;                                                    \
                    }                                                                      \
                }                                                                          \
                for (int j = 0; j < 4; j++) {                                              \
                    float s0 = hsum(a0[j], W), s1 = hsum(a1[j], W);                        \
                    for (int k = KW; k < K; k++) {                                         \
                        s0 += x0[k] * w[j][k];                                             \
                        s1 += x1[k] * w[j][k];                                             \
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
                float t = hsum(acc, W);                                                    \
                for (int k = KW; k < K; k++) t += x[k] * wr[k];                            \
                put(C + (size_t)m * ldc + n, t, alpha, beta);                              \
            }                                                                              \
        }                                                                                  \
    }

typedef void (*cols_fn)(int, int, int, int, float, const float *, int, const float *, int,
                        float, float *, int);

SMALLM_COLS(cols_generic, , v8, 8)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
SMALLM_COLS(cols_avx2, __attribute__((target("avx2,fma"))), v8, 8)
SMALLM_COLS(cols_avx512, __attribute__((target("avx512f,avx512vl,fma"))), v16, 16)
#endif

static cols_fn smallm_cols = cols_generic;

static void pick_kernel(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    const char *s = getenv("MLX_STEER_SHIM_ISA"); /* "avx2" or "generic": for measuring */
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
    if (s && strcmp(s, "generic") == 0) avx2 = avx512 = 0;
    if (s && strcmp(s, "avx2") == 0) avx512 = 0;
    smallm_cols = avx512 ? cols_avx512 : avx2 ? cols_avx2 : cols_generic;
#endif
}

/* A small pool of persistent workers; the calling thread takes the first share. */
struct job {
    int M, N, K, lda, ldb, ldc, parts;
    float alpha, beta;
    const float *A, *B;
    float *C;
};
static struct job job;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_go = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static unsigned long pool_gen;
static int pool_pending, pool_size; /* workers started */

static void run_part(const struct job *j, int part) {
    int per = ((j->N + j->parts - 1) / j->parts + 3) & ~3;
    int n0 = part * per, n1 = n0 + per < j->N ? n0 + per : j->N;
    if (n0 < n1)
        smallm_cols(j->M, n0, n1, j->K, j->alpha, j->A, j->lda, j->B, j->ldb, j->beta, j->C,
                    j->ldc);
}

static void *worker(void *arg) {
    int part = (int)(long)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool_mu);
    for (;;) {
        while (pool_gen == seen) pthread_cond_wait(&pool_go, &pool_mu);
        seen = pool_gen;
        struct job j = job;
        pthread_mutex_unlock(&pool_mu);
        if (part < j.parts) run_part(&j, part);
        pthread_mutex_lock(&pool_mu);
        if (--pool_pending == 0) pthread_cond_signal(&pool_done);
    }
    return NULL;
}

static void after_fork_child(void) {  /* workers do not survive fork() */
    pthread_mutex_init(&pool_mu, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pthread_cond_init(&pool_go, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_size = 0;
    pool_pending = 0;
}

static void smallm_gemm(int M, int N, int K, float alpha, const float *A, int lda,
                        const float *B, int ldb, float beta, float *C, int ldc) {
    int parts = nthreads;
    if ((long)N * K < 65536L || N < 8 * parts) parts = 1;
    if (parts > 1 && pthread_mutex_trylock(&call_mu) == 0) {
        pthread_mutex_lock(&pool_mu);
        static int atfork;
        if (!atfork) {
            atfork = 1;
            pthread_atfork(NULL, NULL, after_fork_child);
        }
        while (pool_size < parts - 1) {
            pthread_t t;
            if (pthread_create(&t, NULL, worker, (void *)(long)(pool_size + 1)) != 0) break;
            pthread_detach(t);
            pool_size++;
        }
        if (pool_size + 1 < parts) parts = pool_size + 1;
        job = (struct job){M, N, K, lda, ldb, ldc, parts, alpha, beta, A, B, C};
        pool_pending = pool_size;
        pool_gen++;
        pthread_cond_broadcast(&pool_go);
        pthread_mutex_unlock(&pool_mu);
        run_part(&job, 0);
        pthread_mutex_lock(&pool_mu);
        while (pool_pending > 0) pthread_cond_wait(&pool_done, &pool_mu);
        pthread_mutex_unlock(&pool_mu);
        pthread_mutex_unlock(&call_mu);
        return;
    }
    smallm_cols(M, 0, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta,
                 float *C, int ldc) {
    if (!real_sgemm) shim_init();
    if (!real_sgemm) abort(); /* no BLAS behind us: cannot happen when MLX is loaded */
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
            smallm_gemm(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
            if (stats) __atomic_fetch_add(&n_small, 1, __ATOMIC_RELAXED);
            return;
        }
    }
    if (stats) __atomic_fetch_add(&n_gemm, 1, __ATOMIC_RELAXED);
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
