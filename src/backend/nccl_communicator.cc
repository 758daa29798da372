#include "backend/nccl_communicator.h"

#include <dlfcn.h>

#include <cstring>
#include <mutex>

#include "core/error.h"

namespace redknot {

namespace {

// The subset of nccl.h used here, declared by hand (values and layouts of NCCL 2.x).
using ncclResult_t = int;  // ncclSuccess = 0
using ncclComm_t = void*;
struct ncclUniqueId {
  char internal[128];
};
constexpr int kNcclFloat32 = 7, kNcclBfloat16 = 9, kNcclUint8 = 1;  // ncclDataType_t
constexpr int kNcclSum = 0;                                         // ncclRedOp_t

struct NcclApi {
  ncclResult_t (*get_unique_id)(ncclUniqueId*) = nullptr;
  ncclResult_t (*comm_init_rank)(ncclComm_t*, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*all_reduce)(const void*, void*, size_t, int, int, ncclComm_t, void*) = nullptr;
  ncclResult_t (*all_gather)(const void*, void*, size_t, int, ncclComm_t, void*) = nullptr;
  ncclResult_t (*comm_destroy)(ncclComm_t) = nullptr;
  ncclResult_t (*comm_abort)(ncclComm_t) = nullptr;
  const char* (*get_error_string)(ncclResult_t) = nullptr;
  std::string error;  // non-empty: not usable, and why
};

const NcclApi& api() {
  static NcclApi a;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* e = dlerror();
      a.error = std::string("cannot load libnccl.so.2 (") + (e ? e : "unknown") + ")";
      return;
    }
    auto sym = [&](const char* name, auto& fn) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (fn == nullptr && a.error.empty())
        a.error = std::string("libnccl.so.2 has no ") + name + " (NCCL 2.x needed)";
    };
    sym("ncclGetUniqueId", a.get_unique_id);
    sym("ncclCommInitRank", a.comm_init_rank);
    sym("ncclAllReduce", a.all_reduce);
    sym("ncclAllGather", a.all_gather);
    sym("ncclCommDestroy", a.comm_destroy);
    sym("ncclCommAbort", a.comm_abort);
    sym("ncclGetErrorString", a.get_error_string);
  });
  return a;
}

const NcclApi& checked_api() {
  const NcclApi& a = api();
  if (!a.error.empty()) throw Error("NCCL: " + a.error);
  return a;
}

void check(ncclResult_t r, const char* what) {
  if (r != 0)
    throw Error(std::string("NCCL ") + what + " failed: " + checked_api().get_error_string(r));
}

int nccl_dtype(DType t) {
  switch (t) {
    case DType::F32:
      return kNcclFloat32;
    case DType::BF16:
      return kNcclBfloat16;
    default:
      throw Error(std::string("NCCL all_reduce: f32 or bf16 only, got ") + dtype_name(t));
  }
}

}  // namespace

std::string nccl_unavailable_reason() { return api().error; }

NcclUniqueId nccl_unique_id() {
  ncclUniqueId id;
  check(checked_api().get_unique_id(&id), "ncclGetUniqueId");
  NcclUniqueId out;
  std::memcpy(out.data(), id.internal, out.size());
  return out;
}

NcclCommunicator::NcclCommunicator(const NcclUniqueId& id, int rank, int size, void* stream,
                                   Tensor scratch)
    : rank_(rank), size_(size), stream_(stream), scratch_(std::move(scratch)) {
  ncclUniqueId uid;
  std::memcpy(uid.internal, id.data(), id.size());
  check(checked_api().comm_init_rank(&comm_, size, uid, rank), "ncclCommInitRank");
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ != nullptr) api().comm_destroy(comm_);
}

void NcclCommunicator::all_reduce_sum(Tensor& t) {
  // In place; NCCL's ring order is fixed for a communicator, so every step sums the same way.
  check(checked_api().all_reduce(t.raw(), t.raw(), static_cast<size_t>(t.numel()),
                                 nccl_dtype(t.dtype()), kNcclSum, comm_, stream_),
        "ncclAllReduce");
}

void NcclCommunicator::all_gather(const Tensor& in, Tensor& out) {
  if (out.nbytes() != in.nbytes() * size_)
    throw Error("all_gather: out " + out.describe() + " does not hold " + std::to_string(size_) +
                " x " + in.describe());
  // As bytes: any dtype gathers the same.
  check(checked_api().all_gather(in.raw(), out.raw(), static_cast<size_t>(in.nbytes()), kNcclUint8,
                                 comm_, stream_),
        "ncclAllGather");
}

void NcclCommunicator::barrier() { all_reduce_sum(scratch_); }

void NcclCommunicator::abort(const std::string& why) {
  (void)why;
  if (comm_ != nullptr) {
    api().comm_abort(comm_);
    comm_ = nullptr;
  }
}

}  // namespace redknot
