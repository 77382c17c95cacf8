#include "preload/mpi_types.h"

#include <climits>
#include <cstdint>

namespace pycomm {
namespace preload {

namespace {

// Handles are compared, not names or sizes: a derived datatype with the layout of a predefined
// one still passes through, because only predefined handles are certain to be contiguous and of
// one element type. MPI requires every rank to pass the same datatype, so the choice is the same
// on every rank.
struct TypeEntry {
  MPI_Datatype mpi;
  DataType engine;
};

static_assert(sizeof(int) == 4 && sizeof(long long) == 8, "pycomm assumes 32-bit int, 64-bit long long");
static_assert(sizeof(signed char) == 1, "pycomm assumes 8-bit char");

const TypeEntry kTypes[] = {
    {MPI_FLOAT, DataType::kFloat32},
    {MPI_DOUBLE, DataType::kFloat64},
    {MPI_SIGNED_CHAR, DataType::kInt8},
    {MPI_INT8_T, DataType::kInt8},
    {MPI_UNSIGNED_CHAR, DataType::kUInt8},
    {MPI_UINT8_T, DataType::kUInt8},
    {MPI_INT, DataType::kInt32},
    {MPI_INT32_T, DataType::kInt32},
    {MPI_UNSIGNED, DataType::kUInt32},
    {MPI_UINT32_T, DataType::kUInt32},
    {MPI_LONG, sizeof(long) == 8 ? DataType::kInt64 : DataType::kInt32},
    {MPI_UNSIGNED_LONG, sizeof(long) == 8 ? DataType::kUInt64 : DataType::kUInt32},
    {MPI_LONG_LONG, DataType::kInt64},
    {MPI_UNSIGNED_LONG_LONG, DataType::kUInt64},
    {MPI_INT64_T, DataType::kInt64},
    {MPI_UINT64_T, DataType::kUInt64},
#ifdef MPIX_C_FLOAT16
    // The engine sums half precision in float32 and rounds once per step: for float16 at 2 ranks
    // the same bits as MPICH's, at more ranks possibly closer to the exact sum than MPI's per-add
    // rounding. (For bfloat16 MPICH rounds ties away from even, so even 2 ranks can differ.)
    {MPIX_C_FLOAT16, DataType::kFloat16},
#endif
#ifdef MPIX_BFLOAT16
    {MPIX_BFLOAT16, DataType::kBFloat16},
#endif
};

}  // namespace

bool EngineDataType(MPI_Datatype datatype, DataType* out) {
  for (const TypeEntry& entry : kTypes) {
    if (entry.mpi == datatype) {
      *out = entry.engine;
      return true;
    }
  }
  return false;
}

bool EngineReduceOp(MPI_Op op, ReduceOp* out) {
  if (op == MPI_SUM) {
    *out = ReduceOp::kSum;
  } else if (op == MPI_PROD) {
    *out = ReduceOp::kProd;
  } else if (op == MPI_MIN) {
    *out = ReduceOp::kMin;
  } else if (op == MPI_MAX) {
    *out = ReduceOp::kMax;
  } else {
    return false;
  }
  return true;
}

const char* OpName(MPI_Op op) {
  struct Named {
    MPI_Op op;
    const char* name;
  };
  static const Named kNames[] = {
      {MPI_SUM, "MPI_SUM"},         {MPI_PROD, "MPI_PROD"},   {MPI_MIN, "MPI_MIN"},       {MPI_MAX, "MPI_MAX"},
      {MPI_LAND, "MPI_LAND"},       {MPI_LOR, "MPI_LOR"},     {MPI_LXOR, "MPI_LXOR"},     {MPI_BAND, "MPI_BAND"},
      {MPI_BOR, "MPI_BOR"},         {MPI_BXOR, "MPI_BXOR"},   {MPI_MINLOC, "MPI_MINLOC"}, {MPI_MAXLOC, "MPI_MAXLOC"},
      {MPI_REPLACE, "MPI_REPLACE"}, {MPI_NO_OP, "MPI_NO_OP"},
  };
  for (const Named& n : kNames) {
    if (n.op == op) return n.name;
  }
  return "a user-defined op";
}

}  // namespace preload
}  // namespace pycomm
