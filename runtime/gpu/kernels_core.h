/* sonoscore GPU pre/post-processing: the per-pixel arithmetic and the per-block work of every kernel.
 *
 * One definition, two compilers. kernels.cu includes this header and wraps each function in a thin __global__
 * shell (thread index in, one call); tests/gpu_harness compiles the very same functions with a plain C++
 * compiler and loops over pixels and blocks the way the grid would, so the arithmetic is checked bit for bit
 * against the CPU reference (runtime/preprocess.py, cv2) on machines without a GPU.
 *
 * What each function reproduces:
 *   sono_gray            cv2.cvtColor RGB2GRAY / BGR2GRAY for uint8 (15-bit fixed point, exact).
 *   sono_resize_block    cv2.resize to S x S as runtime.preprocess.resize calls it: INTER_AREA when shrinking
 *                        (integer-scale "fast" path and the general float path), INTER_LINEAR when enlarging
 *                        (11-bit fixed point), and cv2's bilinear emulation of INTER_AREA when one axis grows.
 *   sono_crimmins_block  runtime.preprocess.crimmins, one iteration (32 whole-image passes, borders
 *                        replicated) on one tile held in shared memory, exact.
 *   sono_gate_pixel      prob > threshold -> 0/1 mask, masked image (cv2.multiply with a 0/1 mask), network input.
 *   sono_gate_block_done the mask count's cross-block reduction (self-resetting counters).
 *   sono_minmax_*        a network input normalised "minmax" (runtime.normalize.to_input): the image's (or masked
 *                        image's) min and max reduced in one block, then (x - min x) / (max x - min x) per pixel.
 * Network inputs are written through a 256-entry table per channel built on the host by runtime.normalize.to_input
 * itself (unit uint8/255, or mean/std per channel), so uint8 -> float32/float16 is the CPU's conversion by
 * construction; minmax, which depends on the image, computes the same float32 operations from the unit table.
 *
 * Host-only hooks (empty on the GPU): SONO_CHECK(cond) flags an out-of-range index; SONO_BEFORE_PASS(buf, n)
 * lets the harness poison a Crimmins buffer before each pass to prove no stale value is ever read;
 * SONO_CRIMMINS_HALO / SONO_REGION_SLACK can be overridden to build the harness's negative controls.
 */
#ifndef SONO_KERNELS_CORE_H
#define SONO_KERNELS_CORE_H

#if defined(__CUDACC__)
#define SONO_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#define SONO_HD static inline
#endif

/* Rounded float/double arithmetic, never contracted into FMA (cv2 runs on x86 without FMA contraction; the
 * harness is built with -ffp-contract=off). Device: the _rn intrinsics, which nvcc never fuses. */
#if defined(__CUDA_ARCH__)
#define SONO_SYNC() __syncthreads()
#define SONO_FADD(a, b) __fadd_rn((a), (b))
#define SONO_FMUL(a, b) __fmul_rn((a), (b))
#define SONO_FDIV(a, b) __fdiv_rn((a), (b))
#define SONO_DADD(a, b) __dadd_rn((a), (b))
#define SONO_DMUL(a, b) __dmul_rn((a), (b))
#define SONO_DDIV(a, b) __ddiv_rn((a), (b))
#define SONO_D2F(a) __double2float_rn(a)
#define SONO_ATOMIC_ADD(p, v) atomicAdd((p), (v))
#define SONO_ATOMIC_EXCH(p, v) atomicExch((p), (v))
#define SONO_FENCE() __threadfence()
#else
#define SONO_SYNC() ((void)0)
#define SONO_FADD(a, b) ((float)(a) + (float)(b))
#define SONO_FMUL(a, b) ((float)(a) * (float)(b))
#define SONO_FDIV(a, b) ((float)(a) / (float)(b))
#define SONO_DADD(a, b) ((double)(a) + (double)(b))
#define SONO_DMUL(a, b) ((double)(a) * (double)(b))
#define SONO_DDIV(a, b) ((double)(a) / (double)(b))
#define SONO_D2F(a) ((float)(a))
/* Host: blocks run one after another, so plain read-modify-write is the atomic. */
#define SONO_ATOMIC_ADD(p, v) sono_host_fetch_add((p), (v))
#define SONO_ATOMIC_EXCH(p, v) sono_host_exchange((p), (v))
#define SONO_FENCE() ((void)0)
SONO_HD unsigned int sono_host_fetch_add(unsigned int* p, unsigned int v)
{
    unsigned int old = *p;
    *p = old + v;
    return old;
}
SONO_HD unsigned int sono_host_exchange(unsigned int* p, unsigned int v)
{
    unsigned int old = *p;
    *p = v;
    return old;
}
#endif

#ifndef SONO_CHECK
#define SONO_CHECK(cond) ((void)0)
#endif
/* Test-only: shrink each pass's region by this many pixels (the harness proves that 1 breaks the result). */
#ifndef SONO_REGION_SLACK
#define SONO_REGION_SLACK 0
#endif
#ifndef SONO_BEFORE_PASS
#define SONO_BEFORE_PASS(buf, nbytes) ((void)0)
#endif

/* Resize modes, chosen on the host (runtime/gpu/kernels.py: resize_plan) exactly as cv2.resize chooses. */
#define SONO_RESIZE_COPY 0        /* crop is already S x S */
#define SONO_RESIZE_AREA_FAST 1   /* INTER_AREA, integer scale on both axes */
#define SONO_RESIZE_AREA 2        /* INTER_AREA, general (float weights) */
#define SONO_RESIZE_LINEAR 3      /* INTER_LINEAR (fixed point) */
#define SONO_RESIZE_LINEAR_AREA 4 /* INTER_AREA with an enlarged axis: cv2's bilinear emulation */

#define SONO_CRIMMINS_PASSES 32
#ifndef SONO_CRIMMINS_HALO
#define SONO_CRIMMINS_HALO 24 /* how far one iteration's information travels along an axis (24 of 32 passes) */
#endif

SONO_HD int sono_min(int a, int b) { return a < b ? a : b; }
SONO_HD int sono_max(int a, int b) { return a > b ? a : b; }
SONO_HD int sono_clamp(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* cvRound: round half to even (the default rounding mode), as saturate_cast does. */
SONO_HD int sono_round_f(float v) { return (int)rintf(v); }
SONO_HD unsigned char sono_sat_u8(int v) { return (unsigned char)sono_clamp(v, 0, 255); }
SONO_HD int sono_sat_short(int v) { return sono_clamp(v, -32768, 32767); }

/* ---------------------------------------------------------------------------------------------- grayscale */

/* cv2.cvtColor(COLOR_RGB2GRAY / COLOR_BGR2GRAY) on uint8: coefficients 0.299/0.587/0.114 in 15-bit fixed
 * point (9798, 19235, 3735), rounded. `r_index` is where red sits in the pixel (0 = RGB, 2 = BGR); a fourth
 * channel (alpha) is ignored, as runtime.preprocess.to_gray ignores it. One channel: the value itself. */
SONO_HD int sono_gray(const unsigned char* px, int channels, int r_index)
{
    if (channels == 1) return px[0];
    int r = px[r_index], g = px[1], b = px[2 - r_index];
    return (r * 9798 + g * 19235 + b * 3735 + (1 << 14)) >> 15;
}

/* Gray value of crop pixel (y, x); `src` points at the crop's top-left pixel, `pitch` is bytes per row. */
SONO_HD int sono_src_gray(const unsigned char* src, int pitch, int channels, int r_index, int y, int x)
{
    return sono_gray(src + (long long)y * pitch + (long long)x * channels, channels, r_index);
}

/* ------------------------------------------------------------------------------------------ network input */

/* out[i] = lut[v]: the table holds runtime.preprocess.to_input of 0..255 as raw float32 (4) or float16 (2)
 * bytes, so the device writes the CPU's exact values. */
SONO_HD void sono_store_input(void* out, long long i, const void* lut, int elem, int v)
{
    if (elem == 4) ((unsigned int*)out)[i] = ((const unsigned int*)lut)[v];
    else ((unsigned short*)out)[i] = ((const unsigned short*)lut)[v];
}

/* IEEE float -> half, round to nearest even (numpy's astype(float16), npy_floatbits_to_halfbits: overflow to
 * signed inf, subnormals rounded, NaN kept a NaN). */
SONO_HD unsigned short sono_float_to_half(float value)
{
    union { float f; unsigned int u; } cvt;
    cvt.f = value;
    unsigned int f = cvt.u, f_exp = f & 0x7f800000u, f_sig;
    unsigned short h_sgn = (unsigned short)((f & 0x80000000u) >> 16);
    if (f_exp >= 0x47800000u) {                                   /* inf, nan, overflow */
        if (f_exp == 0x7f800000u && (f & 0x007fffffu)) {
            unsigned short ret = (unsigned short)(0x7c00u + ((f & 0x007fffffu) >> 13));
            return (unsigned short)(h_sgn + (ret == 0x7c00u ? ret + 1 : ret));
        }
        return (unsigned short)(h_sgn + 0x7c00u);
    }
    if (f_exp <= 0x38000000u) {                                   /* subnormal half or signed zero */
        if (f_exp < 0x33000000u) return h_sgn;
        f_exp >>= 23;
        f_sig = 0x00800000u + (f & 0x007fffffu);
        f_sig >>= (113 - f_exp);
        if (((f_sig & 0x00003fffu) != 0x00001000u) || (f & 0x000007ffu)) f_sig += 0x00001000u;
        return (unsigned short)(h_sgn + (f_sig >> 13));
    }
    unsigned int h_exp = (f_exp - 0x38000000u) >> 13;
    f_sig = f & 0x007fffffu;
    if ((f_sig & 0x00003fffu) != 0x00001000u) f_sig += 0x00001000u;  /* ties to even */
    return (unsigned short)(h_sgn + h_exp + (f_sig >> 13));      /* a carry into the exponent is correct */
}

/* out[i] = value as float32 (elem 4) or float16 (elem 2). */
SONO_HD void sono_store_float(void* out, long long i, float value, int elem)
{
    if (elem == 4) ((float*)out)[i] = value;
    else ((unsigned short*)out)[i] = sono_float_to_half(value);
}

/* ------------------------------------------------------------------------------------------------- resize */

/* The resize is separable in its coefficients: like cv2, each output column and row gets its source taps and
 * weights once (sono_axis, the double-precision part), and every pixel combines one column's and one row's
 * (sono_resize_pixel, integer and float only). A block of SONO_RESIZE_BX x SONO_RESIZE_BY pixels tabulates its
 * columns and rows in shared memory first (sono_resize_block). */
#define SONO_RESIZE_BX 32
#define SONO_RESIZE_BY 8

typedef struct {
    int s0, s1;        /* LINEAR*: the two source indices (clamped); AREA: full cells [s0, s1); AREA_FAST: first */
    int first, last;   /* AREA: index of the partial first / last cell, or -1 */
    int w0, w1;        /* LINEAR*: fixed-point weights (INTER_RESIZE_COEF_SCALE = 2048) */
    float w_first, w_full, w_last; /* AREA: float weights */
} SonoAxis;

/* cv2's general INTER_AREA table (computeResizeAreaTab) for output index d of an axis of `ssize` pixels:
 * optional partial first cell, full cells, optional partial last cell; weights computed in double, stored float. */
SONO_HD void sono_area_axis(SonoAxis* t, int d, int ssize, double scale)
{
    double fs1 = SONO_DMUL((double)d, scale);
    double fs2 = SONO_DADD(fs1, scale);
    double rest = SONO_DADD((double)ssize, -fs1);
    double cell = scale < rest ? scale : rest;
    int s1 = (int)ceil(fs1), s2 = (int)floor(fs2);
    s2 = sono_min(s2, ssize - 1);
    s1 = sono_min(s1, s2);
    t->s0 = s1;
    t->s1 = s2;
    t->first = t->last = -1;
    t->w_first = t->w_last = 0.f;
    if (SONO_DADD((double)s1, -fs1) > 1e-3) {
        t->first = s1 - 1;
        t->w_first = SONO_D2F(SONO_DDIV(SONO_DADD((double)s1, -fs1), cell));
    }
    t->w_full = SONO_D2F(SONO_DDIV(1.0, cell));
    double tail = SONO_DADD(fs2, -(double)s2);
    if (tail > 1e-3) {
        double w = tail < 1.0 ? tail : 1.0;
        w = w < cell ? w : cell;
        t->last = s2;
        t->w_last = SONO_D2F(SONO_DDIV(w, cell));
    }
}

/* Source index and fraction of output index d, cv2's resize coefficient loop: centre-aligned for INTER_LINEAR,
 * cell-aligned for the INTER_AREA emulation. */
SONO_HD void sono_linear_coord(int d, double scale, double inv_scale, int area_mode, int* s_out, float* f_out)
{
    int s;
    float f;
    if (!area_mode) {
        f = SONO_D2F(SONO_DADD(SONO_DMUL(SONO_DADD((double)d, 0.5), scale), -0.5));
        s = (int)floorf(f);
        f = SONO_FADD(f, -(float)s);
    } else {
        s = (int)floor(SONO_DMUL((double)d, scale));
        f = SONO_D2F(SONO_DADD((double)(d + 1), -SONO_DMUL((double)(s + 1), inv_scale)));
        f = f <= 0.f ? 0.f : SONO_FADD(f, -floorf(f));
    }
    *s_out = s;
    *f_out = f;
}

/* Taps of output column (is_x) or row d. Linear columns clamp like cv2's xofs/alpha table (left of the image:
 * the first column; right: the last column alone); linear rows keep their weights and clip the row indices,
 * as cv2's vertical pass does. Weights are rounded to 11-bit fixed point as cv2 rounds them. */
SONO_HD SonoAxis sono_axis(int mode, int d, int ssize, double scale, double inv_scale, int iscale, int is_x)
{
    SonoAxis t;
    t.s0 = t.s1 = 0;
    t.first = t.last = -1;
    t.w0 = t.w1 = 0;
    t.w_first = t.w_full = t.w_last = 0.f;
    if (mode == SONO_RESIZE_COPY) {
        t.s0 = d;
    } else if (mode == SONO_RESIZE_AREA_FAST) {
        t.s0 = d * iscale;
    } else if (mode == SONO_RESIZE_AREA) {
        sono_area_axis(&t, d, ssize, scale);
    } else {
        int s;
        float f;
        sono_linear_coord(d, scale, inv_scale, mode == SONO_RESIZE_LINEAR_AREA, &s, &f);
        if (is_x) {
            if (s < 0) { f = 0.f; s = 0; }
            if (s >= ssize - 1) { f = 0.f; s = ssize - 1; }
        }
        t.s0 = sono_clamp(s, 0, ssize - 1);
        t.s1 = sono_clamp(s + 1, 0, ssize - 1);
        t.w0 = sono_sat_short(sono_round_f(SONO_FMUL(SONO_FADD(1.f, -f), 2048.f)));
        t.w1 = sono_sat_short(sono_round_f(SONO_FMUL(f, 2048.f)));
    }
    return t;
}

/* Weighted sum of one source row over the column's taps, accumulated in tap order (cv2: buf += S * alpha). */
SONO_HD float sono_area_row(const unsigned char* src, int pitch, int channels, int r_index, int sy, const SonoAxis* ax)
{
    float buf = 0.f;
    if (ax->first >= 0)
        buf = SONO_FADD(buf, SONO_FMUL((float)sono_src_gray(src, pitch, channels, r_index, sy, ax->first), ax->w_first));
    for (int sx = ax->s0; sx < ax->s1; ++sx)
        buf = SONO_FADD(buf, SONO_FMUL((float)sono_src_gray(src, pitch, channels, r_index, sy, sx), ax->w_full));
    if (ax->last >= 0)
        buf = SONO_FADD(buf, SONO_FMUL((float)sono_src_gray(src, pitch, channels, r_index, sy, ax->last), ax->w_last));
    return buf;
}

/* Output pixel from its column's and row's taps; `src` points at the crop's top-left pixel.
 *   AREA_FAST  block mean; 2x2 rounds half up ((s + 2) >> 2, cv2's SIMD and scalar code alike), other integer
 *              scales round sum * (1 / area) in float.
 *   AREA       rows weighted in tap order (sum += beta * buf), rounded half to even.
 *   LINEAR*    horizontal pass in int, vertical ((b0 * (h0 >> 4)) >> 16) + ((b1 * (h1 >> 4)) >> 16) + 2 >> 2,
 *              saturated (cv2's VResizeLinear for uint8). */
SONO_HD int sono_resize_pixel(const unsigned char* src, int pitch, int channels, int r_index, int mode,
                              const SonoAxis* ax, const SonoAxis* ay, int iscale_x, int iscale_y)
{
    if (mode == SONO_RESIZE_COPY) return sono_src_gray(src, pitch, channels, r_index, ay->s0, ax->s0);
    if (mode == SONO_RESIZE_AREA_FAST) {
        int sum = 0;
        for (int sy = 0; sy < iscale_y; ++sy)
            for (int sx = 0; sx < iscale_x; ++sx)
                sum += sono_src_gray(src, pitch, channels, r_index, ay->s0 + sy, ax->s0 + sx);
        if (iscale_x == 2 && iscale_y == 2) return (sum + 2) >> 2;
        float scale = SONO_FDIV(1.f, (float)(iscale_x * iscale_y));
        return sono_sat_u8(sono_round_f(SONO_FMUL((float)sum, scale)));
    }
    if (mode == SONO_RESIZE_AREA) {
        float sum = 0.f;
        if (ay->first >= 0)
            sum = SONO_FADD(sum, SONO_FMUL(ay->w_first, sono_area_row(src, pitch, channels, r_index, ay->first, ax)));
        for (int sy = ay->s0; sy < ay->s1; ++sy)
            sum = SONO_FADD(sum, SONO_FMUL(ay->w_full, sono_area_row(src, pitch, channels, r_index, sy, ax)));
        if (ay->last >= 0)
            sum = SONO_FADD(sum, SONO_FMUL(ay->w_last, sono_area_row(src, pitch, channels, r_index, ay->last, ax)));
        return sono_sat_u8(sono_round_f(sum));
    }
    int h0 = sono_src_gray(src, pitch, channels, r_index, ay->s0, ax->s0) * ax->w0
           + sono_src_gray(src, pitch, channels, r_index, ay->s0, ax->s1) * ax->w1;
    int h1 = sono_src_gray(src, pitch, channels, r_index, ay->s1, ax->s0) * ax->w0
           + sono_src_gray(src, pitch, channels, r_index, ay->s1, ax->s1) * ax->w1;
    return sono_sat_u8((((ay->w0 * (h0 >> 4)) >> 16) + ((ay->w1 * (h1 >> 4)) >> 16) + 2) >> 2);
}

/* Every source index a pixel of this column/row touches lies inside the crop (checked by the harness). */
SONO_HD int sono_axis_in_range(const SonoAxis* t, int mode, int ssize, int iscale)
{
    if (mode == SONO_RESIZE_AREA_FAST) return t->s0 >= 0 && t->s0 + iscale <= ssize;
    if (mode == SONO_RESIZE_AREA)
        return t->s0 >= 0 && t->s1 <= ssize && t->first < ssize && t->last < ssize && t->first >= -1;
    return t->s0 >= 0 && t->s0 < ssize && t->s1 >= 0 && t->s1 < ssize;
}

/* Output block (bx, by) of gray -> crop -> resize, run by thread (tx, ty) of an ntx x nty block: tabulate the
 * block's columns and rows in `ax` / `ay` (SONO_RESIZE_BX / _BY entries), then one pixel per thread; write the
 * image and, when net_out is given, the network input through the table. */
SONO_HD void sono_resize_block(const unsigned char* src, int pitch, int channels, int r_index, int src_w, int src_h,
                               int mode, double scale_x, double scale_y, double inv_scale_x, double inv_scale_y,
                               int iscale_x, int iscale_y, unsigned char* dst, int size, void* net_out,
                               const void* lut, int lut_elem, int bx, int by, int tx, int ty, int ntx, int nty,
                               SonoAxis* ax, SonoAxis* ay)
{
    int x0 = bx * SONO_RESIZE_BX, y0 = by * SONO_RESIZE_BY;
    for (int t = ty * ntx + tx; t < SONO_RESIZE_BX + SONO_RESIZE_BY; t += ntx * nty) {
        if (t < SONO_RESIZE_BX) {
            if (x0 + t < size) {
                ax[t] = sono_axis(mode, x0 + t, src_w, scale_x, inv_scale_x, iscale_x, 1);
                SONO_CHECK(sono_axis_in_range(&ax[t], mode, src_w, iscale_x));
            }
        } else if (y0 + t - SONO_RESIZE_BX < size) {
            int r = t - SONO_RESIZE_BX;
            ay[r] = sono_axis(mode, y0 + r, src_h, scale_y, inv_scale_y, iscale_y, 0);
            SONO_CHECK(sono_axis_in_range(&ay[r], mode, src_h, iscale_y));
        }
    }
    SONO_SYNC();
    for (int py = ty; py < SONO_RESIZE_BY; py += nty)
        for (int px = tx; px < SONO_RESIZE_BX; px += ntx) {
            int dx = x0 + px, dy = y0 + py;
            if (dx >= size || dy >= size) continue;
            int v = sono_resize_pixel(src, pitch, channels, r_index, mode, &ax[px], &ay[py], iscale_x, iscale_y);
            long long i = (long long)dy * size + dx;
            dst[i] = (unsigned char)v;
            if (net_out) sono_store_input(net_out, i, lut, lut_elem, v);
        }
}

/* --------------------------------------------------------------------------------------------- Crimmins */

/* One rule at one pixel (docs/design.md): a = neighbour on the first side, c = the other side.
 * dark (b += 1): r0 a >= b+2; r1 a > b and b <= c; r2 c > b and b <= a; r3 c >= b+2.
 * light (b -= 1): the mirror image. b never wraps: b only rises below a neighbour and falls above one. */
SONO_HD int sono_crimmins_rule(int a, int b, int c, int rule, int dark)
{
    int hit;
    if (dark) {
        hit = rule == 0 ? a >= b + 2 : rule == 1 ? (a > b && b <= c) : rule == 2 ? (c > b && b <= a) : c >= b + 2;
        return b + hit;
    }
    hit = rule == 0 ? a <= b - 2 : rule == 1 ? (a < b && b >= c) : rule == 2 ? (c < b && b >= a) : c <= b - 2;
    return b - hit;
}

/* Pass p (0..31) of one iteration: dark passes 0-15 then light 16-31; within each, directions N-S, E-W,
 * NW-SE, NE-SW, four rules each. (dy, dx) is the offset of neighbour a; c is the opposite one. */
SONO_HD void sono_crimmins_pass_dir(int pass, int* dy, int* dx)
{
    int dir = (pass >> 2) & 3;
    *dy = dir == 1 ? 0 : -1;
    *dx = dir == 0 ? 0 : (dir == 3 ? 1 : -1);
}

/* How many of the passes after `pass` move information along an axis (0 = rows, 1 = columns): the margin
 * around a tile's core that must still be exact after `pass`. reach(-1) = 24 on both axes = the halo. */
SONO_HD int sono_crimmins_reach(int pass, int axis)
{
    int r = 0;
    for (int q = pass + 1; q < SONO_CRIMMINS_PASSES; ++q) {
        int dy, dx;
        sono_crimmins_pass_dir(q, &dy, &dx);
        r += axis == 0 ? (dy != 0) : (dx != 0);
    }
    return r;
}

/* Tiling: each block owns a core of T x T output pixels and loads it with a 24-pixel halo (one iteration's
 * reach), so it runs all 32 passes without hearing from other blocks. A tile as large as the image needs no
 * halo (one block, the whole image in shared memory). */
SONO_HD int sono_crimmins_halo(int h, int w, int tile)
{
    return (tile >= h && tile >= w) ? 0 : SONO_CRIMMINS_HALO;
}

SONO_HD int sono_crimmins_pitch(int h, int w, int tile)
{
    return sono_min(tile + 2 * sono_crimmins_halo(h, w, tile), w);
}

SONO_HD int sono_crimmins_rows(int h, int w, int tile)
{
    return sono_min(tile + 2 * sono_crimmins_halo(h, w, tile), h);
}

/* Dynamic shared memory of one block: two tile buffers (ping-pong between passes). */
SONO_HD int sono_crimmins_smem_bytes(int h, int w, int tile)
{
    return 2 * sono_crimmins_pitch(h, w, tile) * sono_crimmins_rows(h, w, tile);
}

/* One pass over the rectangle [ry0, ry1) x [rx0, rx1) (image coordinates) of a tile whose element [0][0] is
 * image pixel (oy, ox): every pixel decided from `in` (the image before the pass), written to `out`.
 * Neighbours are clamped to the image, which is the CPU's replicated border. */
SONO_HD void sono_crimmins_tile_pass(const unsigned char* in, unsigned char* out, int pitch, int rows, int oy, int ox,
                                     int h, int w, int ry0, int ry1, int rx0, int rx1, int pass,
                                     int tx, int ty, int ntx, int nty)
{
    int dy, dx;
    sono_crimmins_pass_dir(pass, &dy, &dx);
    int rule = pass & 3, dark = pass < 16;
    for (int y = ry0 + ty; y < ry1; y += nty) {
        int ya = sono_clamp(y + dy, 0, h - 1) - oy, yc = sono_clamp(y - dy, 0, h - 1) - oy, yb = y - oy;
        SONO_CHECK(ya >= 0 && ya < rows && yc >= 0 && yc < rows && yb >= 0 && yb < rows);
        for (int x = rx0 + tx; x < rx1; x += ntx) {
            int xa = sono_clamp(x + dx, 0, w - 1) - ox, xc = sono_clamp(x - dx, 0, w - 1) - ox, xb = x - ox;
            SONO_CHECK(xa >= 0 && xa < pitch && xc >= 0 && xc < pitch && xb >= 0 && xb < pitch);
            out[yb * pitch + xb] = (unsigned char)sono_crimmins_rule(in[ya * pitch + xa], in[yb * pitch + xb],
                                                                     in[yc * pitch + xc], rule, dark);
        }
    }
}

/* One Crimmins iteration for the tile (bx, by), executed by thread (tx, ty) of an ntx x nty block; `smem`
 * holds sono_crimmins_smem_bytes. Load tile + halo; 32 passes, each over the part of the tile that later
 * passes still read (the core grown by the remaining reach), ping-ponging between the two buffers; store the
 * core to `dst` and, when net_out is given, the network input through the table. After 32 passes (even) the
 * result is back in the first buffer. On the host (one thread, ntx = nty = 1) SONO_SYNC is a no-op. */
SONO_HD void sono_crimmins_block(const unsigned char* src, unsigned char* dst, int h, int w, int tile,
                                 int bx, int by, int tx, int ty, int ntx, int nty, unsigned char* smem,
                                 void* net_out, const void* lut, int lut_elem)
{
    int halo = sono_crimmins_halo(h, w, tile);
    int pitch = sono_crimmins_pitch(h, w, tile), rows = sono_crimmins_rows(h, w, tile);
    int cy0 = by * tile, cy1 = sono_min(h, cy0 + tile), cx0 = bx * tile, cx1 = sono_min(w, cx0 + tile);
    int oy = sono_max(0, cy0 - halo), ey = sono_min(h, cy1 + halo);
    int ox = sono_max(0, cx0 - halo), ex = sono_min(w, cx1 + halo);
    unsigned char* buf0 = smem;
    unsigned char* buf1 = smem + pitch * rows;
    SONO_CHECK(ey - oy <= rows && ex - ox <= pitch);

    for (int y = oy + ty; y < ey; y += nty)
        for (int x = ox + tx; x < ex; x += ntx)
            buf0[(y - oy) * pitch + (x - ox)] = src[(long long)y * w + x];
    SONO_SYNC();

    /* rv, rh: the reach still to come after this pass, reach(pass) = reach(pass - 1) - what this pass moves. */
    int rv = sono_crimmins_reach(-1, 0) - SONO_REGION_SLACK, rh = sono_crimmins_reach(-1, 1) - SONO_REGION_SLACK;
    for (int pass = 0; pass < SONO_CRIMMINS_PASSES; ++pass) {
        int pdy, pdx;
        sono_crimmins_pass_dir(pass, &pdy, &pdx);
        rv -= pdy != 0;
        rh -= pdx != 0;
        const unsigned char* in = (pass & 1) ? buf1 : buf0;
        unsigned char* out = (pass & 1) ? buf0 : buf1;
        SONO_BEFORE_PASS(out, pitch * rows);
        sono_crimmins_tile_pass(in, out, pitch, rows, oy, ox, h, w,
                                sono_max(oy, cy0 - rv), sono_min(ey, cy1 + rv),
                                sono_max(ox, cx0 - rh), sono_min(ex, cx1 + rh), pass, tx, ty, ntx, nty);
        SONO_SYNC();
    }

    for (int y = cy0 + ty; y < cy1; y += nty)
        for (int x = cx0 + tx; x < cx1; x += ntx) {
            int v = buf0[(y - oy) * pitch + (x - ox)];
            long long i = (long long)y * w + x;
            dst[i] = (unsigned char)v;
            if (net_out) sono_store_input(net_out, i, lut, lut_elem, v);
        }
}

/* ------------------------------------------------------------------------------------------------- gate */

/* IEEE half -> float, exact (every half is a float). */
SONO_HD float sono_half_to_float(unsigned short hbits)
{
    unsigned int sign = (unsigned int)(hbits >> 15) << 31;
    unsigned int exp = (hbits >> 10) & 0x1f, man = hbits & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);              /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);     /* normal: rebias 15 -> 127 */
    } else if (man == 0) {
        bits = sign;                                          /* signed zero */
    } else {                                                  /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; ++e; } while (!(man & 0x400));
        bits = sign | ((unsigned int)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    union { unsigned int u; float f; } cvt;
    cvt.u = bits;
    return cvt.f;
}

/* Pixel i of the gate: mask = prob > threshold (NaN -> 0), masked = image * mask, the VGG input (masked value
 * repeated to `channels` planes of n pixels, plane c through table row c: `lut` holds `channels` rows of 256;
 * vgg_out NULL: not written here, sono_minmax writes it). Returns the mask bit for the fraction. `threshold` is
 * already rounded to the probability's dtype on the host (numpy's comparison semantics). */
SONO_HD int sono_gate_pixel(const void* prob, int prob_half, float threshold, const unsigned char* image, long long n,
                            unsigned char* mask, void* vgg_out, int channels, const void* lut, int lut_elem, long long i)
{
    float p = prob_half ? sono_half_to_float(((const unsigned short*)prob)[i]) : ((const float*)prob)[i];
    int m = p > threshold;
    mask[i] = (unsigned char)m;
    int v = m ? image[i] : 0;
    if (vgg_out)
        for (int c = 0; c < channels; ++c) {
            const unsigned char* row = (const unsigned char*)lut + (long long)c * 256 * lut_elem;
            sono_store_input(vgg_out, c * n + i, row, lut_elem, v);
        }
    return m;
}

/* The end of one gate block, run by its thread 0 with the block's mask count: add it to counter[0], take a
 * ticket from counter[1]; the last of `nblocks` blocks moves the total to *result and zeroes both counters, so
 * the kernel needs no memset between frames and replays unchanged inside a CUDA graph. */
SONO_HD void sono_gate_block_done(unsigned int* counter, unsigned int* result, unsigned int count,
                                 unsigned int nblocks)
{
    SONO_ATOMIC_ADD(&counter[0], count);
    SONO_FENCE();
    unsigned int ticket = SONO_ATOMIC_ADD(&counter[1], 1u);
    if (ticket == nblocks - 1) {
        *result = SONO_ATOMIC_EXCH(&counter[0], 0u);
        SONO_ATOMIC_EXCH(&counter[1], 0u);
    }
}

/* ---------------------------------------------------------------------------------------- minmax input */

/* A network input normalised "minmax" (runtime.normalize.to_input): with x = unit[v] (the float32 table of
 * uint8 / 255) over the image, (x - min x) / (max x - min x) per pixel in float32, all zeros for a constant image;
 * the value repeated to `channels` planes. The image is `image`, or with `mask` (0/1) the masked image
 * image * mask, as the gate makes it. The table is monotone, so min x = unit[min v]: the reduction is over bytes.
 * One block of SONO_MINMAX_THREADS threads: each thread reduces its pixels (sono_minmax_partial), the block
 * combines them pairwise in log2 steps (sono_minmax_combine, a barrier after each step), then every thread writes
 * its pixels (sono_minmax_write). The host harness runs the same three phases thread by thread. */
#define SONO_MINMAX_THREADS 256

SONO_HD int sono_minmax_value(const unsigned char* image, const unsigned char* mask, long long i)
{
    return mask ? (mask[i] ? image[i] : 0) : image[i];
}

SONO_HD void sono_minmax_partial(const unsigned char* image, const unsigned char* mask, long long n, int t, int nt,
                                 int* lo, int* hi)
{
    int a = 255, b = 0;
    for (long long i = t; i < n; i += nt) {
        int v = sono_minmax_value(image, mask, i);
        a = v < a ? v : a;
        b = v > b ? v : b;
    }
    lo[t] = a;
    hi[t] = b;
}

/* Step `stride` (1, 2, 4, ...) of the pairwise combination: thread t, a multiple of 2 * stride, takes t + stride. */
SONO_HD void sono_minmax_combine(int* lo, int* hi, int t, int nt, int stride)
{
    if (t % (2 * stride) == 0 && t + stride < nt) {
        lo[t] = sono_min(lo[t], lo[t + stride]);
        hi[t] = sono_max(hi[t], hi[t + stride]);
    }
}

SONO_HD void sono_minmax_write(const unsigned char* image, const unsigned char* mask, long long n, void* out,
                               int channels, const float* unit, int elem, int lo, int hi, int t, int nt)
{
    float x0 = unit[lo], span = SONO_FADD(unit[hi], -x0);
    for (long long i = t; i < n; i += nt) {
        float y = hi > lo ? SONO_FDIV(SONO_FADD(unit[sono_minmax_value(image, mask, i)], -x0), span) : 0.f;
        for (int c = 0; c < channels; ++c) sono_store_float(out, c * n + i, y, elem);
    }
}

#endif /* SONO_KERNELS_CORE_H */
