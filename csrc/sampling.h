#pragma once
// Where one sampling point lands in one feature level: which pixels it reads and with what weights.
// This is the single home of the sampling math; the CPU and CUDA kernels both include it, so the two
// can only differ in how they schedule work. docs/semantics.md states the contract implemented here.
#include <cstdint>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RTDETRV2_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced inline so that CPU kernels compiled for several ISAs get this math in each version.
#define RTDETRV2_HOST_DEVICE inline __attribute__((always_inline))
#else
#define RTDETRV2_HOST_DEVICE inline
#endif

namespace rtdetrv2_kernels {

// The bilinear math below is written once for two kinds of arguments: scalars (acc_t, int32_t), as the CUDA
// kernels call it, and GCC/Clang vector types, with which the CPU kernels place a bundle of points at once.
// Comparisons give bool for scalars and lane masks for vectors; both select with ?: and combine with &, and
// these two helpers cover what the two kinds spell differently.
template <typename T, typename = void>
struct LaneOf {
  using type = T;
};
#if !defined(__CUDACC__) && !defined(__HIPCC__)
template <typename T>
struct LaneOf<T, std::void_t<decltype(std::declval<T>()[0])>> {
  using type = std::decay_t<decltype(std::declval<T>()[0])>;
};
#endif

// Lane-wise conversion between the real and the integer type.
template <typename To, typename From>
RTDETRV2_HOST_DEVICE To convert_to(From x) {
#if !defined(__CUDACC__) && !defined(__HIPCC__)
  if constexpr (!std::is_arithmetic_v<From>) {
    return __builtin_convertvector(x, To);
  } else {
    return static_cast<To>(x);
  }
#else
  return static_cast<To>(x);
#endif
}

// floor() for |x| < 2^31. Truncation plus a correction avoids a libm call where the baseline ISA has no
// rounding instruction (x86-64 without SSE4.1).
template <typename Int, typename Real>
RTDETRV2_HOST_DEVICE Int floor_to_int(Real x) {
  using int_t = typename LaneOf<Int>::type;
  const Int truncated = convert_to<Int>(x);
  return truncated - (x < convert_to<Real>(truncated) ? int_t(1) : int_t(0));
}

// The four pixels read by a bilinear sample, in the order (x0, y0), (x0+1, y0), (x0, y0+1), (x0+1, y0+1).
// A corner outside the level reads nothing: inside[k] is false and its weight and derivatives are zero.
template <typename Real, typename Int = int32_t>
struct BilinearCorners {
  using Mask = decltype(Real() < Real());  // bool, or a vector of lane masks
  Int offset[4];  // y * width + x within the level; only meaningful where inside[k]
  Mask inside[4];
  Real weight[4];
  Real dweight_dx[4];  // derivative of weight[k] with respect to the pixel coordinate x
  Real dweight_dy[4];
};

// grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) at the normalized location
// (loc_x, loc_y): pixel centers sit at (i + 0.5) / size.
template <typename Real, typename Int>
RTDETRV2_HOST_DEVICE BilinearCorners<Real, Int> bilinear_corners(Real loc_x, Real loc_y, Int height, Int width) {
  using acc_t = typename LaneOf<Real>::type;
  using int_t = typename LaneOf<Int>::type;
  BilinearCorners<Real, Int> corners;
  const Real x = loc_x * convert_to<Real>(width) - acc_t(0.5);
  const Real y = loc_y * convert_to<Real>(height) - acc_t(0.5);
  // Outside [-1, size) no corner can carry weight or gradient. The test is written so that NaN fails it,
  // and the coordinates it fails are replaced before any float-to-int conversion, which therefore never
  // sees non-finite or huge values.
  const auto near_level = (x >= acc_t(-1)) & (x < convert_to<Real>(width)) & (y >= acc_t(-1)) &
                          (y < convert_to<Real>(height));
  const Int x0 = floor_to_int<Int>(near_level ? x : acc_t(-2));
  const Int y0 = floor_to_int<Int>(near_level ? y : acc_t(-2));
  const Real fx = x - convert_to<Real>(x0);
  const Real fy = y - convert_to<Real>(y0);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int_t dx = k & 1;
    const int_t dy = k >> 1;
    const Int cx = x0 + dx;
    const Int cy = y0 + dy;
    const auto inside = near_level & (cx >= int_t(0)) & (cx < width) & (cy >= int_t(0)) & (cy < height);
    const Real wx = dx ? fx : acc_t(1) - fx;
    const Real wy = dy ? fy : acc_t(1) - fy;
    corners.inside[k] = inside;
    // The coordinates are selected before the product: a vector computes it in every lane, and outside the
    // level it could overflow.
    corners.offset[k] = (inside ? cy : int_t(0)) * width + (inside ? cx : int_t(0));
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
