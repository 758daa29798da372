// NCCL behind the communicator seam (backend/communicator.h), for CUDA ranks. libnccl.so.2 is
// loaded at run time (dlopen) through a small declared subset of its C API, so the engine builds
// and runs without NCCL and a machine without it gets a clear error instead of a link failure.
// Written against NCCL 2.x's ABI (ncclUniqueId of 128 bytes, the ncclDataType_t / ncclRedOp_t
// numbering of nccl.h). NOT RUN: no machine this was written on has two GPUs or NCCL; the CUDA
// backend does not yet pin one device per rank (docs/tensor-parallel.md).
#pragma once
#include <array>
#include <string>

#include "backend/communicator.h"

namespace redknot {

// ncclUniqueId: made by rank 0 (nccl_unique_id), handed to every rank by the caller.
using NcclUniqueId = std::array<char, 128>;

// Empty when libnccl.so.2 loads and exports every function used here; else why not (dlerror).
std::string nccl_unavailable_reason();
// Throws Error (with nccl_unavailable_reason) when NCCL cannot be loaded.
NcclUniqueId nccl_unique_id();

class NcclCommunicator : public Communicator {
 public:
  // Joins the communicator of `size` ranks named by `id` as `rank` (ncclCommInitRank: every
  // rank must call it at once, each on its own device, current when called). stream: the
  // cudaStream_t the rank's backend computes on (null: the default stream); collectives are
  // enqueued there, ordered with the kernels around them. scratch: [1] f32 on the rank's device
  // (barrier's all-reduce).
  NcclCommunicator(const NcclUniqueId& id, int rank, int size, void* stream, Tensor scratch);
  ~NcclCommunicator() override;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce_sum(Tensor& t) override;
  void all_gather(const Tensor& in, Tensor& out) override;
  void barrier() override;
  void abort(const std::string& why) override;

 private:
  void* comm_ = nullptr;  // ncclComm_t
  int rank_, size_;
  void* stream_;
  Tensor scratch_;
};

}  // namespace redknot
