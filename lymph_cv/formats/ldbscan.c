/* lymph_cv.formats.ldbscan: compute_image_mean's float32 running sum, natively.
 *
 * scan_tables(paths, threads=0) memory-maps LevelDB table files, walks footer -> index block ->
 * data blocks (uncompressed or snappy), parses each raw Datum and accumulates Caffe's float32
 * running sum in key order.  Accumulator().add_values(iterable) does the same over serialized
 * Datums (an LMDB cursor's buffers, or any bytes-like values).  Whatever this module does not
 * handle exactly as LevelDB would read it (a deletion, a repeated or out-of-order user key, an
 * unknown compression, a malformed block, a record that is not a raw uint8 Datum of the first
 * record's size) raises Unsupported: the caller then takes the plyvel + numpy path, which gives
 * the same bytes or names the bad record.
 *
 * The arithmetic is Caffe's: every record's uint8 pixels are added to a float32 sum, one rounding
 * per record and pixel, records in key order.  Threads split the pixels (the order per pixel is
 * what matters), so the bytes do not depend on the thread count.  Block checksums are not
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
#include <sys/mman.h>
#include <sys/stat.h>
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
/* Records a pass collects before summing them (a few LevelDB blocks). */
#define PASS_BATCH 64
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

static void add1_f32(float *restrict sum, const uint8_t *restrict a, size_t n)
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
    }

#define WIDEN16(p, i) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((p) + (i)))))
#define WIDEN8(p, i) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((p) + (i)))))
DEFINE_ADD4(add4_avx512, "avx512f", 16, __m512, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_add_ps, WIDEN16)
DEFINE_ADD4(add4_avx2, "avx2", 8, __m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_add_ps, WIDEN8)
#endif

static add4_t add4 = add4_plain;

static void choose_kernels(void)
{
#ifdef HAVE_X86_KERNELS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        add4 = add4_avx512;
    else if (__builtin_cpu_supports("avx2"))
        add4 = add4_avx2;
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
    for (; i + 4 <= n; i += 4)
        add4(l->sum, r[i] + lo, r[i + 1] + lo, r[i + 2] + lo, r[i + 3] + lo, l->n);
    for (; i < n; i++)
        add1_f32(l->sum, r[i] + lo, l->n);
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

typedef struct {
    const char *path;
    const uint8_t *map;
    size_t size;
    const uint8_t *index;  /* the index block's contents */
    size_t index_len;
    uint8_t *index_owned;  /* when it was compressed */
    int empty;             /* a table of no entries */
    uint8_t *first_key;    /* its first user key */
    size_t first_len;
    int c, h, w;           /* its first record's shape */
    const char *problem;   /* NULL, or why the fast path does not apply */
} table_t;

/* A block's contents by handle: in place when uncompressed, else snappy into *owned (malloc'd). */
static const char *read_block(const table_t *t, uint64_t offset, uint64_t size, const uint8_t **data, size_t *len,
                              uint8_t **owned)
{
    *owned = NULL;
    if (offset > t->size || size > t->size - offset || BLOCK_TRAILER > t->size - offset - size)
        return "a block handle points past its table";
    uint8_t type = t->map[offset + size];
    if (type == NO_COMPRESSION) {
        *data = t->map + offset, *len = size;
        return NULL;
    }
    if (type != SNAPPY_COMPRESSION)
        return "a block of an unknown compression";
    if (!(*owned = snappy_uncompress(t->map + offset, size, len)))
        return "a malformed snappy block";
    *data = *owned;
    return NULL;
}

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

/* A data block handle from an index entry's value. */
static int get_handle(const uint8_t *value, size_t len, uint64_t *offset, uint64_t *size)
{
    size_t pos = 0;
    return get_varint(value, len, &pos, offset) && get_varint(value, len, &pos, size);
}

/* Map one table and read what the walk needs first: its index block, first key and record shape. */
static void open_table(table_t *t)
{
    int fd = open(t->path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) {
        t->problem = "a table file cannot be opened";
        return;
    }
    if (fstat(fd, &st) < 0 || st.st_size < TABLE_FOOTER) {
        close(fd);
        t->problem = "a table file too short for a footer";
        return;
    }
    /* Populated: faulting the pages in one by one costs more than the kernel's bulk mapping. */
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        t->problem = "a table file cannot be mapped";
        return;
    }
    t->map = map, t->size = (size_t)st.st_size;
    if (le64(t->map + t->size - 8) != TABLE_MAGIC) {
        t->problem = "not a LevelDB table (no footer magic)";
        return;
    }
    const uint8_t *footer = t->map + t->size - TABLE_FOOTER;
    size_t pos = 0, end = TABLE_FOOTER - 8, len;
    uint64_t meta_offset, meta_size, index_offset, index_size, offset, size;
    if (!get_varint(footer, end, &pos, &meta_offset) || !get_varint(footer, end, &pos, &meta_size) ||
        !get_varint(footer, end, &pos, &index_offset) || !get_varint(footer, end, &pos, &index_size)) {
        t->problem = "a malformed table footer";
        return;
    }
    if ((t->problem = read_block(t, index_offset, index_size, &t->index, &t->index_len, &t->index_owned)))
        return;
    block_iter_t index = {0}, block = {0};
    const uint8_t *value, *data, *pixels;
    size_t value_len;
    uint8_t *owned = NULL;
    int got;
    if (!block_open(&index, t->index, t->index_len) || (got = block_next(&index, &value, &value_len)) < 0) {
        t->problem = "a malformed index block";
    } else if (got == 0) {
        t->empty = 1;
    } else if (!get_handle(value, value_len, &offset, &size)) {
        t->problem = "a malformed block handle";
    } else if (!(t->problem = read_block(t, offset, size, &data, &len, &owned))) {
        if (!block_open(&block, data, len) || block_next(&block, &value, &value_len) != 1 || block.key_len < 8)
            t->problem = "a malformed data block";
        else if (!(t->first_key = malloc(block.key_len)))
            t->problem = "out of memory";
        else if (!parse_datum(value, value_len, &pixels, &t->c, &t->h, &t->w))
            t->problem = "a record that is not a raw uint8 Datum";
        else
            memcpy(t->first_key, block.key, t->first_len = block.key_len - 8);
    }
    free(owned);
    free(index.key);
    free(block.key);
}

static void table_free(table_t *t)
{
    free(t->index_owned);
    free(t->first_key);
    if (t->map)
        munmap((void *)t->map, t->size);
}

typedef struct {
    table_t *tables;
    size_t n;
    size_t next; /* the next table to open (shared by the openers) */
} opening_t;

static void *opener(void *arg)
{
    opening_t *o = (opening_t *)arg;
    size_t i;
    while ((i = __atomic_fetch_add(&o->next, 1, __ATOMIC_RELAXED)) < o->n)
        open_table(&o->tables[i]);
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

/* One thread's pass over every table in key order, summing its lane's pixels of every record. */
typedef struct {
    table_t *const *order;
    size_t n_tables;
    acc_t *acc;
    lane_t *lane;
    int check_keys;  /* one pass checks that user keys strictly increase (no repeats, no overlaps) */
    int *stop;       /* shared: set by the pass that finds a problem */
    const char *problem;
    int no_memory;
    uint64_t count;
} pass_t;

static void *run_pass(void *arg)
{
    pass_t *p = (pass_t *)arg;
    const uint8_t *batch[PASS_BATCH];
    size_t in_batch = 0, value_len, len;
    block_iter_t index = {0}, block = {0};
    uint8_t *owned = NULL, *last = NULL;
    size_t last_len = 0, last_cap = 0;
    int have_last = 0;
    const acc_t *a = p->acc;
    for (size_t ti = 0; ti < p->n_tables && !p->problem; ti++) {
        const table_t *t = p->order[ti];
        const uint8_t *handle, *data, *value, *pixels;
        int got, entry, c, h, w;
        block_open(&index, t->index, t->index_len); /* checked by open_table */
        while (!p->problem && (got = block_next(&index, &handle, &value_len)) == 1) {
            uint64_t offset, size;
            uint8_t *fresh;
            if (__atomic_load_n(p->stop, __ATOMIC_RELAXED)) {
                p->problem = "stopped";
                break;
            }
            if (!get_handle(handle, value_len, &offset, &size)) {
                p->problem = "a malformed block handle";
                break;
            }
            if ((p->problem = read_block(t, offset, size, &data, &len, &fresh)))
                break;
            if (fresh) { /* the batch may point into the previous decompressed block: sum it first */
                lane_add(p->lane, batch, in_batch);
                in_batch = 0;
                free(owned);
                owned = fresh;
            }
            if (!block_open(&block, data, len)) {
                p->problem = "a malformed data block";
                break;
            }
            while ((entry = block_next(&block, &value, &value_len)) == 1) {
                if (block.key_len < 8) {
                    p->problem = "a malformed internal key";
                    break;
                }
                size_t user_len = block.key_len - 8;
                if ((le64(block.key + user_len) & 0xff) != TYPE_VALUE) {
                    p->problem = "a deletion";
                    break;
                }
                if (p->check_keys) {
                    if (have_last && !key_less(last, last_len, block.key, user_len)) {
                        p->problem = "repeated or overlapping user keys";
                        break;
                    }
                    if (user_len > last_cap) {
                        uint8_t *grown = realloc(last, user_len * 2 + 64);
                        if (!grown) {
                            p->no_memory = 1, p->problem = "out of memory";
                            break;
                        }
                        last = grown, last_cap = user_len * 2 + 64;
                    }
                    memcpy(last, block.key, user_len);
                    last_len = user_len, have_last = 1;
                }
                if (!parse_datum(value, value_len, &pixels, &c, &h, &w)) {
                    p->problem = "a record that is not a raw uint8 Datum";
                    break;
                }
                if (c != a->channels || h != a->height || w != a->width) {
                    p->problem = "records of different sizes";
                    break;
                }
                batch[in_batch++] = pixels;
                p->count++;
                if (in_batch == PASS_BATCH) {
                    lane_add(p->lane, batch, in_batch);
                    in_batch = 0;
                }
            }
            if (!p->problem && entry < 0)
                p->problem = "a malformed data block";
        }
        if (!p->problem && got < 0)
            p->problem = "a malformed index block";
    }
    if (!p->problem)
        lane_add(p->lane, batch, in_batch);
    else
        __atomic_store_n(p->stop, 1, __ATOMIC_RELAXED);
    free(owned);
    free(last);
    free(index.key);
    free(block.key);
    return NULL;
}

/* The scan without the GIL: a problem (a static string) or NULL with *acc filled. */
static const char *scan(table_t *tables, size_t n, int threads, acc_t *acc, int *no_memory)
{
    opening_t opening = {tables, n, 0};
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
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        if (tables[i].problem) {
            free(order);
            return tables[i].problem;
        }
        if (!tables[i].empty)
            order[used++] = &tables[i];
    }
    if (used == 0) {
        free(order);
        return "no records";
    }
    qsort(order, used, sizeof(table_t *), compare_first_keys);
    if (acc_start(acc, order[0]->c, order[0]->h, order[0]->w, threads) < 0) {
        free(order);
        *no_memory = 1;
        return NULL;
    }
    pass_t passes[MAX_THREADS];
    int stop = 0;
    for (int t = 0; t < acc->n_lanes; t++) {
        passes[t] = (pass_t){order, used, acc, &acc->lanes[t], t == 0, &stop, NULL, 0, 0};
        started[t] = 0;
    }
    for (int t = 1; t < acc->n_lanes; t++)
        started[t] = pthread_create(&ids[t], NULL, run_pass, &passes[t]) == 0;
    for (int t = 1; t < acc->n_lanes; t++)
        if (!started[t])
            run_pass(&passes[t]);
    run_pass(&passes[0]);
    for (int t = 1; t < acc->n_lanes; t++)
        if (started[t])
            pthread_join(ids[t], NULL);
    free(order);
    const char *problem = NULL;
    for (int t = 0; t < acc->n_lanes; t++) {
        *no_memory |= passes[t].no_memory;
        if (passes[t].problem && (!problem || !strcmp(problem, "stopped")))
            problem = passes[t].problem;
    }
    if (!problem)
        acc->count = passes[0].count;
    return problem;
}

static PyObject *scan_tables(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"paths", "threads", NULL};
    PyObject *paths;
    int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|i:scan_tables", keywords, &paths, &threads))
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
    }
    if (threads <= 0)
        threads = default_threads();
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    const char *problem;
    int no_memory = 0;
    Py_BEGIN_ALLOW_THREADS
    problem = scan(tables, (size_t)n, threads, &acc, &no_memory);
    Py_END_ALLOW_THREADS
    if (no_memory)
        PyErr_NoMemory();
    else if (problem)
        PyErr_SetString(Unsupported, problem);
    else
        result = acc_result(&acc);
done:
    for (Py_ssize_t i = 0; tables && i < n; i++)
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
     "scan_tables(paths, threads=0) -> (count, (C, H, W), sum bytes, mean bytes, channel means)\n\n"
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
