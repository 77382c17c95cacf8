#include "preload/settings.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
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
    if (ParseSize(raw, &bytes) && bytes >= 8) {
      options.chunk_bytes = bytes;
    } else {
      Warn("PYCOMM_CHUNK_BYTES", raw);
    }
  }
  if (const char* raw = Env("PYCOMM_ALGO")) {
    const std::string name = Lower(raw);
    if (name == "auto") {
      options.algorithm = Algorithm::kAuto;
    } else if (name == "ring") {
      options.algorithm = Algorithm::kRing;
    } else if (name == "oneshot") {
      options.algorithm = Algorithm::kOneShot;
    } else if (name == "hierarchical") {
      options.algorithm = Algorithm::kHierarchical;
    } else if (name == "singlecopy") {
      options.algorithm = Algorithm::kSingleCopy;
    } else {
      Warn("PYCOMM_ALGO", raw);
    }
  }
  if (const char* raw = Env("PYCOMM_INTER_NODE")) {
    const std::string name = Lower(raw);
    if (name == "auto") {
      options.inter_node = InterNode::kAuto;
    } else if (name == "mpi") {
      options.inter_node = InterNode::kMpi;
    } else if (name == "ring") {
      options.inter_node = InterNode::kRing;
    } else {
      Warn("PYCOMM_INTER_NODE", raw);
    }
  }
  return options;
}

}  // namespace preload
}  // namespace pycomm
