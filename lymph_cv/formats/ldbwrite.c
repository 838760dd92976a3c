/* LevelDB table files written directly from records that arrive in increasing key order.
 *
 * A database built record by record through LevelDB writes every byte to its log, its memtable and
 * a level-0 table (then compactions may rewrite it).  Records that arrive sorted need none of that:
 * this module writes them straight into table files in LevelDB's format (table_format.md: data
 * blocks with prefix-compressed keys and restart points, an empty metaindex block, an index block,
 * the 48-byte footer; every block followed by its compression byte and masked CRC32C), uncompressed.
 * The Python side (formats/store.py) names the tables in a MANIFEST; LevelDB then opens the folder
 * as any other database.
 *
 * Writer(path_template, first_number, block_size, max_file_size, first_sequence)
 *   .add(keys, values)             sequences of bytes-like, keys strictly increasing
 *   .add_fixed(keys, data, width)  values are consecutive width-byte slices of one buffer
 *   .add_blob(keys, ends, data, width)  keys too are slices of one buffer (int64 end offsets)
 *   .finish() -> [(number, size, smallest internal key, largest internal key)], last sequence
 * add* return how many records they took: fewer than given when a key is not greater than the
 * previous one (the caller continues through LevelDB itself).
 * A finished table is on disk (fdatasync) before it is closed, as LevelDB's own BuildTable does, so the
 * MANIFEST written after finish() never names bytes a crash could lose; the writeback of each flushed
 * stretch is started at once (sync_file_range), so that sync waits only for the last few megabytes.
 * crc32c(data, crc=0) is exported for the MANIFEST's log records; pread_rows gathers the records'
 * pixels from the shared patch array's file.
 */
#define _GNU_SOURCE /* sync_file_range */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define HAVE_SSE42_PATH 1
#endif

/* ------------------------------------------------------------------ CRC32C (Castagnoli) */

static uint32_t crc_table[8][256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

static uint32_t crc_soft(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^ crc_table[5][(w >> 16) & 0xff] ^
              crc_table[4][(w >> 24) & 0xff] ^ crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff] ^
              crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

#ifdef HAVE_SSE42_PATH
/* SSE4.2's crc32 instruction, 8 bytes at a time (about 8 GB/s: the table method manages ~1.5). */
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = ~crc & 0xffffffffu;
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    while (n >= 32) {
        uint64_t a, b, d, e;
        memcpy(&a, p, 8);
        memcpy(&b, p + 8, 8);
        memcpy(&d, p + 16, 8);
        memcpy(&e, p + 24, 8);
        c = _mm_crc32_u64(c, a);
        c = _mm_crc32_u64(c, b);
        c = _mm_crc32_u64(c, d);
        c = _mm_crc32_u64(c, e);
        p += 32;
        n -= 32;
    }
    while (n >= 8) {
        uint64_t a;
        memcpy(&a, p, 8);
        c = _mm_crc32_u64(c, a);
        p += 8;
        n -= 8;
    }
    while (n--) c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif

static int use_hw_crc = 0;

static uint32_t crc32c(uint32_t crc, const uint8_t *p, size_t n) {
#ifdef HAVE_SSE42_PATH
    if (use_hw_crc) return crc_hw(crc, p, n);
#endif
    return crc_soft(crc, p, n);
}

/* LevelDB stores CRCs masked (a CRC of data containing CRCs is weak otherwise). */
static uint32_t crc_mask(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

/* ------------------------------------------------------------------ buffers */

typedef struct {
    uint8_t *data;
    size_t size, capacity;
} Buffer;

static int buf_reserve(Buffer *b, size_t extra) {
    if (b->size + extra <= b->capacity) return 0;
    size_t capacity = b->capacity ? b->capacity : 1 << 16;
    while (capacity < b->size + extra) capacity *= 2;
    uint8_t *data = realloc(b->data, capacity);
    if (!data) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->capacity = capacity;
    return 0;
}

static inline void put_varint(Buffer *b, uint64_t v) { /* room reserved by the caller */
    while (v >= 0x80) {
        b->data[b->size++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    b->data[b->size++] = (uint8_t)v;
}

static inline void put_fixed32(Buffer *b, uint32_t v) {
    for (int i = 0; i < 4; i++) b->data[b->size++] = (uint8_t)(v >> (8 * i));
}

static inline void put_fixed64(Buffer *b, uint64_t v) {
    for (int i = 0; i < 8; i++) b->data[b->size++] = (uint8_t)(v >> (8 * i));
}

/* ------------------------------------------------------------------ the writer */

enum { VALUE_TYPE = 1, TRAILER_BYTES = 5, FOOTER_BYTES = 48, HANDLE_MAX = 20, RESTART_INTERVAL = 16 };
static const uint64_t TABLE_MAGIC = 0xdb4775248b80fb57ull;
/* The file buffer is written out past this size (fewer, larger write calls). */
static const size_t FLUSH_BYTES = 1 << 22;

typedef struct {
    PyObject_HEAD
    char *template_;       /* printf pattern of a table's path, one %06llu */
    unsigned long long number;
    size_t block_size, max_file_size;
    uint64_t sequence;     /* of the next record */
    int fd;                /* the open table, -1 between tables */
    uint64_t file_offset;  /* bytes of the open table already written to fd */
    Buffer out;            /* the open table's unwritten bytes: finished blocks, then the open block */
    size_t block_start;    /* where the open data block starts in out */
    uint32_t *restarts;
    size_t restart_count, restart_capacity, block_entries;
    Buffer last_key;       /* internal key of the previous record (for prefixes and the order check) */
    Buffer first_key;      /* smallest internal key of the open table */
    Buffer index;          /* the open table's index block entries */
    uint32_t *index_restarts;
    size_t index_count, index_capacity;
    int has_last;          /* a record was added (last_key is valid for the order check) */
    int table_open, block_open;
    PyObject *tables;      /* list of (number, size, smallest, largest) */
} Writer;

/* Write out the buffered bytes (called between blocks only). */
static int out_flush(Writer *w) {
    size_t n = w->out.size;
    size_t done = 0;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    while (done < n) {
        ssize_t r = write(w->fd, w->out.data + done, n - done);
        if (r < 0) {
            if (errno == EINTR) continue;
            failed = errno;
            break;
        }
        done += (size_t)r;
    }
    /* Start the stretch's writeback now (a hint: its result is what the table's fdatasync reports). */
    if (!failed && n) (void)sync_file_range(w->fd, (off64_t)w->file_offset, (off64_t)n, SYNC_FILE_RANGE_WRITE);
    Py_END_ALLOW_THREADS
    if (failed) {
        errno = failed;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    w->out.size = 0;
    w->block_start = 0;
    w->file_offset += n;
    return 0;
}

static int restarts_push(uint32_t **array, size_t *count, size_t *capacity, uint32_t value) {
    if (*count == *capacity) {
        size_t capacity_ = *capacity ? *capacity * 2 : 64;
        uint32_t *grown = realloc(*array, capacity_ * sizeof(uint32_t));
        if (!grown) {
            PyErr_NoMemory();
            return -1;
        }
        *array = grown;
        *capacity = capacity_;
    }
    (*array)[(*count)++] = value;
    return 0;
}

static int buf_assign(Buffer *b, const uint8_t *data, size_t n) {
    b->size = 0;
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->data, data, n);
    b->size = n;
    return 0;
}

/* Close the open block: restarts, count, trailer; its index entry (the block's last key). */
static int block_finish(Writer *w) {
    if (!w->block_open) return 0;
    if (buf_reserve(&w->out, 4 * w->restart_count + 4 + TRAILER_BYTES) < 0) return -1;
    for (size_t i = 0; i < w->restart_count; i++) put_fixed32(&w->out, w->restarts[i]);
    put_fixed32(&w->out, (uint32_t)w->restart_count);
    size_t length = w->out.size - w->block_start;
    uint8_t type = 0; /* kNoCompression */
    uint32_t crc = crc32c(crc32c(0, w->out.data + w->block_start, length), &type, 1);
    w->out.data[w->out.size++] = type;
    put_fixed32(&w->out, crc_mask(crc));
    uint64_t offset = w->file_offset + w->block_start;
    /* index entry: key = the block's last internal key (>= every key in it, < the next block's) */
    if (restarts_push(&w->index_restarts, &w->index_count, &w->index_capacity, (uint32_t)w->index.size) < 0) return -1;
    if (buf_reserve(&w->index, 15 + w->last_key.size + HANDLE_MAX) < 0) return -1;
    Buffer handle = {0};
    uint8_t handle_bytes[HANDLE_MAX];
    handle.data = handle_bytes;
    handle.capacity = HANDLE_MAX;
    put_varint(&handle, offset);
    put_varint(&handle, length);
    put_varint(&w->index, 0);
    put_varint(&w->index, w->last_key.size);
    put_varint(&w->index, handle.size);
    memcpy(w->index.data + w->index.size, w->last_key.data, w->last_key.size);
    w->index.size += w->last_key.size;
    memcpy(w->index.data + w->index.size, handle.data, handle.size);
    w->index.size += handle.size;
    w->block_open = 0;
    w->block_start = w->out.size;
    if (w->out.size >= FLUSH_BYTES && out_flush(w) < 0) return -1;
    return 0;
}

/* Append a finished raw block (metaindex, index) to out; its handle into handle. */
static int raw_block(Writer *w, const uint8_t *data, size_t n, Buffer *handle) {
    if (buf_reserve(&w->out, n + TRAILER_BYTES) < 0) return -1;
    uint64_t offset = w->file_offset + w->out.size;
    memcpy(w->out.data + w->out.size, data, n);
    w->out.size += n;
    uint8_t type = 0;
    uint32_t crc = crc32c(crc32c(0, data, n), &type, 1);
    w->out.data[w->out.size++] = type;
    put_fixed32(&w->out, crc_mask(crc));
    put_varint(handle, offset);
    put_varint(handle, n);
    return 0;
}

static int table_finish(Writer *w) {
    if (!w->table_open) return 0;
    if (block_finish(w) < 0) return -1;
    uint8_t footer_bytes[FOOTER_BYTES];
    Buffer footer = {footer_bytes, 0, FOOTER_BYTES};
    uint8_t meta[8] = {0, 0, 0, 0, 1, 0, 0, 0}; /* an empty block: one restart at 0 */
    if (raw_block(w, meta, sizeof meta, &footer) < 0) return -1;
    if (buf_reserve(&w->index, 4 * w->index_count + 4) < 0) return -1;
    for (size_t i = 0; i < w->index_count; i++) put_fixed32(&w->index, w->index_restarts[i]);
    put_fixed32(&w->index, (uint32_t)w->index_count);
    if (raw_block(w, w->index.data, w->index.size, &footer) < 0) return -1;
    memset(footer.data + footer.size, 0, 2 * HANDLE_MAX - footer.size);
    footer.size = 2 * HANDLE_MAX;
    put_fixed32(&footer, (uint32_t)(TABLE_MAGIC & 0xffffffffu));
    put_fixed32(&footer, (uint32_t)(TABLE_MAGIC >> 32));
    if (buf_reserve(&w->out, FOOTER_BYTES) < 0) return -1;
    memcpy(w->out.data + w->out.size, footer.data, FOOTER_BYTES);
    w->out.size += FOOTER_BYTES;
    w->block_start = w->out.size;
    if (out_flush(w) < 0) return -1;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (fdatasync(w->fd) != 0) failed = errno;
    if (close(w->fd) != 0 && !failed) failed = errno;
    Py_END_ALLOW_THREADS
    w->fd = -1;
    w->table_open = 0;
    if (failed) {
        errno = failed;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    PyObject *entry = Py_BuildValue("(KKy#y#)", w->number, (unsigned long long)w->file_offset,
                                    (const char *)w->first_key.data, (Py_ssize_t)w->first_key.size,
                                    (const char *)w->last_key.data, (Py_ssize_t)w->last_key.size);
    if (!entry || PyList_Append(w->tables, entry) < 0) {
        Py_XDECREF(entry);
        return -1;
    }
    Py_DECREF(entry);
    w->number++;
    return 0;
}

static int table_open(Writer *w) {
    char path[4096];
    if (snprintf(path, sizeof path, w->template_, w->number) >= (int)sizeof path) {
        PyErr_SetString(PyExc_ValueError, "table path too long");
        return -1;
    }
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
        return -1;
    }
    w->fd = fd;
    w->file_offset = 0;
    w->out.size = 0;
    w->block_start = 0;
    w->index.size = 0;
    w->index_count = 0;
    w->table_open = 1;
    w->first_key.size = 0;
    return 0;
}

/* 1: key > previous (or first), 0: not, after comparing user keys (internal keys end in 8 bytes). */
static int key_greater(Writer *w, const uint8_t *key, size_t n) {
    if (!w->has_last) return 1;
    size_t last = w->last_key.size - 8;
    size_t common = n < last ? n : last;
    int c = memcmp(key, w->last_key.data, common);
    return c > 0 || (c == 0 && n > last);
}

static int add_record(Writer *w, const uint8_t *key, size_t key_size, const uint8_t *value, size_t value_size) {
    if (w->table_open && w->file_offset + w->out.size >= w->max_file_size && !w->block_open) {
        if (table_finish(w) < 0) return -1;
    }
    if (!w->table_open && table_open(w) < 0) return -1;
    if (!w->block_open) {
        w->block_start = w->out.size;
        w->restart_count = 0;
        w->block_entries = 0;
        w->block_open = 1;
    }
    size_t shared = 0;
    if (w->block_entries % RESTART_INTERVAL == 0) {
        if (restarts_push(&w->restarts, &w->restart_count, &w->restart_capacity,
                          (uint32_t)(w->out.size - w->block_start)) < 0)
            return -1;
    } else {
        size_t last = w->last_key.size, limit = key_size + 8 < last ? key_size + 8 : last;
        const uint8_t *prev = w->last_key.data;
        while (shared < limit && shared < key_size && prev[shared] == key[shared]) shared++;
    }
    size_t internal = key_size + 8;
    if (buf_reserve(&w->out, 15 + internal + value_size) < 0) return -1;
    put_varint(&w->out, shared);
    put_varint(&w->out, internal - shared);
    put_varint(&w->out, value_size);
    memcpy(w->out.data + w->out.size, key + shared, key_size - shared);
    w->out.size += key_size - shared;
    put_fixed64(&w->out, (w->sequence << 8) | VALUE_TYPE);
    memcpy(w->out.data + w->out.size, value, value_size);
    w->out.size += value_size;
    /* last_key = this internal key */
    if (buf_reserve(&w->last_key, internal) < 0) return -1;
    w->last_key.size = 0;
    memcpy(w->last_key.data, key, key_size);
    w->last_key.size = key_size;
    put_fixed64(&w->last_key, (w->sequence << 8) | VALUE_TYPE);
    if (w->first_key.size == 0 && buf_assign(&w->first_key, w->last_key.data, internal) < 0) return -1;
    w->has_last = 1;
    w->sequence++;
    w->block_entries++;
    if (w->out.size - w->block_start + 4 * w->restart_count + 4 >= w->block_size) return block_finish(w);
    return 0;
}

static PyObject *take_records(Writer *w, PyObject *keys, Py_ssize_t count,
                              int (*value_of)(void *, Py_ssize_t, const uint8_t **, size_t *), void *context) {
    PyObject *fast = PySequence_Fast(keys, "keys must be a sequence of bytes");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (count >= 0 && n != count) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%zd keys for %zd values", n, count);
        return NULL;
    }
    if (!w->tables) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "writer is finished");
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    Py_ssize_t i = 0;
    for (; i < n; i++) {
        char *key;
        Py_ssize_t key_size;
        if (PyBytes_AsStringAndSize(items[i], &key, &key_size) < 0) goto error;
        if (!key_greater(w, (const uint8_t *)key, (size_t)key_size)) break;
        const uint8_t *value;
        size_t value_size;
        if (value_of(context, i, &value, &value_size) < 0) goto error;
        if (add_record(w, (const uint8_t *)key, (size_t)key_size, value, value_size) < 0) goto error;
    }
    Py_DECREF(fast);
    return PyLong_FromSsize_t(i);
error:
    Py_DECREF(fast);
    return NULL;
}

typedef struct {
    PyObject **items;
    Py_buffer view;
} SequenceValues;

static int sequence_value(void *context, Py_ssize_t i, const uint8_t **value, size_t *size) {
    SequenceValues *values = context;
    if (values->view.obj) PyBuffer_Release(&values->view);
    if (PyObject_GetBuffer(values->items[i], &values->view, PyBUF_SIMPLE) < 0) {
        values->view.obj = NULL;
        return -1;
    }
    *value = values->view.buf;
    *size = (size_t)values->view.len;
    return 0;
}

static PyObject *Writer_add(Writer *w, PyObject *args) {
    PyObject *keys, *values;
    if (!PyArg_ParseTuple(args, "OO", &keys, &values)) return NULL;
    PyObject *fast = PySequence_Fast(values, "values must be a sequence of bytes-like objects");
    if (!fast) return NULL;
    SequenceValues context = {PySequence_Fast_ITEMS(fast), {0}};
    PyObject *taken = take_records(w, keys, PySequence_Fast_GET_SIZE(fast), sequence_value, &context);
    if (context.view.obj) PyBuffer_Release(&context.view);
    Py_DECREF(fast);
    return taken;
}

typedef struct {
    const uint8_t *data;
    size_t width;
} FixedValues;

static int fixed_value(void *context, Py_ssize_t i, const uint8_t **value, size_t *size) {
    FixedValues *values = context;
    *value = values->data + (size_t)i * values->width;
    *size = values->width;
    return 0;
}

static PyObject *Writer_add_fixed(Writer *w, PyObject *args) {
    PyObject *keys;
    Py_buffer data;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "Oy*n", &keys, &data, &width)) return NULL;
    if (width <= 0 || data.len % width) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "data is not a whole number of width-byte values");
        return NULL;
    }
    FixedValues context = {data.buf, (size_t)width};
    PyObject *taken = take_records(w, keys, data.len / width, fixed_value, &context);
    PyBuffer_Release(&data);
    return taken;
}

/* add_blob(keys, ends, data, width): key i is keys[ends[i-1]:ends[i]] (ends: int64, ends[-1] = len(keys)),
 * value i is data[i*width:(i+1)*width]: a batch without a Python object per record. */
static PyObject *Writer_add_blob(Writer *w, PyObject *args) {
    Py_buffer keys, ends, data;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*y*y*n", &keys, &ends, &data, &width)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = ends.len / (Py_ssize_t)sizeof(int64_t);
    const int64_t *end = ends.buf;
    if (!w->tables) {
        PyErr_SetString(PyExc_ValueError, "writer is finished");
        goto done;
    }
    if (ends.len % (Py_ssize_t)sizeof(int64_t) || width <= 0 || data.len != n * width || (n && end[n - 1] != keys.len)) {
        PyErr_SetString(PyExc_ValueError, "add_blob: ends must be int64 key ends, data n values of width bytes");
        goto done;
    }
    Py_ssize_t i = 0;
    int64_t start = 0;
    for (; i < n; i++) {
        if (end[i] < start || end[i] > keys.len) {
            PyErr_SetString(PyExc_ValueError, "add_blob: key ends must not decrease");
            goto done;
        }
        const uint8_t *key = (const uint8_t *)keys.buf + start;
        size_t key_size = (size_t)(end[i] - start);
        if (!key_greater(w, key, key_size)) break;
        if (add_record(w, key, key_size, (const uint8_t *)data.buf + i * width, (size_t)width) < 0) goto done;
        start = end[i];
    }
    result = PyLong_FromSsize_t(i);
done:
    PyBuffer_Release(&keys);
    PyBuffer_Release(&ends);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *Writer_finish(Writer *w, PyObject *Py_UNUSED(ignored)) {
    if (!w->tables) {
        PyErr_SetString(PyExc_ValueError, "writer is finished");
        return NULL;
    }
    if (table_finish(w) < 0) return NULL;
    PyObject *result = Py_BuildValue("(OK)", w->tables, (unsigned long long)(w->sequence - 1));
    Py_CLEAR(w->tables);
    return result;
}

static PyObject *Writer_abandon(Writer *w, PyObject *Py_UNUSED(ignored)) {
    /* Close the open table without finishing it (the caller removes the folder). */
    if (w->fd >= 0) close(w->fd);
    w->fd = -1;
    w->table_open = w->block_open = 0;
    Py_RETURN_NONE;
}

static int Writer_init(Writer *w, PyObject *args, PyObject *kwds) {
    static char *names[] = {"path_template", "first_number", "block_size", "max_file_size", "first_sequence", NULL};
    const char *template_;
    unsigned long long number, sequence;
    Py_ssize_t block_size, max_file_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sKnnK", names, &template_, &number, &block_size, &max_file_size,
                                     &sequence))
        return -1;
    if (block_size <= 0 || max_file_size <= 0 || sequence == 0 || sequence >= (1ull << 56)) {
        PyErr_SetString(PyExc_ValueError, "block_size and max_file_size must be positive, first_sequence in 1..2^56");
        return -1;
    }
    free(w->template_);
    w->template_ = strdup(template_);
    if (!w->template_) {
        PyErr_NoMemory();
        return -1;
    }
    w->number = number;
    w->block_size = (size_t)block_size;
    w->max_file_size = (size_t)max_file_size;
    w->sequence = sequence;
    w->fd = -1;
    Py_XSETREF(w->tables, PyList_New(0));
    return w->tables ? 0 : -1;
}

static void Writer_dealloc(Writer *w) {
    if (w->fd >= 0) close(w->fd);
    free(w->template_);
    free(w->out.data);
    free(w->restarts);
    free(w->last_key.data);
    free(w->first_key.data);
    free(w->index.data);
    free(w->index_restarts);
    Py_XDECREF(w->tables);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMethodDef Writer_methods[] = {
    {"add", (PyCFunction)Writer_add, METH_VARARGS, "add(keys, values) -> records taken (keys strictly increasing)"},
    {"add_fixed", (PyCFunction)Writer_add_fixed, METH_VARARGS,
     "add_fixed(keys, data, width) -> records taken; value i is data[i*width:(i+1)*width]"},
    {"add_blob", (PyCFunction)Writer_add_blob, METH_VARARGS,
     "add_blob(keys, ends, data, width) -> records taken; key i is keys[ends[i-1]:ends[i]] (int64 ends)"},
    {"finish", (PyCFunction)Writer_finish, METH_NOARGS,
     "finish() -> ([(number, size, smallest, largest)], last sequence): closes the last table"},
    {"abandon", (PyCFunction)Writer_abandon, METH_NOARGS, "close the open table unfinished"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lymph_cv.formats.ldbwrite.Writer",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Uncompressed LevelDB table files from records in increasing key order.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Writer_init,
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_methods = Writer_methods,
};

static PyObject *module_crc32c(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer data;
    unsigned int crc = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &data, &crc)) return NULL;
    uint32_t value = crc32c(crc, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(value);
}

static PyObject *module_mask(PyObject *Py_UNUSED(module), PyObject *args) {
    unsigned int crc;
    if (!PyArg_ParseTuple(args, "I", &crc)) return NULL;
    return PyLong_FromUnsignedLong(crc_mask(crc));
}

/* pread_rows(fd, rows, row_size, out, column, stride): row rows[i] of the file (row_size bytes each)
 * into out[i*stride + column ...].  Reading through the file, not a mapping, leaves nothing of a
 * large shared array resident in the reader (no page faults, no RSS). */
static PyObject *module_pread_rows(PyObject *Py_UNUSED(module), PyObject *args) {
    int fd;
    Py_buffer rows, out;
    Py_ssize_t row_size, column, stride;
    if (!PyArg_ParseTuple(args, "iy*nw*nn", &fd, &rows, &row_size, &out, &column, &stride)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = rows.len / (Py_ssize_t)sizeof(int64_t);
    if (rows.len % (Py_ssize_t)sizeof(int64_t) || row_size <= 0 || column < 0 || stride < column + row_size ||
        (count && (count - 1) * stride + column + row_size > out.len)) {
        PyErr_SetString(PyExc_ValueError, "pread_rows: rows must be int64 and out large enough");
        goto done;
    }
    const int64_t *wanted = rows.buf;
    uint8_t *target = out.buf;
    int failed = 0;
    Py_ssize_t i = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; i < count && !failed; i++) {
        size_t done_bytes = 0;
        while (done_bytes < (size_t)row_size) {
            ssize_t r = pread(fd, target + i * stride + column + done_bytes, (size_t)row_size - done_bytes,
                              (off_t)(wanted[i] * row_size + (int64_t)done_bytes));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                failed = r < 0 ? errno : -1;
                break;
            }
            done_bytes += (size_t)r;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed > 0) {
        errno = failed;
        PyErr_SetFromErrno(PyExc_OSError);
    } else if (failed < 0) {
        PyErr_Format(PyExc_EOFError, "pread_rows: row %lld is past the end of the file", (long long)wanted[i - 1]);
    } else {
        Py_INCREF(Py_None);
        result = Py_None;
    }
done:
    PyBuffer_Release(&rows);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef module_methods[] = {
    {"pread_rows", module_pread_rows, METH_VARARGS,
     "pread_rows(fd, rows, row_size, out, column, stride): file rows (int64 indices) into out's strided slots"},
    {"crc32c", module_crc32c, METH_VARARGS, "crc32c(data, crc=0) -> CRC32C (Castagnoli) continued from crc"},
    {"mask", module_mask, METH_VARARGS, "mask(crc) -> LevelDB's masked CRC"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "ldbwrite", .m_size = -1, .m_methods = module_methods};

PyMODINIT_FUNC PyInit_ldbwrite(void) {
    crc_init();
#ifdef HAVE_SSE42_PATH
    __builtin_cpu_init();
    use_hw_crc = __builtin_cpu_supports("sse4.2");
#endif
    if (PyType_Ready(&WriterType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&WriterType);
    if (PyModule_AddObject(m, "Writer", (PyObject *)&WriterType) < 0) {
        Py_DECREF(&WriterType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "hardware_crc", use_hw_crc) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
