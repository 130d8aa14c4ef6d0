#pragma once
// Where one sampling point lands in one feature level: which pixels it reads and with what weights.
// This is the single home of the sampling math; the CPU and CUDA kernels both include it, so the two
// can only differ in how they schedule work. docs/semantics.md states the contract implemented here.
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RTDETRV2_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced inline so that CPU kernels compiled for several ISAs get this math in each version.
#define RTDETRV2_HOST_DEVICE inline __attribute__((always_inline))
#else
#define RTDETRV2_HOST_DEVICE inline
#endif

namespace rtdetrv2_kernels {

// floor() for |x| < 2^31. Truncation plus a correction avoids a libm call where the baseline ISA has no
// rounding instruction (x86-64 without SSE4.1).
template <typename acc_t>
RTDETRV2_HOST_DEVICE int32_t floor_to_int(acc_t x) {
  const int32_t truncated = static_cast<int32_t>(x);
  return truncated - (x < static_cast<acc_t>(truncated) ? 1 : 0);
}

// The four pixels read by a bilinear sample, in the order (x0, y0), (x0+1, y0), (x0, y0+1), (x0+1, y0+1).
// A corner outside the level reads nothing: inside[k] is false and its weight and derivatives are zero.
template <typename acc_t>
struct BilinearCorners {
  int32_t offset[4];    // y * width + x within the level; only meaningful where inside[k]
  bool inside[4];
  acc_t weight[4];
  acc_t dweight_dx[4];  // derivative of weight[k] with respect to the pixel coordinate x
  acc_t dweight_dy[4];
};

// grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) at the normalized location
// (loc_x, loc_y): pixel centers sit at (i + 0.5) / size.
template <typename acc_t>
RTDETRV2_HOST_DEVICE BilinearCorners<acc_t> bilinear_corners(acc_t loc_x, acc_t loc_y, int32_t height,
                                                             int32_t width) {
  BilinearCorners<acc_t> corners;
  const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  // Outside [-1, size) no corner can carry weight or gradient. The test is written so that NaN fails it,
  // which also keeps the float-to-int conversions below away from non-finite and huge values.
  const bool near_level = x >= acc_t(-1) && x < static_cast<acc_t>(width) && y >= acc_t(-1) &&
                          y < static_cast<acc_t>(height);
  const int32_t x0 = near_level ? floor_to_int(x) : -2;
  const int32_t y0 = near_level ? floor_to_int(y) : -2;
  const acc_t fx = x - static_cast<acc_t>(x0);
  const acc_t fy = y - static_cast<acc_t>(y0);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int dx = k & 1;
    const int dy = k >> 1;
    const int32_t cx = x0 + dx;
    const int32_t cy = y0 + dy;
    const bool inside = near_level && cx >= 0 && cx < width && cy >= 0 && cy < height;
    const acc_t wx = dx ? fx : acc_t(1) - fx;
    const acc_t wy = dy ? fy : acc_t(1) - fy;
    corners.inside[k] = inside;
    corners.offset[k] = inside ? cy * width + cx : 0;
    corners.weight[k] = inside ? wx * wy : acc_t(0);
    corners.dweight_dx[k] = inside ? (dx ? wy : -wy) : acc_t(0);
    corners.dweight_dy[k] = inside ? (dy ? wx : -wx) : acc_t(0);
  }
  return corners;
}

// Nearest pixel index along one axis, floor(loc * size + 0.5) clamped into [0, size - 1];
// -1 for NaN and for an empty axis (the sample reads nothing).
template <typename acc_t>
RTDETRV2_HOST_DEVICE int32_t nearest_clamped_index(acc_t loc, int32_t size) {
  const acc_t t = loc * static_cast<acc_t>(size) + acc_t(0.5);
  // size <= 0: a level the CUDA kernels found invalid in a device-resident table (they give it size 0).
  if (!(t == t) || size <= 0) return -1;
  // Clamped in floating point, so infinities and huge values never reach the int conversion; in between,
  // t is in [1, size - 1) where truncation is the floor.
  if (t < acc_t(1)) return 0;
  if (t >= static_cast<acc_t>(size - 1)) return size - 1;
  return static_cast<int32_t>(t);
}

// method="discrete": the one pixel read by a sample, as y * width + x within the level, or -1.
template <typename acc_t>
RTDETRV2_HOST_DEVICE int32_t discrete_offset(acc_t loc_x, acc_t loc_y, int32_t height, int32_t width) {
  const int32_t x = nearest_clamped_index(loc_x, width);
  const int32_t y = nearest_clamped_index(loc_y, height);
  return (x < 0 || y < 0) ? -1 : y * width + x;
}

}  // namespace rtdetrv2_kernels
