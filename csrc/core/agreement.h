// Checks, through the shared arena, that every rank is making the same call.
#pragma once

#include <cstdint>

#include "transport/shared_arena.h"

namespace pycomm {

// After arena.WaitAll(seq): throws MismatchError on every rank (all see the same infos) unless
// every rank posted the same count, dtype and op as `mine`.
void CheckCallsAgree(const SharedArena& arena, uint64_t seq, const SharedArena::CallInfo& mine);

}  // namespace pycomm
