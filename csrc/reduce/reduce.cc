#include "reduce/reduce.h"

#include <cstdint>
#include <type_traits>

#include "reduce/half.h"

namespace pycomm {

namespace {

// How one dtype is stored and in which type its arithmetic runs.
template <typename T>
struct Native {
  using Storage = T;
  using Compute = T;
  static Compute Load(Storage v) { return v; }
  static Storage Store(Compute v) { return v; }
};

struct Half {
  using Storage = uint16_t;
  using Compute = float;
  static float Load(uint16_t v) { return Float16ToFloat(v); }
  static uint16_t Store(float v) { return FloatToFloat16(v); }
};

struct BFloat16 {
  using Storage = uint16_t;
  using Compute = float;
  static float Load(uint16_t v) { return BFloat16ToFloat(v); }
  static uint16_t Store(float v) { return FloatToBFloat16(v); }
};

// Signed sums and products wrap like numpy's: computing them in the unsigned type of the same
// width keeps that well defined.
template <typename T, bool = std::is_integral_v<T>>
struct WrappingOf {
  using type = T;
};
template <typename T>
struct WrappingOf<T, true> {
  using type = std::make_unsigned_t<T>;
};
template <typename T>
using Wrapping = typename WrappingOf<T>::type;

struct Sum {
  template <typename T>
  static T Apply(T a, T b) {
    return static_cast<T>(static_cast<Wrapping<T>>(a) + static_cast<Wrapping<T>>(b));
  }
};
struct Prod {
  template <typename T>
  static T Apply(T a, T b) {
    return static_cast<T>(static_cast<Wrapping<T>>(a) * static_cast<Wrapping<T>>(b));
  }
};
struct Min {
  template <typename T>
  static T Apply(T a, T b) {
    return b < a ? b : a;
  }
};
struct Max {
  template <typename T>
  static T Apply(T a, T b) {
    return a < b ? b : a;
  }
};

template <typename Type, typename Op>
void Reduce(const void* a, const void* b, void* out, size_t n) {
  using S = typename Type::Storage;
  const S* x = static_cast<const S*>(a);
  const S* y = static_cast<const S*>(b);
  S* z = static_cast<S*>(out);
  for (size_t i = 0; i < n; ++i) z[i] = Type::Store(Op::Apply(Type::Load(x[i]), Type::Load(y[i])));
}

template <typename Type>
ReduceFn ForOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return &Reduce<Type, Sum>;
    case ReduceOp::kProd:
      return &Reduce<Type, Prod>;
    case ReduceOp::kMin:
      return &Reduce<Type, Min>;
    case ReduceOp::kMax:
      return &Reduce<Type, Max>;
  }
  return nullptr;
}

template <typename Type>
void Scale(void* buf, size_t n, int divisor) {
  using S = typename Type::Storage;
  S* p = static_cast<S*>(buf);
  const auto d = static_cast<typename Type::Compute>(divisor);
  for (size_t i = 0; i < n; ++i) p[i] = Type::Store(Type::Load(p[i]) / d);
}

}  // namespace

ReduceFn GetReduceFn(DataType dtype, ReduceOp op) {
  switch (dtype) {
    case DataType::kFloat16:
      return ForOp<Half>(op);
    case DataType::kBFloat16:
      return ForOp<BFloat16>(op);
    case DataType::kFloat32:
      return ForOp<Native<float>>(op);
    case DataType::kFloat64:
      return ForOp<Native<double>>(op);
    case DataType::kInt8:
      return ForOp<Native<int8_t>>(op);
    case DataType::kUInt8:
      return ForOp<Native<uint8_t>>(op);
    case DataType::kInt32:
      return ForOp<Native<int32_t>>(op);
    case DataType::kInt64:
      return ForOp<Native<int64_t>>(op);
    case DataType::kUInt32:
      return ForOp<Native<uint32_t>>(op);
    case DataType::kUInt64:
      return ForOp<Native<uint64_t>>(op);
  }
  return nullptr;
}

void ScaleDown(void* buf, size_t n, DataType dtype, int divisor) {
  switch (dtype) {
    case DataType::kFloat16:
      return Scale<Half>(buf, n, divisor);
    case DataType::kBFloat16:
      return Scale<BFloat16>(buf, n, divisor);
    case DataType::kFloat32:
      return Scale<Native<float>>(buf, n, divisor);
    case DataType::kFloat64:
      return Scale<Native<double>>(buf, n, divisor);
    default:
      throw CommError(std::string("pycomm: avg is not defined for ") + DataTypeName(dtype));
  }
}

}  // namespace pycomm
