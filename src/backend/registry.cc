#include <map>
#include <mutex>

#include "backend/backend.h"
#include "core/error.h"

namespace redknot {
namespace {
std::map<std::string, BackendFactory>& registry() {
  static std::map<std::string, BackendFactory> r;
  return r;
}
std::mutex& registry_mu() {
  static std::mutex m;
  return m;
}
}  // namespace

void register_backend(const std::string& name, BackendFactory factory) {
  std::lock_guard<std::mutex> lk(registry_mu());
  registry()[name] = std::move(factory);
}

std::vector<std::string> backend_names() {
  std::lock_guard<std::mutex> lk(registry_mu());
  std::vector<std::string> out;
  for (auto& [k, v] : registry()) out.push_back(k);
  return out;
}

std::unique_ptr<Backend> create_backend(const std::string& name) {
  BackendFactory f;
  {
    std::lock_guard<std::mutex> lk(registry_mu());
    auto it = registry().find(name);
    if (it == registry().end()) {
      std::string names;
      for (auto& [k, v] : registry()) names += (names.empty() ? "" : ", ") + k;
      throw Error("unknown backend '" + name + "' (available: " + names + ")");
    }
    f = it->second;
  }
  return f();
}

}  // namespace redknot
