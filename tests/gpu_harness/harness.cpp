// Host harness for runtime/gpu/kernels_core.h: the kernels' own per-pixel and per-block functions, compiled by
// a plain C++ compiler and driven the way the CUDA grid drives them (every block of sono_resize and every
// tile of sono_crimmins with one "thread", every pixel of sono_gate). Built by tests/test_gpu_kernels.py into a
// temporary shared library and called through ctypes. The *_launch functions run one kernel launch over the grid
// that GpuKernels asked for (tests/gpu_harness/fake_cuda.py: the CPU stand-in for pycuda calls them).
//
// Checks compiled in here only: SONO_CHECK records any index outside the tile or crop; SONO_BEFORE_PASS fills a
// Crimmins buffer with noise before each pass, so a read of a value no pass wrote would change the output.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

static int g_violations = 0;
static uint32_t g_noise = 12345u;
static int g_poison = 0;

static void sono_host_poison(unsigned char* buf, int n)
{
    if (!g_poison) return;
    for (int i = 0; i < n; ++i) {
        g_noise = g_noise * 1664525u + 1013904223u;
        buf[i] = (unsigned char)(g_noise >> 24);
    }
}

#define SONO_CHECK(cond) do { if (!(cond)) ++g_violations; } while (0)
#define SONO_BEFORE_PASS(buf, n) sono_host_poison((buf), (n))
#include "kernels_core.h"

extern "C" {

int harness_violations(void) { return g_violations; }
void harness_reset(void) { g_violations = 0; }

void harness_gray(const unsigned char* src, int h, int w, int channels, int r_index, unsigned char* out)
{
    for (int y = 0; y < h; ++y)
        for (int x = 0; x < w; ++x)
            out[y * w + x] = (unsigned char)sono_src_gray(src, w * channels, channels, r_index, y, x);
}

// One sono_resize launch over a gx x gy grid, block by block (sono_resize's arguments, then the grid).
void harness_resize_launch(const unsigned char* src, int pitch, int channels, int r_index, int src_w, int src_h,
                           int mode, double scale_x, double scale_y, double inv_scale_x, double inv_scale_y,
                           int iscale_x, int iscale_y, unsigned char* dst, int size, void* net_out, const void* lut,
                           int lut_elem, int gx, int gy)
{
    SonoAxis ax[SONO_RESIZE_BX], ay[SONO_RESIZE_BY];
    for (int by = 0; by < gy; ++by)
        for (int bx = 0; bx < gx; ++bx)
            sono_resize_block(src, pitch, channels, r_index, src_w, src_h, mode, scale_x, scale_y, inv_scale_x,
                              inv_scale_y, iscale_x, iscale_y, dst, size, net_out, lut, lut_elem, bx, by, 0, 0, 1,
                              1, ax, ay);
}

// The sono_resize grid, block by block; `src` is the crop's top-left pixel, `pitch` bytes per row.
void harness_resize(const unsigned char* src, int pitch, int channels, int r_index, int src_w, int src_h, int mode,
                    double scale_x, double scale_y, double inv_scale_x, double inv_scale_y, int iscale_x,
                    int iscale_y, unsigned char* dst, int size, void* net_out, const void* lut, int lut_elem)
{
    harness_resize_launch(src, pitch, channels, r_index, src_w, src_h, mode, scale_x, scale_y, inv_scale_x,
                          inv_scale_y, iscale_x, iscale_y, dst, size, net_out, lut, lut_elem,
                          (size + SONO_RESIZE_BX - 1) / SONO_RESIZE_BX, (size + SONO_RESIZE_BY - 1) / SONO_RESIZE_BY);
}

// One sono_crimmins launch (one iteration) over a gx x gy grid: every block in its own `smem_bytes` of shared
// memory, poisoned first (and before each pass) when `poison` is set.
void harness_crimmins_launch(const unsigned char* src, unsigned char* dst, int h, int w, int tile, void* net_out,
                             const void* lut, int lut_elem, int gx, int gy, int smem_bytes, int poison)
{
    g_poison = poison;
    std::vector<unsigned char> smem(smem_bytes > 0 ? smem_bytes : 1);
    for (int by = 0; by < gy; ++by)
        for (int bx = 0; bx < gx; ++bx) {
            sono_host_poison(smem.data(), smem_bytes);
            sono_crimmins_block(src, dst, h, w, tile, bx, by, 0, 0, 1, 1, smem.data(), net_out, lut, lut_elem);
        }
    g_poison = 0;
}

int harness_crimmins_smem_bytes(int h, int w, int tile) { return sono_crimmins_smem_bytes(h, w, tile); }

// `iterations` launches of the sono_crimmins grid, ping-ponging through a scratch image like kernels.py does;
// every block runs with ntx = nty = 1 in its own (freshly poisoned) shared-memory buffer.
void harness_crimmins(const unsigned char* src, unsigned char* dst, int h, int w, int tile, int iterations,
                      int poison, void* net_out, const void* lut, int lut_elem)
{
    g_poison = poison;
    int smem_bytes = sono_crimmins_smem_bytes(h, w, tile);
    std::vector<unsigned char> smem(smem_bytes), a((size_t)h * w), b((size_t)h * w);
    memcpy(a.data(), src, (size_t)h * w);
    if (iterations == 0) memcpy(dst, src, (size_t)h * w);
    int gx = (w + tile - 1) / tile, gy = (h + tile - 1) / tile;
    for (int it = 0; it < iterations; ++it) {
        unsigned char* out = it == iterations - 1 ? dst : b.data();
        for (int by = 0; by < gy; ++by)
            for (int bx = 0; bx < gx; ++bx) {
                sono_host_poison(smem.data(), smem_bytes);
                sono_crimmins_block(a.data(), out, h, w, tile, bx, by, 0, 0, 1, 1, smem.data(),
                                    it == iterations - 1 ? net_out : 0, lut, lut_elem);
            }
        if (out != dst) a.swap(b);
    }
    g_poison = 0;
}

// One sono_gate launch: gx blocks of bdx threads; each block counts its mask bits (__syncthreads_count) and
// hands the count to sono_gate_block_done, as the block's thread 0 does.
void harness_gate_launch(const void* prob, int prob_half, float threshold, const unsigned char* image, int n,
                         unsigned char* mask, void* vgg_out, int channels, const void* lut, int lut_elem,
                         unsigned int* counter, unsigned int* result, int gx, int bdx)
{
    for (int b = 0; b < gx; ++b) {
        unsigned int count = 0;
        for (int t = 0; t < bdx; ++t) {
            long long i = (long long)b * bdx + t;
            if (i < n)
                count += (unsigned int)sono_gate_pixel(prob, prob_half, threshold, image, n, mask, vgg_out, channels,
                                                       lut, lut_elem, i);
        }
        sono_gate_block_done(counter, result, count, (unsigned int)gx);
    }
}

// The sono_gate grid; returns the mask count the reduction would produce.
long long harness_gate(const void* prob, int prob_half, float threshold, const unsigned char* image, int n,
                       unsigned char* mask, void* vgg_out, int channels, const void* lut, int lut_elem)
{
    long long count = 0;
    for (int i = 0; i < n; ++i)
        count += sono_gate_pixel(prob, prob_half, threshold, image, n, mask, vgg_out, channels, lut, lut_elem, i);
    return count;
}

void harness_half_to_float(const unsigned short* bits, float* out, int n)
{
    for (int i = 0; i < n; ++i) out[i] = sono_half_to_float(bits[i]);
}

int harness_crimmins_reach(int pass, int axis) { return sono_crimmins_reach(pass, axis); }

// One sono_minmax launch of one block of `nt` threads, phase by phase as the barriers separate them: every thread's
// partial min/max, then each pairwise step for every thread, then every thread's writes.
void harness_minmax_launch(const unsigned char* image, const unsigned char* mask, int n, void* out, int channels,
                           const float* unit, int elem, int nt)
{
    std::vector<int> lo(nt), hi(nt);
    for (int t = 0; t < nt; ++t) sono_minmax_partial(image, mask, n, t, nt, lo.data(), hi.data());
    for (int stride = 1; stride < nt; stride *= 2)
        for (int t = 0; t < nt; ++t) sono_minmax_combine(lo.data(), hi.data(), t, nt, stride);
    for (int t = 0; t < nt; ++t) sono_minmax_write(image, mask, n, out, channels, unit, elem, lo[0], hi[0], t, nt);
}

void harness_float_to_half(const float* in, unsigned short* out, long long n)
{
    for (long long i = 0; i < n; ++i) out[i] = sono_float_to_half(in[i]);
}

}  // extern "C"
