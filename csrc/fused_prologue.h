#pragma once
// The fused op's prologue and its chain rule (docs/semantics.md, "The fused op"), per (batch, query, head):
// the softmax of the head's P attention logits, and each point's location from its reference row and raw
// offset. Like sampling.h, the single home of this math: the CPU and CUDA kernels both include it.
#include <cmath>
#include <cstdint>

#include "sampling.h"

namespace rtdetrv2_kernels {

template <typename acc_t>
RTDETRV2_HOST_DEVICE acc_t exponential(acc_t x) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == 4) {
    return ::expf(x);
  } else {
    return ::exp(x);
  }
#else
  return std::exp(x);
#endif
}

// The order in which a lane walks a (batch, query, head)'s points, round r taking point r, or with
// kLastLevelFirst point P - 1 - r, so that the levels come last to first. In the family's layout (finest level
// first) a forward launch then reads the small coarse levels, which many queries share, while all its queries
// are at them together, and the large finest level last: in GPGPU-Sim's RTX 3070 model (4 MB L2) that read
// a third less from DRAM at RT-DETRv2's decoder, where in level order the finest level's rows pushed the
// coarse ones out of the L2 between their uses. The backward keeps level order: there the L2 also holds
// grad_value's atomics, and the V100 model wrote more of them back to DRAM the other way (bench/results/
// gpusim-2026-12-07). Rounds past the points give a point >= P (not real) and leave the level valid.
// Levels: anything with indexable per-level point counts.
template <bool kLastLevelFirst, typename Levels>
struct PointWalk {
  const Levels& levels;
  int32_t num_levels, points, level;
  int32_t bound;  // where the level's points end (in level order) or begin (last level first)

  RTDETRV2_HOST_DEVICE PointWalk(const Levels& levels_, int32_t num_levels_, int32_t points_)
      : levels(levels_),
        num_levels(num_levels_),
        points(points_),
        level(kLastLevelFirst ? num_levels_ - 1 : 0),
        bound(kLastLevelFirst ? points_ - static_cast<int32_t>(levels_.points[num_levels_ - 1])
                              : static_cast<int32_t>(levels_.points[0])) {}

  RTDETRV2_HOST_DEVICE int32_t point(int32_t r) const {
    return kLastLevelFirst && r < points ? points - 1 - r : r;
  }

  // Moves to point p's level (p moves one way only); whether the level changed.
  RTDETRV2_HOST_DEVICE bool seek(int32_t p) {
    const int32_t before = level;
    if constexpr (kLastLevelFirst) {
      while (p < bound && level > 0) bound -= static_cast<int32_t>(levels.points[--level]);
    } else {
      while (p >= bound && level + 1 < num_levels) bound += static_cast<int32_t>(levels.points[++level]);
    }
    return level != before;
  }
};

// The fused op's inputs, all contiguous: reference_points (B, Q, R, K) with R = 1 or L rows and K = 4
// (boxes cx, cy, w, h) or 2 (points x, y), sampling_offsets (B, Q, H, P, 2), attention_logits (B, Q, H, P).
// Levels is the caller's level table: anything with indexable points, height and width per level.
template <typename scalar_t, typename acc_t, typename Levels>
struct FusedPrologue {
  const scalar_t* reference;
  const scalar_t* offsets;
  const scalar_t* logits;
  int64_t heads, points, reference_rows, reference_size;
  acc_t offset_scale;
  int64_t num_levels;
  const Levels& levels;

  RTDETRV2_HOST_DEVICE const scalar_t* reference_row(int64_t bqh, int64_t level) const {
    return reference + ((bqh / heads) * reference_rows + (reference_rows > 1 ? level : 0)) * reference_size;
  }

  // d loc / d offset along x and y on a level, less the reference box size for boxes.
  RTDETRV2_HOST_DEVICE void offset_factors(int64_t level, acc_t& factor_x, acc_t& factor_y) const {
    if (reference_size == 4) {
      factor_x = factor_y = offset_scale / static_cast<acc_t>(levels.points[level]);
    } else {
      factor_x = acc_t(1) / static_cast<acc_t>(levels.width[level]);
      factor_y = acc_t(1) / static_cast<acc_t>(levels.height[level]);
    }
  }

  // The softmax's shift (the largest logit) and normalizer (the sum of exp(logit - shift)) of bqh.
  RTDETRV2_HOST_DEVICE void softmax_stats(int64_t bqh, acc_t& largest, acc_t& total) const {
    const scalar_t* row = logits + bqh * points;
    largest = static_cast<acc_t>(row[0]);
    for (int64_t p = 1; p < points; ++p) {
      const acc_t logit = static_cast<acc_t>(row[p]);
      largest = logit > largest ? logit : largest;
    }
    total = 0;
    for (int64_t p = 0; p < points; ++p) total += exponential(static_cast<acc_t>(row[p]) - largest);
  }

  // Calls f(level, point, weight, loc_x, loc_y) for each point of bqh, levels in order.
  template <typename F>
  RTDETRV2_HOST_DEVICE void visit(int64_t bqh, const F& f) const {
    visit<false>(bqh, 0, 1, static_cast<int32_t>(points), f);
  }

  // The same for `rounds` of the points first, first + stride, ... in PointWalk's order: a lane's share when
  // several lanes split bqh's points. Rounds past the points call f(a valid level, p >= points, 0, 0, 0), so
  // that every lane of a group can make the same calls. One call site, reached once per round whatever the
  // level: lanes that combine their results with warp shuffles inside f reach those shuffles together.
  template <bool kLastLevelFirst, typename F>
  RTDETRV2_HOST_DEVICE void visit(int64_t bqh, int32_t first, int32_t stride, int32_t rounds, const F& f) const {
    acc_t largest, total;
    softmax_stats(bqh, largest, total);
    const scalar_t* logit_row = logits + bqh * points;
    const scalar_t* offset_row = offsets + 2 * bqh * points;
    PointWalk<kLastLevelFirst, Levels> walk(levels, static_cast<int32_t>(num_levels), static_cast<int32_t>(points));
    acc_t factor_x, factor_y, ref_x, ref_y;
    const auto enter_level = [&] {
      offset_factors(walk.level, factor_x, factor_y);
      const scalar_t* ref = reference_row(bqh, walk.level);
      ref_x = static_cast<acc_t>(ref[0]);
      ref_y = static_cast<acc_t>(ref[1]);
      if (reference_size == 4) {  // boxes: offsets scale with the box size
        factor_x *= static_cast<acc_t>(ref[2]);
        factor_y *= static_cast<acc_t>(ref[3]);
      }
    };
    walk.seek(walk.point(first));  // the lane's first level: no reference row read for a level it skips
    enter_level();
    for (int32_t round = 0, r = first; round < rounds; ++round, r += stride) {
      const int32_t p = walk.point(r);
      if (walk.seek(p)) enter_level();
      const bool real = p < points;
      const acc_t weight = real ? exponential(static_cast<acc_t>(logit_row[p]) - largest) / total : acc_t(0);
      const acc_t loc_x = real ? ref_x + static_cast<acc_t>(offset_row[2 * p]) * factor_x : acc_t(0);
      const acc_t loc_y = real ? ref_y + static_cast<acc_t>(offset_row[2 * p + 1]) * factor_y : acc_t(0);
      f(walk.level, p, weight, loc_x, loc_y);
    }
  }

  // From the gradients of bqh's weights (grad_weight[P]) and locations (grad_location[2P], (x, y) pairs),
  // writes those of its logits and offsets, and its head's share of the reference gradient into
  // grad_reference, the (R, K) block of a (B, Q, H, R, K) buffer. grad_location is null where the locations
  // pass no gradient (discrete sampling): offsets and references then get exact zeros, also where the chain
  // rule would multiply a zero by an infinite or NaN offset or box size.
  RTDETRV2_HOST_DEVICE void backpropagate(int64_t bqh, const acc_t* grad_weight, const acc_t* grad_location,
                                          scalar_t* grad_logits, scalar_t* grad_offsets,
                                          acc_t* grad_reference) const {
    acc_t largest, total;
    softmax_stats(bqh, largest, total);
    const int64_t first = bqh * points;
    acc_t expected = 0;  // softmax backward: grad_logit = w * (grad_w - sum_j w_j grad_w_j)
    for (int64_t p = 0; p < points; ++p) {
      expected += exponential(static_cast<acc_t>(logits[first + p]) - largest) / total * grad_weight[p];
    }
    for (int64_t p = 0; p < points; ++p) {
      const acc_t weight = exponential(static_cast<acc_t>(logits[first + p]) - largest) / total;
      grad_logits[first + p] = static_cast<scalar_t>(weight * (grad_weight[p] - expected));
    }
    for (int64_t i = 0; i < reference_rows * reference_size; ++i) grad_reference[i] = acc_t(0);
    if (grad_location == nullptr) {
      for (int64_t i = 2 * first; i < 2 * (first + points); ++i) grad_offsets[i] = scalar_t(0);
      return;
    }
    int64_t p = 0;
    for (int64_t level = 0; level < num_levels; ++level) {
      acc_t factor[2];
      offset_factors(level, factor[0], factor[1]);
      const scalar_t* ref = reference_row(bqh, level);
      acc_t* grad_ref = grad_reference + (reference_rows > 1 ? level : 0) * reference_size;
      for (int64_t i = 0; i < static_cast<int64_t>(levels.points[level]); ++i, ++p) {
        for (int axis = 0; axis < 2; ++axis) {
          const acc_t g = grad_location[2 * p + axis];
          const acc_t offset = static_cast<acc_t>(offsets[2 * (first + p) + axis]);
          grad_ref[axis] += g;
          if (reference_size == 4) {
            grad_offsets[2 * (first + p) + axis] = static_cast<scalar_t>(g * factor[axis] * static_cast<acc_t>(ref[2 + axis]));
            grad_ref[2 + axis] += g * factor[axis] * offset;
          } else {
            grad_offsets[2 * (first + p) + axis] = static_cast<scalar_t>(g * factor[axis]);
          }
        }
      }
    }
  }
};

}  // namespace rtdetrv2_kernels
