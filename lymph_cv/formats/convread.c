/* convert_imageset's reading side without numpy: the record order and the plain patch files' Datums.
 *
 * permutation(count, seed) -> bytes (native int64s)
 *   numpy's default_rng(seed).permutation(count), computed here: SeedSequence(seed) (its hash of the
 *   seed's 32-bit words into a pool of 4 and generate_state(4, uint64)), PCG64 (128-bit LCG, XSL-RR
 *   output, 32-bit draws served from halves of a 64-bit one) and Generator.shuffle's Fisher-Yates
 *   from the end with random_interval (masked rejection).  Seeds 0 .. 2**64 - 1 (OverflowError beyond).
 *
 * scan_list(data) -> bytes or None
 *   A list file's "<name> <label>" lines as int64 rows (name start, name length, label, line number),
 *   for the lines read_image_list takes in bulk; None for anything else (the caller reads it then).
 *
 * plain_datums(prefix, names, labels, first_index, head, tail, height, width)
 *     -> (keys, key_lengths, values, record_length) or None
 * plain_chunk(prefix, text, rows, order, first, count, head, tail, height, width)
 *   the same for entries order[first:first + count] of a scanned list (no Python object per record)
 *   Each file prefix + names[i] read (opened relative to its folder; up to 16 folders stay open
 *   between calls until close_folders()), checked to be head + height*width*3 pixel bytes + tail (an uncompressed
 *   RGB TIFF of the layout core.rawtiff found), and written as the raw Datum Caffe writes: channels,
 *   height, width, the pixels in (C, H, W) BGR order, the label, encoded: false.  Keys are Caffe's
 *   "%08d_name" from first_index on.  None as soon as any record does not fit (a file missing,
 *   unreadable, of another size or other bytes outside its pixels, a label outside 0..127): the
 *   caller then reads the chunk its own way, which names the problem.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------ numpy's permutation */

#define POOL 4
#define INIT_A 0x43b0d7e5u
#define MULT_A 0x931e8875u
#define INIT_B 0x8b51f9ddu
#define MULT_B 0x58f38dedu
#define MIX_MULT_L 0xca01f9ddu
#define MIX_MULT_R 0x4973f715u
#define XSHIFT 16

typedef unsigned __int128 u128;

static uint32_t hashmix(uint32_t value, uint32_t *hash_const) {
    value ^= *hash_const;
    *hash_const *= MULT_A;
    value *= *hash_const;
    value ^= value >> XSHIFT;
    return value;
}

static uint32_t mix(uint32_t x, uint32_t y) {
    uint32_t result = MIX_MULT_L * x - MIX_MULT_R * y;
    return result ^ (result >> XSHIFT);
}

typedef struct {
    u128 state, inc;
    int has_half;
    uint32_t half;
} Pcg64;

static const u128 PCG_MULT = ((u128)2549297995355413924ull << 64) | 4865540595714422341ull;

static inline uint64_t pcg_next64(Pcg64 *rng) {
    rng->state = rng->state * PCG_MULT + rng->inc;
    uint64_t folded = (uint64_t)(rng->state >> 64) ^ (uint64_t)rng->state;
    unsigned rot = (unsigned)(rng->state >> 122);
    return (folded >> rot) | (folded << ((64 - rot) & 63));
}

static inline uint32_t pcg_next32(Pcg64 *rng) {
    if (rng->has_half) {
        rng->has_half = 0;
        return rng->half;
    }
    uint64_t next = pcg_next64(rng);
    rng->has_half = 1;
    rng->half = (uint32_t)(next >> 32);
    return (uint32_t)next;
}

/* SeedSequence(entropy words).generate_state(4, uint64) seeding PCG64 (pcg64_set_seed). */
static void pcg_seed(Pcg64 *rng, const uint32_t *entropy, size_t words) {
    uint32_t pool[POOL], hash_const = INIT_A;
    for (size_t i = 0; i < POOL; i++) pool[i] = hashmix(i < words ? entropy[i] : 0, &hash_const);
    for (size_t src = 0; src < POOL; src++)
        for (size_t dst = 0; dst < POOL; dst++)
            if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], &hash_const));
    for (size_t src = POOL; src < words; src++)
        for (size_t dst = 0; dst < POOL; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src], &hash_const));
    uint32_t state[8];
    hash_const = INIT_B;
    for (size_t i = 0; i < 8; i++) {
        uint32_t value = pool[i % POOL] ^ hash_const;
        hash_const *= MULT_B;
        value *= hash_const;
        state[i] = value ^ (value >> XSHIFT);
    }
    uint64_t v[4];
    for (size_t i = 0; i < 4; i++) v[i] = (uint64_t)state[2 * i] | ((uint64_t)state[2 * i + 1] << 32);
    u128 initstate = ((u128)v[0] << 64) | v[1], initseq = ((u128)v[2] << 64) | v[3];
    rng->state = 0;
    rng->inc = (initseq << 1) | 1;
    pcg_next64(rng);
    rng->state += initstate;
    pcg_next64(rng);
    rng->has_half = 0;
    rng->half = 0;
}

/* numpy's random_interval: uniform in [0, max] by masked rejection. */
static inline uint64_t random_interval(Pcg64 *rng, uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max, value;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    if (max <= 0xffffffffull) {
        while ((value = (pcg_next32(rng) & mask)) > max) {
        }
    } else {
        while ((value = (pcg_next64(rng) & mask)) > max) {
        }
    }
    return value;
}

static PyObject *module_permutation(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_ssize_t count;
    PyObject *seed;
    if (!PyArg_ParseTuple(args, "nO!", &count, &PyLong_Type, &seed)) return NULL;
    if (count < 0) {
        PyErr_SetString(PyExc_ValueError, "permutation: count must be >= 0");
        return NULL;
    }
    /* The seed's 32-bit words, least significant first, as SeedSequence takes an int (0 is one word). */
    unsigned long long value = PyLong_AsUnsignedLongLong(seed);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    uint32_t words[2] = {(uint32_t)value, (uint32_t)(value >> 32)};
    size_t used = words[1] ? 2 : 1;
    PyObject *result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((size_t)count * sizeof(int64_t)));
    if (!result) return NULL;
    int64_t *order = (int64_t *)PyBytes_AS_STRING(result);
    for (Py_ssize_t i = 0; i < count; i++) order[i] = i;
    Pcg64 rng;
    pcg_seed(&rng, words, used);
    for (Py_ssize_t i = count - 1; i >= 1; i--) {
        uint64_t j = random_interval(&rng, (uint64_t)i);
        int64_t kept = order[j];
        order[j] = order[i];
        order[i] = kept;
    }
    return result;
}

/* ------------------------------------------------------------------ plain patch files to Datums */

/* The folders kept open (a list's patch files lie in one or a few: one per class at most); the
 * last one used is looked at first, and a folder past FOLDERS replaces the oldest opened. */
#define FOLDERS 16
static struct {
    char *path;
    size_t length;
    int fd;
} folders[FOLDERS];
static int folders_used = 0, folder_last = 0, folder_oldest = 0;

static void folders_close(void) {
    for (int i = 0; i < folders_used; i++) {
        close(folders[i].fd);
        PyMem_Free(folders[i].path);
    }
    folders_used = folder_last = folder_oldest = 0;
}

static int folder_open(const char *folder, size_t n) {
    for (int k = 0; k < folders_used; k++) {
        int i = (folder_last + k) % folders_used;
        if (folders[i].length == n && memcmp(folders[i].path, folder, n) == 0) {
            folder_last = i;
            return folders[i].fd;
        }
    }
    char *path = PyMem_Malloc(n + 1);
    if (!path) return -1;
    memcpy(path, folder, n);
    path[n] = 0;
    int fd = open(n ? path : "/", O_RDONLY | O_CLOEXEC | O_DIRECTORY);
    if (fd < 0) {
        PyMem_Free(path);
        return -1;
    }
    int i;
    if (folders_used < FOLDERS) {
        i = folders_used++;
    } else {
        i = folder_oldest;
        close(folders[i].fd);
        PyMem_Free(folders[i].path);
        folder_oldest = (i + 1) % FOLDERS;
    }
    folders[i].path = path;
    folders[i].length = n;
    folders[i].fd = fd;
    folder_last = i;
    return fd;
}

/* The whole file into buf (room for size + 1 bytes): 0 when it holds exactly `size` bytes.  Asking for
 * one byte more tells the size without an fstat: a longer file fills it, a shorter one ends early, a
 * folder fails to read (a special file gives what the caller's own reading then judges). */
static int read_exactly(int dir, const char *name, uint8_t *buf, size_t size) {
    int fd = openat(dir, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t got = 0;
    int ok = 1;
    while (got <= size) {
        ssize_t r = read(fd, buf + got, size + 1 - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) ok = 0;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    return ok && got == size ? 0 : -1;
}

static size_t varint(uint8_t *out, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        out[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    out[n++] = (uint8_t)v;
    return n;
}

/* Interleaved RGB rows to the three channel planes, blue first. */
static void planes_scalar(const uint8_t *restrict in, uint8_t *restrict out, size_t pixels, size_t from) {
    uint8_t *restrict blue = out, *restrict green = out + pixels, *restrict red = out + 2 * pixels;
    for (size_t p = from; p < pixels; p++) {
        red[p] = in[3 * p];
        green[p] = in[3 * p + 1];
        blue[p] = in[3 * p + 2];
    }
}

#if defined(__x86_64__) || defined(__i386__)
#include <tmmintrin.h>
#define HAVE_SSSE3_PATH 1
/* pshufb masks: for channel k (R, G, B) and input vector v (bytes 16v .. 16v + 15 of 16 pixels),
 * lane j takes byte 3j + k - 16v when it lies in v, else zero (0x80). */
static uint8_t deinterleave[3][3][16] __attribute__((aligned(16)));
static int use_ssse3 = 0;

static void deinterleave_init(void) {
    for (int k = 0; k < 3; k++)
        for (int v = 0; v < 3; v++)
            for (int j = 0; j < 16; j++) {
                int at = 3 * j + k - 16 * v;
                deinterleave[k][v][j] = (uint8_t)(at >= 0 && at < 16 ? at : 0x80);
            }
}

__attribute__((target("ssse3"))) static void planes_ssse3(const uint8_t *restrict in, uint8_t *restrict out,
                                                          size_t pixels) {
    uint8_t *planes[3] = {out + 2 * pixels, out + pixels, out}; /* R, G, B: blue is the first plane */
    __m128i mask[3][3];
    for (int k = 0; k < 3; k++)
        for (int v = 0; v < 3; v++) mask[k][v] = _mm_load_si128((const __m128i *)deinterleave[k][v]);
    size_t p = 0;
    for (; p + 16 <= pixels; p += 16) {
        const uint8_t *at = in + 3 * p;
        __m128i a = _mm_loadu_si128((const __m128i *)at), b = _mm_loadu_si128((const __m128i *)(at + 16)),
                c = _mm_loadu_si128((const __m128i *)(at + 32));
        for (int k = 0; k < 3; k++) {
            __m128i channel = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, mask[k][0]), _mm_shuffle_epi8(b, mask[k][1])),
                                           _mm_shuffle_epi8(c, mask[k][2]));
            _mm_storeu_si128((__m128i *)(planes[k] + p), channel);
        }
    }
    planes_scalar(in, out, pixels, p);
}
#endif

static void rgb_to_bgr_planes(const uint8_t *restrict in, uint8_t *restrict out, size_t pixels) {
#ifdef HAVE_SSSE3_PATH
    if (use_ssse3) {
        planes_ssse3(in, out, pixels);
        return;
    }
#endif
    planes_scalar(in, out, pixels, 0);
}

/* Caffe's datum key width: %08d. */
#define KEY_DIGITS 8
#define KEY_NUMBER_MAX 24 /* digits of an int64 plus the underscore */
/* scan_list's rows: name start, name length, label, line number (int64 each). */
#define ROW 4

/* Where a chunk's names and labels come from: Python lists, or a scanned list and the record order. */
typedef struct {
    PyObject *names, *labels;
    const char *text;
    const int64_t *rows, *order;
    Py_ssize_t text_len, entries, order_len;
} Source;

/* Record i's name and label: 0, 1 when it does not fit, -1 on a Python error. */
static int source_get(const Source *s, Py_ssize_t first, Py_ssize_t i, const char **name, Py_ssize_t *name_len,
                      long *label) {
    if (s->names) {
        *name = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(s->names, i), name_len);
        if (!*name) return -1;
        *label = PyLong_AsLong(PyList_GET_ITEM(s->labels, i));
        if (*label == -1 && PyErr_Occurred()) return -1;
        return 0;
    }
    int64_t position = s->order[first + i];
    if (position < 0 || position >= s->entries) return 1;
    const int64_t *row = s->rows + ROW * position;
    if (row[0] < 0 || row[1] < 0 || row[0] + row[1] > s->text_len) return 1;
    *name = s->text + row[0];
    *name_len = (Py_ssize_t)row[1];
    *label = (long)row[2];
    return 0;
}

/* The records of one chunk as raw Datums and keys, or None when one does not fit. */
static PyObject *chunk_datums(const char *prefix, Py_ssize_t prefix_len, const Source *source, Py_ssize_t first,
                              Py_ssize_t count, const Py_buffer *head, const Py_buffer *tail, Py_ssize_t height,
                              Py_ssize_t width) {
    PyObject *result = NULL, *keys = NULL, *key_lengths = NULL, *values = NULL;
    uint8_t *file = NULL;
    char *path = NULL;
    char *key_buf = NULL;
    if (height <= 0 || width <= 0 || count <= 0) {
        PyErr_SetString(PyExc_ValueError, "convread: a positive size and some records");
        return NULL;
    }
    size_t pixels = (size_t)height * (size_t)width, pixel_bytes = 3 * pixels;
    size_t file_size = (size_t)head->len + pixel_bytes + (size_t)tail->len;
    uint8_t header[64];
    size_t header_len = 0;
    header[header_len++] = 0x08;
    header_len += varint(header + header_len, 3);
    header[header_len++] = 0x10;
    header_len += varint(header + header_len, (uint64_t)height);
    header[header_len++] = 0x18;
    header_len += varint(header + header_len, (uint64_t)width);
    header[header_len++] = 0x22;
    header_len += varint(header + header_len, pixel_bytes);
    size_t record = header_len + pixel_bytes + 4; /* label tag, one-byte label, encoded: false */
    values = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(record * (size_t)count));
    key_lengths = PyList_New(count);
    file = PyMem_Malloc(file_size + 1);
    size_t key_cap = 4096, key_len = 0, path_cap = 0;
    key_buf = PyMem_Malloc(key_cap);
    if (!values || !key_lengths || !file || !key_buf) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(values);
    int fits = 1;
    for (Py_ssize_t i = 0; i < count && fits; i++) {
        const char *name;
        Py_ssize_t name_len;
        long label;
        int got = source_get(source, first, i, &name, &name_len, &label);
        if (got < 0) goto done;
        if (got > 0 || label < 0 || label > 127) {
            fits = 0;
            break;
        }
        size_t length = (size_t)prefix_len + (size_t)name_len;
        if (length + 1 > path_cap) {
            path_cap = 2 * (length + 1);
            PyMem_Free(path);
            path = PyMem_Malloc(path_cap);
            if (!path) {
                PyErr_NoMemory();
                goto done;
            }
        }
        memcpy(path, prefix, (size_t)prefix_len);
        memcpy(path + prefix_len, name, (size_t)name_len);
        path[length] = 0;
        if (strlen(path) != length) { /* a NUL inside: the caller's own reading names it */
            fits = 0;
            break;
        }
        char *slash = strrchr(path, '/');
        if (!slash || !slash[1]) {
            fits = 0;
            break;
        }
        int dir = folder_open(path, (size_t)(slash - path));
        if (dir < 0 || read_exactly(dir, slash + 1, file, file_size) < 0 ||
            memcmp(file, head->buf, (size_t)head->len) != 0 ||
            memcmp(file + head->len + pixel_bytes, tail->buf, (size_t)tail->len) != 0) {
            fits = 0;
            break;
        }
        uint8_t *row = out + (size_t)i * record;
        memcpy(row, header, header_len);
        rgb_to_bgr_planes(file + head->len, row + header_len, pixels);
        uint8_t *trailer = row + header_len + pixel_bytes;
        trailer[0] = 0x28;
        trailer[1] = (uint8_t)label;
        trailer[2] = 0x38;
        trailer[3] = 0x00;
        if (key_len + KEY_NUMBER_MAX + (size_t)name_len > key_cap) {
            key_cap = 2 * (key_len + KEY_NUMBER_MAX + (size_t)name_len);
            char *grown = PyMem_Realloc(key_buf, key_cap);
            if (!grown) {
                PyErr_NoMemory();
                goto done;
            }
            key_buf = grown;
        }
        int digits = snprintf(key_buf + key_len, KEY_NUMBER_MAX, "%0*lld_", KEY_DIGITS, (long long)(first + i));
        memcpy(key_buf + key_len + digits, name, (size_t)name_len);
        PyObject *n = PyLong_FromSize_t((size_t)digits + (size_t)name_len);
        if (!n) goto done;
        PyList_SET_ITEM(key_lengths, i, n);
        key_len += (size_t)digits + (size_t)name_len;
    }
    if (!fits) {
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    keys = PyBytes_FromStringAndSize(key_buf, (Py_ssize_t)key_len);
    if (!keys) goto done;
    result = Py_BuildValue("(OOOn)", keys, key_lengths, values, (Py_ssize_t)record);
done:
    Py_XDECREF(keys);
    Py_XDECREF(key_lengths);
    Py_XDECREF(values);
    PyMem_Free(file);
    PyMem_Free(path);
    PyMem_Free(key_buf);
    return result;
}

static PyObject *module_plain_datums(PyObject *Py_UNUSED(module), PyObject *args) {
    const char *prefix;
    Py_ssize_t prefix_len, height, width, first;
    PyObject *names, *labels;
    Py_buffer head, tail;
    if (!PyArg_ParseTuple(args, "s#O!O!ny*y*nn", &prefix, &prefix_len, &PyList_Type, &names, &PyList_Type, &labels,
                          &first, &head, &tail, &height, &width))
        return NULL;
    PyObject *result = NULL;
    if (PyList_GET_SIZE(labels) != PyList_GET_SIZE(names) || first < 0) {
        PyErr_SetString(PyExc_ValueError, "plain_datums: as many labels as names, first_index >= 0");
    } else {
        Source source = {.names = names, .labels = labels};
        result = chunk_datums(prefix, prefix_len, &source, first, PyList_GET_SIZE(names), &head, &tail, height, width);
    }
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return result;
}

static PyObject *module_plain_chunk(PyObject *Py_UNUSED(module), PyObject *args) {
    const char *prefix;
    Py_ssize_t prefix_len, first, count, height, width;
    Py_buffer text, rows, order, head, tail;
    if (!PyArg_ParseTuple(args, "s#y*y*y*nny*y*nn", &prefix, &prefix_len, &text, &rows, &order, &first, &count,
                          &head, &tail, &height, &width))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t order_len = order.len / (Py_ssize_t)sizeof(int64_t);
    if (rows.len % (Py_ssize_t)(ROW * sizeof(int64_t)) || order.len % (Py_ssize_t)sizeof(int64_t) || first < 0 ||
        count < 0 || first + count > order_len) {
        PyErr_SetString(PyExc_ValueError, "plain_chunk: int64 rows and order, the chunk inside the order");
    } else {
        Source source = {.text = text.buf, .text_len = text.len, .rows = rows.buf, .order = order.buf,
                         .entries = rows.len / (Py_ssize_t)(ROW * sizeof(int64_t)), .order_len = order_len};
        result = chunk_datums(prefix, prefix_len, &source, first, count, &head, &tail, height, width);
    }
    PyBuffer_Release(&text);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&order);
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return result;
}

/* ------------------------------------------------------------------ the list, scanned */

/* The label digits the bulk reading takes (stages/dbs/lists and workdir/lists: _INT32_DIGITS). */
#define LABEL_DIGITS 12
#define INT32_LIMIT 2147483648ll

static inline int blank(uint8_t c) { return c == ' ' || c == '\t'; }

/* scan_list(data) -> rows (int64 name start, name length, label, line per entry) or None.
 * The lines read_image_list takes in bulk: ASCII, "<name><spaces or tabs><digits>", the name relative
 * without "..", a drive colon or a leading slash; blank lines skipped, lines counted from 1.  Anything
 * else (another byte, a sign, one field, a label past int32, no entry at all) gives None: the caller
 * reads the list its own way, which decides and names the line. */
static PyObject *module_scan_list(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    const uint8_t *p = data.buf;
    size_t n = (size_t)data.len, pos = 0, used = 0, cap = 0;
    int64_t line = 0, *rows = NULL;
    int fits = 1;
    while (pos < n && fits) {
        size_t end = pos;
        while (end < n && p[end] != '\n') end++;
        line++;
        size_t a = pos, b = end;
        pos = end + 1;
        for (size_t k = a; k < b; k++)
            if (p[k] >= 0x80 || (p[k] < 0x20 && p[k] != '\t')) fits = 0;
        while (a < b && blank(p[a])) a++;
        while (b > a && blank(p[b - 1])) b--;
        if (!fits || a == b) continue;
        size_t s = b;
        while (s > a && !blank(p[s - 1])) s--;
        if (s == a || b - s > LABEL_DIGITS) {
            fits = 0;
            break;
        }
        int64_t label = 0;
        for (size_t k = s; k < b && fits; k++) {
            if (p[k] < '0' || p[k] > '9') fits = 0;
            label = label * 10 + (p[k] - '0');
        }
        size_t e = s;
        while (e > a && blank(p[e - 1])) e--;
        if (!fits || label >= INT32_LIMIT || p[a] == '/' || p[a] == '\\' || (e - a > 1 && p[a + 1] == ':')) {
            fits = 0;
            break;
        }
        for (size_t k = a; k + 1 < e; k++)
            if (p[k] == '.' && p[k + 1] == '.') fits = 0;
        if (!fits) break;
        if (used + ROW > cap) {
            cap = cap ? 2 * cap : 4096;
            int64_t *grown = PyMem_Realloc(rows, cap * sizeof *rows);
            if (!grown) {
                PyMem_Free(rows);
                PyBuffer_Release(&data);
                return PyErr_NoMemory();
            }
            rows = grown;
        }
        rows[used++] = (int64_t)a;
        rows[used++] = (int64_t)(e - a);
        rows[used++] = label;
        rows[used++] = line;
    }
    PyObject *result;
    if (!fits || used == 0) {
        Py_INCREF(Py_None);
        result = Py_None;
    } else {
        result = PyBytes_FromStringAndSize((const char *)rows, (Py_ssize_t)(used * sizeof *rows));
    }
    PyMem_Free(rows);
    PyBuffer_Release(&data);
    return result;
}

static int use_ssse3_enabled(void) {
#ifdef HAVE_SSSE3_PATH
    return use_ssse3;
#else
    return 0;
#endif
}

/* set_ssse3(on): the vector deinterleave on or off (the tests compare both). */
static PyObject *module_set_ssse3(PyObject *Py_UNUSED(module), PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
#ifdef HAVE_SSSE3_PATH
    use_ssse3 = on && __builtin_cpu_supports("ssse3");
#endif
    return PyBool_FromLong(use_ssse3_enabled());
}

static PyObject *module_close_folders(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
    folders_close();
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"permutation", module_permutation, METH_VARARGS,
     "permutation(count, seed) -> int64 bytes: numpy's default_rng(seed).permutation(count)"},
    {"plain_datums", module_plain_datums, METH_VARARGS,
     "plain_datums(prefix, names, labels, first_index, head, tail, height, width) -> "
     "(keys, key_lengths, values, record_length), or None when a record does not fit"},
    {"plain_chunk", module_plain_chunk, METH_VARARGS,
     "plain_chunk(prefix, text, rows, order, first, count, head, tail, height, width) -> plain_datums of the "
     "scanned list's entries order[first:first + count]"},
    {"scan_list", module_scan_list, METH_VARARGS,
     "scan_list(data) -> int64 rows (name start, name length, label, line) of a plain list, or None"},
    {"close_folders", module_close_folders, METH_NOARGS, "close the folder plain_datums keeps open"},
    {"set_ssse3", module_set_ssse3, METH_VARARGS, "set_ssse3(on) -> whether the SSSE3 deinterleave is used now"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "convread", .m_size = -1,
                                    .m_methods = module_methods};

PyMODINIT_FUNC PyInit_convread(void) {
#ifdef HAVE_SSSE3_PATH
    deinterleave_init();
    __builtin_cpu_init();
    use_ssse3 = __builtin_cpu_supports("ssse3");
#endif
    return PyModule_Create(&module);
}
