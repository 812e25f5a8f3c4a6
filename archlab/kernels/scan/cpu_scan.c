/* Diagonal linear recurrence h_t = a_t * h_{t-1} + b_t, fused single-pass CPU kernels.
 *
 * Built on first use by archlab/kernels/scan/cpu_scan.py with the system C compiler and
 * called through ctypes on contiguous [B, T, D] tensors. Plain C99 + pthreads, no Python
 * or torch headers, so it compiles in about a second.
 *
 * Why: the sequential loop costs one tiny PyTorch call per step (~6 us at D = 512, call
 * overhead, not arithmetic) and any eager PyTorch scan streams the tensors through memory
 * several times. Here the time loop runs in C over rows of D contiguous values, so each
 * input is read once and each output written once: the memory floor of a scan.
 *
 * Work split: the (batch, channel-block) columns are independent; each thread takes whole
 * columns and walks them through time. The arithmetic per element is the sequential one
 * (a multiply and an add in the input's precision, no reassociation), so results equal the
 * reference loop up to the compiler's choice of fused multiply-add.
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const void *a, *b, *h0, *h, *dh; /* inputs (unused ones NULL) */
    void *out, *da, *db, *dh0;       /* outputs */
    int64_t B, T, D;
    int64_t nsplit, width; /* channel blocks per batch row, channels per block */
    int64_t first, last;   /* this worker's blocks: [first, last) over B * nsplit */
} job_t;

/* Forward: out[b, t, d] = a[b, t, d] * out[b, t-1, d] + b[b, t, d], out[b, -1] = h0 or 0. */
#define DEFINE_FWD(NAME, T_)                                                                 \
    static void *NAME(void *arg) {                                                          \
        const job_t *j = (const job_t *)arg;                                                \
        const T_ *A = (const T_ *)j->a, *Bx = (const T_ *)j->b, *H0 = (const T_ *)j->h0;  \
        T_ *H = (T_ *)j->out;                                                               \
        for (int64_t k = j->first; k < j->last; ++k) {                                      \
            int64_t bi = k / j->nsplit, d0 = (k % j->nsplit) * j->width;                    \
            int64_t d1 = d0 + j->width < j->D ? d0 + j->width : j->D;                       \
            if (d0 >= d1 || j->T == 0) continue;                                            \
            int64_t base = bi * j->T * j->D;                                                \
            {   /* t = 0 */                                                                 \
                const T_ *a0 = A + base, *b0 = Bx + base;                                   \
                T_ *h = H + base;                                                           \
                if (H0) {                                                                   \
                    const T_ *p = H0 + bi * j->D;                                           \
                    for (int64_t d = d0; d < d1; ++d) h[d] = a0[d] * p[d] + b0[d];          \
                } else {                                                                    \
                    for (int64_t d = d0; d < d1; ++d) h[d] = b0[d];                         \
                }                                                                           \
            }                                                                               \
            for (int64_t t = 1; t < j->T; ++t) {                                            \
                const T_ *at = A + base + t * j->D, *bt = Bx + base + t * j->D;             \
                T_ *ht = H + base + t * j->D;                                               \
                const T_ *hp = ht - j->D;                                                   \
                for (int64_t d = d0; d < d1; ++d) ht[d] = at[d] * hp[d] + bt[d];            \
            }                                                                               \
        }                                                                                   \
        return NULL;                                                                        \
    }

/* The backward walks time from the last row to the first. Inside a row it walks channels
 * from high to low as well, so that the whole walk descends through memory: with channels
 * ascending inside descending rows (ARCHLAB_SCAN_BWD_ASCENDING, kept so that
 * benchmarks/scan_walk.py can time both), this CPU's hardware prefetchers did not follow the
 * pattern and the same loads and stores took about 3x as long from a cold cache. */
#ifdef ARCHLAB_SCAN_BWD_ASCENDING
#define BWD_CHANNELS(d) for (int64_t d = d0; d < d1; ++d)
#else
#define BWD_CHANNELS(d) for (int64_t d = d1 - 1; d >= d0; --d)
#endif

/* Backward, one reverse pass: g_t = dh_t + a_{t+1} g_{t+1} (g_{T-1} = dh_{T-1});
 * db_t = g_t; da_t = g_t * h_{t-1} (h_{-1} = h0 or 0); dh0 = a_0 * g_0 when asked. */
#define DEFINE_BWD(NAME, T_)                                                                 \
    static void *NAME(void *arg) {                                                          \
        const job_t *j = (const job_t *)arg;                                                \
        const T_ *A = (const T_ *)j->a, *H = (const T_ *)j->h, *G = (const T_ *)j->dh;     \
        const T_ *H0 = (const T_ *)j->h0;                                                   \
        T_ *DA = (T_ *)j->da, *DB = (T_ *)j->db, *DH0 = (T_ *)j->dh0;                       \
        for (int64_t k = j->first; k < j->last; ++k) {                                      \
            int64_t bi = k / j->nsplit, d0 = (k % j->nsplit) * j->width;                    \
            int64_t d1 = d0 + j->width < j->D ? d0 + j->width : j->D;                       \
            if (d0 >= d1 || j->T == 0) continue;                                            \
            int64_t base = bi * j->T * j->D, D = j->D;                                      \
            /* channels high to low as well (BWD_CHANNELS, above) */                        \
            for (int64_t t = j->T - 1; t >= 0; --t) {                                       \
                int64_t o = base + t * D;                                                   \
                const T_ *gt = G + o;                                                       \
                T_ *dbt = DB + o, *dat = DA + o;                                            \
                if (t == j->T - 1) { /* nothing after the last step */                      \
                    BWD_CHANNELS(d) dbt[d] = gt[d];                                          \
                } else {                                                                    \
                    const T_ *an = A + o + D, *dbn = DB + o + D;                            \
                    BWD_CHANNELS(d) dbt[d] = gt[d] + an[d] * dbn[d];                         \
                }                                                                           \
                if (t >= 1) {                                                               \
                    const T_ *hp = H + o - D;                                               \
                    BWD_CHANNELS(d) dat[d] = dbt[d] * hp[d];                                 \
                }                                                                           \
            }                                                                               \
            {   /* t = 0 */                                                                 \
                const T_ *g = DB + base, *a0 = A + base;                                    \
                T_ *da0 = DA + base;                                                        \
                if (H0) {                                                                   \
                    const T_ *p = H0 + bi * D;                                              \
                    for (int64_t d = d0; d < d1; ++d) da0[d] = g[d] * p[d];                 \
                } else {                                                                    \
                    for (int64_t d = d0; d < d1; ++d) da0[d] = 0;                           \
                }                                                                           \
                if (DH0) {                                                                  \
                    T_ *q = DH0 + bi * D;                                                   \
                    for (int64_t d = d0; d < d1; ++d) q[d] = a0[d] * g[d];                  \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        return NULL;                                                                        \
    }

DEFINE_FWD(fwd_f32, float)
DEFINE_FWD(fwd_f64, double)
DEFINE_BWD(bwd_f32, float)
DEFINE_BWD(bwd_f64, double)

#define MAX_THREADS 256

/* Split B * nsplit column blocks over `threads` workers (the caller's thread is one). */
static int run(void *(*fn)(void *), job_t proto, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    /* enough channel blocks per batch row that every thread gets work, at least 16 wide */
    int64_t nsplit = (threads + proto.B - 1) / (proto.B > 0 ? proto.B : 1);
    if (nsplit < 1) nsplit = 1;
    int64_t width = (proto.D + nsplit - 1) / nsplit;
    if (width < 16) width = 16;
    nsplit = (proto.D + width - 1) / width;
    if (nsplit < 1) nsplit = 1; /* D = 0 */
    proto.nsplit = nsplit;
    proto.width = width;
    int64_t total = proto.B * nsplit;
    if (total < threads) threads = (int)(total > 0 ? total : 1);
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < threads; ++i) {
        jobs[i] = proto;
        jobs[i].first = total * i / threads;
        jobs[i].last = total * (i + 1) / threads;
    }
    int rc = 0;
    for (int i = 1; i < threads; ++i) {
        if (pthread_create(&tid[i], NULL, fn, &jobs[i]) == 0) {
            started[i] = 1;
        } else { /* no thread: do its share here */
            fn(&jobs[i]);
        }
    }
    fn(&jobs[0]);
    for (int i = 1; i < threads; ++i)
        if (started[i] && pthread_join(tid[i], NULL) != 0) rc = 1;
    return rc;
}

/* dtype: 0 = float32, 1 = float64. h0 may be NULL. Returns 0 on success. */
int archlab_scan_fwd(int dtype, const void *a, const void *b, const void *h0, void *out,
                     int64_t B, int64_t T, int64_t D, int threads) {
    job_t p = {0};
    p.a = a; p.b = b; p.h0 = h0; p.out = out; p.B = B; p.T = T; p.D = D;
    return run(dtype == 0 ? fwd_f32 : fwd_f64, p, threads);
}

/* h: the forward output; h0 and dh0 may be NULL (dh0 NULL: no gradient for h0 asked). */
int archlab_scan_bwd(int dtype, const void *a, const void *h, const void *h0, const void *dh,
                     void *da, void *db, void *dh0, int64_t B, int64_t T, int64_t D,
                     int threads) {
    job_t p = {0};
    p.a = a; p.h = h; p.h0 = h0; p.dh = dh; p.da = da; p.db = db; p.dh0 = dh0;
    p.B = B; p.T = T; p.D = D;
    return run(dtype == 0 ? bwd_f32 : bwd_f64, p, threads);
}
