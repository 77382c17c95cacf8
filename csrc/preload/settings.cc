#include "preload/settings.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>

namespace pycomm {
namespace preload {

namespace {

const char* Env(const char* name) {
  const char* value = std::getenv(name);
  return value && *value ? value : nullptr;
}

std::string Lower(std::string text) {
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return text;
}

void Warn(const char* name, const char* value) {
  std::fprintf(stderr, "pycomm preload: ignoring %s=%s (cannot read it); using the default\n", name, value);
}

// `variable` names one of `names` in any case; the enum's values are their positions (the same
// order as pycomm.settings' tuples).
template <typename Enum>
void ReadChoice(const char* variable, std::initializer_list<const char*> names, Enum* out) {
  const char* raw = Env(variable);
  if (!raw) return;
  int value = 0;
  for (const char* name : names) {
    if (Lower(raw) == name) {
      *out = static_cast<Enum>(value);
      return;
    }
    ++value;
  }
  Warn(variable, raw);
}

// Switches the core reads itself (PYCOMM_SHM, PYCOMM_CMA, PYCOMM_KERNELS) and that take only
// `values`: any other is reported, since the core keeps its default without a word.
void CheckSwitch(const char* variable, std::initializer_list<const char*> values) {
  const char* raw = Env(variable);
  if (!raw) return;
  for (const char* value : values) {
    if (std::string(raw) == value) return;
  }
  Warn(variable, raw);
}

// "8", "64K", "1M", "2G" (powers of 1024), as pycomm.settings.parse_size reads them.
bool ParseSize(const char* text, size_t* out) {
  std::string s = Lower(text);
  if (!s.empty() && s.back() == 'b') s.pop_back();
  if (!s.empty() && s.back() == 'i') s.pop_back();
  double scale = 1;
  if (!s.empty() && (s.back() == 'k' || s.back() == 'm' || s.back() == 'g')) {
    scale = s.back() == 'k' ? 1024.0 : s.back() == 'm' ? 1048576.0 : 1073741824.0;
    s.pop_back();
  }
  char* end = nullptr;
  const double value = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || !(value >= 0) || !std::isfinite(value * scale)) return false;
  const double bytes = value * scale;
  if (bytes != std::floor(bytes) || bytes > 1e18) return false;
  *out = static_cast<size_t>(bytes);
  return true;
}

}  // namespace

bool DebugFromEnvironment() {
  const char* raw = Env("PYCOMM_DEBUG");
  if (!raw) return false;
  const std::string value = Lower(raw);
  return value != "0" && value != "false" && value != "no" && value != "off";
}

Options OptionsFromEnvironment() {
  Options options;
  options.blocking_only = true;
  options.debug = DebugFromEnvironment();
  if (const char* raw = Env("PYCOMM_TIMEOUT")) {
    char* end = nullptr;
    const double seconds = std::strtod(raw, &end);
    if (*end == '\0' && seconds > 0 && std::isfinite(seconds)) {
      options.timeout_s = seconds;
    } else {
      Warn("PYCOMM_TIMEOUT", raw);
    }
  }
  if (const char* raw = Env("PYCOMM_CHUNK_BYTES")) {
    size_t bytes = 0;
    if (ParseSize(raw, &bytes) && bytes >= kMinChunkBytes && bytes <= kMaxChunkBytes) {
      options.chunk_bytes = bytes;
    } else {
      Warn("PYCOMM_CHUNK_BYTES", raw);
    }
  }
  ReadChoice("PYCOMM_ALGO", {"auto", "ring", "oneshot", "hierarchical", "singlecopy"}, &options.algorithm);
  ReadChoice("PYCOMM_INTER_NODE", {"auto", "mpi", "ring"}, &options.inter_node);
  // As pycomm.settings.check_core_switches, which refuses them in Python.
  CheckSwitch("PYCOMM_SHM", {"0", "1"});
  CheckSwitch("PYCOMM_CMA", {"0", "1"});
  CheckSwitch("PYCOMM_KERNELS", {"auto", "generic"});
  return options;
}

}  // namespace preload
}  // namespace pycomm
