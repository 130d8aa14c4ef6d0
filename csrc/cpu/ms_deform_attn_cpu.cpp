// C++ CPU kernels for multi-scale deformable attention, forward and backward, both sampling methods.
//
// Forward is parallel over (batch, head, query): every output row is written by exactly one task. Where a
// head's rows are read often enough, it samples a copy of them with a border of zeros (StagedHead).
// Backward is parallel over (batch, head): the rows of grad_value that one (batch, head) pair can touch are
// disjoint from every other pair's, so the scatter needs no atomics and no per-thread copies of grad_value,
// and the result is bitwise reproducible for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../fused_prologue.h"
#include "../ms_deform_attn.h"
#include "../sampling.h"
#include "buffer_pool.h"

namespace rtdetrv2_kernels {
namespace {

// The hot loops are compiled twice on x86-64 Linux with GCC, for the baseline ISA and for x86-64-v3
// (AVX2 + FMA), and the loader picks the best one for the running CPU. Other platforms get one build.
// Helpers they call are forced inline so that they are compiled into each version.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define RTDETRV2_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RTDETRV2_CPU_MULTIVERSION
#endif
#if defined(__GNUC__)
#define RTDETRV2_INLINE inline __attribute__((always_inline))
// The same for lambdas: one that is called rather than inlined is a single function built for the baseline
// ISA, so a multiversioned function's lambdas are all forced inline (the backward's per-C dispatch was not,
// and ran without AVX2 and FMA for every C but 16, 32, 48 and 64).
#define RTDETRV2_LAMBDA_INLINE __attribute__((always_inline))
#else
#define RTDETRV2_INLINE inline
#define RTDETRV2_LAMBDA_INLINE
#endif
// The loop that follows writes no memory that it reads.
#if defined(__clang__)
#define RTDETRV2_DISJOINT _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define RTDETRV2_DISJOINT _Pragma("GCC ivdep")
#else
#define RTDETRV2_DISJOINT
#endif

// Explicit SIMD through the GCC/Clang vector extension: 32-byte bundles of acc_t that compile to SSE2 or
// AVX on x86-64 and to NEON on ARM without intrinsics.
template <typename acc_t, int kBytes = 32>
struct Simd {
  typedef acc_t Vec __attribute__((vector_size(kBytes)));
  static constexpr int64_t kLanes = kBytes / sizeof(acc_t);

  template <typename scalar_t>
  RTDETRV2_INLINE static Vec load(const scalar_t* p) {
    Vec v;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(&v, p, sizeof(Vec));
    } else {
      for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<acc_t>(p[i]);
    }
    return v;
  }
  template <typename scalar_t>
  RTDETRV2_INLINE static void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(p, &v, sizeof(Vec));
    } else {
      for (int64_t i = 0; i < kLanes; ++i) p[i] = static_cast<scalar_t>(v[i]);
    }
  }
  // Pairwise, halving the width each step: compiles to a few shuffles and adds, not a serial chain.
  RTDETRV2_INLINE static acc_t sum(Vec v) {
    for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
      for (int64_t i = 0; i < width; ++i) v[i] += v[i + width];
    }
    return v[0];
  }
};

// Half a bundle (16 bytes: 4 fp32 channels): the last channels of a row whose C is not a whole number of
// bundles (DEIMv2's C = 12, 14, 28) take one of these before any are left one by one.
template <typename acc_t>
using HalfSimd = Simd<acc_t, 16>;

// The lanes of a and b picked by kIndex (0 to kLanes - 1 from a, kLanes to 2 kLanes - 1 from b).
template <int... kIndex, typename Vec>
RTDETRV2_INLINE Vec shuffle(const Vec& a, const Vec& b) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, kIndex...);
#else
  typedef int32_t Index __attribute__((vector_size(sizeof(int32_t) * sizeof...(kIndex))));
  return __builtin_shuffle(a, b, Index{kIndex...});
#endif
}

// Lane j of the result is the sum of the lanes of vector j of the kLanes vectors stored at data. At 8 fp32
// lanes, pairs of vectors are folded by adding neighbouring lanes within each 16 bytes (as AVX's hadd does),
// twice, then the two halves are added: 21 instructions for the 8 sums, where a horizontal sum takes about 7.
template <typename acc_t>
RTDETRV2_INLINE typename Simd<acc_t>::Vec lane_sums(const acc_t* data) {
  using S = Simd<acc_t>;
  using Vec = typename S::Vec;
  Vec v[S::kLanes];
  for (int64_t j = 0; j < S::kLanes; ++j) v[j] = S::load(data + j * S::kLanes);
  if constexpr (S::kLanes == 8 && sizeof(acc_t) == sizeof(int32_t)) {
    auto add_neighbours = [](const Vec& a, const Vec& b) RTDETRV2_LAMBDA_INLINE {
      return shuffle<0, 2, 8, 10, 4, 6, 12, 14>(a, b) + shuffle<1, 3, 9, 11, 5, 7, 13, 15>(a, b);
    };
    // low: lanes 0-3 hold the sums of the first halves of v[0..3], lanes 4-7 those of their second halves.
    const Vec low = add_neighbours(add_neighbours(v[0], v[1]), add_neighbours(v[2], v[3]));
    const Vec high = add_neighbours(add_neighbours(v[4], v[5]), add_neighbours(v[6], v[7]));
    return shuffle<0, 1, 2, 3, 8, 9, 10, 11>(low, high) + shuffle<4, 5, 6, 7, 12, 13, 14, 15>(low, high);
  } else {
    Vec sums;
    for (int64_t j = 0; j < S::kLanes; ++j) sums[j] = S::sum(v[j]);
    return sums;
  }
}

// Rows are requested before they are used, one request per 128 bytes: the L2's adjacent-line prefetcher
// brings the other 64-byte line of each 128-byte pair, and a request per line clogged the miss queue.
// prefetch_row_start requests a row's first 128 bytes, as soon as the row is known (all of a C=32 fp32 row);
// longer rows get the rest from PointBatch::prefetch_rows_rest once a batch of tasks is listed. Faster than
// both a request per line and none (bench/results/cpu-kernel-design/, "Prefetching").
template <bool kForWrite = false, typename T>
RTDETRV2_INLINE void prefetch_row_start(const T* row) {
#if defined(__GNUC__)
  __builtin_prefetch(row, kForWrite);
  // GCC deletes a loop whose body is only prefetches (they have no side effects); this empty statement,
  // which does, keeps the loops over a row's bytes in prefetch_rows_rest.
  asm volatile("" : : "r"(row));
#endif
}
// Requests every 64-byte line of count elements from data: for the short per-query inputs (a few lines each),
// where a request per line costs little, unlike the many rows above.
template <typename T>
RTDETRV2_INLINE void prefetch_span(const T* data, int64_t count) {
  if (count <= 0) return;
  const char* bytes = reinterpret_cast<const char*>(data);
  const int64_t last = count * int64_t(sizeof(T)) - 1;
  for (int64_t offset = 0; offset < last; offset += 64) prefetch_row_start(bytes + offset);
  prefetch_row_start(bytes + last);
}

// Calls f(std::integral_constant<int64_t, n>{}) where n is one of kValues, else
// f(std::integral_constant<int64_t, 0>{}): code for the common counts, with every loop over them unrolled.
template <int64_t... kValues, typename F>
RTDETRV2_INLINE void dispatch_constant(int64_t n, const F& f) {
  const bool named = ((n == kValues && (f(std::integral_constant<int64_t, kValues>{}), true)) || ...);
  if (!named) f(std::integral_constant<int64_t, 0>{});
}

// Where a kernel's per-point inputs come from, and where the gradients of those inputs go. Each fills the
// acc_t buffers of one (batch, query, head): x[P], y[P] and weight[P]; and takes their gradients back as
// grad_loc[2P], (x, y) pairs, and grad_weight[P]. PlainPoints reads and writes the plain op's sampling_locations and
// attention_weights; FusedPoints derives them from reference points, raw offsets and raw logits.
template <typename scalar_t>
struct PlainPoints {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t points;
  const scalar_t* locations;  // contiguous (B, Q, H, P, 2)
  const scalar_t* weights;    // contiguous (B, Q, H, P)
  scalar_t* grad_locations = nullptr;
  scalar_t* grad_weights = nullptr;

  RTDETRV2_INLINE void prefetch(int64_t bqh) const {
    prefetch_span(locations + 2 * bqh * points, 2 * points);
    prefetch_span(weights + bqh * points, points);
  }
  // These copies are short (2 to 16 points) and never overlap: they are marked so (RTDETRV2_DISJOINT), which
  // spares the vectorized loop its run-time overlap checks; restrict pointers would instead let GCC turn
  // the fp32 copies into calls to memcpy, slower at this size. The family's counts of points per head
  // (RF-DETR 2, DEIMv2's small models 6, LW-DETR 8, RT-DETRv2 and D-FINE 12, the Deformable-DETR encoder 16)
  // get loops of constant count, which the compiler unrolls (a run-time count cost about 9 instructions per point).
  // load_tasks reads `tasks` consecutive tasks' inputs, the first of (batch, query, head) bqh and the others
  // `stride` apart, into runs of P, under one dispatch on the count: 128 -> 111 instructions a task in
  // rfdetr-nano-train-b4's staged forward, against a load and its dispatch a task.
  RTDETRV2_INLINE void load_tasks(int64_t bqh, int64_t stride, int64_t tasks, acc_t* x, acc_t* y,
                                  acc_t* weight) const {
    auto copy = [&](auto count) RTDETRV2_LAMBDA_INLINE {
      const int64_t n = decltype(count)::value > 0 ? int64_t(decltype(count)::value) : points;
      for (int64_t t = 0; t < tasks; ++t) {
        const scalar_t* location = locations + 2 * (bqh + t * stride) * points;
        const scalar_t* attention = weights + (bqh + t * stride) * points;
        RTDETRV2_DISJOINT
        for (int64_t i = 0; i < n; ++i) {
          x[t * n + i] = static_cast<acc_t>(location[2 * i]);
          y[t * n + i] = static_cast<acc_t>(location[2 * i + 1]);
          weight[t * n + i] = static_cast<acc_t>(attention[i]);
        }
      }
    };
    dispatch_constant<2, 6, 8, 12, 16>(points, copy);
  }
  RTDETRV2_INLINE void load(int64_t bqh, acc_t* x, acc_t* y, acc_t* weight) const {
    load_tasks(bqh, 0, 1, x, y, weight);
  }
  RTDETRV2_INLINE void store_gradients(int64_t bqh, const acc_t* grad_loc, const acc_t* grad_weight) const {
    scalar_t* grad_location = grad_locations + 2 * bqh * points;
    scalar_t* grad_attention = grad_weights + bqh * points;
    RTDETRV2_DISJOINT
    for (int64_t i = 0; i < points; ++i) {
      grad_location[2 * i] = grad_loc ? static_cast<scalar_t>(grad_loc[2 * i]) : scalar_t(0);
      grad_location[2 * i + 1] = grad_loc ? static_cast<scalar_t>(grad_loc[2 * i + 1]) : scalar_t(0);
      grad_attention[i] = static_cast<scalar_t>(grad_weight[i]);
    }
  }
};

// The fused op: locations and weights from reference points, raw offsets and raw logits (fused_prologue.h).
template <typename scalar_t>
struct FusedPoints {
  using acc_t = at::opmath_type<scalar_t>;
  FusedPrologue<scalar_t, acc_t, LevelTable> prologue;
  int64_t points;
  acc_t* grad_reference = nullptr;  // (B, Q, H, R, K): per head, summed over heads by the caller
  scalar_t* grad_offsets = nullptr;
  scalar_t* grad_logits = nullptr;

  FusedPoints(const LevelTable& levels, int64_t heads, const at::Tensor& reference, const at::Tensor& offsets,
              const at::Tensor& logits, double offset_scale)
      : prologue{reference.const_data_ptr<scalar_t>(), offsets.const_data_ptr<scalar_t>(),
                 logits.const_data_ptr<scalar_t>(), heads, logits.size(3), reference.size(2), reference.size(3),
                 static_cast<acc_t>(offset_scale), levels.num_levels(), levels},
        points(logits.size(3)) {}

  RTDETRV2_INLINE void prefetch(int64_t bqh) const {
    prefetch_span(prologue.offsets + 2 * bqh * points, 2 * points);
    prefetch_span(prologue.logits + bqh * points, points);
  }
  RTDETRV2_INLINE void load(int64_t bqh, acc_t* x, acc_t* y, acc_t* weight) const {
    prologue.visit(bqh, [&](int64_t, int64_t p, acc_t w, acc_t loc_x, acc_t loc_y) RTDETRV2_LAMBDA_INLINE {
      weight[p] = w;
      x[p] = loc_x;
      y[p] = loc_y;
    });
  }
  RTDETRV2_INLINE void load_tasks(int64_t bqh, int64_t stride, int64_t tasks, acc_t* x, acc_t* y,
                                  acc_t* weight) const {
    for (int64_t t = 0; t < tasks; ++t) load(bqh + t * stride, x + t * points, y + t * points, weight + t * points);
  }
  RTDETRV2_INLINE void store_gradients(int64_t bqh, const acc_t* grad_loc, const acc_t* grad_weight) const {
    prologue.backpropagate(bqh, grad_weight, grad_loc, grad_logits, grad_offsets,
                           grad_reference + bqh * prologue.reference_rows * prologue.reference_size);
  }
};

// Everything a kernel reads, with value's strides in elements: row (b, s, h) of C contiguous channels
// starts at value + b*batch_stride + s*row_stride + h*head_stride. Points supplies the per-point inputs.
template <typename scalar_t, typename Points>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  const LevelTable& levels;
  const Points& source;
  int64_t batch, rows, queries, heads, channels, points;
  int64_t batch_stride, row_stride, head_stride;
  const scalar_t* value;

  Problem(const LevelTable& table, const Points& points_source, const at::Tensor& value_t, int64_t queries_)
      : levels(table), source(points_source),
        batch(value_t.size(0)), rows(value_t.size(1)), queries(queries_), heads(value_t.size(2)),
        channels(value_t.size(3)), points(points_source.points),
        batch_stride(value_t.stride(0)), row_stride(value_t.stride(1)), head_stride(value_t.stride(2)),
        value(value_t.const_data_ptr<scalar_t>()) {}

  // The first row of (batch b, head h).
  const scalar_t* value_rows(int64_t b, int64_t h) const { return value + b * batch_stride + h * head_stride; }
};

// The rows one sampling point reads (4 for bilinear, 1 for discrete).
template <bool kDiscrete>
constexpr int64_t kTapsPerPoint = kDiscrete ? 1 : 4;

// Where tap k of point p sits in a PointBatch's tap lists: bundle by bundle of kLanes points, and within a
// bundle corner by corner, so that placing a bundle stores whole vectors.
// p is never negative: unsigned, the division and remainder by the power of two kLanes are a shift and a mask
// (signed, they need sign corrections, a dozen instructions per point).
template <int64_t kLanes, int64_t kTaps>
RTDETRV2_INLINE int64_t tap_index(int64_t p, int64_t k) {
  static_assert((kLanes & (kLanes - 1)) == 0, "a bundle's lanes are a power of two");
  const uint64_t point = static_cast<uint64_t>(p);
  return static_cast<int64_t>(point / kLanes * (kLanes * kTaps) + point % kLanes) + k * kLanes;
}

// Calls f(std::integral_constant<int64_t, C>{}) for the head sizes the family uses (DEIMv2: 8 to 32;
// RT-DETRv2, D-FINE and Deformable-DETR: 32, 256 channels over 8 heads; RF-DETR and LW-DETR: 16) and 48 and
// 64, else f(std::integral_constant<int64_t, 0>{}).
template <typename F>
RTDETRV2_INLINE void dispatch_channels(int64_t C, const F& f) {
  dispatch_constant<8, 12, 14, 16, 24, 28, 32, 48, 64>(C, f);
}

// A row of kChannels acc_t channels held in registers: whole SIMD vectors, then a half vector where at least
// half a vector is left, then single channels. kChannels is known at compile time, so every loop over the
// channels unrolls. Value-initialized, it is zero.
template <typename acc_t, int64_t kChannels>
struct RegisterRow {
  using S = Simd<acc_t>;
  using H = HalfSimd<acc_t>;
  static_assert(kChannels > 0, "the channel count must be known at compile time");
  static constexpr int64_t kVectors = kChannels / S::kLanes;
  static constexpr bool kHalf = kChannels % S::kLanes >= H::kLanes;
  static constexpr int64_t kSinglesFrom = kVectors * S::kLanes + (kHalf ? H::kLanes : 0);
  typename S::Vec vectors[kVectors > 0 ? kVectors : 1];
  typename H::Vec half_vector;
  acc_t singles[kChannels > kSinglesFrom ? kChannels - kSinglesFrom : 1];

  template <typename scalar_t>
  RTDETRV2_INLINE static RegisterRow load(const scalar_t* row) {
    RegisterRow loaded;
    for (int64_t j = 0; j < kVectors; ++j) loaded.vectors[j] = S::load(row + j * S::kLanes);
    if constexpr (kHalf) loaded.half_vector = H::load(row + kVectors * S::kLanes);
    for (int64_t c = kSinglesFrom; c < kChannels; ++c) loaded.singles[c - kSinglesFrom] = static_cast<acc_t>(row[c]);
    return loaded;
  }
  // this += weight * row
  template <typename scalar_t>
  RTDETRV2_INLINE void add_scaled(acc_t weight, const scalar_t* row) {
    for (int64_t j = 0; j < kVectors; ++j) vectors[j] += weight * S::load(row + j * S::kLanes);
    if constexpr (kHalf) half_vector += weight * H::load(row + kVectors * S::kLanes);
    for (int64_t c = kSinglesFrom; c < kChannels; ++c) singles[c - kSinglesFrom] += weight * static_cast<acc_t>(row[c]);
  }
  // out = this + other
  template <typename scalar_t>
  RTDETRV2_INLINE void store_sum(const RegisterRow& other, scalar_t* out) const {
    for (int64_t j = 0; j < kVectors; ++j) S::store(out + j * S::kLanes, vectors[j] + other.vectors[j]);
    if constexpr (kHalf) H::store(out + kVectors * S::kLanes, half_vector + other.half_vector);
    for (int64_t c = kSinglesFrom; c < kChannels; ++c) {
      out[c] = static_cast<scalar_t>(singles[c - kSinglesFrom] + other.singles[c - kSinglesFrom]);
    }
  }
  RTDETRV2_INLINE static constexpr int64_t channels() { return kChannels; }
  RTDETRV2_INLINE static constexpr int64_t num_vectors() { return kVectors; }
  RTDETRV2_INLINE static constexpr bool has_half() { return kHalf; }
  RTDETRV2_INLINE static constexpr int64_t singles_from() { return kSinglesFrom; }
  RTDETRV2_INLINE typename S::Vec vector(int64_t j) const { return vectors[j]; }
  RTDETRV2_INLINE typename H::Vec half() const { return half_vector; }
  RTDETRV2_INLINE acc_t channel(int64_t c) const { return singles[c - kSinglesFrom]; }
};

// Sums the points [first, last) in two accumulators: add_point(p, mine, other) adds point p's taps, its even
// corners to mine and its odd ones to other, and the next point's go the other way round (a point's only tap,
// discrete, alternates with the next point's). Two independent FMA chains hide the FMA latency that one chain
// (48 FMAs long for RT-DETRv2's 48 taps) would serialize on (measured: bench/results/cpu-kernel-design/). The
// unstaged and the staged forward both sum in this order.
template <typename Accumulator, typename AddPoint>
RTDETRV2_INLINE void sum_points_in_two_chains(int64_t first, int64_t last, Accumulator& even, Accumulator& odd,
                                              const AddPoint& add_point) {
  int64_t p = first;
  for (; p + 1 < last; p += 2) {
    add_point(p, even, odd);
    add_point(p + 1, odd, even);
  }
  if (p < last) add_point(p, even, odd);
}

// The same for taps listed in tap_index order: add_tap(i, sum) for every tap i of the points [first, last).
template <int64_t kLanes, int64_t kTaps, typename Accumulator, typename AddTap>
RTDETRV2_INLINE void sum_taps_in_two_chains(int64_t first, int64_t last, Accumulator& even, Accumulator& odd,
                                            const AddTap& add_tap) {
  sum_points_in_two_chains(first, last, even, odd, [&](int64_t p, Accumulator& mine, Accumulator& other)
                                                       RTDETRV2_LAMBDA_INLINE {
    const int64_t base = tap_index<kLanes, kTaps>(p, 0);
    for (int64_t k = 0; k < kTaps; ++k) add_tap(base + k * kLanes, k % 2 ? other : mine);
  });
}

// out[c] = sum over the taps i of the points [first, last) of weights[i] * rows[i][c], for any C: the
// forward's sum where C is not one that dispatch_channels names, or is too long to be held in registers
// (48, 64; see weighted_sum_in_registers). Channels go in groups of up to kGroup vectors, a pass over the
// taps per group.
template <int64_t kLanes, int64_t kTaps, typename scalar_t, typename acc_t>
RTDETRV2_INLINE void weighted_sum(const scalar_t* const* rows, const acc_t* weights, int64_t first, int64_t last,
                                  int64_t C, scalar_t* out) {
  constexpr int64_t kGroup = 4;
  int64_t c = 0;
  // Channels [c, ...) in groups of kVectors bundles of the width V (Simd or HalfSimd) while they fit.
  auto sum_vectors = [&](auto width, auto group_constant) RTDETRV2_LAMBDA_INLINE {
    using V = decltype(width);
    constexpr int64_t kVectors = decltype(group_constant)::value;
    using Group = std::array<typename V::Vec, kVectors>;
    for (; c + kVectors * V::kLanes <= C; c += kVectors * V::kLanes) {
      Group even{}, odd{};
      sum_taps_in_two_chains<kLanes, kTaps>(first, last, even, odd, [&](int64_t i, Group& sums) RTDETRV2_LAMBDA_INLINE {
        const scalar_t* row = rows[i] + c;
        for (int64_t j = 0; j < kVectors; ++j) sums[j] += weights[i] * V::load(row + j * V::kLanes);
      });
      for (int64_t j = 0; j < kVectors; ++j) V::store(out + c + j * V::kLanes, even[j] + odd[j]);
    }
  };
  sum_vectors(Simd<acc_t>{}, std::integral_constant<int64_t, kGroup>{});
  sum_vectors(Simd<acc_t>{}, std::integral_constant<int64_t, 1>{});
  sum_vectors(HalfSimd<acc_t>{}, std::integral_constant<int64_t, 1>{});  // at most once: less than a bundle is left
  for (; c < C; ++c) {
    acc_t acc = 0;
    for (int64_t p = first; p < last; ++p) {
      for (int64_t k = 0; k < kTaps; ++k) {
        const int64_t i = tap_index<kLanes, kTaps>(p, k);
        acc += weights[i] * static_cast<acc_t>(rows[i][c]);
      }
    }
    out[c] = static_cast<scalar_t>(acc);
  }
}

// The same sum where C is known at compile time and all of a row's channels fit in registers (C <= 32 in
// fp32): one pass over the taps reads each tap's row address and weight once, where weighted_sum makes a pass
// per group of channels (it would make two at C = 16, three at C = 24, four at C = 28).
template <int64_t kLanes, int64_t kTaps, int64_t kChannels, typename scalar_t, typename acc_t>
RTDETRV2_INLINE void weighted_sum_in_registers(const scalar_t* const* rows, const acc_t* weights, int64_t first,
                                               int64_t last, scalar_t* out) {
  using Row = RegisterRow<acc_t, kChannels>;
  Row even{}, odd{};
  sum_taps_in_two_chains<kLanes, kTaps>(first, last, even, odd, [&](int64_t i, Row& sum) RTDETRV2_LAMBDA_INLINE {
    sum.add_scaled(weights[i], rows[i]);
  });
  even.store_sum(odd, out);
}

// Both kernels place the points of several (batch, query, head) tasks at once, a SIMD bundle of points at a
// time: placed one by one, a point's scalar index math cost more than its channels at C = 8 to 16 (a
// profile at deimv2-atto-train-b4), and RF-DETR's tasks have two points each, a quarter of a bundle. A
// batch lists its points task after task; their levels, the same for every task, are filled in once.
// The forward needs each tap's value row and its weight times the attention weight; the backward
// (kBackward) also the tap's grad_value row and its weight's derivatives, and keeps the two weights apart.
template <typename scalar_t, bool kDiscrete, bool kBackward>
struct PointBatch {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Simd<acc_t>;
  static constexpr int64_t kLanes = V::kLanes;
  // The integer lanes of the bilinear math, as wide as acc_t's so that its masks select both (int32 for fp32).
  using Int = typename LaneOf<decltype(typename V::Vec() < typename V::Vec())>::type;
  using IV = Simd<Int>;
  // Row addresses, at most 32 bytes of them (four with 64-bit pointers) and no more than a bundle has points.
  using AV = Simd<intptr_t, std::min<int>(32, int(kLanes * sizeof(intptr_t)))>;
  using NarrowIV = Simd<Int, AV::kLanes * sizeof(Int)>;  // as many Int as AV has addresses
  static constexpr int64_t kTaps = kTapsPerPoint<kDiscrete>;
  // A batch holds up to kPoints points (four fp32 bundles; more only in a single task), and rows of no more
  // than kRowBytes in all, half of a 32 KiB L1, so that the rows requested first are still there when summed.
  static constexpr int64_t kPoints = 32;
  static constexpr int64_t kRowBytes = 16 << 10;

  int64_t tasks;   // per batch
  int64_t points;  // per task
  intptr_t row_bytes, grad_row_bytes;
  // Whether a row's byte offset within its level (at most the largest level's rows times the longer row)
  // fits in Int: then it is one multiply of Int lanes, not the 64-bit multiply that AVX2 lacks and the
  // compiler builds from several instructions per lane pair. Never where a stride is 0 (an expanded value):
  // the sign of the product marks a tap outside the level.
  bool narrow_offsets;
  // The arrays below, zeroed, in one allocation: a tiny call pays for one, not a dozen.
  std::vector<unsigned char> storage;
  // Per point of the batch, padded to whole bundles: its location and attention weight, its level's size,
  // and the address of its level's first row in its task's value (and grad_value).
  acc_t *x, *y, *attention;
  Int *height, *width;
  int64_t *level_start, *grad_level_start;  // that row's offset from the (batch, head)'s first
  intptr_t *level_rows, *grad_level_rows;
  // Per task slot, the (batch, head) first rows its level_rows were made from: consecutive tasks mostly share
  // them (a task walks one head's queries), and remaking the rows cost about 7 instructions per point.
  const scalar_t** slot_value_bh;
  acc_t** slot_grad_value_bh;
  // Per tap, in tap_index order: the row it reads, its weight (the forward's times the attention weight),
  // and for the backward the grad_value row it adds to, its weight times the attention weight (the scale of
  // its grad_value update) and its weight's derivatives along x and y.
  const scalar_t** rows;
  acc_t* weights;
  acc_t** grad_rows;
  acc_t *scaled_weights, *dweight_dx, *dweight_dy;
  // The backward's, per tap: the dot product of grad_output's row with the tap's row, still a vector of
  // kLanes partial sums; and per point, the gradients of its (x, y) location and attention weight.
  acc_t* dots;
  acc_t *grad_point_locations, *grad_point_weights;
  // Taps outside the level read zeros and add into a discarded row, so the summations have no branches.
  scalar_t* zero_row;
  acc_t* discarded_row;

  static int64_t tasks_per_batch(int64_t P, int64_t C) {
    const int64_t task_row_bytes = std::max<int64_t>(1, P * kTaps * C * int64_t(sizeof(scalar_t)));
    return std::max<int64_t>(1, std::min(kPoints / std::max<int64_t>(1, P), kRowBytes / task_row_bytes));
  }

  // grad_row_stride: grad_value's, for the backward.
  template <typename Points>
  PointBatch(const Problem<scalar_t, Points>& problem, int64_t grad_row_stride = 0)
      : tasks(tasks_per_batch(problem.points, problem.channels)),
        points(problem.points),
        row_bytes(problem.row_stride * intptr_t(sizeof(scalar_t))),
        grad_row_bytes(grad_row_stride * intptr_t(sizeof(acc_t))) {
    int64_t largest_level = 0;
    for (int64_t l = 0; l < problem.levels.num_levels(); ++l) {
      largest_level = std::max<int64_t>(largest_level, int64_t(problem.levels.height[l]) * problem.levels.width[l]);
    }
    const intptr_t longest_row = std::max(row_bytes, kBackward ? grad_row_bytes : intptr_t(0));
    narrow_offsets = row_bytes > 0 && (!kBackward || grad_row_bytes > 0) &&
                     largest_level <= int64_t(std::numeric_limits<Int>::max()) / longest_row;
    const int64_t padded = (tasks * points + kLanes - 1) / kLanes * kLanes;
    const int64_t C = problem.channels;
    const int64_t backward_points = kBackward ? padded : 0, backward_taps = backward_points * kTaps;
    // Each array starts at a multiple of 64 bytes into the storage. The same layout runs twice: without a
    // base to size the storage, then to point the members into it.
    auto layout = [&](unsigned char* base) {
      size_t size = 0;
      auto take = [&](auto*& member, int64_t count) {
        const size_t offset = (size + 63) / 64 * 64;
        if (base != nullptr) member = reinterpret_cast<std::remove_reference_t<decltype(member)>>(base + offset);
        size = offset + count * sizeof(*member);
      };
      take(x, padded), take(y, padded), take(attention, padded), take(height, padded), take(width, padded);
      take(level_start, padded), take(grad_level_start, backward_points);
      take(level_rows, padded), take(grad_level_rows, backward_points);
      take(slot_value_bh, tasks), take(slot_grad_value_bh, tasks);
      take(rows, padded * kTaps), take(weights, padded * kTaps), take(grad_rows, backward_taps);
      take(scaled_weights, backward_taps), take(dots, backward_taps * kLanes);
      take(grad_point_locations, 2 * backward_points), take(grad_point_weights, backward_points);
      take(dweight_dx, kDiscrete ? 0 : backward_taps), take(dweight_dy, kDiscrete ? 0 : backward_taps);
      take(zero_row, C), take(discarded_row, kBackward ? C : 0);
      return size;
    };
    storage.assign(layout(nullptr), 0);
    layout(storage.data());
    for (int64_t t = 0, i = 0; t < tasks; ++t) {
      for (int64_t l = 0; l < problem.levels.num_levels(); ++l) {
        for (int64_t p = 0; p < problem.levels.points[l]; ++p, ++i) {
          height[i] = problem.levels.height[l], width[i] = problem.levels.width[l];
          level_start[i] = problem.levels.start[l] * problem.row_stride;
          if constexpr (kBackward) grad_level_start[i] = problem.levels.start[l] * grad_row_stride;
        }
      }
    }
  }

  // Reads the points of (batch, query, head) bqh as the batch's task t; value_bh and grad_value_bh are the
  // first rows of its (batch, head) in value and grad_value.
  template <typename Points>
  RTDETRV2_INLINE void load(const Problem<scalar_t, Points>& problem, int64_t t, int64_t bqh,
                            const scalar_t* value_bh, acc_t* grad_value_bh = nullptr) {
    const int64_t first = t * points;
    problem.source.load(bqh, &x[first], &y[first], &attention[first]);
    // The storage starts zeroed, so a slot's first task makes its rows (unless value is empty and value_bh
    // null: then the rows are never read).
    if (slot_value_bh[t] == value_bh && slot_grad_value_bh[t] == grad_value_bh) return;
    slot_value_bh[t] = value_bh, slot_grad_value_bh[t] = grad_value_bh;
    RTDETRV2_DISJOINT
    for (int64_t i = first; i < first + points; ++i) {
      level_rows[i] = reinterpret_cast<intptr_t>(value_bh + level_start[i]);
      if constexpr (kBackward) grad_level_rows[i] = reinterpret_cast<intptr_t>(grad_value_bh + grad_level_start[i]);
    }
  }

  // Lists the taps of the first count points and requests the start of each tap's rows, a bundle at a time:
  // the misses of one bundle's rows overlap the index math of the next (bench/results/cpu-kernel-design/).
  // Lanes past count are placed too, and never read.
  RTDETRV2_INLINE void place(int64_t count) {
    // The addresses of a corner's rows (offset < 0: outside the level), four at a time: AVX2 has 64-bit
    // lanes for four, and a wider vector of them is split into scalars, not into registers.
    auto store_rows = [&](auto* out, const typename IV::Vec& offsets, const intptr_t* level, intptr_t bytes,
                          const void* outside) RTDETRV2_LAMBDA_INLINE {
      Int offset[kLanes];
      IV::store(offset, narrow_offsets ? offsets * Int(bytes) : offsets);
      for (int64_t j = 0; j < kLanes; j += AV::kLanes) {
        typename AV::Vec wide = __builtin_convertvector(NarrowIV::load(offset + j), typename AV::Vec);
        const auto inside = wide >= 0;  // before the product, which is 0 for every tap where bytes is
        if (!narrow_offsets) wide *= bytes;
        AV::store(reinterpret_cast<intptr_t*>(out + j),
                  inside ? AV::load(level + j) + wide : reinterpret_cast<intptr_t>(outside));
      }
    };
    auto store_tap = [&](int64_t tap, int64_t first, const typename IV::Vec& offsets) RTDETRV2_LAMBDA_INLINE {
      store_rows(&rows[tap], offsets, &level_rows[first], row_bytes, zero_row);
      if constexpr (kBackward) {
        store_rows(&grad_rows[tap], offsets, &grad_level_rows[first], grad_row_bytes, discarded_row);
      }
    };
    for (int64_t first = 0; first < count; first += kLanes) {
      const typename V::Vec point_attention = V::load(&attention[first]);
      const int64_t taps = first * kTaps;
      if constexpr (kDiscrete) {
        Int offset[kLanes];
        for (int64_t j = 0; j < kLanes; ++j) {
          offset[j] = discrete_offset(x[first + j], y[first + j], int32_t(height[first + j]),
                                      int32_t(width[first + j]));
        }
        store_tap(taps, first, IV::load(offset));
        V::store(&weights[taps], kBackward ? typename V::Vec() + acc_t(1) : point_attention);
        if constexpr (kBackward) V::store(&scaled_weights[taps], point_attention);
      } else {
        const auto corners = bilinear_corners(V::load(&x[first]), V::load(&y[first]), IV::load(&height[first]),
                                              IV::load(&width[first]));
        for (int k = 0; k < 4; ++k) {
          const int64_t tap = taps + k * kLanes;
          store_tap(tap, first, corners.inside[k] ? corners.offset[k] : Int(-1));
          if constexpr (kBackward) {
            V::store(&weights[tap], corners.weight[k]);
            V::store(&scaled_weights[tap], point_attention * corners.weight[k]);
            V::store(&dweight_dx[tap], corners.dweight_dx[k]);
            V::store(&dweight_dy[tap], corners.dweight_dy[k]);
          } else {
            V::store(&weights[tap], point_attention * corners.weight[k]);
          }
        }
      }
      // A whole bundle's loop has a constant count, which the compiler unrolls.
      auto prefetch_taps = [&](int64_t lanes) RTDETRV2_LAMBDA_INLINE {
        for (int64_t k = 0; k < kTaps; ++k) {
          for (int64_t j = 0; j < lanes; ++j) {
            prefetch_row_start(rows[taps + k * kLanes + j]);
            if constexpr (kBackward) prefetch_row_start</*kForWrite=*/true>(grad_rows[taps + k * kLanes + j]);
          }
        }
      };
      if (count - first >= kLanes) {
        prefetch_taps(kLanes);
      } else {
        prefetch_taps(count - first);
      }
    }
  }

  // Requests the rest of the rows of the first count points where rows are longer than the first request.
  RTDETRV2_INLINE void prefetch_rows_rest(int64_t count, int64_t C) const {
    auto request = [&](const auto* row, auto for_write) RTDETRV2_LAMBDA_INLINE {
      const char* bytes = reinterpret_cast<const char*>(row);
      const int64_t row_bytes = C * int64_t(sizeof(*row));
      for (int64_t offset = 128; offset < row_bytes; offset += 128) {
        prefetch_row_start<decltype(for_write)::value>(bytes + offset);
      }
    };
    if (C * int64_t(sizeof(scalar_t)) <= 128 && (!kBackward || C * int64_t(sizeof(acc_t)) <= 128)) return;
    for (int64_t p = 0; p < count; ++p) {
      for (int64_t k = 0; k < kTaps; ++k) {
        request(rows[tap_index<kLanes, kTaps>(p, k)], std::false_type{});
        if constexpr (kBackward) request(grad_rows[tap_index<kLanes, kTaps>(p, k)], std::true_type{});
      }
    }
  }

  // The forward's output row of task t: the weighted sum of its taps' rows.
  RTDETRV2_INLINE void sum_task(int64_t t, int64_t C, scalar_t* out) const {
    dispatch_channels(C, [&](auto channels) RTDETRV2_LAMBDA_INLINE {
      constexpr int64_t kChannels = decltype(channels)::value;
      if constexpr (kChannels > 0 && kChannels <= 4 * kLanes) {
        weighted_sum_in_registers<kLanes, kTaps, kChannels>(rows, weights, t * points, (t + 1) * points, out);
      } else {
        weighted_sum<kLanes, kTaps>(rows, weights, t * points, (t + 1) * points, C, out);
      }
    });
  }

  // The backward's gradients of the first count points' locations and attention weights, from their taps'
  // dots, a bundle at a time: the lane sums of a bundle's corner-k dots are one vector over its points.
  RTDETRV2_INLINE void point_gradients(int64_t count) const {
    using Vec = typename V::Vec;
    for (int64_t first = 0; first < count; first += kLanes) {
      Vec grad_weight = {}, grad_x = {}, grad_y = {};
      for (int64_t k = 0; k < kTaps; ++k) {
        const int64_t tap = tap_index<kLanes, kTaps>(first, k);
        const Vec dot = lane_sums<acc_t>(&dots[tap * kLanes]);
        grad_weight += V::load(&weights[tap]) * dot;
        if constexpr (!kDiscrete) {
          grad_x += V::load(&dweight_dx[tap]) * dot;
          grad_y += V::load(&dweight_dy[tap]) * dot;
        }
      }
      V::store(&grad_point_weights[first], grad_weight);
      if constexpr (!kDiscrete) {  // the nearest pixel does not move with the location: no location gradient
        // Chain rule through x = loc_x * W - 0.5 and y = loc_y * H - 0.5.
        const Vec point_attention = V::load(&attention[first]);
        grad_x *= point_attention * convert_to<Vec>(IV::load(&width[first]));
        grad_y *= point_attention * convert_to<Vec>(IV::load(&height[first]));
        for (int64_t j = 0; j < kLanes; ++j) {
          grad_point_locations[2 * (first + j)] = grad_x[j];
          grad_point_locations[2 * (first + j) + 1] = grad_y[j];
        }
      }
    }
  }
};

// The output rows of the (batch, head, query) triples i in [begin, end), queries innermost. A batch of
// tasks first lists the rows its points read with their weights (times the attention weight), then each task
// sums its rows channel block by channel block.
// A task walks one head's queries, as the backward does: the value rows it reads again (queries sample
// overlapping places) are that head's, 1 MiB at RT-DETRv2's 640x640 levels with C=32 fp32, which the core's
// own L2 can hold; walking all heads of a query spreads them over every head's rows, which only the shared L3
// holds. Faster than that order with caches flushed before each call, as a model's other layers flush them,
// most at large batches (bench/results/cpu-kernel-design/, "A task walks one head's queries").
template <typename scalar_t, bool kDiscrete, typename Points>
RTDETRV2_CPU_MULTIVERSION void forward_range(const Problem<scalar_t, Points>& problem, bool heads_innermost,
                                             int64_t begin, int64_t end, scalar_t* output) {
  const int64_t C = problem.channels, H = problem.heads, Q = problem.queries;
  PointBatch<scalar_t, kDiscrete, /*kBackward=*/false> batch(problem);
  std::vector<int64_t> task_bqh(batch.tasks);
  // Task i is (batch b, head h, query q) with q innermost, or (b, q, h) with h innermost; the indices are
  // stepped, not divided out per task (integer divisions cost more than the whole sampling of a 2-point,
  // 16-channel head).
  int64_t b = begin / (Q * H), q, h;
  if (heads_innermost) {
    q = begin / H % Q, h = begin % H;
  } else {
    h = begin / Q % H, q = begin % Q;
  }
  for (int64_t i = begin; i < end;) {
    const int64_t tasks = std::min(batch.tasks, end - i);
    for (int64_t t = 0; t < tasks; ++t, ++i) {
      const int64_t bqh = (b * Q + q) * H + h;
      task_bqh[t] = bqh;
      // Head by head, the per-query inputs are strided: request the ones two queries on.
      if (!heads_innermost && q + 2 < Q) problem.source.prefetch(bqh + 2 * H);
      batch.load(problem, t, bqh, problem.value_rows(b, h));
      if (heads_innermost) {
        if (++h == H) {
          h = 0;
          if (++q == Q) q = 0, ++b;
        }
      } else if (++q == Q) {
        q = 0;
        if (++h == H) h = 0, ++b;
      }
    }
    batch.place(tasks * problem.points);
    batch.prefetch_rows_rest(tasks * problem.points, C);
    for (int64_t t = 0; t < tasks; ++t) batch.sum_task(t, C, output + task_bqh[t] * C);
  }
}

// The forward where a (batch, head)'s value rows are read several times each (DEIMv2's and RF-DETR's decoders
// on their small levels, D-FINE N, the training decoders, the DETR encoder; pays() says when): the rows are
// first copied, as acc_t, into a buffer that puts a border of zeros around each level (two rows above it and
// two columns left of it, one row below and one column right), and the points are sampled from there. Every
// corner of a point then lies in the buffer, found from one row index and the level's padded width, and a
// corner outside the level reads the border's zeros: no per-corner test and no detour to a zero row, which
// with the row addresses cost most of the unstaged forward's instructions per point
// (bench/results/family-cpu-2026-12-07-epyc/). The weights and the order of the sum are the unstaged
// forward's, so both give the same bits.
template <typename scalar_t>
struct StagedHead {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Simd<acc_t>;
  using Int = typename LaneOf<decltype(typename V::Vec() < typename V::Vec())>::type;
  using IV = Simd<Int>;
  static constexpr int64_t kLanes = V::kLanes;
  static constexpr int64_t kBefore = 2;  // border rows above and columns left of a level
  static constexpr int64_t kPoints = 32;  // per batch of tasks, as PointBatch
  static constexpr int64_t kMaxChannels = 4 * kLanes;  // a row in registers: up to 32 fp32 channels

  // The head sizes that stage: named by dispatch_channels, a row in registers, and whole vectors and half
  // vectors only. Single channels past them (C = 14 in fp32) are left unstaged: the compiler fused their
  // multiply-adds in one of the two forwards and not in the other, a few units in the last place apart.
  template <int64_t kChannels>
  static constexpr bool stages_channels() {
    if constexpr (kChannels > 0 && kChannels <= kMaxChannels) {
      return RegisterRow<acc_t, kChannels>::singles_from() == kChannels;
    } else {
      return false;
    }
  }

  // Whether staging pays, from the reads per row (the taps of a (batch, head), Q * P * 4, over its rows): from
  // 2.5 on, the copy costs less than it saves (DEIMv2's and D-FINE's small decoders 3.6-4.8, the training
  // decoders 2.9-54, the DETR encoder 64: 1.2-1.7x faster); at 1.2-1.7 it does not (RF-DETR base and large
  // inference 0.9-1.1x, RT-DETRv2's and LW-DETR's inference decoders 1.4x slower). Measured on the EPYC of
  // bench/results/family-cpu-2026-12-07-epyc/. Up to a 4 MiB buffer a thread, for the head sizes of
  // stages_channels.
  static bool pays(const LevelTable& levels, int64_t rows, int64_t queries, int64_t points, int64_t channels) {
    bool channels_in_registers = false;
    dispatch_channels(channels, [&](auto named) {
      channels_in_registers = stages_channels<decltype(named)::value>();
    });
    const int64_t bytes = buffer_rows(levels) * channels * int64_t(sizeof(acc_t));
    return channels_in_registers && bytes <= (4 << 20) && 2 * queries * points * 4 >= 5 * rows;
  }
  // A level's height or width with its border.
  static int64_t with_border(int64_t size) { return size + kBefore + 1; }
  static int64_t buffer_rows(const LevelTable& levels) {
    int64_t total = 0;
    for (int64_t l = 0; l < levels.num_levels(); ++l) {
      total += with_border(levels.height[l]) * with_border(levels.width[l]);
    }
    return total;
  }

  int64_t tasks, points;
  std::vector<acc_t> buffer;                   // zeroed once: staging writes the levels' pixels only
  std::vector<int64_t> level_first_row;         // per level: the buffer row of its padded (0, 0)
  const scalar_t* staged_value_bh = nullptr;    // whose rows the buffer holds
  // Per point of a batch, padded to whole bundles: its inputs, its level's size, padded width and first row,
  // and what placing it gives: the buffer row of its top-left corner and its four corners' weights (times
  // the attention weight).
  std::vector<acc_t> x, y, attention, weights[4];
  std::vector<Int> height, width, padded_width, first_row, top_left;

  template <typename Points>
  explicit StagedHead(const Problem<scalar_t, Points>& problem)
      : tasks(std::max<int64_t>(1, kPoints / std::max<int64_t>(1, problem.points))),
        points(problem.points),
        buffer(buffer_rows(problem.levels) * problem.channels, acc_t(0)) {
    const LevelTable& levels = problem.levels;
    for (int64_t l = 0, row = 0; l < levels.num_levels(); ++l) {
      level_first_row.push_back(row);
      row += with_border(levels.height[l]) * with_border(levels.width[l]);
    }
    const int64_t padded = (tasks * points + kLanes - 1) / kLanes * kLanes;
    for (auto* v : {&x, &y, &attention, &weights[0], &weights[1], &weights[2], &weights[3]}) v->assign(padded, 0);
    for (auto* v : {&height, &width, &padded_width, &first_row, &top_left}) v->assign(padded, 0);
    for (int64_t t = 0, i = 0; t < tasks; ++t) {
      for (int64_t l = 0; l < levels.num_levels(); ++l) {
        for (int64_t p = 0; p < levels.points[l]; ++p, ++i) {
          height[i] = levels.height[l], width[i] = levels.width[l];
          padded_width[i] = Int(with_border(levels.width[l]));
          first_row[i] = Int(level_first_row[l]);
        }
      }
    }
  }

  // Copies the levels of (batch, head) whose first value row is value_bh, unless the buffer holds them.
  template <int64_t kChannels, typename Points>
  RTDETRV2_INLINE void stage(const Problem<scalar_t, Points>& problem, const scalar_t* value_bh) {
    if (value_bh == staged_value_bh) return;
    staged_value_bh = value_bh;
    const LevelTable& levels = problem.levels;
    for (int64_t l = 0; l < levels.num_levels(); ++l) {
      const int64_t W = levels.width[l];
      for (int64_t yy = 0; yy < levels.height[l]; ++yy) {
        const scalar_t* from = value_bh + (levels.start[l] + yy * W) * problem.row_stride;
        acc_t* to = buffer.data() + (level_first_row[l] + (yy + kBefore) * with_border(W) + kBefore) * kChannels;
        for (int64_t xx = 0; xx < W; ++xx, from += problem.row_stride, to += kChannels) {
          for (int64_t c = 0; c < kChannels; ++c) to[c] = static_cast<acc_t>(from[c]);
        }
      }
    }
  }

  // Each of the first count points' top-left buffer row and corner weights, a bundle at a time: the math of
  // bilinear_corners (sampling.h), with a point away from the level at (-2, -2), whose corners are all border.
  RTDETRV2_INLINE void place(int64_t count) {
    using Vec = typename V::Vec;
    using IVec = typename IV::Vec;
    for (int64_t first = 0; first < count; first += kLanes) {
      const IVec h = IV::load(&height[first]), w = IV::load(&width[first]);
      const Vec xs = V::load(&x[first]) * convert_to<Vec>(w) - acc_t(0.5);
      const Vec ys = V::load(&y[first]) * convert_to<Vec>(h) - acc_t(0.5);
      const auto near_level = (xs >= acc_t(-1)) & (xs < convert_to<Vec>(w)) & (ys >= acc_t(-1)) &
                              (ys < convert_to<Vec>(h));
      const IVec x0 = floor_to_int<IVec>(near_level ? xs : acc_t(-2));
      const IVec y0 = floor_to_int<IVec>(near_level ? ys : acc_t(-2));
      const Vec fx = xs - convert_to<Vec>(x0), fy = ys - convert_to<Vec>(y0);
      // Near the level x0 is in [-1, width - 1], so column x0 is inside where x0 >= 0 and x0 + 1 where
      // x0 + 1 < width; likewise the rows.
      const IVec column_inside[2] = {near_level & (x0 >= Int(0)), near_level & (x0 + Int(1) < w)};
      const IVec row_inside[2] = {y0 >= Int(0), y0 + Int(1) < h};
      const Vec wx[2] = {acc_t(1) - fx, fx}, wy[2] = {acc_t(1) - fy, fy};
      const Vec point_attention = V::load(&attention[first]);
      for (int k = 0; k < 4; ++k) {
        const auto inside = column_inside[k & 1] & row_inside[k >> 1];
        V::store(&weights[k][first], point_attention * (inside ? wx[k & 1] * wy[k >> 1] : acc_t(0)));
      }
      const IVec row = (y0 + Int(kBefore)) * IV::load(&padded_width[first]) + (x0 + Int(kBefore));
      IV::store(&top_left[first], IV::load(&first_row[first]) + row);
    }
  }

  // The output row of task t of a placed batch.
  template <int64_t kChannels, typename out_t>
  RTDETRV2_INLINE void sum_task(int64_t t, out_t* out) const {
    using Row = RegisterRow<acc_t, kChannels>;
    Row even{}, odd{};
    sum_points_in_two_chains(t * points, (t + 1) * points, even, odd,
                             [&](int64_t p, Row& mine, Row& other) RTDETRV2_LAMBDA_INLINE {
      const acc_t* top = buffer.data() + int64_t(top_left[p]) * kChannels;
      const acc_t* bottom = top + int64_t(padded_width[p]) * kChannels;
      mine.add_scaled(weights[0][p], top);
      other.add_scaled(weights[1][p], top + kChannels);
      mine.add_scaled(weights[2][p], bottom);
      other.add_scaled(weights[3][p], bottom + kChannels);
    });
    even.store_sum(odd, out);
  }
};

// The output rows of the (batch, head, query) triples i in [begin, end), queries innermost, from staged heads.
// A batch of tasks never spans two (batch, head) pairs: they read different buffers.
template <typename scalar_t, typename Points>
RTDETRV2_CPU_MULTIVERSION void staged_forward_range(const Problem<scalar_t, Points>& problem, int64_t begin,
                                                    int64_t end, scalar_t* output) {
  const int64_t C = problem.channels, H = problem.heads, Q = problem.queries;
  StagedHead<scalar_t> head(problem);
  dispatch_channels(C, [&](auto channels) RTDETRV2_LAMBDA_INLINE {
    constexpr int64_t kChannels = decltype(channels)::value;
    if constexpr (StagedHead<scalar_t>::template stages_channels<kChannels>()) {
      for (int64_t i = begin; i < end;) {
        const int64_t b = i / (Q * H), h = i / Q % H, q0 = i % Q;
        const int64_t tasks = std::min({head.tasks, end - i, Q - q0});
        head.template stage<kChannels>(problem, problem.value_rows(b, h));
        // The per-query inputs are not requested ahead, as the unstaged forward requests them: their stride is
        // constant here, which the hardware prefetcher follows, and the requests were 23% of the
        // instructions of rfdetr-nano-train-b4's forward (bench/results/family-cpu-2026-12-07-epyc/).
        problem.source.load_tasks((b * Q + q0) * H + h, H, tasks, head.x.data(), head.y.data(), head.attention.data());
        head.place(tasks * head.points);
        for (int64_t t = 0; t < tasks; ++t) {
          head.template sum_task<kChannels>(t, output + ((b * Q + q0 + t) * H + h) * C);
        }
        i += tasks;
      }
    }
  });
}

// grad_output of one (batch, query, head), channel by channel as RegisterRow splits them. With kChannels > 0
// the row is loaded once into registers; with kChannels = 0 any C works: the row is converted into a buffer
// and read from there.
template <typename acc_t, int64_t kChannels>
struct GradOutRow : RegisterRow<acc_t, kChannels> {
  template <typename scalar_t>
  RTDETRV2_INLINE GradOutRow(const scalar_t* row, int64_t, acc_t*)
      : RegisterRow<acc_t, kChannels>(RegisterRow<acc_t, kChannels>::load(row)) {}
};

template <typename acc_t>
struct GradOutRow<acc_t, 0> {
  using S = Simd<acc_t>;
  using H = HalfSimd<acc_t>;
  const acc_t* row;
  int64_t C;

  template <typename scalar_t>
  RTDETRV2_INLINE GradOutRow(const scalar_t* in, int64_t channels_, acc_t* buffer) : row(buffer), C(channels_) {
    for (int64_t c = 0; c < C; ++c) buffer[c] = static_cast<acc_t>(in[c]);
  }
  RTDETRV2_INLINE int64_t channels() const { return C; }
  RTDETRV2_INLINE int64_t num_vectors() const { return C / S::kLanes; }
  RTDETRV2_INLINE bool has_half() const { return C % S::kLanes >= H::kLanes; }
  RTDETRV2_INLINE int64_t singles_from() const { return num_vectors() * S::kLanes + (has_half() ? H::kLanes : 0); }
  RTDETRV2_INLINE typename S::Vec vector(int64_t j) const { return S::load(row + j * S::kLanes); }
  RTDETRV2_INLINE typename H::Vec half() const { return H::load(row + num_vectors() * S::kLanes); }
  RTDETRV2_INLINE acc_t channel(int64_t c) const { return row[c]; }
};

// Sums the taps of task t of a placed backward batch: adds attention * weight * grad_out to each tap's
// grad_value row, and leaves each tap's dot product grad_out . row in batch.dots as a vector of partial sums,
// which PointBatch::point_gradients sums a bundle of points at a time (a horizontal sum per point and tap,
// or three per point, cost more).
template <int64_t kChannels, typename Batch, typename scalar_t, typename acc_t>
RTDETRV2_INLINE void backward_task(const Batch& batch, int64_t t, const scalar_t* grad_output_row, int64_t C,
                                   acc_t* grad_out_buffer) {
  using S = Simd<acc_t>;
  using H = HalfSimd<acc_t>;
  using Vec = typename S::Vec;
  constexpr int64_t kTaps = Batch::kTaps;
  const GradOutRow<acc_t, kChannels> grad_out(grad_output_row, C, grad_out_buffer);
  for (int64_t point = t * batch.points; point < (t + 1) * batch.points; ++point) {
    const int64_t first = tap_index<Batch::kLanes, kTaps>(point, 0);
    for (int64_t k = 0; k < kTaps; ++k) {
      const int64_t tap = first + k * Batch::kLanes;
      const scalar_t* row = batch.rows[tap];
      acc_t* grad_row = batch.grad_rows[tap];
      const acc_t scale = batch.scaled_weights[tap];
      Vec dot = {};
      for (int64_t j = 0; j < grad_out.num_vectors(); ++j) {
        const Vec g = grad_out.vector(j);
        dot += g * S::load(row + j * S::kLanes);
        S::store(grad_row + j * S::kLanes, S::load(grad_row + j * S::kLanes) + scale * g);
      }
      // The channels past the whole vectors, where C has any (a lane insert per tap costs at C = 8).
      if (grad_out.has_half() || grad_out.singles_from() < grad_out.channels()) {
        acc_t rest = 0;
        if (grad_out.has_half()) {
          const int64_t c = grad_out.num_vectors() * S::kLanes;
          const typename H::Vec g = grad_out.half();
          rest += H::sum(g * H::load(row + c));
          H::store(grad_row + c, H::load(grad_row + c) + scale * g);
        }
        for (int64_t c = grad_out.singles_from(); c < grad_out.channels(); ++c) {
          rest += grad_out.channel(c) * static_cast<acc_t>(row[c]);
          grad_row[c] += scale * grad_out.channel(c);
        }
        dot[0] += rest;
      }
      S::store(&batch.dots[tap * S::kLanes], dot);
    }
  }
}

// Gradients for the (batch, head) pairs in [begin, end). grad_value is contiguous (B, S, H, C) in acc_t
// (fp32 for half inputs); the pairs' rows in it are disjoint, so no two tasks ever write the same element.
// The gradients of each (batch, query, head)'s locations and weights go to problem.source.
template <typename scalar_t, bool kDiscrete, typename Points>
RTDETRV2_CPU_MULTIVERSION void backward_range(const Problem<scalar_t, Points>& problem, const scalar_t* grad_output,
                                              int64_t begin, int64_t end, at::opmath_type<scalar_t>* grad_value) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = problem.channels, H = problem.heads, Q = problem.queries, P = problem.points;
  const int64_t grad_row_stride = H * C;
  PointBatch<scalar_t, kDiscrete, /*kBackward=*/true> batch(problem, grad_row_stride);
  std::vector<acc_t> grad_out_buffer(C);  // for a C that dispatch_channels does not name
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const scalar_t* value_bh = problem.value_rows(b, h);
    acc_t* grad_value_bh = grad_value + (b * problem.rows * H + h) * C;
    for (int64_t q0 = 0; q0 < Q; q0 += batch.tasks) {
      const int64_t tasks = std::min(batch.tasks, Q - q0);
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t bqh = (b * Q + q0 + t) * H + h;
        // A task walks one head's queries, so its per-query inputs are strided: request the next batch's.
        if (q0 + t + batch.tasks < Q) {
          prefetch_span(grad_output + (bqh + batch.tasks * H) * C, C);
          problem.source.prefetch(bqh + batch.tasks * H);
        }
        batch.load(problem, t, bqh, value_bh, grad_value_bh);
      }
      batch.place(tasks * P);
      batch.prefetch_rows_rest(tasks * P, C);
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t bqh = (b * Q + q0 + t) * H + h;
        dispatch_channels(C, [&](auto channels) RTDETRV2_LAMBDA_INLINE {
          backward_task<decltype(channels)::value>(batch, t, grad_output + bqh * C, C, grad_out_buffer.data());
        });
      }
      batch.point_gradients(tasks * P);
      for (int64_t t = 0; t < tasks; ++t) {
        problem.source.store_gradients((b * Q + q0 + t) * H + h,
                                       kDiscrete ? nullptr : &batch.grad_point_locations[2 * t * P],
                                       &batch.grad_point_weights[t * P]);
      }
    }
  }
}

// The forward's task order. Head by head (the default), a task rereads the value rows of one head, which stay
// in the core's L2, while the per-query inputs and outputs go by with a stride of H rows. When a batch's whole
// value fits in the L2 anyway and those per-query rows do not (RF-DETR's training: 3,900 queries of 16 heads,
// 2 points, a 40x40 level), walking the heads of each query innermost reads and writes them in order: 11.2 ->
// 7.1 ms at rfdetr-base-train-b4 (2 threads); at every other named shape the two orders are within noise or
// head by head is faster (up to 1.4x: lwdetr-large-infer-b1, the DETR encoder).
constexpr int64_t kL2Bytes = int64_t(2) << 20;  // a core's L2 on the Xeons measured; smaller ones only shift the limit
template <typename scalar_t, typename Points>
bool walk_heads_innermost(const Problem<scalar_t, Points>& problem) {
  const int64_t value_bytes = problem.rows * problem.heads * problem.channels * int64_t(sizeof(scalar_t));
  const int64_t per_query_bytes = problem.queries * problem.heads *
                                  (3 * problem.points + problem.channels) * int64_t(sizeof(scalar_t));
  return value_bytes <= kL2Bytes && per_query_bytes > kL2Bytes;
}

// Output (B, Q, H*C) of any point source: make_points(tag) builds the source for scalar type
// decltype(*tag) once the dtype is dispatched.
template <typename MakePoints>
at::Tensor forward_cpu(const KernelInputs& in, int64_t queries, const MakePoints& make_points) {
  at::Tensor output = at::empty({in.value.size(0), queries, in.value.size(2) * in.value.size(3)}, in.value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const auto source = make_points(static_cast<scalar_t*>(nullptr));
    const Problem<scalar_t, std::decay_t<decltype(source)>> problem(in.levels, source, in.value, queries);
    scalar_t* output_data = output.mutable_data_ptr<scalar_t>();
    const int64_t work_per_head = std::max<int64_t>(1, problem.points * problem.channels * (in.discrete ? 1 : 4));
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / work_per_head);
    const bool staged = !in.discrete && StagedHead<scalar_t>::pays(in.levels, problem.rows, problem.queries,
                                                                   problem.points, problem.channels);
    const bool heads_innermost = walk_heads_innermost(problem);
    at::parallel_for(0, problem.batch * problem.queries * problem.heads, grain, [&](int64_t begin, int64_t end) {
      if (staged) {
        staged_forward_range<scalar_t>(problem, begin, end, output_data);
      } else if (in.discrete) {
        forward_range<scalar_t, true>(problem, heads_innermost, begin, end, output_data);
      } else {
        forward_range<scalar_t, false>(problem, heads_innermost, begin, end, output_data);
      }
    });
  });
  return output;
}

// grad_value (B, S, H, C) of any point source, whose own gradient outputs make_points has set up.
template <typename MakePoints>
at::Tensor backward_cpu(const at::Tensor& grad_output_in, const KernelInputs& in, int64_t queries,
                        const MakePoints& make_points) {
  const at::Tensor grad_output = grad_output_in.contiguous();
  check_grad_output(grad_output, in.value, queries);
  at::Tensor grad_value = zeros_for_accumulation(in.value.sizes(), at::toOpMathType(in.value.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const auto source = make_points(static_cast<scalar_t*>(nullptr));
    const Problem<scalar_t, std::decay_t<decltype(source)>> problem(in.levels, source, in.value, queries);
    const scalar_t* grad_output_data = grad_output.const_data_ptr<scalar_t>();
    auto* grad_value_data = grad_value.mutable_data_ptr<at::opmath_type<scalar_t>>();
    // Tasks (batch, head pairs) small enough to be done before the thread pool would wake run inline.
    const int64_t work_per_pair = std::max<int64_t>(
        1, problem.queries * problem.points * problem.channels * (in.discrete ? 1 : 4));
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / work_per_pair);
    at::parallel_for(0, problem.batch * problem.heads, grain, [&](int64_t begin, int64_t end) {
      if (in.discrete) {
        backward_range<scalar_t, true>(problem, grad_output_data, begin, end, grad_value_data);
      } else {
        backward_range<scalar_t, false>(problem, grad_output_data, begin, end, grad_value_data);
      }
    });
  });
  return grad_value.to(in.value.scalar_type());
}

template <typename scalar_t>
PlainPoints<scalar_t> plain_points(const KernelInputs& in) {
  return {in.weights.size(3), in.locations.const_data_ptr<scalar_t>(), in.weights.const_data_ptr<scalar_t>()};
}

at::Tensor plain_forward_cpu(const KernelInputs& in) {
  return forward_cpu(in, in.locations.size(1), [&](auto* tag) {
    return plain_points<std::remove_pointer_t<decltype(tag)>>(in);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plain_backward_cpu(const at::Tensor& grad_output,
                                                                  const KernelInputs& in) {
  at::Tensor grad_locations = at::empty_like(in.locations);
  at::Tensor grad_weights = at::empty_like(in.weights);
  at::Tensor grad_value = backward_cpu(grad_output, in, in.locations.size(1), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    auto source = plain_points<scalar_t>(in);
    source.grad_locations = grad_locations.mutable_data_ptr<scalar_t>();
    source.grad_weights = grad_weights.mutable_data_ptr<scalar_t>();
    return source;
  });
  return {grad_value, grad_locations, grad_weights};
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                      const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                      at::IntArrayRef num_points, c10::string_view method) {
  return plain_forward_cpu(
      prepare_inputs(value, spatial_shapes, sampling_locations, attention_weights, num_points, method));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, at::IntArrayRef spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::IntArrayRef num_points,
    c10::string_view method) {
  return plain_backward_cpu(
      grad_output, prepare_inputs(value, spatial_shapes, sampling_locations, attention_weights, num_points, method));
}

// The level table in CPU tensors costs nothing to read here: it is read and checked like the list form.
at::Tensor ms_deform_attn_forward_tensor_levels_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights, at::IntArrayRef num_points,
                                                    c10::string_view method) {
  return plain_forward_cpu(prepare_inputs(read_level_tensors(value, spatial_shapes, level_start_index, num_points),
                                          value, sampling_locations, attention_weights, method));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_tensor_levels_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    at::IntArrayRef num_points, c10::string_view method) {
  return plain_backward_cpu(
      grad_output, prepare_inputs(read_level_tensors(value, spatial_shapes, level_start_index, num_points), value,
                                  sampling_locations, attention_weights, method));
}

at::Tensor ms_deform_attn_fused_forward_cpu(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                            const at::Tensor& reference_points, const at::Tensor& sampling_offsets,
                                            const at::Tensor& attention_logits, at::IntArrayRef num_points,
                                            double offset_scale, c10::string_view method) {
  const KernelInputs in = prepare_fused_inputs(value, spatial_shapes, reference_points, sampling_offsets,
                                               attention_logits, num_points, method);
  const at::Tensor reference = reference_points.contiguous();
  return forward_cpu(in, in.locations.size(1), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    return FusedPoints<scalar_t>(in.levels, in.value.size(2), reference, in.locations, in.weights, offset_scale);
  });
}

// Returns the gradients of value, reference_points, sampling_offsets and attention_logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_fused_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, at::IntArrayRef spatial_shapes,
    const at::Tensor& reference_points, const at::Tensor& sampling_offsets, const at::Tensor& attention_logits,
    at::IntArrayRef num_points, double offset_scale, c10::string_view method) {
  const KernelInputs in = prepare_fused_inputs(value, spatial_shapes, reference_points, sampling_offsets,
                                               attention_logits, num_points, method);
  const at::Tensor reference = reference_points.contiguous();
  const int64_t B = in.value.size(0), Q = in.locations.size(1), H = in.value.size(2);
  // Each head's share of the reference gradient, summed over heads below: the backward's tasks own heads.
  at::Tensor grad_reference_per_head = at::empty({B, Q, H, reference.size(2), reference.size(3)},
                                                 reference.options().dtype(at::toOpMathType(reference.scalar_type())));
  at::Tensor grad_offsets = at::empty_like(in.locations);
  at::Tensor grad_logits = at::empty_like(in.weights);
  at::Tensor grad_value = backward_cpu(grad_output, in, Q, [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    FusedPoints<scalar_t> source(in.levels, H, reference, in.locations, in.weights, offset_scale);
    source.grad_reference = grad_reference_per_head.mutable_data_ptr<at::opmath_type<scalar_t>>();
    source.grad_offsets = grad_offsets.mutable_data_ptr<scalar_t>();
    source.grad_logits = grad_logits.mutable_data_ptr<scalar_t>();
    return source;
  });
  return {grad_value, grad_reference_per_head.sum(2).to(reference.scalar_type()), grad_offsets, grad_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(rtdetrv2_kernels, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
  m.impl("ms_deform_attn_forward_tensor_levels", &ms_deform_attn_forward_tensor_levels_cpu);
  m.impl("ms_deform_attn_backward_tensor_levels", &ms_deform_attn_backward_tensor_levels_cpu);
  m.impl("ms_deform_attn_fused_forward", &ms_deform_attn_fused_forward_cpu);
  m.impl("ms_deform_attn_fused_backward", &ms_deform_attn_fused_backward_cpu);
}

}  // namespace rtdetrv2_kernels
