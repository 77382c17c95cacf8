// How a buffer is cut into one block per rank.
#pragma once

#include <algorithm>
#include <cstddef>

namespace pycomm {

// `count` elements cut into `parts` blocks whose lengths differ by at most one.
class BlockLayout {
 public:
  BlockLayout(size_t count, int parts) : base_(count / parts), extra_(count % parts) {}
  size_t offset(int block) const { return block * base_ + std::min<size_t>(block, extra_); }
  size_t length(int block) const { return base_ + (static_cast<size_t>(block) < extra_ ? 1 : 0); }
  size_t max_length() const { return length(0); }

 private:
  size_t base_;
  size_t extra_;
};

// a mod n in [0, n), for positions on a ring of n ranks.
inline int Mod(int a, int n) { return ((a % n) + n) % n; }

}  // namespace pycomm
