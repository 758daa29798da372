#include "backend/builtin.h"

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/reference/reference_backend.h"
#ifdef REDKNOT_HAS_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

namespace redknot {

// Idempotent without extra state: registering a name again replaces the same factory.
void register_builtin_backends() {
  register_backend("reference", [] { return std::make_unique<ReferenceBackend>(); });
  // Default: one thread per hardware thread, weights kept in their checkpoint dtype.
  register_backend("cpu", [] { return std::make_unique<CpuBackend>(); });
#ifdef REDKNOT_HAS_CUDA
  register_backend("cuda", [] { return make_cuda_backend(); });
#endif
}

}  // namespace redknot
