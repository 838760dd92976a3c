/* lymph_cv.formats.ldbscan: compute_image_mean's float32 running sum, natively.
 *
 * scan_tables(paths, threads=0) reads LevelDB table files (pread), walks footer -> index block ->
 * data blocks (uncompressed or snappy), parses each raw Datum and accumulates Caffe's float32
 * running sum in key order.  Accumulator().add_values(iterable) does the same over serialized
 * Datums (an LMDB cursor's buffers, or any bytes-like values).  Whatever this module does not
 * handle exactly as LevelDB would read it (a deletion, a repeated or out-of-order user key, an
 * unknown compression, a malformed block, a record that is not a raw uint8 Datum of the first
 * record's size) raises Unsupported: the caller then takes the plyvel + numpy path, which gives
 * the same bytes or names the bad record.
 *
 * The arithmetic is Caffe's: every record's uint8 pixels are added to a float32 sum, one rounding
 * per record and pixel, records in key order.  Threads split the records into chunks and the pixels
 * into lanes, each lane of each chunk added after the lane of the chunk before (the order per pixel
 * is what matters), so the bytes do not depend on the thread count.  Block checksums are not
 * verified, as Caffe's reads (LevelDB's default ReadOptions) do not verify them either.
 * The float32 bytes returned are the machine's (little-endian on every machine this builds for).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TABLE_FOOTER 48
#define TABLE_MAGIC 0xdb4775248b80fb57ull
#define BLOCK_TRAILER 5
#define TYPE_VALUE 1
#define NO_COMPRESSION 0
#define SNAPPY_COMPRESSION 1
#define MAX_THREADS 8
/* Pixels per thread below which one thread does all (thread start-up costs more than it saves). */
#define MIN_PIXELS_PER_THREAD 256
/* Bytes of table data read at once (a few LevelDB blocks): a thread's two chunks stay in its core's
 * L2 (512 KiB measured 3 % less CPU than 256 KiB at full scale, the same on fold 1). */
#define CHUNK_BYTES (1u << 19)
/* Set (not 0): every scanning thread's times (reading, parsing, waiting, adding) go to stderr. */
#define PROFILE_ENV "LYMPH_CV_SCAN_PROFILE"
/* Up to this many tables stay open from the first look to the scan (a compaction that LevelDB
 * starts on open may delete a table meanwhile); more are reopened chunk by chunk, within the
 * process's file limit. */
#define KEEP_OPEN 256
/* Records handed to the summing threads at once by add_values. */
#define VALUES_CHUNK 8192
/* Largest block a snappy header may announce (LevelDB's blocks are ~64 KiB). */
#define MAX_BLOCK_BYTES (1u << 30)

static PyObject *Unsupported;

/* ------------------------------------------------------------------ summing kernels */

/* sum[i] += a[i], then b, c, d: one float32 rounding per record and pixel, records in order (no
 * reassociation: no -ffast-math).  The vector kernels widen uint8 straight to int32 (gcc's own
 * vectorisation goes through int16 and takes twice the instructions); chosen once by the CPU. */
typedef void (*add4_t)(float *, const uint8_t *, const uint8_t *, const uint8_t *, const uint8_t *, size_t);
typedef void (*add1_t)(float *, const uint8_t *, size_t);
/* Eight records at once (pixels [lo, lo + n) of each), two vectors per step: half the sum's loads
 * and stores of add4, and two chains of adds in flight (in a cache-resident loop: 0.17-0.18 against
 * 0.21 CPU s for the full-scale DB's 3.19 G adds). */
typedef void (*add8_t)(float *, const uint8_t *const *, size_t, size_t);

static void add4_plain(float *restrict sum, const uint8_t *a, const uint8_t *b, const uint8_t *c, const uint8_t *d,
                       size_t n);

static void add8_plain(float *restrict sum, const uint8_t *const *r, size_t lo, size_t n)
{
    add4_plain(sum, r[0] + lo, r[1] + lo, r[2] + lo, r[3] + lo, n);
    add4_plain(sum, r[4] + lo, r[5] + lo, r[6] + lo, r[7] + lo, n);
}

static void add1_plain(float *restrict sum, const uint8_t *restrict a, size_t n)
{
    for (size_t i = 0; i < n; i++)
        sum[i] = sum[i] + (float)a[i];
}

static void add4_plain(float *restrict sum, const uint8_t *a, const uint8_t *b, const uint8_t *c, const uint8_t *d,
                       size_t n)
{
    for (size_t i = 0; i < n; i++)
        sum[i] = (((sum[i] + (float)a[i]) + (float)b[i]) + (float)c[i]) + (float)d[i];
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86_KERNELS 1

/* One kernel per vector width: WIDEN loads `lanes` uint8 pixels of p at i as float32. */
#define DEFINE_ADD4(name, isa, lanes, vec, load, store, add, widen)                                          \
    __attribute__((target(isa))) static void name(float *restrict sum, const uint8_t *a, const uint8_t *b,    \
                                                     const uint8_t *c, const uint8_t *d, size_t n)             \
    {                                                                                                          \
        size_t i = 0;                                                                                          \
        for (; i + (lanes) <= n; i += (lanes)) {                                                               \
            vec s = load(sum + i);                                                                             \
            s = add(s, widen(a, i));                                                                           \
            s = add(s, widen(b, i));                                                                           \
            s = add(s, widen(c, i));                                                                           \
            s = add(s, widen(d, i));                                                                           \
            store(sum + i, s);                                                                                 \
        }                                                                                                      \
        add4_plain(sum + i, a + i, b + i, c + i, d + i, n - i);                                                \
    }                                                                                                          \
    __attribute__((target(isa))) static void name##_1(float *restrict sum, const uint8_t *a, size_t n)        \
    {                                                                                                          \
        size_t i = 0;                                                                                          \
        for (; i + (lanes) <= n; i += (lanes))                                                                 \
            store(sum + i, add(load(sum + i), widen(a, i)));                                                   \
        add1_plain(sum + i, a + i, n - i);                                                                     \
    }                                                                                                          \
    __attribute__((target(isa))) static void name##_8(float *restrict sum, const uint8_t *const *r, size_t lo, \
                                                         size_t n)                                            \
    {                                                                                                          \
        const uint8_t *p[8];                                                                                   \
        for (int j = 0; j < 8; j++)                                                                            \
            p[j] = r[j] + lo;                                                                                  \
        size_t i = 0;                                                                                          \
        for (; i + 2 * (lanes) <= n; i += 2 * (lanes)) {                                                       \
            vec s0 = load(sum + i), s1 = load(sum + i + (lanes));                                              \
            for (int j = 0; j < 8; j++) {                                                                      \
                s0 = add(s0, widen(p[j], i));                                                                  \
                s1 = add(s1, widen(p[j], i + (lanes)));                                                        \
            }                                                                                                  \
            store(sum + i, s0);                                                                                \
            store(sum + i + (lanes), s1);                                                                      \
        }                                                                                                      \
        if (i < n) { /* the last pixels: records 0-3, then 4-7 */                                              \
            name(sum + i, p[0] + i, p[1] + i, p[2] + i, p[3] + i, n - i);                                      \
            name(sum + i, p[4] + i, p[5] + i, p[6] + i, p[7] + i, n - i);                                      \
        }                                                                                                      \
    }

#define WIDEN16(p, i) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((p) + (i)))))
#define WIDEN8(p, i) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((p) + (i)))))
DEFINE_ADD4(add4_avx512, "avx512f", 16, __m512, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_add_ps, WIDEN16)
DEFINE_ADD4(add4_avx2, "avx2", 8, __m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_add_ps, WIDEN8)
#endif

static add4_t add4 = add4_plain;
static add1_t add1 = add1_plain; /* the records left over after fours */
static add8_t add8 = add8_plain;

static void choose_kernels(void)
{
#ifdef HAVE_X86_KERNELS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        add4 = add4_avx512, add1 = add4_avx512_1, add8 = add4_avx512_8;
    else if (__builtin_cpu_supports("avx2"))
        add4 = add4_avx2, add1 = add4_avx2_1, add8 = add4_avx2_8;
#endif
}

/* ------------------------------------------------------------------ parsing helpers */

/* A varint of at most 64 bits at *pos, below end; 0 when malformed. */
static int get_varint(const uint8_t *data, size_t end, size_t *pos, uint64_t *value)
{
    uint64_t result = 0;
    for (int shift = 0; shift < 64 && *pos < end; shift += 7) {
        uint8_t byte = data[(*pos)++];
        result |= (uint64_t)(byte & 0x7f) << shift;
        if (byte < 0x80) {
            *value = result;
            return 1;
        }
    }
    return 0;
}

static uint32_t le32(const uint8_t *p) { return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

static uint64_t le64(const uint8_t *p) { return le32(p) | (uint64_t)le32(p + 4) << 32; }

/* The pixels of a raw uint8 Datum: 1 with *pixels and the shape set, 0 for any other record. */
static int parse_datum(const uint8_t *v, size_t len, const uint8_t **pixels, int *c, int *h, int *w)
{
    uint64_t dims[3] = {0, 0, 0}, value;
    const uint8_t *data = NULL;
    uint64_t data_len = 0;
    size_t pos = 0;
    while (pos < len) {
        uint64_t tag;
        if (!get_varint(v, len, &pos, &tag))
            return 0;
        uint64_t field = tag >> 3, wire = tag & 7;
        if (field >= 1 && field <= 3 && wire == 0) { /* channels, height, width */
            if (!get_varint(v, len, &pos, &dims[field - 1]))
                return 0;
        } else if (field == 4 && wire == 2) { /* data */
            if (!get_varint(v, len, &pos, &data_len) || data_len > len - pos)
                return 0;
            data = v + pos;
            pos += data_len;
        } else if (field == 5 && wire == 0) { /* label */
            if (!get_varint(v, len, &pos, &value))
                return 0;
        } else if (field == 7 && wire == 0) { /* encoded: decoding is the other path's */
            if (!get_varint(v, len, &pos, &value) || value != 0)
                return 0;
        } else {
            return 0; /* float_data (6) or an unknown field: the other path decides */
        }
    }
    if (!data || dims[0] == 0 || dims[1] == 0 || dims[2] == 0 || dims[0] > INT32_MAX || dims[1] > INT32_MAX ||
        dims[2] > INT32_MAX || dims[0] * dims[1] > UINT32_MAX || data_len != dims[0] * dims[1] * dims[2])
        return 0;
    *pixels = data, *c = (int)dims[0], *h = (int)dims[1], *w = (int)dims[2];
    return 1;
}

/* Snappy's format: a varint length, then literals and back-references.  malloc'd output or NULL. */
static uint8_t *snappy_uncompress(const uint8_t *src, size_t n, size_t *out_len)
{
    size_t pos = 0, op = 0;
    uint64_t length;
    if (!get_varint(src, n, &pos, &length) || length > MAX_BLOCK_BYTES)
        return NULL;
    uint8_t *dst = malloc(length ? length : 1);
    if (!dst)
        return NULL;
    while (pos < n) {
        uint8_t tag = src[pos++];
        size_t len, offset;
        if ((tag & 3) == 0) { /* literal */
            len = tag >> 2;
            if (len >= 60) {
                size_t bytes = len - 59;
                if (pos + bytes > n)
                    goto bad;
                len = 0;
                for (size_t i = 0; i < bytes; i++)
                    len |= (size_t)src[pos + i] << (8 * i);
                pos += bytes;
            }
            len += 1;
            if (len > n - pos || len > length - op)
                goto bad;
            memcpy(dst + op, src + pos, len);
            op += len, pos += len;
            continue;
        }
        if ((tag & 3) == 1) { /* copy, 11-bit offset */
            if (pos >= n)
                goto bad;
            len = 4 + ((tag >> 2) & 7);
            offset = (size_t)(tag >> 5) << 8 | src[pos++];
        } else if ((tag & 3) == 2) { /* copy, 16-bit offset */
            if (pos + 2 > n)
                goto bad;
            len = (size_t)(tag >> 2) + 1;
            offset = src[pos] | (size_t)src[pos + 1] << 8;
            pos += 2;
        } else { /* copy, 32-bit offset */
            if (pos + 4 > n)
                goto bad;
            len = (size_t)(tag >> 2) + 1;
            offset = le32(src + pos);
            pos += 4;
        }
        if (offset == 0 || offset > op || len > length - op)
            goto bad;
        for (size_t i = 0; i < len; i++) /* byte by byte: a copy may overlap its own output */
            dst[op + i] = dst[op - offset + i];
        op += len;
    }
    if (op != length)
        goto bad;
    *out_len = length;
    return dst;
bad:
    free(dst);
    return NULL;
}

/* ------------------------------------------------------------------ the accumulator */

/* One thread's share of the sums: pixels [lo, lo + n) of every record, records in order. */
typedef struct {
    size_t lo, n;
    float *sum; /* the accumulator's sums, at lo */
} lane_t;

typedef struct {
    int channels, height, width;
    size_t size;    /* pixels per record; 0 before the first record */
    uint64_t count; /* records added */
    float *sum;     /* Caffe's float32 running sums */
    int n_lanes;
    lane_t lanes[MAX_THREADS];
} acc_t;

/* Add n records (pointers to whole records' pixels) to this lane's pixels, in order. */
static void lane_add(lane_t *l, const uint8_t *const *r, size_t n)
{
    size_t lo = l->lo, i = 0;
    for (; i + 8 <= n; i += 8)
        add8(l->sum, r + i, lo, l->n);
    for (; i + 4 <= n; i += 4)
        add4(l->sum, r[i] + lo, r[i + 1] + lo, r[i + 2] + lo, r[i + 3] + lo, l->n);
    for (; i < n; i++)
        add1(l->sum, r[i] + lo, l->n);
}

static void acc_free(acc_t *a)
{
    free(a->sum);
    memset(a, 0, sizeof(*a));
}

/* Size the sums for C x H x W records, split over at most `threads` lanes; 0, or -1 (no memory). */
static int acc_start(acc_t *a, int c, int h, int w, int threads)
{
    a->channels = c, a->height = h, a->width = w;
    a->size = (size_t)c * h * w;
    if (!(a->sum = calloc(a->size, sizeof(float))))
        return -1;
    if (threads < 1)
        threads = 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if ((size_t)threads * MIN_PIXELS_PER_THREAD > a->size)
        threads = a->size / MIN_PIXELS_PER_THREAD > 1 ? (int)(a->size / MIN_PIXELS_PER_THREAD) : 1;
    /* 64-pixel aligned ranges keep the threads off each other's cache lines. */
    size_t step = ((a->size + threads - 1) / threads + 63) & ~(size_t)63;
    a->n_lanes = threads;
    for (int t = 0; t < threads; t++) {
        size_t lo = (size_t)t * step < a->size ? (size_t)t * step : a->size;
        size_t hi = lo + step < a->size ? lo + step : a->size;
        a->lanes[t] = (lane_t){lo, hi - lo, a->sum + lo};
    }
    return 0;
}

typedef struct {
    lane_t *lane;
    const uint8_t *const *records;
    size_t n;
} lane_job_t;

static void *run_lane_job(void *arg)
{
    lane_job_t *job = (lane_job_t *)arg;
    lane_add(job->lane, job->records, job->n);
    return NULL;
}

/* Add n records in order, each lane in a thread of its own. */
static void acc_add(acc_t *a, const uint8_t *const *records, size_t n)
{
    lane_job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    if (n == 0)
        return;
    for (int t = 0; t < a->n_lanes; t++)
        jobs[t] = (lane_job_t){&a->lanes[t], records, n};
    for (int t = 1; t < a->n_lanes; t++)
        started[t] = pthread_create(&ids[t], NULL, run_lane_job, &jobs[t]) == 0;
    for (int t = 1; t < a->n_lanes; t++)
        if (!started[t])
            run_lane_job(&jobs[t]); /* no thread to be had: do it here */
    run_lane_job(&jobs[0]);
    for (int t = 1; t < a->n_lanes; t++)
        if (started[t])
            pthread_join(ids[t], NULL);
    a->count += n;
}

/* (count, (C, H, W), sum bytes, mean bytes, channel means) as compute_image_mean computes them. */
static PyObject *acc_result(acc_t *a)
{
    if (a->count == 0 || a->size == 0) {
        PyErr_SetString(Unsupported, "no records");
        return NULL;
    }
    PyObject *sum_bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(a->size * sizeof(float)));
    PyObject *mean_bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(a->size * sizeof(float)));
    PyObject *channel_means = PyTuple_New(a->channels);
    if (!sum_bytes || !mean_bytes || !channel_means) {
        Py_XDECREF(sum_bytes);
        Py_XDECREF(mean_bytes);
        Py_XDECREF(channel_means);
        return NULL;
    }
    float *sum = (float *)PyBytes_AS_STRING(sum_bytes), *mean = (float *)PyBytes_AS_STRING(mean_bytes);
    float count = (float)a->count; /* Caffe: sum_blob.data(i) / count, an int made float */
    for (size_t i = 0; i < a->size; i++) {
        sum[i] = a->sum[i];
        mean[i] = sum[i] / count;
    }
    size_t dim = (size_t)a->height * a->width;
    for (int c = 0; c < a->channels; c++) {
        float total = 0.0f; /* Caffe's std::vector<float> mean_values, added pixel after pixel */
        for (size_t j = 0; j < dim; j++)
            total += mean[dim * c + j];
        PyTuple_SET_ITEM(channel_means, c, PyFloat_FromDouble((double)(total / (float)dim)));
    }
    return Py_BuildValue("K(iii)NNN", (unsigned long long)a->count, a->channels, a->height, a->width, sum_bytes,
                         mean_bytes, channel_means);
}

/* ------------------------------------------------------------------ LevelDB tables */

/* A data block's place in its table file. */
typedef struct {
    uint64_t offset, size;
} handle_t;

typedef struct {
    const char *path;
    int fd;
    uint64_t size;
    handle_t *blocks; /* the index block's handles, in key order */
    size_t n_blocks;
    uint8_t *first_key; /* its first user key */
    size_t first_len;
    int c, h, w;         /* its first record's shape */
    const char *problem; /* NULL, or why the fast path does not apply */
} table_t;

typedef struct {
    const uint8_t *data;
    size_t limit, pos; /* entries end at limit (the restart array follows) */
    uint8_t *key;
    size_t key_len, key_cap;
} block_iter_t;

static int block_open(block_iter_t *it, const uint8_t *data, size_t len)
{
    if (len < 4)
        return 0;
    uint64_t restarts = le32(data + len - 4);
    if (restarts > (len - 4) / 4)
        return 0;
    it->data = data, it->limit = len - 4 - 4 * restarts, it->pos = 0, it->key_len = 0;
    return 1;
}

/* The next entry: 1 with the key (it->key, it->key_len) and value set, 0 at the end, -1 when malformed. */
static int block_next(block_iter_t *it, const uint8_t **value, size_t *value_len)
{
    if (it->pos >= it->limit)
        return 0;
    uint64_t shared, non_shared, vlen;
    if (!get_varint(it->data, it->limit, &it->pos, &shared) || !get_varint(it->data, it->limit, &it->pos, &non_shared) ||
        !get_varint(it->data, it->limit, &it->pos, &vlen) || shared > it->key_len ||
        non_shared > it->limit - it->pos || vlen > it->limit - it->pos - non_shared)
        return -1;
    size_t need = shared + non_shared;
    if (need > it->key_cap) {
        size_t cap = need * 2 + 64;
        uint8_t *grown = realloc(it->key, cap);
        if (!grown)
            return -1;
        it->key = grown, it->key_cap = cap;
    }
    memcpy(it->key + shared, it->data + it->pos, non_shared);
    it->key_len = need;
    it->pos += non_shared;
    *value = it->data + it->pos, *value_len = vlen;
    it->pos += vlen;
    return 1;
}

static int key_less(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
    size_t n = alen < blen ? alen : blen;
    int cmp = n ? memcmp(a, b, n) : 0;
    return cmp < 0 || (cmp == 0 && alen < blen);
}

/* Read exactly len bytes at offset; 0 on a short read or an error. */
static int read_at(int fd, uint8_t *buffer, size_t len, uint64_t offset)
{
    while (len) {
        ssize_t got = pread(fd, buffer, len, (off_t)offset);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return 0;
        buffer += got, len -= (size_t)got, offset += (uint64_t)got;
    }
    return 1;
}

/* A block's contents from its bytes and trailer (in `raw`, size + BLOCK_TRAILER bytes): in place
 * when uncompressed, else snappy into *owned (malloc'd). */
static const char *block_contents(const uint8_t *raw, uint64_t size, const uint8_t **data, size_t *len,
                                  uint8_t **owned)
{
    *owned = NULL;
    if (raw[size] == NO_COMPRESSION) {
        *data = raw, *len = size;
        return NULL;
    }
    if (raw[size] != SNAPPY_COMPRESSION)
        return "a block of an unknown compression";
    if (!(*owned = snappy_uncompress(raw, size, len)))
        return "a malformed snappy block";
    *data = *owned;
    return NULL;
}

/* A block read on its own (index block, a table's first block): malloc'd contents or a problem. */
static const char *read_block(const table_t *t, handle_t handle, uint8_t **contents, size_t *len)
{
    if (handle.offset > t->size || handle.size > t->size - handle.offset ||
        BLOCK_TRAILER > t->size - handle.offset - handle.size)
        return "a block handle points past its table";
    uint8_t *raw = malloc(handle.size + BLOCK_TRAILER), *owned;
    const uint8_t *data;
    if (!raw)
        return "out of memory";
    if (!read_at(t->fd, raw, handle.size + BLOCK_TRAILER, handle.offset)) {
        free(raw);
        return "a table file cannot be read";
    }
    const char *problem = block_contents(raw, handle.size, &data, len, &owned);
    if (owned) {
        free(raw);
        raw = owned;
    }
    if (problem) {
        free(raw);
        raw = NULL;
    }
    *contents = raw;
    return problem;
}

/* A data block handle from an index entry's value. */
static int get_handle(const uint8_t *value, size_t len, handle_t *handle)
{
    size_t pos = 0;
    return get_varint(value, len, &pos, &handle->offset) && get_varint(value, len, &pos, &handle->size);
}

/* Open one table and read what the scan needs first: its block handles, first key and record shape. */
static void open_table(table_t *t)
{
    uint8_t footer[TABLE_FOOTER], *index = NULL, *first = NULL;
    struct stat st;
    size_t len, pos = 0, end = TABLE_FOOTER - 8, cap = 0;
    handle_t meta, index_handle;
    t->fd = open(t->path, O_RDONLY | O_CLOEXEC);
    if (t->fd < 0) {
        t->problem = "a table file cannot be opened";
        return;
    }
    if (fstat(t->fd, &st) < 0 || st.st_size < TABLE_FOOTER) {
        t->problem = "a table file too short for a footer";
        return;
    }
    t->size = (uint64_t)st.st_size;
    if (!read_at(t->fd, footer, TABLE_FOOTER, t->size - TABLE_FOOTER)) {
        t->problem = "a table file cannot be read";
        return;
    }
    if (le64(footer + TABLE_FOOTER - 8) != TABLE_MAGIC) {
        t->problem = "not a LevelDB table (no footer magic)";
        return;
    }
    if (!get_varint(footer, end, &pos, &meta.offset) || !get_varint(footer, end, &pos, &meta.size) ||
        !get_varint(footer, end, &pos, &index_handle.offset) || !get_varint(footer, end, &pos, &index_handle.size)) {
        t->problem = "a malformed table footer";
        return;
    }
    if ((t->problem = read_block(t, index_handle, &index, &len)))
        return;
    block_iter_t it = {0}, block = {0};
    const uint8_t *value, *pixels;
    size_t value_len;
    int got = -1;
    if (block_open(&it, index, len)) {
        while ((got = block_next(&it, &value, &value_len)) == 1) {
            handle_t handle;
            if (!get_handle(value, value_len, &handle)) {
                got = -1;
                break;
            }
            if (handle.offset > t->size || handle.size > t->size - handle.offset ||
                BLOCK_TRAILER > t->size - handle.offset - handle.size) {
                t->problem = "a block handle points past its table";
                break;
            }
            if (t->n_blocks == cap) {
                handle_t *grown = realloc(t->blocks, (cap = cap ? cap * 2 : 64) * sizeof(handle_t));
                if (!grown) {
                    t->problem = "out of memory";
                    break;
                }
                t->blocks = grown;
            }
            t->blocks[t->n_blocks++] = handle;
        }
    }
    if (!t->problem && got < 0)
        t->problem = "a malformed index block";
    if (!t->problem && t->n_blocks && !(t->problem = read_block(t, t->blocks[0], &first, &len))) {
        if (!block_open(&block, first, len) || block_next(&block, &value, &value_len) != 1 || block.key_len < 8)
            t->problem = "a malformed data block";
        else if (!(t->first_key = malloc(block.key_len)))
            t->problem = "out of memory";
        else if (!parse_datum(value, value_len, &pixels, &t->c, &t->h, &t->w))
            t->problem = "a record that is not a raw uint8 Datum";
        else
            memcpy(t->first_key, block.key, t->first_len = block.key_len - 8);
    }
    free(index);
    free(first);
    free(it.key);
    free(block.key);
}

static void table_free(table_t *t)
{
    free(t->blocks);
    free(t->first_key);
    if (t->fd >= 0)
        close(t->fd);
}

typedef struct {
    table_t *tables;
    size_t n;
    size_t next;      /* the next table to open (shared by the openers) */
    size_t keep_open; /* more tables than this: closed after the first look */
} opening_t;

static void *opener(void *arg)
{
    opening_t *o = (opening_t *)arg;
    size_t i;
    while ((i = __atomic_fetch_add(&o->next, 1, __ATOMIC_RELAXED)) < o->n) {
        table_t *t = &o->tables[i];
        open_table(t);
        if (o->n > o->keep_open && t->fd >= 0) { /* the scan reopens it */
            close(t->fd);
            t->fd = -1;
        }
    }
    return NULL;
}

static int compare_first_keys(const void *a, const void *b)
{
    const table_t *x = *(const table_t *const *)a, *y = *(const table_t *const *)b;
    if (key_less(x->first_key, x->first_len, y->first_key, y->first_len))
        return -1;
    return key_less(y->first_key, y->first_len, x->first_key, x->first_len) ? 1 : 0;
}

static int default_threads(void)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    return cpus < 1 ? 1 : cpus > MAX_THREADS ? MAX_THREADS : (int)cpus;
}

/* ------------------------------------------------------------------ the scan: each chunk read and summed by one thread
 *
 * The tables' data blocks, in key order, are cut into chunks of consecutive blocks (about
 * CHUNK_BYTES).  Thread k % T reads chunk k (pread: a copy from the page cache into a buffer of its
 * own that stays in its core's cache), parses it, and adds all its records' pixels, lane after lane:
 * lane l of chunk k waits until lane l of chunk k - 1 is summed (by the thread before), so each
 * pixel's sum is taken in key order while the threads' reads and lanes overlap.  What moves between
 * the cores is the sums (a lane is a few KiB, on cache lines of its own), not the records: each
 * byte of the tables is read from memory once, by one core, and added from that core's cache. */

typedef struct {
    const table_t *table;
    size_t first, last; /* blocks [first, last] of the table */
} chunk_t;

static int push(void ***items, size_t *n, size_t *cap, void *item)
{
    if (*n == *cap) {
        size_t grown = *cap ? *cap * 2 : 1024;
        void **moved = realloc(*items, grown * sizeof(void *));
        if (!moved)
            return -1;
        *items = moved, *cap = grown;
    }
    (*items)[(*n)++] = item;
    return 0;
}

/* A thread's chunk: the bytes read, the records parsed from them. */
typedef struct {
    uint8_t *buffer;
    size_t capacity;
    uint8_t **owned; /* decompressed blocks its records point into */
    size_t n_owned, cap_owned;
    const uint8_t **records;
    size_t n_records, cap_records;
    uint8_t *first_key, *last_key; /* the chunk's first and last user keys (for the order across chunks) */
    size_t first_len, last_len, first_cap, last_cap;
} slot_t;

/* A lane's progress: the chunks whose records it has added, on a cache line of its own. */
typedef struct {
    size_t done;
    char pad[64 - sizeof(size_t)];
} __attribute__((aligned(64))) progress_t;

/* Chunk k's last user key, at k % KEY_RING: written by its thread when it parses the chunk (before
 * it adds lane 0), read by chunk k + 1's thread once lane 0 of chunk k is summed.  A thread parses at
 * most one chunk ahead of the one it sums, so when chunk j is parsed every chunk up to j - 2T has
 * passed its check; 2T + 1 slots would do. */
#define KEY_RING (2 * MAX_THREADS + 2)
typedef struct {
    uint8_t *key;
    size_t len, cap;
} last_key_t;

/* Spins on a lane's progress (pause instructions, some tens of microseconds: a lane's add takes
 * about ten) before sleeping on the condition variable; spinning longer only burns the CPU share a
 * busy host gives this machine. */
#define SPINS 256

typedef struct {
    progress_t progress[MAX_THREADS]; /* per lane */
    chunk_t *chunks;
    size_t n_chunks;
    acc_t *acc;
    last_key_t last_keys[KEY_RING];
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int sleepers;        /* threads in (or entering) the condition wait */
    int threads;
    int profile;         /* LYMPH_CV_SCAN_PROFILE set: each thread's times on stderr */
    const char *problem; /* the first problem; stops every thread */
    int no_memory;
    uint64_t count;
} scan_t;

static int keep_key(uint8_t **key, size_t *len, size_t *cap, const uint8_t *from, size_t from_len)
{
    if (from_len > *cap) {
        uint8_t *grown = realloc(*key, from_len * 2 + 64);
        if (!grown)
            return 0;
        *key = grown, *cap = from_len * 2 + 64;
    }
    memcpy(*key, from, from_len);
    *len = from_len;
    return 1;
}

/* Read chunk's bytes into slot's buffer: NULL, or the problem. */
static const char *read_chunk(slot_t *slot, const chunk_t *chunk, int fd)
{
    const table_t *t = chunk->table;
    uint64_t start = t->blocks[chunk->first].offset;
    uint64_t end = t->blocks[chunk->last].offset + t->blocks[chunk->last].size + BLOCK_TRAILER;
    if (end < start)
        return "blocks out of order in a table";
    if (end - start > slot->capacity) {
        free(slot->buffer);
        slot->capacity = 0;
        if (!(slot->buffer = malloc(end - start)))
            return "out of memory";
        slot->capacity = end - start;
    }
    if (!read_at(fd, slot->buffer, end - start, start))
        return "a table file cannot be read";
    return NULL;
}

/* Parse the chunk read into slot (its records' pixels, first and last keys): NULL, or the problem. */
static const char *parse_chunk(const acc_t *a, slot_t *slot, const chunk_t *chunk)
{
    const table_t *t = chunk->table;
    uint64_t start = t->blocks[chunk->first].offset;
    uint64_t end = t->blocks[chunk->last].offset + t->blocks[chunk->last].size + BLOCK_TRAILER;
    for (size_t i = 0; i < slot->n_owned; i++)
        free(slot->owned[i]);
    slot->n_owned = slot->n_records = 0;
    block_iter_t block = {0};
    const char *problem = NULL;
    int have_key = 0;
    for (size_t b = chunk->first; b <= chunk->last && !problem; b++) {
        const handle_t *h = &t->blocks[b];
        const uint8_t *data, *value, *pixels;
        size_t len, value_len;
        uint8_t *owned;
        int entry, c, hh, w;
        if (h->offset < start || h->offset + h->size + BLOCK_TRAILER > end) {
            problem = "blocks out of order in a table";
            break;
        }
        if ((problem = block_contents(slot->buffer + (h->offset - start), h->size, &data, &len, &owned)))
            break;
        if (owned && push((void ***)&slot->owned, &slot->n_owned, &slot->cap_owned, owned) < 0) {
            free(owned);
            problem = "out of memory";
            break;
        }
        if (!block_open(&block, data, len)) {
            problem = "a malformed data block";
            break;
        }
        while ((entry = block_next(&block, &value, &value_len)) == 1) {
            if (block.key_len < 8) {
                problem = "a malformed internal key";
                break;
            }
            size_t user_len = block.key_len - 8;
            if ((le64(block.key + user_len) & 0xff) != TYPE_VALUE) {
                problem = "a deletion";
                break;
            }
            if (have_key && !key_less(slot->last_key, slot->last_len, block.key, user_len)) {
                problem = "repeated or overlapping user keys";
                break;
            }
            if ((!have_key && !keep_key(&slot->first_key, &slot->first_len, &slot->first_cap, block.key, user_len)) ||
                !keep_key(&slot->last_key, &slot->last_len, &slot->last_cap, block.key, user_len)) {
                problem = "out of memory";
                break;
            }
            have_key = 1;
            if (!parse_datum(value, value_len, &pixels, &c, &hh, &w)) {
                problem = "a record that is not a raw uint8 Datum";
                break;
            }
            if (c != a->channels || hh != a->height || w != a->width) {
                problem = "records of different sizes";
                break;
            }
            if (push((void ***)&slot->records, &slot->n_records, &slot->cap_records, (void *)pixels) < 0) {
                problem = "out of memory";
                break;
            }
        }
        if (!problem && entry < 0)
            problem = "a malformed data block";
    }
    if (!problem && !have_key)
        problem = "an empty data block";
    free(block.key);
    return problem;
}

static void slot_free(slot_t *slot)
{
    for (size_t i = 0; i < slot->n_owned; i++)
        free(slot->owned[i]);
    free(slot->owned);
    free(slot->buffer);
    free(slot->records);
    free(slot->first_key);
    free(slot->last_key);
}

static void stop(scan_t *s, const char *problem)
{
    pthread_mutex_lock(&s->lock);
    if (!s->problem)
        __atomic_store_n(&s->problem, problem, __ATOMIC_SEQ_CST);
    if (!strcmp(problem, "out of memory"))
        s->no_memory = 1;
    pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->lock);
}

static void cpu_relax(void)
{
#ifdef HAVE_X86_KERNELS
    _mm_pause();
#endif
}

/* Wait until lane l has added chunks [0, k) or a thread has stopped the scan; 0 when stopped. */
static int wait_lane(scan_t *s, int l, size_t k)
{
    size_t *done = &s->progress[l].done;
    for (int i = 0; i < SPINS; i++) {
        if (__atomic_load_n(done, __ATOMIC_ACQUIRE) >= k)
            return 1;
        if (__atomic_load_n(&s->problem, __ATOMIC_RELAXED))
            return 0;
        cpu_relax();
    }
    /* Sleep.  The sleeper count and the progress are both sequentially consistent, so either the
     * publisher sees this sleeper (and wakes it under the lock) or this thread sees the progress. */
    __atomic_fetch_add(&s->sleepers, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&s->lock);
    while (__atomic_load_n(done, __ATOMIC_SEQ_CST) < k && !s->problem)
        pthread_cond_wait(&s->changed, &s->lock);
    int ok = s->problem == NULL;
    pthread_mutex_unlock(&s->lock);
    __atomic_fetch_sub(&s->sleepers, 1, __ATOMIC_SEQ_CST);
    return ok;
}

static void publish_lane(scan_t *s, int l, size_t k)
{
    __atomic_store_n(&s->progress[l].done, k, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&s->sleepers, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&s->lock);
        pthread_cond_broadcast(&s->changed);
        pthread_mutex_unlock(&s->lock);
    }
}

typedef struct {
    scan_t *scan;
    int id;
} worker_t;

/* Seconds on the monotonic clock (profiling only). */
static double seconds(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

enum { T_READ, T_PARSE, T_WAIT, T_ADD, N_TIMES };

/* A scanning thread's state: its two chunks (the one being summed, and the next one, read ahead
 * while a lane waits), the table it has open, its times. */
typedef struct {
    scan_t *s;
    slot_t slots[2];
    const table_t *open_table_of; /* the table open_fd is of */
    int open_fd;
    double times[N_TIMES], mark;
} thread_state_t;

static void lap(thread_state_t *me, int what)
{
    if (me->s->profile) {
        double now = seconds();
        me->times[what] += now - me->mark;
        me->mark = now;
    }
}

/* Read and parse chunk k into slot, and keep its last key for chunk k + 1's thread: NULL, or the problem. */
static const char *load_chunk(thread_state_t *me, size_t k, slot_t *slot)
{
    scan_t *s = me->s;
    const chunk_t *chunk = &s->chunks[k];
    const table_t *table = chunk->table;
    if (table->fd < 0 && table != me->open_table_of) { /* a table not kept open: this thread's own fd */
        if (me->open_fd >= 0)
            close(me->open_fd);
        me->open_fd = open(table->path, O_RDONLY | O_CLOEXEC);
        me->open_table_of = table;
    }
    int fd = table->fd >= 0 ? table->fd : me->open_fd;
    const char *problem = fd < 0 ? "a table file cannot be opened" : read_chunk(slot, chunk, fd);
    lap(me, T_READ);
    if (!problem)
        problem = parse_chunk(s->acc, slot, chunk);
    if (!problem) {
        last_key_t *last = &s->last_keys[k % KEY_RING];
        if (!keep_key(&last->key, &last->len, &last->cap, slot->last_key, slot->last_len))
            problem = "out of memory";
    }
    lap(me, T_PARSE);
    return problem;
}

static void *scan_worker(void *arg)
{
    worker_t *worker = (worker_t *)arg;
    scan_t *s = worker->scan;
    acc_t *acc = s->acc;
    size_t step = (size_t)s->threads, ahead = SIZE_MAX; /* the chunk read ahead into the other slot */
    thread_state_t me = {.s = s, .open_fd = -1, .mark = s->profile ? seconds() : 0};
    double start = me.mark;
    uint64_t count = 0;
    size_t chunks = 0;
    int cur = 0;
    for (size_t k = (size_t)worker->id; k < s->n_chunks; k += step) {
        const char *problem = NULL;
        if (__atomic_load_n(&s->problem, __ATOMIC_RELAXED))
            break;
        if (ahead == k)
            cur = 1 - cur, ahead = SIZE_MAX;
        else
            problem = load_chunk(&me, k, &me.slots[cur]);
        if (problem) {
            stop(s, problem);
            break;
        }
        slot_t *slot = &me.slots[cur];
        for (int l = 0; l < acc->n_lanes; l++) {
            /* The lane is not free yet: read the next chunk meanwhile instead of waiting. */
            if (ahead == SIZE_MAX && k + step < s->n_chunks &&
                __atomic_load_n(&s->progress[l].done, __ATOMIC_ACQUIRE) < k) {
                if ((problem = load_chunk(&me, k + step, &me.slots[1 - cur]))) {
                    stop(s, problem);
                    break;
                }
                ahead = k + step;
            }
            if (!wait_lane(s, l, k))
                break;
            lap(&me, T_WAIT);
            if (l == 0 && k) { /* the order across chunks (and so across tables): strictly increasing keys */
                const last_key_t *before = &s->last_keys[(k - 1) % KEY_RING];
                if (!key_less(before->key, before->len, slot->first_key, slot->first_len)) {
                    stop(s, "repeated or overlapping user keys");
                    break;
                }
            }
            lane_add(&acc->lanes[l], slot->records, slot->n_records);
            publish_lane(s, l, k + 1);
            lap(&me, T_ADD);
        }
        if (__atomic_load_n(&s->problem, __ATOMIC_RELAXED))
            break;
        count += slot->n_records;
        chunks++;
    }
    if (s->profile)
        fprintf(stderr, "ldbscan: thread %d: %zu chunks, %.3f s: read %.3f, parse %.3f, wait %.3f, add %.3f\n",
                worker->id, chunks, seconds() - start, me.times[T_READ], me.times[T_PARSE], me.times[T_WAIT],
                me.times[T_ADD]);
    __atomic_fetch_add(&s->count, count, __ATOMIC_RELAXED);
    slot_free(&me.slots[0]);
    slot_free(&me.slots[1]);
    if (me.open_fd >= 0)
        close(me.open_fd);
    return NULL;
}

/* The scan without the GIL: a problem (a static string) or NULL with *acc filled. */
static const char *scan(table_t *tables, size_t n, int threads, size_t keep_open, acc_t *acc, int *no_memory)
{
    opening_t opening = {tables, n, 0, keep_open};
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads && (size_t)t < n; t++)
        started[t] = pthread_create(&ids[t], NULL, opener, &opening) == 0;
    opener(&opening);
    for (int t = 1; t < threads && (size_t)t < n; t++)
        if (started[t])
            pthread_join(ids[t], NULL);
    table_t **order = malloc((n ? n : 1) * sizeof(table_t *));
    if (!order) {
        *no_memory = 1;
        return NULL;
    }
    size_t used = 0, n_chunks = 0;
    for (size_t i = 0; i < n; i++) {
        if (tables[i].problem) {
            free(order);
            return tables[i].problem;
        }
        if (tables[i].n_blocks)
            order[used++] = &tables[i];
    }
    if (used == 0) {
        free(order);
        return "no records";
    }
    qsort(order, used, sizeof(table_t *), compare_first_keys);
    /* chunks: consecutive blocks of one table, about CHUNK_BYTES each */
    for (size_t i = 0; i < used; i++)
        n_chunks += order[i]->n_blocks;
    chunk_t *chunks = malloc(n_chunks * sizeof(chunk_t));
    if (!chunks || acc_start(acc, order[0]->c, order[0]->h, order[0]->w, threads) < 0) {
        free(chunks);
        free(order);
        *no_memory = 1;
        return NULL;
    }
    n_chunks = 0;
    for (size_t i = 0; i < used; i++) {
        const table_t *t = order[i];
        for (size_t b = 0; b < t->n_blocks;) {
            size_t last = b;
            while (last + 1 < t->n_blocks && t->blocks[last + 1].offset + t->blocks[last + 1].size - t->blocks[b].offset <= CHUNK_BYTES)
                last++;
            chunks[n_chunks++] = (chunk_t){t, b, last};
            b = last + 1;
        }
    }
    free(order);
    scan_t s = {.chunks = chunks, .n_chunks = n_chunks, .acc = acc, .lock = PTHREAD_MUTEX_INITIALIZER,
                .changed = PTHREAD_COND_INITIALIZER, .threads = acc->n_lanes};
    const char *profile = getenv(PROFILE_ENV);
    s.profile = profile && *profile && strcmp(profile, "0");
    worker_t workers[MAX_THREADS];
    for (int t = 0; t < acc->n_lanes; t++) {
        workers[t] = (worker_t){&s, t};
        started[t] = 0;
    }
    int all_started = 1;
    for (int t = 1; t < acc->n_lanes; t++)
        all_started &= started[t] = pthread_create(&ids[t], NULL, scan_worker, &workers[t]) == 0;
    if (all_started)
        scan_worker(&workers[0]);
    else /* the lanes wait on each other: without all their threads, none can finish */
        stop(&s, "threads could not be started");
    for (int t = 1; t < acc->n_lanes; t++)
        if (started[t])
            pthread_join(ids[t], NULL);
    for (int r = 0; r < KEY_RING; r++)
        free(s.last_keys[r].key);
    free(chunks);
    pthread_mutex_destroy(&s.lock);
    pthread_cond_destroy(&s.changed);
    *no_memory |= s.no_memory;
    if (!s.problem)
        acc->count = s.count;
    return s.problem;
}

static PyObject *scan_tables(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"paths", "threads", "keep_open", NULL};
    PyObject *paths;
    int threads = 0;
    Py_ssize_t keep_open = KEEP_OPEN;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|in:scan_tables", keywords, &paths, &threads, &keep_open))
        return NULL;
    PyObject *sequence = PySequence_Fast(paths, "paths must be a sequence of str");
    if (!sequence)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(sequence);
    table_t *tables = calloc(n ? (size_t)n : 1, sizeof(table_t));
    PyObject **encoded = calloc(n ? (size_t)n : 1, sizeof(PyObject *));
    PyObject *result = NULL;
    acc_t acc = {0};
    if (!tables || !encoded) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(sequence, i), &encoded[i]))
            goto done;
        tables[i].path = PyBytes_AS_STRING(encoded[i]);
        tables[i].fd = -1;
    }
    if (threads <= 0)
        threads = default_threads();
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    const char *problem;
    int no_memory = 0;
    Py_BEGIN_ALLOW_THREADS
    problem = scan(tables, (size_t)n, threads, keep_open < 0 ? 0 : (size_t)keep_open, &acc, &no_memory);
    Py_END_ALLOW_THREADS
    if (no_memory)
        PyErr_NoMemory();
    else if (problem)
        PyErr_SetString(Unsupported, problem);
    else
        result = acc_result(&acc);
done:
    for (Py_ssize_t i = 0; tables && encoded && i < n; i++)
        if (encoded[i])
            table_free(&tables[i]);
    for (Py_ssize_t i = 0; encoded && i < n; i++)
        Py_XDECREF(encoded[i]);
    free(tables);
    free(encoded);
    acc_free(&acc);
    Py_DECREF(sequence);
    return result;
}

/* ------------------------------------------------------------------ Accumulator (values) */

typedef struct {
    PyObject_HEAD
    acc_t acc;
    int threads;
    int broken; /* a record was refused mid-way: the sums are partial */
} AccumulatorObject;

static int Accumulator_init(AccumulatorObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"threads", NULL};
    int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|i:Accumulator", keywords, &threads))
        return -1;
    acc_free(&self->acc);
    memset(&self->acc, 0, sizeof(self->acc));
    self->threads = threads <= 0 ? default_threads() : threads > MAX_THREADS ? MAX_THREADS : threads;
    return 0;
}

static void Accumulator_dealloc(AccumulatorObject *self)
{
    acc_free(&self->acc);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Sum the chunk's records (their buffers are held until then), then release the buffers. */
static void flush_chunk(AccumulatorObject *self, const uint8_t **records, Py_buffer *views, size_t *n)
{
    Py_BEGIN_ALLOW_THREADS
    acc_add(&self->acc, records, *n);
    Py_END_ALLOW_THREADS
    for (size_t i = 0; i < *n; i++)
        PyBuffer_Release(&views[i]);
    *n = 0;
}

static PyObject *Accumulator_add_values(AccumulatorObject *self, PyObject *iterable)
{
    PyObject *iterator = PyObject_GetIter(iterable);
    if (!iterator)
        return NULL;
    if (self->broken) {
        Py_DECREF(iterator);
        PyErr_SetString(Unsupported, "a record was refused before");
        return NULL;
    }
    const uint8_t **records = malloc(VALUES_CHUNK * sizeof(uint8_t *));
    Py_buffer *views = malloc(VALUES_CHUNK * sizeof(Py_buffer));
    size_t n = 0;
    unsigned long long added = 0;
    PyObject *item, *result = NULL;
    if (!records || !views) {
        PyErr_NoMemory();
        goto done;
    }
    while ((item = PyIter_Next(iterator))) {
        int ok = PyObject_GetBuffer(item, &views[n], PyBUF_SIMPLE);
        Py_DECREF(item);
        if (ok < 0)
            goto done;
        const uint8_t *pixels;
        int c, h, w;
        if (!parse_datum(views[n].buf, (size_t)views[n].len, &pixels, &c, &h, &w)) {
            PyBuffer_Release(&views[n]);
            self->broken = 1;
            PyErr_Format(Unsupported, "record %llu is not a raw uint8 Datum", (unsigned long long)self->acc.count + n);
            goto done;
        }
        if (self->acc.size == 0) {
            if (acc_start(&self->acc, c, h, w, self->threads) < 0) {
                PyBuffer_Release(&views[n]);
                PyErr_NoMemory();
                goto done;
            }
        } else if (c != self->acc.channels || h != self->acc.height || w != self->acc.width) {
            PyBuffer_Release(&views[n]);
            self->broken = 1;
            PyErr_Format(Unsupported, "record %llu is %dx%dx%d, the first was %dx%dx%d",
                         (unsigned long long)self->acc.count + n, c, h, w, self->acc.channels, self->acc.height,
                         self->acc.width);
            goto done;
        }
        records[n++] = pixels;
        added++;
        if (n == VALUES_CHUNK)
            flush_chunk(self, records, views, &n);
    }
    if (PyErr_Occurred())
        goto done;
    flush_chunk(self, records, views, &n);
    result = PyLong_FromUnsignedLongLong(added);
done:
    for (size_t i = 0; views && i < n; i++)
        PyBuffer_Release(&views[i]);
    free(records);
    free(views);
    Py_DECREF(iterator);
    return result;
}

static PyObject *Accumulator_add_rows(AccumulatorObject *self, PyObject *args)
{
    PyObject *rows;
    int c, h, w;
    if (!PyArg_ParseTuple(args, "O(iii):add_rows", &rows, &c, &h, &w))
        return NULL;
    if (self->broken) {
        PyErr_SetString(Unsupported, "a record was refused before");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(rows, &view, PyBUF_STRIDES | PyBUF_FORMAT) < 0)
        return NULL;
    PyObject *result = NULL;
    const uint8_t **records = NULL;
    size_t n = view.ndim == 2 ? (size_t)view.shape[0] : 0, size = (size_t)c * h * w;
    if (view.ndim != 2 || view.itemsize != 1 || (view.format && strcmp(view.format, "B")) || c <= 0 || h <= 0 ||
        w <= 0 || (size_t)view.shape[1] != size || (n > 1 && view.strides[0] <= 0) || view.strides[1] != 1) {
        PyErr_SetString(PyExc_ValueError, "rows must be a (B, C*H*W) uint8 array with contiguous rows");
        goto done;
    }
    if (self->acc.size == 0) {
        if (acc_start(&self->acc, c, h, w, self->threads) < 0) {
            PyErr_NoMemory();
            goto done;
        }
    } else if (c != self->acc.channels || h != self->acc.height || w != self->acc.width) {
        self->broken = 1;
        PyErr_Format(Unsupported, "rows are %dx%dx%d, the first were %dx%dx%d", c, h, w, self->acc.channels,
                     self->acc.height, self->acc.width);
        goto done;
    }
    if (!(records = malloc((n ? n : 1) * sizeof(uint8_t *)))) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < n; i++)
        records[i] = (const uint8_t *)view.buf + (Py_ssize_t)i * view.strides[0];
    Py_BEGIN_ALLOW_THREADS
    acc_add(&self->acc, records, n);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSize_t(n);
done:
    free(records);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *Accumulator_result(AccumulatorObject *self, PyObject *unused)
{
    if (self->broken) {
        PyErr_SetString(Unsupported, "a record was refused before");
        return NULL;
    }
    return acc_result(&self->acc);
}

static PyObject *Accumulator_count(AccumulatorObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->acc.count);
}

static PyMethodDef Accumulator_methods[] = {
    {"add_values", (PyCFunction)Accumulator_add_values, METH_O,
     "add_values(iterable) -> int: add serialized raw Datums (bytes-like) in order; Unsupported for any other record."},
    {"add_rows", (PyCFunction)Accumulator_add_rows, METH_VARARGS,
     "add_rows(rows, (C, H, W)) -> int: add the rows of a (B, C*H*W) uint8 array (rows may be strided) in order."},
    {"result", (PyCFunction)Accumulator_result, METH_NOARGS,
     "result() -> (count, (C, H, W), sum bytes, mean bytes, channel means); float32 little-endian bytes."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Accumulator_getset[] = {
    {"count", (getter)Accumulator_count, NULL, "records added", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AccumulatorType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lymph_cv.formats.ldbscan.Accumulator",
    .tp_basicsize = sizeof(AccumulatorObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Accumulator(threads=0): compute_image_mean's float32 running sum over serialized Datums.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Accumulator_init,
    .tp_dealloc = (destructor)Accumulator_dealloc,
    .tp_methods = Accumulator_methods,
    .tp_getset = Accumulator_getset,
};

static PyMethodDef methods[] = {
    {"scan_tables", (PyCFunction)(void (*)(void))scan_tables, METH_VARARGS | METH_KEYWORDS,
     "scan_tables(paths, threads=0, keep_open=256) -> (count, (C, H, W), sum bytes, mean bytes, channel means)\n\n"
     "compute_image_mean over LevelDB table files (the live ones, any order); Unsupported when the\n"
     "tables need LevelDB's own merge (deletions, repeated or overlapping keys) or hold other records."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "lymph_cv.formats.ldbscan",
    "compute_image_mean's float32 running sum over LevelDB tables or serialized Datums, natively.", -1, methods,
};

PyMODINIT_FUNC PyInit_ldbscan(void)
{
    choose_kernels();
    if (PyType_Ready(&AccumulatorType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Unsupported = PyErr_NewException("lymph_cv.formats.ldbscan.Unsupported", PyExc_Exception, NULL);
    if (!Unsupported || PyModule_AddObject(m, "Unsupported", Unsupported) < 0) {
        Py_XDECREF(Unsupported);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(Unsupported);
    Py_INCREF(&AccumulatorType);
    if (PyModule_AddObject(m, "Accumulator", (PyObject *)&AccumulatorType) < 0) {
        Py_DECREF(&AccumulatorType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
