#include "preload/engine_cache.h"

#include <atomic>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "preload/log.h"
#include "preload/settings.h"

namespace pycomm {
namespace preload {

namespace {

std::mutex g_mu;
// Engines by address. The attribute on each MPI communicator holds the address only, so that
// closing everything at MPI_Finalize and MPI's later attribute deletions cannot free twice.
std::unordered_map<Communicator*, std::unique_ptr<Communicator>> g_engines;
int g_engine_key = MPI_KEYVAL_INVALID;
int g_finalize_key = MPI_KEYVAL_INVALID;
std::atomic<bool> g_closed{false};

// The engine closes (frees its private MPI communicator) outside the lock.
void Destroy(std::unique_ptr<Communicator> engine) {
  try {
    engine->Close();
  } catch (const std::exception& e) {
    Debug("closing an engine: %s", e.what());
  }
}

// MPI frees a communicator that carries an engine.
int DeleteEngine(MPI_Comm, int, void* value, void*) {
  std::unique_ptr<Communicator> engine;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_engines.find(static_cast<Communicator*>(value));
    if (it == g_engines.end()) return MPI_SUCCESS;  // already closed at MPI_Finalize
    engine = std::move(it->second);
    g_engines.erase(it);
  }
  Debug("a communicator was freed: closing its engine");
  Destroy(std::move(engine));
  return MPI_SUCCESS;
}

// MPI_Finalize deletes MPI_COMM_SELF's attributes before anything else, with MPI still fully
// usable: every engine closes here, including those of communicators the program never freed.
int CloseAllEngines(MPI_Comm, int, void*, void*) {
  std::vector<std::unique_ptr<Communicator>> engines;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_closed = true;
    for (auto& entry : g_engines) engines.push_back(std::move(entry.second));
    g_engines.clear();
  }
  Debug("MPI_Finalize: closing %zu engine(s)", engines.size());
  for (auto& engine : engines) Destroy(std::move(engine));
  PMPI_Comm_free_keyval(&g_finalize_key);
  // Attributes still holding it stay valid until their communicators go; their callbacks find
  // no engine left and do nothing.
  PMPI_Comm_free_keyval(&g_engine_key);
  return MPI_SUCCESS;
}

// The keyvals, and the MPI_COMM_SELF attribute that closes everything at MPI_Finalize, on first use.
void SetUpOnce() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_engine_key != MPI_KEYVAL_INVALID) return;
  // MPI_COMM_NULL_COPY_FN: a duplicate of a communicator gets an engine of its own.
  PMPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, DeleteEngine, &g_engine_key, nullptr);
  PMPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, CloseAllEngines, &g_finalize_key, nullptr);
  PMPI_Comm_set_attr(MPI_COMM_SELF, g_finalize_key, nullptr);
}

}  // namespace

Communicator& EngineFor(MPI_Comm comm) {
  SetUpOnce();
  void* value = nullptr;
  int found = 0;
  PMPI_Comm_get_attr(comm, g_engine_key, &value, &found);
  if (found) return *static_cast<Communicator*>(value);
  // Collective, and not under the lock: other threads may be creating engines for other
  // communicators at the same time (MPI_THREAD_MULTIPLE).
  std::unique_ptr<Communicator> engine =
      Communicator::FromMpi((intptr_t)comm, OptionsFromEnvironment());  // an int in MPICH, a pointer elsewhere
  Communicator* raw = engine.get();
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_engines.emplace(raw, std::move(engine));
  }
  PMPI_Comm_set_attr(comm, g_engine_key, raw);
  Debug("engine created for a communicator of %d rank(s)", raw->size());
  return *raw;
}

bool EnginesClosed() { return g_closed.load(); }

}  // namespace preload
}  // namespace pycomm
