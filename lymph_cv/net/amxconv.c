/* lymph_cv.net.amxconv: a deploy net's leading Convolution / Pooling / ReLU layers in bfloat16 on
 * Intel AMX (or AVX512-BF16 where AMX is missing), or in float32, one crop at a time, with no torch.
 *
 * program(ops) compiles a list of layer descriptions (lymph_cv.net.amxforward builds them) into a
 * capsule; run(program, src, n, dst, threads) pushes n float32 C×H×W crops through it and writes
 * the last layer's top as float32 H×W×C (channels-last).  Every blob between the layers is bfloat16 (round to
 * nearest even), channels-last, with the zero border the next convolution pads with, in buffers a
 * thread keeps for all its crops (a crop's blobs fit in L2), so the borders stay zero.
 *
 * A convolution is a sum over its kernel rows ky of a product whose K dimension is the kernel
 * row's kw×C input values: in channels-last order they are contiguous, and output pixel x+1's
 * start stride×C values later.  So one AMX A tile is 16 consecutive output pixels × 32 of those
 * values (the tile's row stride is stride×C values) and a B tile is the matching 32 values × 16
 * output channels of the weights, in AMX's pairs layout.  A row of K values that is not a multiple
 * of 32 reads on into the following pixels; the weights there are zero, so it adds exactly zero
 * (the blobs are finite: zero borders, activations and crops).  Outputs past a row's end (ow not a
 * multiple of 16) are computed and dropped.  The tiles accumulate in float32; the bias is added in
 * float32 and ReLU applied before rounding the result to bfloat16.
 *
 * Pooling follows Caffe: MAX over the window cut at the image border (a pad never wins), AVE the
 * float32 sum over the window cut at the image border divided by the window cut at the padded
 * border (count_include_pad), rounded to bfloat16.  MAX + ReLU compares the int16 bit patterns
 * from a floor of 0 (a negative bfloat16 is a negative int16; the others order as their values).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_THREADS 8
#define MAX_OPS 64
#define TILE_M 16    /* output pixels per A tile */
#define TILE_K 32    /* bfloat16 values per A tile row */
#define TILE_N 16    /* output channels per B / C tile */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

enum { OP_CONV = 0, OP_POOL_MAX = 1, OP_POOL_AVE = 2 };
/* A float32 program's kernels. */
enum { F32_AVX2 = 1, F32_AVX512 = 2 };

typedef struct {
    int kind, relu;
    /* input blob: c channels, h×w interior inside a zero border of in_pad */
    int c, h, w, in_pad;
    /* output blob: oc channels, oh×ow; kernel, stride, pad (pooling; a convolution's is in_pad) */
    int oc, oh, ow, kh, kw, sh, sw, ph, pw;
    /* convolution: K tiles per kernel row (all of K when im2col), 16-channel output blocks, kernel
     * rows the tiles loop over (1 when im2col), the values of one im2col row (0: none), input rows
     * stacked per pixel (the first layer: its input is written with `stack` rows' C values side by
     * side, so one K tile spans as many kernel rows; 1: none) */
    int chunks, nblocks, rows, im2col, stack;
    int blocks;          /* 16-pixel output blocks */
    ptrdiff_t *block_a;  /* [blocks]: a block's first A row in the input (or im2col) buffer (AMX) */
    ptrdiff_t *block_out; /* [blocks][16]: each row's output pixel in the output buffer, or -1 */
    uint16_t *weights;   /* [rows][chunks][nblocks][16 pairs][16][2] */
    float *weights32;    /* float32 programs: [kh][kw×c][nblocks][16] */
    ptrdiff_t *pixel_in, *pixel_out; /* the vector kernels: each output pixel's first input value and its output */
    float *bias;         /* [nblocks*16], zero past oc */
} Op;

typedef struct {
    int count;
    Op ops[MAX_OPS];
    size_t elements[MAX_OPS + 1]; /* blob i's buffer size in bfloat16 values, slack included */
    size_t scratch;               /* im2col buffer size in bfloat16 values */
    int f32;                      /* a float32 program (F32_AVX512 or F32_AVX2, no AMX): blobs hold float32
                                   * values; 0: bfloat16 */
    int dp;                       /* a bfloat16 program on AVX512-BF16 (VDPBF16PS) rather than AMX */
} Program;

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* ------------------------------------------------------------------------- CPU and kernel support */
static int amx_state = -1; /* -1 unknown, 0 no, 1 yes */

static int avx512_state = -1;
static int avx2_state = -1;
static int dpbf16_state = -1;

static void cpuid(unsigned int leaf, unsigned int sub, unsigned int r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* The OS's XCR0: which register states it saves (0 without OSXSAVE). */
static unsigned int saved_states(void) {
    unsigned int r[4], lo, hi;
    cpuid(1, 0, r);
    if (!(r[2] & (1u << 27))) return 0; /* OSXSAVE */
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return lo;
}

/* AVX-512 F/BW/VL with the OS saving its state: what a float32 program needs. */
static int probe_avx512(void) {
    unsigned int r[4];
    cpuid(0, 0, r);
    if (r[0] < 7 || (saved_states() & 0xE6u) != 0xE6u) return 0; /* AVX and AVX-512 state */
    cpuid(7, 0, r);
    return ((r[1] >> 16) & 1) && ((r[1] >> 30) & 1) && ((r[1] >> 31) & 1);
}

/* That, and AMX-TILE, AMX-BF16, AVX512_BF16 (the rounding instruction) and the tile state saved
 * and granted to this process. */
static int probe_amx(void) {
    unsigned int r[4];
    if (!probe_avx512() || (saved_states() & ((1u << 17) | (1u << 18))) != ((1u << 17) | (1u << 18))) return 0;
    cpuid(7, 0, r);
    if (!((r[3] >> 22) & 1) || !((r[3] >> 24) & 1)) return 0;
    cpuid(7, 1, r);
    if (!((r[0] >> 5) & 1)) return 0;
    /* Linux hands out the tile data state only on request (arch_prctl, 5.16+). */
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* AVX-512 and AVX512_BF16 (VDPBF16PS, VCVTNEPS2BF16): bfloat16 programs without AMX. */
static int probe_dpbf16(void) {
    unsigned int r[4];
    if (!probe_avx512()) return 0;
    cpuid(7, 1, r);
    return (r[0] >> 5) & 1;
}

/* AVX2 and FMA with the OS saving the AVX state: the other float32 kernels. */
static int probe_avx2(void) {
    unsigned int r[4];
    cpuid(0, 0, r);
    if (r[0] < 7 || (saved_states() & 0x6u) != 0x6u) return 0;
    cpuid(1, 0, r);
    if (!((r[2] >> 12) & 1)) return 0; /* FMA */
    cpuid(7, 0, r);
    return (r[1] >> 5) & 1;
}

static int avx2_ready(void) {
    if (avx2_state < 0) avx2_state = probe_avx2();
    return avx2_state;
}

static int avx512_ready(void) {
    if (avx512_state < 0) avx512_state = probe_avx512();
    return avx512_state;
}

static int amx_ready(void) {
    if (amx_state < 0) amx_state = probe_amx();
    return amx_state;
}

static int dpbf16_ready(void) {
    if (dpbf16_state < 0) dpbf16_state = probe_dpbf16();
    return dpbf16_state;
}

/* ------------------------------------------------------------------------- bfloat16 */
static inline uint16_t bf16_round(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return (uint16_t)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float bf16_value(uint16_t low) {
    uint32_t bits = (uint32_t)low << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* ------------------------------------------------------------------------- layers */
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
/* The AVX512-BF16 and the float32 AVX-512 kernels' (subsets of AMX's: their helpers inline into
 * every kernel above them). */
#define DPBF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

/* The bias, ReLU and rounding of one pixel's 16 output channels from j×16 (none past oc).  (As
 * store_f32 but for the rounding; sharing the bias and mask as helpers made GCC spill the
 * AVX512-BF16 kernel's weight registers: 2.1 against 1.0 s for an image's crops on one thread.) */
DPBF16_TARGET static inline void store_bf16(const Op *op, int j, __m512 v, uint16_t *to) {
    const int first = j * TILE_N;
    const int valid = op->oc - first < TILE_N ? op->oc - first : TILE_N;
    v = _mm512_add_ps(v, _mm512_loadu_ps(op->bias + first));
    if (op->relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
    _mm256_mask_storeu_epi16(to + first, (__mmask16)((1u << valid) - 1u), (__m256i)_mm512_cvtneps_pbh(v));
}

/* One 16-pixel × 16-channel accumulator block into the rows' pixels. */
AMX_TARGET static inline void store_block(const float *acc, const Op *op, int block, const ptrdiff_t *rows,
                                          uint16_t *dst) {
    for (int r = 0; r < TILE_M; r++)
        if (rows[r] >= 0) store_bf16(op, block, _mm512_loadu_ps(acc + r * TILE_N), dst + rows[r]);
}

/* One group of output pixel blocks × output channel blocks: MB blocks of 16 pixels (A tiles from
 * a[m]) times NB blocks of 16 channels from j0, accumulated in tiles 0-3: 4 independent chains,
 * since a TDPBF16PS waits for the last one into the same tile.  Shapes: 1×NB (NB ≤ 4; A in tile
 * 4, B in 5, 6, 7, then 5 again), 2×2 (A 4 and 5, B 6 and 7) and 4×1 (A in 4, 5, 7, then 4 again,
 * B in 6).  A step loads its tiles before its products: a load into a tile waits for the products
 * that read it, so interleaving loads and products serialised them (1.7× slower, measured). */
#define DP(c, a, b) _tile_dpbf16ps(c, a, b)
AMX_TARGET static void conv_group(const Op *op, const uint16_t *const a[4], int mb, int nb, int j0, size_t row_step,
                                  size_t a_stride, float acc[4][TILE_M * TILE_N]) {
    const size_t b_tile = (size_t)TILE_K * TILE_N;
    const size_t q_step = (size_t)op->nblocks * b_tile;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int ky = 0; ky < op->rows; ky++) {
        const size_t shift = (size_t)ky * row_step;
        const uint16_t *w = op->weights + ((size_t)ky * op->chunks * op->nblocks + j0) * b_tile;
        for (int q = 0; q < op->chunks; q++, w += q_step) {
            const size_t k = shift + (size_t)q * TILE_K;
            if (mb == 4) {
                _tile_loadd(6, w, 64);
                _tile_loadd(4, a[0] + k, a_stride);
                _tile_loadd(5, a[1] + k, a_stride);
                _tile_loadd(7, a[2] + k, a_stride);
                DP(0, 4, 6);
                DP(1, 5, 6);
                DP(2, 7, 6);
                _tile_loadd(4, a[3] + k, a_stride);
                DP(3, 4, 6);
            } else if (mb == 2) {
                _tile_loadd(4, a[0] + k, a_stride);
                _tile_loadd(6, w, 64);
                _tile_loadd(5, a[1] + k, a_stride);
                _tile_loadd(7, w + b_tile, 64);
                DP(0, 4, 6);
                DP(2, 5, 6);
                DP(1, 4, 7);
                DP(3, 5, 7);
            } else {
                _tile_loadd(4, a[0] + k, a_stride);
                _tile_loadd(5, w, 64);
                if (nb > 1) _tile_loadd(6, w + b_tile, 64);
                if (nb > 2) _tile_loadd(7, w + 2 * b_tile, 64);
                DP(0, 4, 5);
                if (nb > 1) DP(1, 4, 6);
                if (nb > 2) DP(2, 4, 7);
                if (nb > 3) {
                    _tile_loadd(5, w + 3 * b_tile, 64);
                    DP(3, 4, 5);
                }
            }
        }
    }
    _tile_stored(0, acc[0], TILE_N * sizeof(float));
    _tile_stored(1, acc[1], TILE_N * sizeof(float));
    _tile_stored(2, acc[2], TILE_N * sizeof(float));
    _tile_stored(3, acc[3], TILE_N * sizeof(float));
}

/* The im2col rows of a convolution whose kernel rows are too short for a K tile: output pixel p's
 * kh×kw×C input values, contiguous (the tail past them stays zero).  A kernel row of up to 16 (32)
 * values is copied as 16 (32): the extra values land where the next kernel row's copy overwrites
 * them, or, after the last, in the row's tail where the weights are zero. */
AMX_TARGET static void fill_im2col(const Op *op, const uint16_t *src, uint16_t *buffer) {
    const int wp = op->w + 2 * op->in_pad, c = op->c, span = op->kw * c;
    const int fits = (op->kh - 1) * span + (span <= 16 ? 16 : 32) <= op->im2col;
    const __mmask32 mask = (__mmask32)(span >= 32 ? 0xffffffffu : ((1u << span) - 1u));
    uint16_t *row = buffer;
    for (int oy = 0; oy < op->oh; oy++)
        for (int ox = 0; ox < op->ow; ox++, row += op->im2col) {
            const uint16_t *from = src + ((size_t)oy * op->sh * wp + (size_t)ox * op->sw) * c;
            for (int ky = 0; ky < op->kh; ky++, from += (size_t)wp * c) {
                if (fits && span <= 16)
                    _mm256_storeu_si256((__m256i *)(row + ky * span), _mm256_loadu_si256((const __m256i *)from));
                else if (fits)
                    _mm512_storeu_si512(row + ky * span, _mm512_loadu_si512(from));
                else if (span <= 32)
                    _mm512_mask_storeu_epi16(row + ky * span, mask, _mm512_maskz_loadu_epi16(mask, from));
                else
                    memcpy(row + ky * span, from, (size_t)span * sizeof(uint16_t));
            }
        }
}

AMX_TARGET static void conv_crop(const Op *op, const uint16_t *src, uint16_t *dst, uint16_t *scratch) {
    const int wp = op->w + 2 * op->in_pad, c = op->c * op->stack;
    const uint16_t *input = src;
    size_t a_stride = (size_t)op->sw * c * sizeof(uint16_t);
    if (op->im2col) {
        fill_im2col(op, src, scratch);
        input = scratch;
        a_stride = (size_t)op->im2col * sizeof(uint16_t);
    }
    const size_t row_step = (size_t)op->stack * wp * c; /* one tile row: `stack` kernel rows */
    /* the group shape: 4 accumulators whatever the output channel count */
    const int mb = op->nblocks == 1 ? 4 : op->nblocks == 2 ? 2 : 1;
    float acc[4][TILE_M * TILE_N] __attribute__((aligned(64)));
    for (int first = 0; first < op->blocks; first += mb) {
        const uint16_t *a[4];
        const ptrdiff_t *rows[4];
        for (int m = 0; m < 4; m++) {
            /* a short last group repeats its last block (computed twice, stored alike) */
            const int block = first + m < op->blocks ? first + m : op->blocks - 1;
            a[m] = input + op->block_a[block];
            rows[m] = op->block_out + (size_t)block * TILE_M;
        }
        for (int j0 = 0; j0 < op->nblocks; j0 += 4 / mb) {
            const int nb = mb > 1 ? 4 / mb : (op->nblocks - j0 < 4 ? op->nblocks - j0 : 4);
            conv_group(op, a, mb, nb, j0, row_step, a_stride, acc);
            for (int m = 0; m < mb; m++)
                for (int j = 0; j < nb; j++) store_block(acc[m * nb + j], op, j0 + j, rows[m], dst);
        }
    }
}

/* A pooling output's window, Caffe's: the rows [top, bottom) and columns [left, right) inside the
 * image, and AVE's divisor, the window cut at the padded image (pad cells count, beyond them not). */
typedef struct {
    int top, bottom, left, right;
    float divisor;
} Window;

static inline Window pool_window(const Op *op, int oy, int ox) {
    const int top = oy * op->sh - op->ph, left = ox * op->sw - op->pw;
    const int bottom = top + op->kh, right = left + op->kw;
    const int padded_bottom = bottom < op->h + op->ph ? bottom : op->h + op->ph;
    const int padded_right = right < op->w + op->pw ? right : op->w + op->pw;
    return (Window){top < 0 ? 0 : top, bottom > op->h ? op->h : bottom, left < 0 ? 0 : left,
                    right > op->w ? op->w : right, (float)((padded_bottom - top) * (padded_right - left))};
}

/* 16 bfloat16 values (masked) as float32. */
AMX_TARGET static inline __m512 load16(const uint16_t *from, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, from)), 16));
}

AMX_TARGET static void pool_crop(const Op *op, const uint16_t *src, uint16_t *dst, int dst_pad) {
    const int c = op->c, dst_wp = op->ow + 2 * dst_pad;
    const __m512 zero = _mm512_setzero_ps();
    for (int oy = 0; oy < op->oh; oy++) {
        for (int ox = 0; ox < op->ow; ox++) {
            const Window win = pool_window(op, oy, ox);
            const int top = win.top, bottom = win.bottom, left = win.left, right = win.right;
            const __m512 divisor = _mm512_set1_ps(win.divisor);
            uint16_t *out = dst + ((size_t)(oy + dst_pad) * dst_wp + ox + dst_pad) * c;
            for (int c0 = 0; c0 < c; c0 += 32) {
                const int width = c - c0 < 32 ? c - c0 : 32;
                const __mmask32 mask = (__mmask32)(width == 32 ? 0xffffffffu : ((1u << width) - 1u));
                const __mmask16 lo = (__mmask16)mask, hi = (__mmask16)(mask >> 16);
                /* the window's first pixel; rows op->w pixels apart */
                const uint16_t *first = src + ((size_t)top * op->w + left) * c + c0;
                const size_t row = (size_t)op->w * c;
                const int taps_y = bottom - top, taps_x = right - left;
                if (op->kind == OP_POOL_MAX && op->relu) {
                    __m512i best = _mm512_setzero_si512();
                    for (int y = 0; y < taps_y; y++, first += row) {
                        const uint16_t *pixel = first;
                        for (int x = 0; x < taps_x; x++, pixel += c)
                            best = _mm512_max_epi16(best, _mm512_maskz_loadu_epi16(mask, pixel));
                    }
                    _mm512_mask_storeu_epi16(out + c0, mask, best);
                    continue;
                }
                const int ave = op->kind == OP_POOL_AVE;
                __m512 a = ave ? zero : _mm512_set1_ps(-__FLT_MAX__), b = a;
                for (int y = 0; y < taps_y; y++, first += row) {
                    const uint16_t *pixel = first;
                    for (int x = 0; x < taps_x; x++, pixel += c) {
                        const __m512 u = load16(pixel, lo), v = load16(pixel + 16, hi);
                        a = ave ? _mm512_add_ps(a, u) : _mm512_max_ps(a, u);
                        b = ave ? _mm512_add_ps(b, v) : _mm512_max_ps(b, v);
                    }
                }
                if (ave) {
                    a = _mm512_div_ps(a, divisor);
                    b = _mm512_div_ps(b, divisor);
                }
                if (op->relu) {
                    a = _mm512_max_ps(a, zero);
                    b = _mm512_max_ps(b, zero);
                }
                _mm256_mask_storeu_epi16(out + c0, lo, (__m256i)_mm512_cvtneps_pbh(a));
                _mm256_mask_storeu_epi16(out + c0 + 16, hi, (__m256i)_mm512_cvtneps_pbh(b));
            }
        }
    }
}

/* ------------------------------------------------------------------------- per-pixel kernels */
/* The AVX-512 kernels' walk over a convolution's output: every output pixel of the per-pixel plan
 * (op->pixel_in, op->pixel_out) in groups of eight, the channel blocks in pairs (the last alone
 * when odd).  GROUP(nb, count) runs one group at pixel m, channel block j, with literal nb and
 * count so each shape is inlined. */
#define PIXEL_GROUPS(GROUP, nb)                                                                             \
    {                                                                                                       \
        int m = 0;                                                                                          \
        for (; m + 8 <= pixels; m += 8) GROUP(nb, 8);                                                       \
        switch (pixels - m) {                                                                               \
        case 7: GROUP(nb, 7); break;                                                                        \
        case 6: GROUP(nb, 6); break;                                                                        \
        case 5: GROUP(nb, 5); break;                                                                        \
        case 4: GROUP(nb, 4); break;                                                                        \
        case 3: GROUP(nb, 3); break;                                                                        \
        case 2: GROUP(nb, 2); break;                                                                        \
        case 1: GROUP(nb, 1); break;                                                                        \
        default: break;                                                                                     \
        }                                                                                                   \
    }
#define EACH_PIXEL_GROUP(GROUP)                                                                             \
    const ptrdiff_t *in = op->pixel_in, *out = op->pixel_out;                                               \
    const int pixels = op->oh * op->ow;                                                                     \
    int j = 0;                                                                                              \
    for (; j + 1 < op->nblocks; j += 2) PIXEL_GROUPS(GROUP, 2)                                              \
    if (j < op->nblocks) PIXEL_GROUPS(GROUP, 1)

/* ------------------------------------------------------------------------- bfloat16 on AVX512-BF16 */
/* The same bfloat16 programs where AMX is missing (AMD Zen 4 and later, Intel Cooper Lake): the
 * blobs, the B tiles and the A rows are AMX's, and VDPBF16PS takes the place of TDPBF16PS: each
 * output pixel's pair of input values broadcast against a B tile row (16 channels × that pair),
 * the products exact and summed in float32.  The pixels come from a per-pixel plan, so no lane
 * computes a dropped pixel (AMX's 16-row tiles do). */

/* `count` (≤ 8) output pixels × `nb` (1 or 2) channel blocks from j: up to 16 accumulators, each
 * pair broadcast once against the blocks' B rows.  Inlined per literal count and nb. */
DPBF16_TARGET static inline __attribute__((always_inline)) void conv_group_dp(const Op *op, const uint16_t *src,
                                                                              const ptrdiff_t *in, const ptrdiff_t *out,
                                                                              int j, const int nb, const int count,
                                                                              uint16_t *dst) {
    const int wp = op->w + 2 * op->in_pad;
    const size_t row_step = op->im2col ? 0 : (size_t)op->stack * wp * op->c * op->stack;
    const size_t b_tile = (size_t)TILE_K * TILE_N, q_step = (size_t)op->nblocks * b_tile;
    /* the pairs a kernel row holds: the rest of its last K tile has zero weights */
    const int values = op->im2col ? op->kh * op->kw * op->c : op->kw * op->stack * op->c;
    const int pairs = (values + 1) / 2;
    __m512 acc[2][8];
#pragma GCC unroll 8
    for (int m = 0; m < count; m++) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    for (int ky = 0; ky < op->rows; ky++) {
        const uint16_t *w = op->weights + ((size_t)ky * op->chunks * op->nblocks + j) * b_tile;
        const size_t shift = (size_t)ky * row_step;
        for (int k = 0; k < pairs; k++) {
            const uint16_t *b = w + (size_t)(k / (TILE_K / 2)) * q_step + (size_t)(k % (TILE_K / 2)) * 2 * TILE_N;
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(b);
            const __m512bh w1 = nb > 1 ? (__m512bh)_mm512_loadu_si512(b + b_tile) : w0;
#pragma GCC unroll 8
            for (int m = 0; m < count; m++) {
                int32_t pair;
                memcpy(&pair, src + in[m] + shift + 2 * (size_t)k, sizeof pair);
                const __m512bh v = (__m512bh)_mm512_set1_epi32(pair);
                acc[0][m] = _mm512_dpbf16_ps(acc[0][m], w0, v);
                if (nb > 1) acc[1][m] = _mm512_dpbf16_ps(acc[1][m], w1, v);
            }
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < count; m++) {
        store_bf16(op, j, acc[0][m], dst + out[m]);
        if (nb > 1) store_bf16(op, j + 1, acc[1][m], dst + out[m]);
    }
}

#define DP_GROUP(nb, count) conv_group_dp(op, input, in + m, out + m, j, nb, count, dst)

AMX_TARGET static void fill_im2col(const Op *op, const uint16_t *src, uint16_t *buffer);

DPBF16_TARGET static void conv_crop_dp(const Op *op, const uint16_t *src, uint16_t *dst, uint16_t *scratch) {
    const uint16_t *input = src;
    if (op->im2col) {
        fill_im2col(op, src, scratch);
        input = scratch;
    }
    EACH_PIXEL_GROUP(DP_GROUP)
}
#undef DP_GROUP

/* ------------------------------------------------------------------------- running */
/* Zeroed memory on a cache line: with C a multiple of 32, every A tile row then starts a line
 * (unaligned rows straddle two; measured ~15% slower per product). */
static void *zeroed_lines(size_t count, size_t size) {
    const size_t bytes = ((count * size + 63) / 64) * 64;
    void *memory = aligned_alloc(64, bytes ? bytes : 64);
    if (memory != NULL) memset(memory, 0, bytes);
    return memory;
}

/* Crops a thread takes at a time: the threads share the batch through one counter, so a thread
 * that loses its core for a while (the caller's crop-cutting thread, another process) leaves the
 * others the rest instead of being waited for. */
#define CHUNK_CROPS 8

typedef struct {
    const Program *program;
    const float *src;
    float *dst;
    Py_ssize_t n;
    Py_ssize_t *next; /* the batch's next crop not yet taken, shared */
    int failed;
} Job;

/* The next chunk [*first, *last) of the job's batch; 0 when none is left. */
static int take_chunk(Job *job, Py_ssize_t *first, Py_ssize_t *last) {
    *first = __atomic_fetch_add(job->next, CHUNK_CROPS, __ATOMIC_RELAXED);
    if (*first >= job->n) return 0;
    *last = *first + CHUNK_CROPS < job->n ? *first + CHUNK_CROPS : job->n;
    return 1;
}

#ifdef AMX_PROFILE
/* -DAMX_PROFILE: TSC cycles per layer (and the input's conversion, last), printed at exit. */
static unsigned long long profile_cycles[MAX_OPS];
__attribute__((destructor)) static void print_profile(void) {
    for (int i = 0; i < MAX_OPS; i++)
        if (profile_cycles[i] && i == MAX_OPS - 1)
            fprintf(stderr, "input: %.1f Mcycles\n", profile_cycles[i] / 1e6);
        else if (profile_cycles[i])
            fprintf(stderr, "op %d: %.1f Mcycles\n", i, profile_cycles[i] / 1e6);
}
#endif

static int dst_pad_of(const Program *p, int i) {
    return i + 1 < p->count && p->ops[i + 1].kind == OP_CONV ? p->ops[i + 1].in_pad : 0;
}

/* ------------------------------------------------------------------------- float32 */
/* The bias, ReLU and store of one pixel's 16 output channels from j×16. */
AVX512_TARGET static inline void store_f32(const Op *op, int j, __m512 v, float *to) {
    const int first = j * TILE_N;
    const int valid = op->oc - first < TILE_N ? op->oc - first : TILE_N;
    v = _mm512_add_ps(v, _mm512_loadu_ps(op->bias + first));
    if (op->relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
    _mm512_mask_storeu_ps(to + first, (__mmask16)((1u << valid) - 1u), v);
}

/* `count` (≤ 8) output pixels × `nb` (1 or 2) channel blocks from j in float32: up to 16
 * accumulators, each input value broadcast once against the blocks' weights.  The pixels come from
 * the per-pixel plan (as AVX2's), and every output is the same FMA chain as there: the same bits.
 * Inlined per literal count and nb. */
AVX512_TARGET static inline __attribute__((always_inline)) void conv_group_f32(const Op *op, const float *src,
                                                                               const ptrdiff_t *in, const ptrdiff_t *out,
                                                                               int j, const int nb, const int count,
                                                                               float *dst) {
    const int wp = op->w + 2 * op->in_pad, span = op->kw * op->c;
    const size_t row_step = (size_t)wp * op->c, w_step = (size_t)op->nblocks * TILE_N;
    __m512 acc[2][8];
    const float *x[8];
#pragma GCC unroll 8
    for (int m = 0; m < count; m++) {
        acc[0][m] = acc[1][m] = _mm512_setzero_ps();
        x[m] = src + in[m];
    }
    for (int ky = 0; ky < op->kh; ky++) {
        const float *w = op->weights32 + ((size_t)ky * span * op->nblocks + j) * TILE_N;
        for (int k = 0; k < span; k++, w += w_step) {
            const __m512 w0 = _mm512_loadu_ps(w), w1 = nb > 1 ? _mm512_loadu_ps(w + TILE_N) : w0;
#pragma GCC unroll 8
            for (int m = 0; m < count; m++) {
                const __m512 v = _mm512_set1_ps(x[m][k]);
                acc[0][m] = _mm512_fmadd_ps(v, w0, acc[0][m]);
                if (nb > 1) acc[1][m] = _mm512_fmadd_ps(v, w1, acc[1][m]);
            }
        }
#pragma GCC unroll 8
        for (int m = 0; m < count; m++) x[m] += row_step;
    }
#pragma GCC unroll 8
    for (int m = 0; m < count; m++) {
        store_f32(op, j, acc[0][m], dst + out[m]);
        if (nb > 1) store_f32(op, j + 1, acc[1][m], dst + out[m]);
    }
}

#define F32_GROUP(nb, count) conv_group_f32(op, src, in + m, out + m, j, nb, count, dst)

AVX512_TARGET static void conv_crop_f32(const Op *op, const float *src, float *dst) {
    EACH_PIXEL_GROUP(F32_GROUP)
}
#undef F32_GROUP

AVX512_TARGET static void pool_crop_f32(const Op *op, const float *src, float *dst, int dst_pad) {
    const int c = op->c, dst_wp = op->ow + 2 * dst_pad;
    const __m512 zero = _mm512_setzero_ps();
    for (int oy = 0; oy < op->oh; oy++) {
        for (int ox = 0; ox < op->ow; ox++) {
            const Window win = pool_window(op, oy, ox);
            const int top = win.top, bottom = win.bottom, left = win.left, right = win.right;
            const __m512 divisor = _mm512_set1_ps(win.divisor);
            float *out = dst + ((size_t)(oy + dst_pad) * dst_wp + ox + dst_pad) * c;
            const int ave = op->kind == OP_POOL_AVE;
            for (int c0 = 0; c0 < c; c0 += 16) {
                const int width = c - c0 < 16 ? c - c0 : 16;
                const __mmask16 mask = (__mmask16)((1u << width) - 1u);
                __m512 acc = ave ? zero : _mm512_set1_ps(-__FLT_MAX__);
                for (int y = top; y < bottom; y++)
                    for (int x = left; x < right; x++) {
                        const __m512 v = _mm512_maskz_loadu_ps(mask, src + ((size_t)y * op->w + x) * c + c0);
                        acc = ave ? _mm512_add_ps(acc, v) : _mm512_max_ps(acc, v);
                    }
                if (ave) acc = _mm512_div_ps(acc, divisor);
                if (op->relu) acc = _mm512_max_ps(acc, zero);
                _mm512_mask_storeu_ps(out + c0, mask, acc);
            }
        }
    }
}

/* ------------------------------------------------------------------------- float32 on AVX2 */
/* The same float32 programs on AVX2 + FMA (CPUs without AVX-512: AMD Zen 1-3, older Intel): the
 * weights' 16-channel blocks as two 8-lane vectors, the same blocks, sums and order per output
 * value, so both ISAs give the same bits. */
#define AVX2_TARGET __attribute__((target("avx2,fma")))

/* Lane masks: 8 - n leading all-ones words from index n's view (maskstore of the first n lanes). */
static const int32_t lane_masks[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

/* The bias, ReLU and store of one pixel's 8 output channels from `first` (none past oc). */
AVX2_TARGET static inline void store8_avx2(const Op *op, int first, __m256 v, float *to) {
    const int valid = op->oc - first;
    if (valid <= 0) return;
    v = _mm256_add_ps(v, _mm256_loadu_ps(op->bias + first));
    if (op->relu) v = _mm256_max_ps(v, _mm256_setzero_ps());
    if (valid >= 8)
        _mm256_storeu_ps(to + first, v);
    else
        _mm256_maskstore_ps(to + first, _mm256_loadu_si256((const __m256i *)(lane_masks + 8 - valid)), v);
}

/* `count` (≤ 6) output pixels × output channel block j: 12 accumulators, each input value
 * broadcast once against the block's two weight vectors.  The pixels are any of the layer's (`in`:
 * their first input value, `out`: their output pixel), so no lane computes a dropped pixel.
 * Inlined per literal count. */
AVX2_TARGET static inline __attribute__((always_inline)) void conv_group_avx2(const Op *op, const float *src,
                                                                               const ptrdiff_t *in, const ptrdiff_t *out,
                                                                               int j, const int count, float *dst) {
    const int wp = op->w + 2 * op->in_pad, span = op->kw * op->c;
    const size_t row_step = (size_t)wp * op->c, w_step = (size_t)op->nblocks * TILE_N;
    __m256 lo[6], hi[6];
    const float *x[6];
#pragma GCC unroll 6
    for (int m = 0; m < count; m++) {
        lo[m] = hi[m] = _mm256_setzero_ps();
        x[m] = src + in[m];
    }
    for (int ky = 0; ky < op->kh; ky++) {
        const float *w = op->weights32 + ((size_t)ky * span * op->nblocks + j) * TILE_N;
        for (int k = 0; k < span; k++, w += w_step) {
            const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
#pragma GCC unroll 6
            for (int m = 0; m < count; m++) {
                const __m256 v = _mm256_broadcast_ss(x[m] + k);
                lo[m] = _mm256_fmadd_ps(v, w0, lo[m]);
                hi[m] = _mm256_fmadd_ps(v, w1, hi[m]);
            }
        }
#pragma GCC unroll 6
        for (int m = 0; m < count; m++) x[m] += row_step;
    }
#pragma GCC unroll 6
    for (int m = 0; m < count; m++) {
        store8_avx2(op, j * TILE_N, lo[m], dst + out[m]);
        store8_avx2(op, j * TILE_N + 8, hi[m], dst + out[m]);
    }
}

/* Every output pixel (the layer's `pixels`, in output order) in groups of six. */
AVX2_TARGET static void conv_crop_avx2(const Op *op, const float *src, float *dst) {
    const ptrdiff_t *in = op->pixel_in, *out = op->pixel_out;
    const int pixels = op->oh * op->ow;
    int m = 0;
    for (; m + 6 <= pixels; m += 6)
        for (int j = 0; j < op->nblocks; j++) conv_group_avx2(op, src, in + m, out + m, j, 6, dst);
    for (int j = 0; j < op->nblocks; j++) switch (pixels - m) {
        case 5: conv_group_avx2(op, src, in + m, out + m, j, 5, dst); break;
        case 4: conv_group_avx2(op, src, in + m, out + m, j, 4, dst); break;
        case 3: conv_group_avx2(op, src, in + m, out + m, j, 3, dst); break;
        case 2: conv_group_avx2(op, src, in + m, out + m, j, 2, dst); break;
        case 1: conv_group_avx2(op, src, in + m, out + m, j, 1, dst); break;
        default: break;
        }
}

AVX2_TARGET static void pool_crop_avx2(const Op *op, const float *src, float *dst, int dst_pad) {
    const int c = op->c, dst_wp = op->ow + 2 * dst_pad;
    const __m256 zero = _mm256_setzero_ps();
    for (int oy = 0; oy < op->oh; oy++) {
        for (int ox = 0; ox < op->ow; ox++) {
            const Window win = pool_window(op, oy, ox);
            const __m256 divisor = _mm256_set1_ps(win.divisor);
            float *out = dst + ((size_t)(oy + dst_pad) * dst_wp + ox + dst_pad) * c;
            const int ave = op->kind == OP_POOL_AVE;
            for (int c0 = 0; c0 < c; c0 += 8) {
                const int width = c - c0 < 8 ? c - c0 : 8;
                const __m256i mask = _mm256_loadu_si256((const __m256i *)(lane_masks + 8 - width));
                __m256 acc = ave ? zero : _mm256_set1_ps(-__FLT_MAX__);
                for (int y = win.top; y < win.bottom; y++)
                    for (int x = win.left; x < win.right; x++) {
                        const __m256 v = _mm256_maskload_ps(src + ((size_t)y * op->w + x) * c + c0, mask);
                        acc = ave ? _mm256_add_ps(acc, v) : _mm256_max_ps(acc, v);
                    }
                if (ave) acc = _mm256_div_ps(acc, divisor);
                if (op->relu) acc = _mm256_max_ps(acc, zero);
                _mm256_maskstore_ps(out + c0, mask, acc);
            }
        }
    }
}

static void run_crops_f32(const Program *p, const float *src, float *dst, Py_ssize_t first_crop,
                                        Py_ssize_t last_crop, float **blobs) {
    const Op *first = &p->ops[0], *last = &p->ops[p->count - 1];
    const int in_pad = first->kind == OP_CONV ? first->in_pad : 0;
    const int in_wp = first->w + 2 * in_pad;
    const size_t crop = (size_t)first->c * first->h * first->w;
    const size_t out_crop = (size_t)last->oc * last->oh * last->ow;
    for (Py_ssize_t b = first_crop; b < last_crop; b++) {
        const float *image = src + (size_t)b * crop;
        for (int k = 0; k < first->c; k++)
            for (int y = 0; y < first->h; y++)
                for (int x = 0; x < first->w; x++)
                    blobs[0][((size_t)(y + in_pad) * in_wp + x + in_pad) * first->c + k] =
                        image[((size_t)k * first->h + y) * first->w + x];
        for (int i = 0; i < p->count; i++) {
            const Op *op = &p->ops[i];
            if (op->kind == OP_CONV && p->f32 == F32_AVX512)
                conv_crop_f32(op, blobs[i], blobs[i + 1]);
            else if (op->kind == OP_CONV)
                conv_crop_avx2(op, blobs[i], blobs[i + 1]);
            else if (p->f32 == F32_AVX512)
                pool_crop_f32(op, blobs[i], blobs[i + 1], dst_pad_of(p, i));
            else
                pool_crop_avx2(op, blobs[i], blobs[i + 1], dst_pad_of(p, i));
        }
        memcpy(dst + (size_t)b * out_crop, blobs[p->count], out_crop * sizeof(float));
    }
}

/* Three bfloat16 channel rows of 16 pixels (ch0 and ch1 in `low`'s halves, ch2 in `high`'s low
 * half) as 48 interleaved values: pixel x's channels at 3x, 3x+1, 3x+2. */
AMX_TARGET static inline void interleave3(__m512i low, __m512i high, uint16_t *to, int pixels) {
    static const uint16_t order[48] = {0,  16, 32, 1,  17, 33, 2,  18, 34, 3,  19, 35, 4,  20, 36, 5,
                                       21, 37, 6,  22, 38, 7,  23, 39, 8,  24, 40, 9,  25, 41, 10, 26,
                                       42, 11, 27, 43, 12, 28, 44, 13, 29, 45, 14, 30, 46, 15, 31, 47};
    const __m512i first = _mm512_loadu_si512(order), second = _mm512_maskz_loadu_epi16(0xffff, order + 32);
    const int values = pixels * 3;
    const __mmask32 m0 = (__mmask32)(values >= 32 ? 0xffffffffu : ((1u << values) - 1u));
    const __mmask32 m1 = (__mmask32)(values <= 32 ? 0u : ((1u << (values - 32)) - 1u));
    _mm512_mask_storeu_epi16(to, m0, _mm512_permutex2var_epi16(low, first, high));
    _mm512_mask_storeu_epi16(to + 32, m1, _mm512_permutex2var_epi16(low, second, high));
}

/* One float32 C×H×W crop into the first blob: bfloat16, channels-last, inside its zero border; a
 * stacked first layer's blob holds, at row Y, rows Y..Y+stack-1 of the padded image side by side.
 * Each image row is converted and interleaved once (`row`: c×w values), then copied to its places. */
AMX_TARGET static void to_input(const float *image, const Op *first, uint16_t *input, int pad, int wp, uint16_t *row) {
    const int c = first->c, h = first->h, w = first->w;
    const int stack = first->kind == OP_CONV ? first->stack : 1, width = stack * c;
    for (int y = 0; y < h; y++) {
        if (c == 3) {
            for (int x = 0; x < w; x += 16) {
                const int pixels = w - x < 16 ? w - x : 16;
                const __mmask16 mask = (__mmask16)((1u << pixels) - 1u);
                const float *from = image + (size_t)y * w + x;
                const __m256i c0 = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, from));
                const __m256i c1 = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, from + (size_t)h * w));
                const __m256i c2 = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, from + (size_t)2 * h * w));
                interleave3(_mm512_inserti64x4(_mm512_castsi256_si512(c0), c1, 1), _mm512_castsi256_si512(c2),
                            row + (size_t)x * 3, pixels);
            }
        } else {
            for (int k = 0; k < c; k++) {
                const float *from = image + ((size_t)k * h + y) * w;
                for (int x = 0; x < w; x++) row[(size_t)x * c + k] = bf16_round(from[x]);
            }
        }
        /* row y of the padded image is part `part` of stacked row y + pad - part */
        for (int part = 0; part < stack && y + pad - part >= 0; part++) {
            uint16_t *to = input + ((size_t)(y + pad - part) * wp + pad) * width + (size_t)part * c;
            if (stack == 1) {
                memcpy(to, row, (size_t)w * c * sizeof(uint16_t));
            } else if (c == 3) {
                for (int x = 0; x < w; x++, to += width) memcpy(to, row + (size_t)x * 3, 3 * sizeof(uint16_t));
            } else {
                for (int x = 0; x < w; x++, to += width) memcpy(to, row + (size_t)x * c, (size_t)c * sizeof(uint16_t));
            }
        }
    }
}

static void *run_job_f32(Job *job) {
    const Program *p = job->program;
    float *blobs[MAX_OPS + 1];
    for (int i = 0; i <= p->count; i++) {
        blobs[i] = zeroed_lines(p->elements[i], sizeof(float));
        if (blobs[i] == NULL) {
            for (int k = 0; k < i; k++) free(blobs[k]);
            job->failed = 1;
            return NULL;
        }
    }
    Py_ssize_t first, last;
    while (take_chunk(job, &first, &last)) run_crops_f32(p, job->src, job->dst, first, last, blobs);
    for (int i = 0; i <= p->count; i++) free(blobs[i]);
    return NULL;
}

AMX_TARGET static void *run_job(void *arg) {
    Job *job = arg;
    const Program *p = job->program;
    if (p->f32) return run_job_f32(job);
    uint16_t *blobs[MAX_OPS + 1];
    uint16_t *row = malloc((size_t)p->ops[0].c * p->ops[0].w * sizeof(uint16_t));
    uint16_t *scratch = p->scratch ? zeroed_lines(p->scratch, sizeof(uint16_t)) : NULL;
    if (row == NULL || (p->scratch && scratch == NULL)) {
        free(row);
        free(scratch);
        job->failed = 1;
        return NULL;
    }
    for (int i = 0; i <= p->count; i++) {
        blobs[i] = zeroed_lines(p->elements[i], sizeof(uint16_t));
        if (blobs[i] == NULL) {
            for (int k = 0; k < i; k++) free(blobs[k]);
            free(row);
            free(scratch);
            job->failed = 1;
            return NULL;
        }
    }
    if (!p->dp) {
        TileConfig config;
        memset(&config, 0, sizeof config);
        config.palette = 1;
        for (int t = 0; t < 8; t++) {
            config.colsb[t] = 64;
            config.rows[t] = 16;
        }
        _tile_loadconfig(&config);
    }
    const Op *first = &p->ops[0], *last = &p->ops[p->count - 1];
    const int in_pad = first->kind == OP_CONV ? first->in_pad : 0;
    const int in_wp = first->w + 2 * in_pad;
    const size_t crop = (size_t)first->c * first->h * first->w;
    const size_t out_crop = (size_t)last->oc * last->oh * last->ow;
    Py_ssize_t b, end;
    while (take_chunk(job, &b, &end)) {
        for (; b < end; b++) {
            const float *image = job->src + (size_t)b * crop;
#ifdef AMX_PROFILE
            unsigned long long t_input = __rdtsc();
#endif
            to_input(image, first, blobs[0], in_pad, in_wp, row);
#ifdef AMX_PROFILE
            __atomic_fetch_add(&profile_cycles[MAX_OPS - 1], __rdtsc() - t_input, __ATOMIC_RELAXED);
#endif
            for (int i = 0; i < p->count; i++) {
                const Op *op = &p->ops[i];
#ifdef AMX_PROFILE
                unsigned long long t0 = __rdtsc();
#endif
                if (op->kind == OP_CONV && p->dp)
                    conv_crop_dp(op, blobs[i], blobs[i + 1], scratch);
                else if (op->kind == OP_CONV)
                    conv_crop(op, blobs[i], blobs[i + 1], scratch);
                else
                    pool_crop(op, blobs[i], blobs[i + 1], dst_pad_of(p, i));
#ifdef AMX_PROFILE
                __atomic_fetch_add(&profile_cycles[i], __rdtsc() - t0, __ATOMIC_RELAXED);
#endif
            }
            float *out = job->dst + (size_t)b * out_crop;
            const uint16_t *top = blobs[p->count];
            for (size_t k = 0; k < out_crop; k++) out[k] = bf16_value(top[k]);
        }
    }
    if (!p->dp) _tile_release();
    for (int i = 0; i <= p->count; i++) free(blobs[i]);
    free(row);
    free(scratch);
    return NULL;
}

/* ------------------------------------------------------------------------- building */
static void free_program(Program *p) {
    for (int i = 0; i < p->count; i++) {
        free(p->ops[i].weights);
        free(p->ops[i].weights32);
        free(p->ops[i].bias);
        free(p->ops[i].block_a);
        free(p->ops[i].block_out);
        free(p->ops[i].pixel_in);
        free(p->ops[i].pixel_out);
    }
    free(p);
}

static void capsule_free(PyObject *capsule) {
    Program *p = PyCapsule_GetPointer(capsule, "lymph_cv.amxconv.Program");
    if (p != NULL) free_program(p);
}

/* Weights [oc][c][kh][kw] float32 into the B tiles of every (tile row, K chunk, output block):
 * K position kx×C + c of kernel row ky, (kx×stack + ky mod stack)×C + c of stacked row ky / stack,
 * or (ky×kw + kx)×C + c of the one im2col row. */
static int pack_weights(Op *op, const float *weights, const float *bias) {
    const size_t b_tile = (size_t)TILE_K * TILE_N;
    const size_t count = (size_t)op->rows * op->chunks * op->nblocks * b_tile;
    op->weights = aligned_alloc(64, ((count * sizeof(uint16_t) + 63) / 64) * 64);
    op->bias = calloc((size_t)op->nblocks * TILE_N, sizeof(float));
    if (op->weights == NULL || op->bias == NULL) return -1;
    memset(op->weights, 0, count * sizeof(uint16_t));
    for (int o = 0; o < op->oc; o++)
        for (int ch = 0; ch < op->c; ch++)
            for (int ky = 0; ky < op->kh; ky++)
                for (int kx = 0; kx < op->kw; kx++) {
                    const int row = op->im2col ? 0 : ky / op->stack;
                    const int k = op->im2col ? (ky * op->kw + kx) * op->c + ch
                                             : (kx * op->stack + ky % op->stack) * op->c + ch;
                    const int q = k / TILE_K, kk = k % TILE_K, j = o / TILE_N, n = o % TILE_N;
                    uint16_t *tile = op->weights + (((size_t)row * op->chunks + q) * op->nblocks + j) * b_tile;
                    tile[(kk / 2) * (TILE_N * 2) + n * 2 + (kk % 2)] =
                        bf16_round(weights[(((size_t)o * op->c + ch) * op->kh + ky) * op->kw + kx]);
                }
    if (bias != NULL) memcpy(op->bias, bias, (size_t)op->oc * sizeof(float));
    return 0;
}

/* Weights [oc][c][kh][kw] float32 as [kh][kw×c][nblocks][16] (zero past oc) for float32 programs. */
static int pack_weights_f32(Op *op, const float *weights, const float *bias) {
    const size_t span = (size_t)op->kw * op->c;
    const size_t count = (size_t)op->kh * span * op->nblocks * TILE_N;
    op->weights32 = calloc(count, sizeof(float));
    op->bias = calloc((size_t)op->nblocks * TILE_N, sizeof(float));
    if (op->weights32 == NULL || op->bias == NULL) return -1;
    for (int o = 0; o < op->oc; o++)
        for (int ch = 0; ch < op->c; ch++)
            for (int ky = 0; ky < op->kh; ky++)
                for (int kx = 0; kx < op->kw; kx++)
                    op->weights32[(((size_t)ky * span + (size_t)kx * op->c + ch) * op->nblocks + o / TILE_N) * TILE_N + o % TILE_N] =
                        weights[(((size_t)o * op->c + ch) * op->kh + ky) * op->kw + kx];
    if (bias != NULL) memcpy(op->bias, bias, (size_t)op->oc * sizeof(float));
    return 0;
}

/* Where a convolution's 16-pixel blocks read (A rows) and write (each row's output pixel):
 * im2col rows in output order; else per output row, or, at stride 1 where it takes fewer blocks,
 * along the padded input width (rows that land in the border are computed and dropped). */
static int plan_blocks(Op *op, int dst_pad) {
    const int wp = op->w + 2 * op->in_pad, dst_wp = op->ow + 2 * dst_pad, c = op->c * op->stack;
    const int per_row = (op->ow + TILE_M - 1) / TILE_M;
    const int flat = (op->oh - 1) * wp + op->ow;
    const int along = !op->im2col && op->sh == 1 && op->sw == 1 && (flat + TILE_M - 1) / TILE_M < op->oh * per_row;
    op->blocks = op->im2col ? (op->oh * op->ow + TILE_M - 1) / TILE_M
                 : along    ? (flat + TILE_M - 1) / TILE_M
                            : op->oh * per_row;
    op->block_a = malloc((size_t)op->blocks * sizeof(ptrdiff_t));
    op->block_out = malloc((size_t)op->blocks * TILE_M * sizeof(ptrdiff_t));
    if (op->block_a == NULL || op->block_out == NULL) return -1;
    for (int b = 0; b < op->blocks; b++) {
        int oy0 = 0, x0 = 0;
        if (op->im2col)
            op->block_a[b] = (ptrdiff_t)b * TILE_M * op->im2col;
        else if (along)
            op->block_a[b] = (ptrdiff_t)b * TILE_M * c;
        else {
            oy0 = b / per_row;
            x0 = (b % per_row) * TILE_M;
            op->block_a[b] = ((ptrdiff_t)oy0 * op->sh * wp + (ptrdiff_t)x0 * op->sw) * c;
        }
        for (int r = 0; r < TILE_M; r++) {
            const int p = b * TILE_M + r;
            int oy, ox;
            if (op->im2col) {
                oy = p / op->ow;
                ox = p % op->ow;
            } else if (along) {
                oy = p / wp;
                ox = p % wp;
            } else {
                oy = oy0;
                ox = x0 + r;
            }
            op->block_out[(size_t)b * TILE_M + r] =
                oy < op->oh && ox < op->ow ? ((ptrdiff_t)(oy + dst_pad) * dst_wp + dst_pad + ox) * op->oc : -1;
        }
    }
    return 0;
}

/* Where each output pixel of a convolution reads (its first input value: in the blob, its stacked
 * rows or its im2col row) and writes, for the kernels that take pixels one by one. */
static int plan_pixels(Op *op, int dst_pad) {
    const int wp = op->w + 2 * op->in_pad, dst_wp = op->ow + 2 * dst_pad, c = op->c * op->stack;
    const size_t pixels = (size_t)op->oh * op->ow;
    op->pixel_in = malloc(pixels * sizeof(ptrdiff_t));
    op->pixel_out = malloc(pixels * sizeof(ptrdiff_t));
    if (op->pixel_in == NULL || op->pixel_out == NULL) return -1;
    for (int oy = 0, k = 0; oy < op->oh; oy++)
        for (int ox = 0; ox < op->ow; ox++, k++) {
            op->pixel_in[k] = op->im2col ? (ptrdiff_t)k * op->im2col
                                         : ((ptrdiff_t)oy * op->sh * wp + (ptrdiff_t)ox * op->sw) * c;
            op->pixel_out[k] = ((ptrdiff_t)(oy + dst_pad) * dst_wp + dst_pad + ox) * op->oc;
        }
    return 0;
}

static int item_int(PyObject *seq, Py_ssize_t index, int *out) {
    PyObject *item = PySequence_GetItem(seq, index);
    if (item == NULL) return -1;
    long value = PyLong_AsLong(item);
    Py_DECREF(item);
    if (value == -1 && PyErr_Occurred()) return -1;
    if (value < 0 || value > (1 << 20)) {
        PyErr_Format(PyExc_ValueError, "program: field %zd out of range (%ld)", index, value);
        return -1;
    }
    *out = (int)value;
    return 0;
}

/* ops: sequence of (kind, relu, c, h, w, in_pad, oc, oh, ow, kh, kw, sh, sw, ph, pw, weights, bias);
 * weights/bias: float32 buffers (convolutions) or None. */
static PyObject *program(PyObject *self, PyObject *args) {
    PyObject *ops;
    int f32 = 0, fallback = 0;
    if (!PyArg_ParseTuple(args, "O|pp", &ops, &f32, &fallback)) return NULL;
    if (f32 ? !(avx2_ready() || (!fallback && avx512_ready())) : !(dpbf16_ready() || (!fallback && amx_ready()))) {
        PyErr_SetString(PyExc_RuntimeError,
                        f32 ? (fallback ? "program: this CPU offers no AVX2 with FMA"
                                        : "program: this CPU offers neither AVX-512 nor AVX2 with FMA")
                            : (fallback ? "program: this CPU offers no AVX512-BF16"
                                        : "program: this CPU or kernel offers neither AMX nor AVX512-BF16 bfloat16"));
        return NULL;
    }
    Py_ssize_t count = PySequence_Length(ops);
    if (count < 1 || count > MAX_OPS) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "program: 1 to %d layers, got %zd", MAX_OPS, count);
        return NULL;
    }
    Program *p = calloc(1, sizeof(Program));
    if (p == NULL) return PyErr_NoMemory();
    p->f32 = !f32 ? 0 : !fallback && avx512_ready() ? F32_AVX512 : F32_AVX2;
    p->dp = !f32 && (fallback || !amx_ready());
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *spec = PySequence_GetItem(ops, i);
        if (spec == NULL) goto fail;
        Op *op = &p->ops[i];
        int *fields[] = {&op->kind, &op->relu, &op->c, &op->h, &op->w, &op->in_pad, &op->oc, &op->oh, &op->ow,
                         &op->kh, &op->kw, &op->sh, &op->sw, &op->ph, &op->pw};
        const Py_ssize_t nfields = (Py_ssize_t)(sizeof fields / sizeof fields[0]);
        if (PySequence_Length(spec) != nfields + 2) {
            PyErr_Format(PyExc_ValueError, "program: layer %zd: expected %zd fields", i, nfields + 2);
            Py_DECREF(spec);
            goto fail;
        }
        for (Py_ssize_t f = 0; f < nfields; f++)
            if (item_int(spec, f, fields[f]) < 0) {
                Py_DECREF(spec);
                goto fail;
            }
        p->count = (int)i + 1;
        int bad = op->kind > OP_POOL_AVE || op->c < 1 || op->h < 1 || op->w < 1 || op->oc < 1 || op->oh < 1 ||
                  op->ow < 1 || op->kh < 1 || op->kw < 1 || op->sh < 1 || op->sw < 1;
        if (op->kind == OP_CONV)
            bad |= op->sh != op->sw || (op->oh - 1) * op->sh + op->kh > op->h + 2 * op->in_pad ||
                   (op->ow - 1) * op->sw + op->kw > op->w + 2 * op->in_pad;
        else
            bad |= op->oc != op->c || op->in_pad != 0 || (op->oh - 1) * op->sh - op->ph >= op->h ||
                   (op->ow - 1) * op->sw - op->pw >= op->w;
        if (i > 0) {
            const Op *prev = &p->ops[i - 1];
            bad |= prev->oc != op->c || prev->oh != op->h || prev->ow != op->w;
        }
        if (bad) {
            PyErr_Format(PyExc_ValueError, "program: layer %zd: inconsistent geometry", i);
            Py_DECREF(spec);
            goto fail;
        }
        if (op->kind == OP_CONV) {
            /* im2col where the kernel rows' K tiles would be a quarter or more padding */
            const int direct = op->kh * ((op->kw * op->c + TILE_K - 1) / TILE_K);
            const int whole = (op->kh * op->kw * op->c + TILE_K - 1) / TILE_K;
            /* the first layer: stacked rows instead, where they take no more K tiles (no im2col copy) */
            const int stack = i == 0 && !f32 ? TILE_K / (op->kw * op->c) : 1;
            const int fold = stack < op->kh ? stack : op->kh;
            const int stacked = fold > 1 ? ((op->kh + fold - 1) / fold) * ((op->kw * fold * op->c + TILE_K - 1) / TILE_K) : direct;
            op->stack = fold > 1 && stacked <= whole && stacked < direct ? fold : 1;
            op->im2col = !f32 && op->stack == 1 && whole * 4 < direct * 3 ? whole * TILE_K : 0;
            op->rows = op->im2col ? 1 : (op->kh + op->stack - 1) / op->stack;
            op->chunks = op->im2col ? whole : (op->kw * op->stack * op->c + TILE_K - 1) / TILE_K;
            op->nblocks = (op->oc + TILE_N - 1) / TILE_N;
            PyObject *wobj = PySequence_GetItem(spec, nfields), *bobj = PySequence_GetItem(spec, nfields + 1);
            Py_buffer wbuf = {0}, bbuf = {0};
            int ok = wobj != NULL && bobj != NULL && PyObject_GetBuffer(wobj, &wbuf, PyBUF_C_CONTIGUOUS) == 0;
            int have_bias = ok && bobj != Py_None;
            if (have_bias) ok = PyObject_GetBuffer(bobj, &bbuf, PyBUF_C_CONTIGUOUS) == 0;
            if (ok && (wbuf.len != (Py_ssize_t)((size_t)op->oc * op->c * op->kh * op->kw * sizeof(float)) ||
                       (have_bias && bbuf.len != (Py_ssize_t)(op->oc * sizeof(float))))) {
                PyErr_Format(PyExc_ValueError, "program: layer %zd: weight or bias size does not match", i);
                ok = 0;
            }
            if (ok && (f32 ? pack_weights_f32(op, wbuf.buf, have_bias ? bbuf.buf : NULL)
                           : pack_weights(op, wbuf.buf, have_bias ? bbuf.buf : NULL)) < 0) {
                PyErr_NoMemory();
                ok = 0;
            }
            if (wbuf.obj) PyBuffer_Release(&wbuf);
            if (bbuf.obj) PyBuffer_Release(&bbuf);
            Py_XDECREF(wobj);
            Py_XDECREF(bobj);
            if (!ok) {
                Py_DECREF(spec);
                goto fail;
            }
        }
        Py_DECREF(spec);
    }
    /* Blob i is op i's input (blob count: the last top). A convolution's A tiles read up to 16
     * pixels × stride past the last output and a K chunk past the kernel row: slack for both. */
    for (int i = 0; i < p->count; i++) {
        Op *op = &p->ops[i];
        if (op->kind != OP_CONV) continue;
        /* AMX takes 16-pixel blocks, the vector kernels each output pixel from its own plan */
        const int by_pixel = p->f32 || p->dp;
        if ((by_pixel ? plan_pixels(op, dst_pad_of(p, i)) : plan_blocks(op, dst_pad_of(p, i))) < 0) {
            PyErr_NoMemory();
            goto fail;
        }
        const size_t rows = (by_pixel ? (size_t)op->oh * op->ow : (size_t)op->blocks * TILE_M) * op->im2col + TILE_K;
        if (op->im2col && rows > p->scratch) p->scratch = rows;
    }
    for (int i = 0; i <= p->count; i++) {
        size_t size;
        if (i < p->count) {
            const Op *op = &p->ops[i];
            const int pad = op->kind == OP_CONV ? op->in_pad : 0;
            const int c = op->kind == OP_CONV ? op->c * op->stack : op->c;
            size = (size_t)(op->h + 2 * pad) * (op->w + 2 * pad) * c;
            if (op->kind == OP_CONV) size += (size_t)(TILE_M + 1) * op->sw * c + (size_t)op->chunks * TILE_K;
        } else {
            const Op *op = &p->ops[p->count - 1];
            size = (size_t)op->oh * op->ow * op->oc;
        }
        p->elements[i] = size + TILE_K;
    }
    return PyCapsule_New(p, "lymph_cv.amxconv.Program", capsule_free);
fail:
    free_program(p);
    return NULL;
}

static PyObject *run(PyObject *self, PyObject *args) {
    PyObject *capsule;
    Py_buffer src, dst;
    Py_ssize_t n;
    int threads;
    if (!PyArg_ParseTuple(args, "Oy*nw*i", &capsule, &src, &n, &dst, &threads)) return NULL;
    PyObject *result = NULL;
    const Program *p = PyCapsule_GetPointer(capsule, "lymph_cv.amxconv.Program");
    if (p == NULL) goto done;
    const Op *first = &p->ops[0], *last = &p->ops[p->count - 1];
    const Py_ssize_t crop = (Py_ssize_t)first->c * first->h * first->w;
    const Py_ssize_t out_crop = (Py_ssize_t)last->oc * last->oh * last->ow;
    if (n < 0 || src.len != n * crop * (Py_ssize_t)sizeof(float) || dst.len != n * out_crop * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "run: buffer sizes do not match the program's input and output");
        goto done;
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = n > 0 ? (int)n : 1;
    Job jobs[MAX_THREADS];
    Py_ssize_t next = 0;
    pthread_t ids[MAX_THREADS];
    int running[MAX_THREADS] = {0};
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; t++)
        jobs[t] = (Job){p, src.buf, dst.buf, n, &next, 0};
    for (int t = 1; t < threads; t++) running[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]); /* it takes chunks until none is left, so a thread not started loses nothing */
    for (int t = 1; t < threads; t++)
        if (running[t]) pthread_join(ids[t], NULL);
    for (int t = 0; t < threads; t++) failed |= jobs[t].failed;
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *available(PyObject *self, PyObject *unused) { return PyBool_FromLong(amx_ready() || dpbf16_ready()); }

static PyObject *bf16_kernels(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(amx_ready() ? "amx" : dpbf16_ready() ? "avx512_bf16" : "");
}

static PyObject *available_dpbf16(PyObject *self, PyObject *unused) { return PyBool_FromLong(dpbf16_ready()); }

static PyObject *available_f32(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(avx512_ready() || avx2_ready());
}

static PyObject *f32_kernels(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(avx512_ready() ? "avx512" : avx2_ready() ? "avx2" : "");
}

static PyObject *round_bf16(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "y*w*", &src, &dst)) return NULL;
    PyObject *result = NULL;
    if (src.len % sizeof(float) || dst.len * 2 != src.len) {
        PyErr_SetString(PyExc_ValueError, "round_bf16: dst must hold one uint16 per float32 of src");
    } else {
        const float *in = src.buf;
        uint16_t *out = dst.buf;
        for (Py_ssize_t i = 0; i < src.len / (Py_ssize_t)sizeof(float); i++) out[i] = bf16_round(in[i]);
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS,
     "available() -> bool: bfloat16 programs run here (AMX granted by the kernel, or AVX512-BF16)."},
    {"available_dpbf16", available_dpbf16, METH_NOARGS, "available_dpbf16() -> bool: AVX512-BF16 (the bfloat16 fallback)."},
    {"bf16_kernels", bf16_kernels, METH_NOARGS, "bf16_kernels() -> str: what bfloat16 programs run on: amx, avx512_bf16 or ''."},
    {"available_f32", available_f32, METH_NOARGS, "available_f32() -> bool: AVX-512 or AVX2 + FMA for float32 programs."},
    {"f32_kernels", f32_kernels, METH_NOARGS, "f32_kernels() -> str: what float32 programs run on: avx512, avx2 or ''."},
    {"program", program, METH_VARARGS,
     "program(ops, f32=False, fallback=False) -> capsule (f32: float32 on AVX-512, or AVX2 where it lacks\n"
     "AVX-512 or fallback is set; else bfloat16 on AMX, or AVX512-BF16 where it lacks AMX or fallback is set): ops (kind, relu, c, h, w, in_pad, oc, oh, ow, kh, kw, sh, sw, ph, pw, weights, bias);\n"
     "kind 0 convolution (weights float32 oc×c×kh×kw, bias float32 oc or None), 1 MAX, 2 AVE pooling."},
    {"run", run, METH_VARARGS,
     "run(program, src, n, dst, threads): n float32 crops (c×h×w) through the program into dst (float32 h×w×c)."},
    {"round_bf16", round_bf16, METH_VARARGS, "round_bf16(src float32, dst uint16): round to nearest even."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "amxconv",
                                    "Convolution, pooling and ReLU layers in bfloat16 on Intel AMX.", -1, methods};

PyMODINIT_FUNC PyInit_amxconv(void) { return PyModule_Create(&module); }
