// GPU reduction kernels: correctness against a host reference (every dtype x op, several input
// counts, sizes and alignments), then bandwidth of the fused N-way reduce against a
// device-to-device copy measured in the same run. Run by bench/gpu_check.sh on a GPU machine.
//
// usage: reduce_bench [bytes (default 256 MiB)]

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/reduce_kernels.h"
#include "reduce/half.h"

using pycomm::DataType;
using pycomm::ReduceOp;

#define CHECK_CUDA(call)                                                                            \
  do {                                                                                              \
    cudaError_t err_ = (call);                                                                      \
    if (err_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(2);                                                                                 \
    }                                                                                               \
  } while (0)

namespace {

// Host reference with the kernels' documented semantics: accumulate in input order in the compute
// type (float32 for the half types), divide for avg, round once.
template <typename S, typename C>
struct HostType {
  static C Load(S v) { return static_cast<C>(v); }
  static S Store(C v) { return static_cast<S>(v); }
};
struct HostHalf {
  static float Load(uint16_t v) { return pycomm::Float16ToFloat(v); }
  static uint16_t Store(float v) { return pycomm::FloatToFloat16(v); }
};
struct HostBFloat16 {
  static float Load(uint16_t v) { return pycomm::BFloat16ToFloat(v); }
  static uint16_t Store(float v) { return pycomm::FloatToBFloat16(v); }
};

template <typename C>
C HostApply(ReduceOp op, C a, C b) {
  if constexpr (std::is_integral_v<C>) {
    using U = std::make_unsigned_t<C>;
    if (op == ReduceOp::kSum) return static_cast<C>(static_cast<U>(a) + static_cast<U>(b));
    if (op == ReduceOp::kProd) return static_cast<C>(static_cast<U>(a) * static_cast<U>(b));
  } else {
    if (op == ReduceOp::kSum || op == ReduceOp::kAvg) return a + b;
    if (op == ReduceOp::kProd) return a * b;
  }
  return op == ReduceOp::kMin ? (b < a ? b : a) : (a < b ? b : a);
}

template <typename S, typename C, typename Conv>
void HostReduce(const std::vector<const void*>& in, void* out, size_t n, ReduceOp op, int divisor) {
  for (size_t i = 0; i < n; ++i) {
    C acc = Conv::Load(static_cast<const S*>(in[0])[i]);
    for (size_t k = 1; k < in.size(); ++k) acc = HostApply<C>(op, acc, Conv::Load(static_cast<const S*>(in[k])[i]));
    if (op == ReduceOp::kAvg) acc = acc / static_cast<C>(divisor);
    static_cast<S*>(out)[i] = Conv::Store(acc);
  }
}

void HostReduceAny(DataType dtype, const std::vector<const void*>& in, void* out, size_t n, ReduceOp op, int divisor) {
  switch (dtype) {
    case DataType::kFloat16:
      return HostReduce<uint16_t, float, HostHalf>(in, out, n, op, divisor);
    case DataType::kBFloat16:
      return HostReduce<uint16_t, float, HostBFloat16>(in, out, n, op, divisor);
    case DataType::kFloat32:
      return HostReduce<float, float, HostType<float, float>>(in, out, n, op, divisor);
    case DataType::kFloat64:
      return HostReduce<double, double, HostType<double, double>>(in, out, n, op, divisor);
    case DataType::kInt8:
      return HostReduce<int8_t, int8_t, HostType<int8_t, int8_t>>(in, out, n, op, divisor);
    case DataType::kUInt8:
      return HostReduce<uint8_t, uint8_t, HostType<uint8_t, uint8_t>>(in, out, n, op, divisor);
    case DataType::kInt32:
      return HostReduce<int32_t, int32_t, HostType<int32_t, int32_t>>(in, out, n, op, divisor);
    case DataType::kInt64:
      return HostReduce<int64_t, int64_t, HostType<int64_t, int64_t>>(in, out, n, op, divisor);
    case DataType::kUInt32:
      return HostReduce<uint32_t, uint32_t, HostType<uint32_t, uint32_t>>(in, out, n, op, divisor);
    case DataType::kUInt64:
      return HostReduce<uint64_t, uint64_t, HostType<uint64_t, uint64_t>>(in, out, n, op, divisor);
  }
}

// Random bytes make NaNs in float types, whose bits are unspecified; fill with values instead.
void FillRandom(DataType dtype, void* buf, size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> real(-4, 4);
  for (size_t i = 0; i < n; ++i) {
    double v = real(rng);
    switch (dtype) {
      case DataType::kFloat16:
        static_cast<uint16_t*>(buf)[i] = pycomm::FloatToFloat16(static_cast<float>(v));
        break;
      case DataType::kBFloat16:
        static_cast<uint16_t*>(buf)[i] = pycomm::FloatToBFloat16(static_cast<float>(v));
        break;
      case DataType::kFloat32:
        static_cast<float*>(buf)[i] = static_cast<float>(v);
        break;
      case DataType::kFloat64:
        static_cast<double*>(buf)[i] = v;
        break;
      default: {
        uint64_t bits = rng();
        std::memcpy(static_cast<char*>(buf) + i * pycomm::DataTypeSize(dtype), &bits, pycomm::DataTypeSize(dtype));
      }
    }
  }
}

int CheckCorrectness() {
  int failures = 0, checks = 0;
  std::mt19937_64 rng(7);
  const size_t sizes[] = {1, 7, 64, 1000, 100003};
  for (int d = 0; d < pycomm::kNumDataTypes; ++d) {
    auto dtype = static_cast<DataType>(d);
    const size_t es = pycomm::DataTypeSize(dtype);
    for (int o = 0; o < pycomm::kNumReduceOps; ++o) {
      auto op = static_cast<ReduceOp>(o);
      if (op == ReduceOp::kAvg && !pycomm::IsFloatingPoint(dtype)) continue;
      for (int inputs : {1, 2, 3, 8}) {
        for (size_t n : sizes) {
          // An element offset of 1 breaks 16-byte alignment and exercises the scalar path.
          for (size_t offset : {size_t{0}, size_t{1}}) {
            std::vector<std::vector<char>> host(inputs, std::vector<char>((n + offset) * es));
            std::vector<const void*> host_ptrs, dev_ptrs;
            std::vector<void*> dev(inputs);
            for (int k = 0; k < inputs; ++k) {
              FillRandom(dtype, host[k].data(), n + offset, rng);
              CHECK_CUDA(cudaMalloc(&dev[k], (n + offset) * es));
              CHECK_CUDA(cudaMemcpy(dev[k], host[k].data(), (n + offset) * es, cudaMemcpyHostToDevice));
              host_ptrs.push_back(host[k].data() + offset * es);
              dev_ptrs.push_back(static_cast<char*>(dev[k]) + offset * es);
            }
            void* dev_out;
            CHECK_CUDA(cudaMalloc(&dev_out, (n + offset) * es));
            std::vector<char> expected(n * es), got(n * es);
            HostReduceAny(dtype, host_ptrs, expected.data(), n, op, inputs);
            void* out_ptr = static_cast<char*>(dev_out) + offset * es;
            CHECK_CUDA(pycomm::cuda::LaunchReduce(dev_ptrs.data(), inputs, &out_ptr, 1, n, dtype, op, inputs, nullptr));
            CHECK_CUDA(
                cudaMemcpy(got.data(), static_cast<char*>(dev_out) + offset * es, n * es, cudaMemcpyDeviceToHost));
            ++checks;
            if (got != expected) {
              ++failures;
              std::printf("FAIL: reduce %s %s inputs=%d n=%zu offset=%zu\n", pycomm::DataTypeName(dtype),
                          pycomm::ReduceOpName(op), inputs, n, offset);
            }
            for (void* p : dev) CHECK_CUDA(cudaFree(p));
            CHECK_CUDA(cudaFree(dev_out));
          }
        }
      }
    }
  }
  std::printf("correctness: %d passed, %d failed\n", checks - failures, failures);
  return failures;
}

template <typename F>
float MedianMs(F launch, int iters) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) launch();
  std::vector<float> times;
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(start));
    launch();
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return times[times.size() / 2];
}

void Bandwidth(size_t bytes) {
  const size_t n = bytes / sizeof(float);
  std::vector<void*> bufs(pycomm::cuda::kMaxReduceInputs + 1);
  for (auto& b : bufs) {
    CHECK_CUDA(cudaMalloc(&b, bytes));
    CHECK_CUDA(cudaMemset(b, 0, bytes));
  }
  float copy_ms = MedianMs([&] { CHECK_CUDA(cudaMemcpyAsync(bufs[1], bufs[0], bytes, cudaMemcpyDeviceToDevice)); }, 20);
  double copy_gbs = 2.0 * bytes / (copy_ms * 1e6);
  std::printf("\n%-28s %12s %12s %14s %10s\n", "operation (float32)", "size(MiB)", "time(us)", "GB/s (r+w)", "vs copy");
  std::printf("%-28s %12.0f %12.1f %14.1f %10s\n", "device-to-device copy", bytes / 1048576.0, copy_ms * 1e3, copy_gbs,
              "1.00");
  for (int inputs : {2, 4, 8}) {
    std::vector<const void*> in(bufs.begin(), bufs.begin() + inputs);
    float ms = MedianMs(
        [&] {
          CHECK_CUDA(pycomm::cuda::LaunchReduce(in.data(), inputs, &bufs[inputs], 1, n, DataType::kFloat32,
                                                ReduceOp::kSum, 1, nullptr));
        },
        20);
    double gbs = (inputs + 1.0) * bytes / (ms * 1e6);
    std::string name = "reduce " + std::to_string(inputs) + " inputs, sum";
    std::printf("%-28s %12.0f %12.1f %14.1f %10.2f\n", name.c_str(), bytes / 1048576.0, ms * 1e3, gbs, gbs / copy_gbs);
  }
  // The leader pattern: P ranks' inputs reduced into P outputs in one pass, against the floor of
  // reading every input and writing every output once at copy bandwidth.
  for (int ranks : {2, 4}) {
    std::vector<const void*> in(bufs.begin(), bufs.begin() + ranks);
    std::vector<void*> out(bufs.begin() + ranks, bufs.begin() + 2 * ranks);
    float ms = MedianMs(
        [&] {
          CHECK_CUDA(pycomm::cuda::LaunchReduce(in.data(), ranks, out.data(), ranks, n, DataType::kFloat32,
                                                ReduceOp::kSum, 1, nullptr));
        },
        20);
    double gbs = 2.0 * ranks * bytes / (ms * 1e6);
    std::string name = "reduce " + std::to_string(ranks) + " in -> " + std::to_string(ranks) + " out";
    std::printf("%-28s %12.0f %12.1f %14.1f %10.2f\n", name.c_str(), bytes / 1048576.0, ms * 1e3, gbs, gbs / copy_gbs);
  }
  for (size_t small : {size_t{8}, size_t{64 << 10}}) {
    std::vector<const void*> in(bufs.begin(), bufs.begin() + 2);
    float ms = MedianMs(
        [&] {
          CHECK_CUDA(pycomm::cuda::LaunchReduce(in.data(), 2, &bufs[2], 1, small / sizeof(float), DataType::kFloat32,
                                                ReduceOp::kSum, 1, nullptr));
        },
        50);
    std::string name = "reduce 2 inputs, " + std::to_string(small) + " B";
    std::printf("%-28s %12.4f %12.1f %14.3f %10s\n", name.c_str(), small / 1048576.0, ms * 1e3,
                3.0 * small / (ms * 1e6), "-");
  }
  for (auto& b : bufs) CHECK_CUDA(cudaFree(b));
}

}  // namespace

int main(int argc, char** argv) {
  size_t bytes = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : size_t{256} << 20;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, %.1f GiB\n", prop.name, prop.multiProcessorCount,
              prop.totalGlobalMem / 1073741824.0);
  int failures = CheckCorrectness();
  Bandwidth(bytes);
  return failures ? 1 : 0;
}
