#include "pycomm/pycomm.h"

namespace pycomm {

size_t DataTypeSize(DataType dtype) {
  switch (dtype) {
    case DataType::kInt8:
    case DataType::kUInt8:
      return 1;
    case DataType::kFloat16:
    case DataType::kBFloat16:
      return 2;
    case DataType::kFloat32:
    case DataType::kInt32:
    case DataType::kUInt32:
      return 4;
    case DataType::kFloat64:
    case DataType::kInt64:
    case DataType::kUInt64:
      return 8;
  }
  throw CommError("pycomm: unknown dtype " + std::to_string(static_cast<int>(dtype)));
}

const char* DataTypeName(DataType dtype) {
  static const char* const kNames[kNumDataTypes] = {"float16", "bfloat16", "float32", "float64", "int8",
                                                    "uint8",   "int32",    "int64",   "uint32",  "uint64"};
  int i = static_cast<int>(dtype);
  return i >= 0 && i < kNumDataTypes ? kNames[i] : "unknown";
}

const char* ReduceOpName(ReduceOp op) {
  static const char* const kNames[kNumReduceOps] = {"sum", "prod", "min", "max", "avg"};
  int i = static_cast<int>(op);
  return i >= 0 && i < kNumReduceOps ? kNames[i] : "unknown";
}

bool IsFloatingPoint(DataType dtype) {
  return dtype == DataType::kFloat16 || dtype == DataType::kBFloat16 || dtype == DataType::kFloat32 ||
         dtype == DataType::kFloat64;
}

}  // namespace pycomm
