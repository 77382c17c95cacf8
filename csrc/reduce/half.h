// float16 and bfloat16 <-> float32 conversions written with integer operations only, so that the
// compiler can vectorise the loops that use them on any x86-64 (no F16C needed). Static: each
// translation unit, compiled for its own instruction set, keeps its own copies.
#pragma once

#include <cstdint>
#include <cstring>

namespace pycomm {

static inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t FloatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

static inline float BFloat16ToFloat(uint16_t h) { return BitsToFloat(static_cast<uint32_t>(h) << 16); }

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
static inline uint16_t FloatToBFloat16(float f) {
  uint32_t u = FloatToBits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
}

static inline float Float16ToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t magnitude = h & 0x7fffu;
  // Moving the exponent and mantissa into float position and scaling by 2^(127-15) turns
  // normals and subnormals alike into the right value.
  float scaled = BitsToFloat(magnitude << 13) * 0x1p112f;
  uint32_t bits = FloatToBits(scaled);
  // Infinity and NaN keep their mantissa and get float's all-ones exponent.
  uint32_t special = (magnitude << 13) | 0x7f800000u;
  return BitsToFloat(sign | (magnitude >= 0x7c00u ? special : bits));
}

// Round to nearest, ties to even, as IEEE conversion does.
static inline uint16_t FloatToFloat16(float f) {
  uint32_t u = FloatToBits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  // Too large for float16 (>= 65520 rounds to infinity), or NaN: quiet, keeping the top of the
  // payload, as F16C's conversion does.
  uint32_t overflow = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : 0x7c00u;
  // Below 2^-14 the result is subnormal: adding 0.5 makes the FPU round the mantissa for us.
  uint32_t subnormal = FloatToBits(BitsToFloat(a) + 0.5f) - 0x3f000000u;
  // Normal: rebias the exponent, then round the 13 dropped mantissa bits to nearest even.
  uint32_t odd = (a >> 13) & 1u;
  uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + odd) >> 13;
  uint32_t out = a >= 0x477ff000u ? overflow : (a < 0x38800000u ? subnormal : normal);
  return static_cast<uint16_t>(sign | out);
}

}  // namespace pycomm
