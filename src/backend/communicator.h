// The communicator seam of tensor parallelism (issue #23): the collectives a sharded model needs
// between its ranks, whatever carries them. Two implementations: an in-process group (N ranks as
// N threads of one process, for the CPU backend and CI) here, and NCCL for CUDA
// (backend/nccl_communicator.h, loaded at run time). Every rank calls the same collectives in
// the same order; a call blocks until every rank has made it.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace redknot {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // In place: every rank's `t` becomes the elementwise sum of all ranks' `t`.
  // t: [...] f32 or bf16, the same shape on every rank, on this rank's device, contiguous
  virtual void all_reduce_sum(Tensor& t) = 0;
  // out[r] = rank r's `in`, for every rank r (NCCL's allgather: equal sizes).
  // in: [...] any dtype; out: [size, ...] same dtype, on this rank's device
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  virtual void barrier() = 0;
  // A rank that failed wakes every rank blocked in (or later entering) a collective, which then
  // throws instead of waiting forever for it. No-op where the transport cannot.
  virtual void abort(const std::string& why) { (void)why; }
};

// Thrown by a collective of a group that a rank aborted.
struct CollectiveAborted : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// N ranks as N threads of one process, tensors in host memory. The rendezvous object all ranks
// share: a collective posts each rank's buffer, waits for all, and every rank reads all buffers
// in rank order, so the sum is the same bits on every rank and never depends on thread timing
// (bf16 sums accumulate in f32 and round once).
class InProcessGroup {
 public:
  explicit InProcessGroup(int size);
  ~InProcessGroup();
  int size() const { return size_; }
  // The communicator of `rank`, owned by the group (one per rank, used by that rank's thread).
  Communicator& rank(int r) { return *comms_.at(static_cast<size_t>(r)); }
  void abort(const std::string& why);

 private:
  class Comm;
  // Posts `rank`'s buffer and waits until every rank has posted (or the group is aborted);
  // then the buffers of all ranks stay valid until the matching leave().
  void arrive(int rank, const void* buf, int64_t bytes, const char* what);
  void leave();
  void wait_all(std::unique_lock<std::mutex>& lock);

  int size_;
  std::vector<std::unique_ptr<Communicator>> comms_;
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t arrived_ = 0;      // ranks at the current rendezvous
  uint64_t generation_ = 0;  // rendezvous completed so far
  std::vector<const void*> bufs_;
  std::vector<int64_t> bytes_;
  bool aborted_ = false;
  std::string abort_reason_;
};

// Runs fn(rank) on `group.size()` threads, one per rank, and waits for all. When a rank throws
// the group is aborted (no rank hangs in a collective) and the first real error is rethrown.
void run_ranks(InProcessGroup& group, const std::function<void(int rank)>& fn);

}  // namespace redknot
