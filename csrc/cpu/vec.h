// One 64-byte vector of T (GCC / Clang vector extensions): one AVX-512 register, or two AVX2 /
// four SSE registers in the other target clones. Loads and stores through it may be unaligned.
#pragma once
#include <cstdint>

namespace hyforget {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64), aligned(4), may_alias));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64), aligned(8), may_alias));
};
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

template <typename T>
inline __attribute__((always_inline)) typename Vec<T>::type vload(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::type*>(p);
}
template <typename T>
inline __attribute__((always_inline)) void vstore(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::type*>(p) = v;
}

}  // namespace hyforget
