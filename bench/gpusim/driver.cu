// One multi-scale deformable attention launch on decoder-like inputs, as a standalone CUDA program for
// GPGPU-Sim (bench/gpusim/run.py builds one binary per simulated architecture and runs it under the simulator).
//
//   driver impl=ours|original pass=forward|backward method=default|discrete batch=B queries=Q heads=H
//          channels=C levels=80x80,40x40,20x20 points=4,4,4 l2_bytes=N [seed=N] [dump=FILE] [block=N point_lanes=N]
//
// "ours" launches the kernels of csrc/cuda/ms_deform_attn_kernels.cuh with the op's own launch policy;
// "original" the Deformable-DETR kernels (their ms_deform_im2col_cuda.cuh, which run.py downloads and puts on
// the include path with empty stand-ins for the ATen and THC headers it includes; compiled in only with
// -DGPUSIM_WITH_ORIGINAL). Both read the same inputs: value uniform in [-1, 1], sampling locations formed as
// RT-DETRv2's decoder forms them (reference boxes plus offsets scaled by the box size, offset_scale / points
// per level), softmaxed attention weights. Every result is checked here against a plain double-precision
// computation on the host (not the kernels' sampling.h), printed as "check <what> <max relative error>";
// dump=FILE writes the results as raw float32 so that run.py can compare implementations with each other.
// l2_bytes and multiprocessors are the simulated GPU's L2 size and SM count, which our launch policy asks
// about (run.py passes the config's; without them the GPU is asked);
// block= and point_lanes= override the policy's choices (threads per block; point lanes: up to 4 forward,
// 8 backward), to explore.
// On a real GPU (bench/gpu_check.py), repeat=N times N more launches after the checked one with CUDA events
// and prints "time_ms <mean>"; under the simulator events measure the host, so run.py asks for none.
// Exit status 3 when a check fails.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/ms_deform_attn_kernels.cuh"
#if defined(GPUSIM_WITH_ORIGINAL)
#include "ms_deform_im2col_cuda.cuh"
#endif

namespace {

struct Args {
  std::string impl = "ours", pass = "forward", method = "default", dump;
  int batch = 1, queries = 300, heads = 8, channels = 32;
  int block = 0, point_lanes = 0;  // ours only, for exploring: 0 = the op's launch policy
  int repeat = 0;                  // on a GPU: time this many more launches
  int64_t l2_bytes = 0;            // the simulated GPU's L2 and SMs, which the launch policy asks about
  int multiprocessors = 0;
  std::vector<int> heights, widths, points;
  uint64_t seed = 0;
};

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "driver: %s\n", message.c_str());
  std::exit(2);
}

std::vector<int> int_list(const std::string& text) {
  std::vector<int> values;
  size_t begin = 0;
  while (begin <= text.size()) {
    const size_t end = text.find(',', begin);
    values.push_back(std::atoi(text.substr(begin, end - begin).c_str()));
    if (end == std::string::npos) break;
    begin = end + 1;
  }
  return values;
}

Args parse(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (eq == std::string::npos) fail("arguments are key=value, got " + arg);
    const std::string key = arg.substr(0, eq), value = arg.substr(eq + 1);
    if (key == "impl") args.impl = value;
    else if (key == "pass") args.pass = value;
    else if (key == "method") args.method = value;
    else if (key == "dump") args.dump = value;
    else if (key == "batch") args.batch = std::atoi(value.c_str());
    else if (key == "queries") args.queries = std::atoi(value.c_str());
    else if (key == "heads") args.heads = std::atoi(value.c_str());
    else if (key == "channels") args.channels = std::atoi(value.c_str());
    else if (key == "block") args.block = std::atoi(value.c_str());
    else if (key == "point_lanes") args.point_lanes = std::atoi(value.c_str());
    else if (key == "repeat") args.repeat = std::atoi(value.c_str());
    else if (key == "multiprocessors") args.multiprocessors = std::atoi(value.c_str());
    else if (key == "l2_bytes") args.l2_bytes = std::strtoll(value.c_str(), nullptr, 10);
    else if (key == "seed") args.seed = std::strtoull(value.c_str(), nullptr, 10);
    else if (key == "points") args.points = int_list(value);
    else if (key == "levels") {
      size_t begin = 0;
      while (begin < value.size()) {
        size_t end = value.find(',', begin);
        if (end == std::string::npos) end = value.size();
        const std::string level = value.substr(begin, end - begin);
        const size_t x = level.find('x');
        if (x == std::string::npos) fail("levels are HxW,HxW,..., got " + value);
        args.heights.push_back(std::atoi(level.substr(0, x).c_str()));
        args.widths.push_back(std::atoi(level.substr(x + 1).c_str()));
        begin = end + 1;
      }
    } else fail("unknown argument " + key);
  }
  if (args.heights.empty() || args.points.size() != args.heights.size()) fail("levels and points must pair up");
  if (args.impl != "ours" && args.impl != "original") fail("impl must be ours or original");
  if (args.pass != "forward" && args.pass != "backward") fail("pass must be forward or backward");
  if (args.method != "default" && args.method != "discrete") fail("method must be default or discrete");
  return args;
}

// splitmix64: the same inputs for every implementation and run.
struct Random {
  uint64_t state;
  double uniform(double low, double high) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return low + (high - low) * static_cast<double>(z >> 11) * 0x1.0p-53;
  }
};

struct Problem {
  Args args;
  int levels, total_points, rows;
  std::vector<int> level_start;
  std::vector<float> value, locations, weights, grad_output;

  explicit Problem(const Args& a) : args(a), levels(static_cast<int>(a.heights.size())), total_points(0), rows(0) {
    for (int l = 0; l < levels; ++l) {
      level_start.push_back(rows);
      rows += a.heights[l] * a.widths[l];
      total_points += a.points[l];
    }
    Random random{a.seed * 7919 + 1};
    const size_t bqh = static_cast<size_t>(a.batch) * a.queries * a.heads;
    value.resize(static_cast<size_t>(a.batch) * rows * a.heads * a.channels);
    for (float& v : value) v = static_cast<float>(random.uniform(-1, 1));
    // RT-DETRv2's decoder: loc = box center + offset / points_l * box size * 0.5, the offsets around the
    // initial per-head grid (head h looks along angle 2 pi h / H, point i of a level at distance i + 1).
    locations.resize(bqh * total_points * 2);
    weights.resize(bqh * total_points);
    for (int b = 0; b < a.batch; ++b) {
      for (int q = 0; q < a.queries; ++q) {
        const double cx = random.uniform(0.05, 0.95), cy = random.uniform(0.05, 0.95);
        const double w = random.uniform(0.02, 0.4), h = random.uniform(0.02, 0.4);
        for (int head = 0; head < a.heads; ++head) {
          const double angle = 2 * M_PI * head / a.heads;
          const double scale = std::fmax(std::fabs(std::cos(angle)), std::fabs(std::sin(angle)));
          const size_t row = ((static_cast<size_t>(b) * a.queries + q) * a.heads + head) * total_points;
          int p = 0;
          double largest = -1e300;
          std::vector<double> logits(total_points);
          for (int l = 0; l < levels; ++l) {
            for (int i = 0; i < a.points[l]; ++i, ++p) {
              const double ox = (i + 1) * std::cos(angle) / scale + random.uniform(-0.5, 0.5);
              const double oy = (i + 1) * std::sin(angle) / scale + random.uniform(-0.5, 0.5);
              locations[2 * (row + p)] = static_cast<float>(cx + ox / a.points[l] * w * 0.5);
              locations[2 * (row + p) + 1] = static_cast<float>(cy + oy / a.points[l] * h * 0.5);
              logits[p] = random.uniform(-2, 2);
              largest = std::fmax(largest, logits[p]);
            }
          }
          double total = 0;
          for (double& logit : logits) total += (logit = std::exp(logit - largest));
          for (p = 0; p < total_points; ++p) weights[row + p] = static_cast<float>(logits[p] / total);
        }
      }
    }
    grad_output.resize(bqh * a.channels);
    for (float& g : grad_output) g = static_cast<float>(random.uniform(-1, 1));
  }

  size_t value_index(int b, int row, int head, int c) const {
    return ((static_cast<size_t>(b) * rows + row) * args.heads + head) * args.channels + c;
  }
};

constexpr size_t kSector = 32;  // bytes: the unit in which the caches move data

size_t sectors(size_t elements) { return (elements * sizeof(float) + kSector - 1) / kSector; }

// Pixels: fp32 rounds a coordinate near 80 by 4e-6 (the kernels compute it in fp32, the host in fp64).
constexpr double kCellEdge = 1e-4;

// The expected results in double, straight from the definition (docs/semantics.md): bilinear as grid_sample
// with zero padding and align_corners=False; discrete as the nearest pixel clamped into the level.
struct Expected {
  std::vector<double> output, grad_value, grad_locations, grad_weights;
  std::vector<bool> value_sectors;  // the 32-byte sectors of value that some tap reads
  // Per location coordinate: whether it lies within kCellEdge pixels of a cell edge, where the bilinear
  // derivative jumps and an fp32 kernel may take the cell on the other side (x = 63.999998 here is 64 in fp32).
  std::vector<bool> on_cell_edge;
};

Expected expected(const Problem& pr) {
  const Args& a = pr.args;
  const bool discrete = a.method == "discrete";
  Expected e;
  e.output.assign(pr.grad_output.size(), 0.0);
  e.grad_value.assign(pr.value.size(), 0.0);
  e.grad_locations.assign(pr.locations.size(), 0.0);
  e.grad_weights.assign(pr.weights.size(), 0.0);
  e.value_sectors.assign(sectors(pr.value.size()), false);
  e.on_cell_edge.assign(pr.locations.size(), false);
  for (int b = 0; b < a.batch; ++b) {
    for (int q = 0; q < a.queries; ++q) {
      for (int head = 0; head < a.heads; ++head) {
        const size_t bqh = (static_cast<size_t>(b) * a.queries + q) * a.heads + head;
        const double* go = nullptr;
        std::vector<double> grad_out(a.channels);
        for (int c = 0; c < a.channels; ++c) grad_out[c] = pr.grad_output[bqh * a.channels + c];
        go = grad_out.data();
        int p = 0;
        for (int l = 0; l < pr.levels; ++l) {
          const int height = a.heights[l], width = a.widths[l];
          for (int i = 0; i < a.points[l]; ++i, ++p) {
            const size_t point = bqh * pr.total_points + p;
            const double weight = pr.weights[point];
            const double lx = pr.locations[2 * point], ly = pr.locations[2 * point + 1];
            // (pixel offset within the level, bilinear weight, d weight / d x, d weight / d y) per tap
            struct Tap { int x, y; double w, dx, dy; };
            std::vector<Tap> taps;
            if (discrete) {
              const int x = std::min(std::max(static_cast<int>(std::floor(lx * width + 0.5)), 0), width - 1);
              const int y = std::min(std::max(static_cast<int>(std::floor(ly * height + 0.5)), 0), height - 1);
              taps.push_back({x, y, 1.0, 0.0, 0.0});
            } else {
              const double x = lx * width - 0.5, y = ly * height - 0.5;
              e.on_cell_edge[2 * point] = std::fabs(x - std::nearbyint(x)) < kCellEdge;
              e.on_cell_edge[2 * point + 1] = std::fabs(y - std::nearbyint(y)) < kCellEdge;
              const int x0 = static_cast<int>(std::floor(x)), y0 = static_cast<int>(std::floor(y));
              const double fx = x - x0, fy = y - y0;
              for (int k = 0; k < 4; ++k) {
                const int dx = k & 1, dy = k >> 1;
                const double wx = dx ? fx : 1 - fx, wy = dy ? fy : 1 - fy;
                if (x0 + dx >= 0 && x0 + dx < width && y0 + dy >= 0 && y0 + dy < height) {
                  taps.push_back({x0 + dx, y0 + dy, wx * wy, dx ? wy : -wy, dy ? wx : -wx});
                }
              }
            }
            double grad_w = 0, grad_x = 0, grad_y = 0;
            for (const Tap& tap : taps) {
              const int row = pr.level_start[l] + tap.y * width + tap.x;
              const size_t first = pr.value_index(b, row, head, 0) * sizeof(float);
              for (size_t sector = first / kSector; sector <= (first + a.channels * sizeof(float) - 1) / kSector; ++sector) {
                e.value_sectors[sector] = true;
              }
              double dot = 0;
              for (int c = 0; c < a.channels; ++c) {
                const double v = pr.value[pr.value_index(b, row, head, c)];
                e.output[bqh * a.channels + c] += weight * tap.w * v;
                e.grad_value[pr.value_index(b, row, head, c)] += weight * tap.w * go[c];
                dot += go[c] * v;
              }
              grad_w += tap.w * dot;
              grad_x += tap.dx * dot;
              grad_y += tap.dy * dot;
            }
            e.grad_weights[point] = grad_w;
            e.grad_locations[2 * point] = weight * width * grad_x;
            e.grad_locations[2 * point + 1] = weight * height * grad_y;
          }
        }
      }
    }
  }
  return e;
}

// The least traffic that any implementation of the pass has to move between DRAM and the chip with the
// caches cold, in whole 32-byte sectors: every sector of value that a tap reads, the per-point inputs (and
// grad_output) read once; the results written once (grad_value whole: it is zero where no tap reads).
// Printed as "traffic <bytes read> <bytes written>".
void print_traffic(const Problem& pr, const Expected& e) {
  size_t value_read = 0;
  for (const bool touched : e.value_sectors) value_read += touched;
  const size_t per_point = sectors(pr.locations.size()) + sectors(pr.weights.size());
  if (pr.args.pass == "forward") {
    std::printf("traffic %zu %zu\n", kSector * (value_read + per_point), kSector * sectors(pr.grad_output.size()));
  } else {
    std::printf("traffic %zu %zu\n", kSector * (value_read + per_point + sectors(pr.grad_output.size())),
                kSector * (sectors(pr.value.size()) + per_point));
  }
}

// Max |actual - expected| over max(1, max |expected|), leaving out the elements `skip` marks.
double relative_error(const std::vector<float>& actual, const std::vector<double>& expected,
                      const std::vector<bool>& skip = {}) {
  double error = 0, scale = 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    scale = std::fmax(scale, std::fabs(expected[i]));
    if (!skip.empty() && skip[i]) continue;
    const double d = std::fabs(actual[i] - expected[i]);
    error = d == d ? std::fmax(error, d) : INFINITY;
  }
  return error / scale;
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(std::string(what) + ": " + cudaGetErrorString(status));
}

template <typename T>
T* upload(const std::vector<T>& host) {
  T* device = nullptr;
  check(cudaMalloc(&device, host.size() * sizeof(T)), "cudaMalloc");
  check(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
  return device;
}

template <typename T>
T* zeros(size_t count) {
  T* device = nullptr;
  check(cudaMalloc(&device, count * sizeof(T)), "cudaMalloc");
  check(cudaMemset(device, 0, count * sizeof(T)), "cudaMemset");
  return device;
}

template <typename T>
std::vector<T> download(const T* device, size_t count) {
  std::vector<T> host(count);
  check(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy");
  return host;
}

struct Results {
  std::vector<float> output, grad_value, grad_locations, grad_weights;
};

using namespace rtdetrv2_kernels;

// The op's launches (ms_deform_attn_cuda.cu) for fp32 with the plain op's point source, as functors over the
// compile-time vector width and method; the launch policy (vector width, point lanes, blocks) is the header's.
struct OursForward {
  const float* value;
  PlainPoints<float> points;
  float* output;
  Geometry g;
  LevelParams levels;
  int point_lanes, block;
  int64_t total;  // lanes: (batch, query, head) groups * channel lanes * point lanes
  template <int VEC, bool kDiscrete>
  void run() const {
    dispatch_point_lanes<kMaxForwardPointLanes>(point_lanes, [&](auto lanes) {
      forward_kernel<float, VEC, decltype(lanes)::value, kDiscrete, PlainPoints<float>, LevelParams>
          <<<(total + block - 1) / block, block>>>(value, points, output, g, levels, total);
    });
  }
};

struct OursBackward {
  const float* grad_output;
  const float* value;
  PlainPoints<float> points;
  float* grad_value;
  float* grad_locations;
  float* grad_weights;
  Geometry g;
  LevelParams levels;
  int point_lanes, block;
  int64_t total;
  template <int VEC, bool kDiscrete, bool kShuffle, int kPointLanes>
  void launch() const {
    backward_kernel<float, VEC, kPointLanes, kDiscrete, kShuffle, PlainPoints<float>, LevelParams, FloatSink<float>>
        <<<(total + block - 1) / block, block>>>(grad_output, value, points, FloatSink<float>{grad_value},
                                                  grad_locations, grad_weights, g, levels, total);
  }
  template <int VEC, bool kDiscrete>
  void run() const {
    if (!shuffles_within_groups(g)) return launch<VEC, kDiscrete, false, 1>();
    dispatch_point_lanes<kMaxPointLanes>(point_lanes, [&](auto lanes) {
      launch<VEC, kDiscrete, true, decltype(lanes)::value>();
    });
  }
};

template <typename Launch>
void dispatch(const Launch& launch, int vec, bool discrete) {
  if (vec == 4) {
    discrete ? launch.template run<4, true>() : launch.template run<4, false>();
  } else {
    discrete ? launch.template run<1, true>() : launch.template run<1, false>();
  }
}

struct Device {
  float *value, *locations, *weights, *grad_output;
};

// `launch` repeat times between CUDA events; prints the mean time of one.
template <typename Launch>
void time_launches(int repeat, const Launch& launch) {
  if (repeat <= 0) return;
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  check(cudaEventRecord(start), "cudaEventRecord");
  for (int i = 0; i < repeat; ++i) launch();
  check(cudaEventRecord(stop), "cudaEventRecord");
  check(cudaEventSynchronize(stop), "the timed launches");
  float milliseconds = 0;
  check(cudaEventElapsedTime(&milliseconds, start, stop), "cudaEventElapsedTime");
  std::printf("time_ms %.5f\n", milliseconds / repeat);
}

Results run_ours(const Problem& pr, const Device& d) {
  const Args& a = pr.args;
  LevelParams levels{};
  levels.num_levels = pr.levels;
  for (int l = 0; l < pr.levels; ++l) {
    levels.height[l] = a.heights[l];
    levels.width[l] = a.widths[l];
    levels.points[l] = a.points[l];
    levels.start[l] = pr.level_start[l];
  }
  const size_t outputs = pr.grad_output.size();
  const int64_t stride_h = a.channels, stride_s = stride_h * a.heads, stride_b = stride_s * pr.rows;
  const PlainPoints<float> points{d.locations, d.weights, pr.total_points};
  const bool discrete = a.method == "discrete";
  const int64_t value_bytes = static_cast<int64_t>(pr.value.size() * sizeof(float));
  Results results;
  if (a.pass == "forward") {
    float* output = zeros<float>(outputs);
    const int vec = vector_width<float>(a.channels, {stride_b, stride_s, stride_h}, {d.value, output});
    const Geometry g = make_geometry(a.queries, a.heads, a.channels, pr.total_points, vec, pr.rows, stride_b,
                                     stride_s, stride_h);
    const int lanes = a.point_lanes ? a.point_lanes : point_lanes(g, vec == 4, true, value_bytes <= a.l2_bytes);
    const int64_t total = static_cast<int64_t>(outputs) / vec * lanes;
    const int block = a.block ? a.block : threads_per_block(total, a.multiprocessors);
    const auto launch = [&] {
      dispatch(OursForward{d.value, points, output, g, levels, lanes, block, total}, vec, discrete);
    };
    launch();
    check(cudaDeviceSynchronize(), "forward_kernel");
    results.output = download(output, outputs);
    time_launches(a.repeat, launch);
  } else {
    float* grad_value = zeros<float>(pr.value.size());
    float* grad_locations = zeros<float>(pr.locations.size());
    float* grad_weights = zeros<float>(pr.weights.size());
    const int vec = vector_width<float>(a.channels, {stride_b, stride_s, stride_h}, {d.value, d.grad_output});
    const Geometry g = make_geometry(a.queries, a.heads, a.channels, pr.total_points, vec, pr.rows, stride_b,
                                     stride_s, stride_h);
    const int lanes = a.point_lanes ? a.point_lanes : point_lanes(g, vec == 4, false, value_bytes <= a.l2_bytes);
    const int64_t total = static_cast<int64_t>(outputs) / vec * lanes;
    const int block = a.block ? a.block : threads_per_block(total, a.multiprocessors);
    const auto launch = [&] {
      dispatch(OursBackward{d.grad_output, d.value, points, grad_value, grad_locations, grad_weights, g, levels, lanes,
                            block, total},
               vec, discrete);
    };
    launch();
    check(cudaDeviceSynchronize(), "backward_kernel");
    results.grad_value = download(grad_value, pr.value.size());
    results.grad_locations = download(grad_locations, pr.locations.size());
    results.grad_weights = download(grad_weights, pr.weights.size());
    time_launches(a.repeat, launch);  // adding into the same buffers again costs what the first launch did
  }
  return results;
}

Results run_original(const Problem& pr, const Device& d) {
#if defined(GPUSIM_WITH_ORIGINAL)
  const Args& a = pr.args;
  for (int l = 1; l < pr.levels; ++l) {
    if (a.points[l] != a.points[0]) fail("the original kernels take the same number of points on every level");
  }
  if (a.method != "default") fail("the original kernels sample bilinearly only");
  std::vector<int64_t> shapes, starts;
  for (int l = 0; l < pr.levels; ++l) {
    shapes.push_back(a.heights[l]);
    shapes.push_back(a.widths[l]);
    starts.push_back(pr.level_start[l]);
  }
  const int64_t* shapes_device = upload(shapes);
  const int64_t* starts_device = upload(starts);
  Results results;
  if (a.pass == "forward") {
    float* output = zeros<float>(pr.grad_output.size());
    const auto launch = [&] {
      ms_deformable_im2col_cuda<float>(nullptr, d.value, shapes_device, starts_device, d.locations, d.weights,
                                       a.batch, pr.rows, a.heads, a.channels, pr.levels, a.queries, a.points[0], output);
    };
    launch();
    check(cudaDeviceSynchronize(), "ms_deformable_im2col_gpu_kernel");
    results.output = download(output, pr.grad_output.size());
    time_launches(a.repeat, launch);
  } else {
    float* grad_value = zeros<float>(pr.value.size());
    float* grad_locations = zeros<float>(pr.locations.size());
    float* grad_weights = zeros<float>(pr.weights.size());
    const auto launch = [&] {
      ms_deformable_col2im_cuda<float>(nullptr, d.grad_output, d.value, shapes_device, starts_device, d.locations,
                                       d.weights, a.batch, pr.rows, a.heads, a.channels, pr.levels, a.queries,
                                       a.points[0], grad_value, grad_locations, grad_weights);
    };
    launch();
    check(cudaDeviceSynchronize(), "ms_deformable_col2im kernels");
    results.grad_value = download(grad_value, pr.value.size());
    results.grad_locations = download(grad_locations, pr.locations.size());
    results.grad_weights = download(grad_weights, pr.weights.size());
    time_launches(a.repeat, launch);
  }
  return results;
#else
  (void)pr;
  (void)d;
  fail("built without the original kernels (-DGPUSIM_WITH_ORIGINAL and their header on the include path)");
#endif
}

}  // namespace

int main(int argc, char** argv) {
  Args args = parse(argc, argv);
  if (args.l2_bytes == 0) {  // on a real GPU: ask it
    int l2 = 0;
    check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0), "cudaDeviceGetAttribute");
    args.l2_bytes = l2;
  }
  if (args.multiprocessors == 0) {
    check(cudaDeviceGetAttribute(&args.multiprocessors, cudaDevAttrMultiProcessorCount, 0), "cudaDeviceGetAttribute");
  }
  const Problem problem(args);
  const Device device{upload(problem.value), upload(problem.locations), upload(problem.weights),
                      upload(problem.grad_output)};
  const Results results = args.impl == "ours" ? run_ours(problem, device) : run_original(problem, device);
  const Expected e = expected(problem);
  print_traffic(problem, e);
  // fp32 kernels against fp64 sums of up to a few hundred terms (atomics add in any order).
  const double tolerance = 1e-4;
  bool ok = true;
  const auto report = [&](const char* what, const std::vector<float>& actual, const std::vector<double>& wanted,
                          const std::vector<bool>& skip = {}) {
    const double error = relative_error(actual, wanted, skip);
    std::printf("check %s %.3g\n", what, error);
    ok = ok && error <= tolerance;
  };
  FILE* dump = args.dump.empty() ? nullptr : std::fopen(args.dump.c_str(), "wb");
  const auto write = [&](const std::vector<float>& values) {
    if (dump) std::fwrite(values.data(), sizeof(float), values.size(), dump);
  };
  if (args.pass == "forward") {
    report("output", results.output, e.output);
    write(results.output);
  } else {
    report("grad_value", results.grad_value, e.grad_value);
    report("grad_weights", results.grad_weights, e.grad_weights);
    if (args.method == "default") {
      // The location gradient of a coordinate on a cell edge is either side's; the others are checked.
      report("grad_locations", results.grad_locations, e.grad_locations, e.on_cell_edge);
      const auto on_edge = std::count(e.on_cell_edge.begin(), e.on_cell_edge.end(), true);
      std::printf("on_cell_edge %zu\n", static_cast<size_t>(on_edge));
    }
    write(results.grad_value);
    write(results.grad_weights);
    write(results.grad_locations);
  }
  if (dump) std::fclose(dump);
  std::printf("result %s\n", ok ? "ok" : "MISMATCH");
  return ok ? 0 : 3;
}
