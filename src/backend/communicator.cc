#include "backend/communicator.h"

#include <cstring>
#include <exception>
#include <thread>

#include "core/dtype.h"
#include "core/error.h"

namespace redknot {

class InProcessGroup::Comm : public Communicator {
 public:
  Comm(InProcessGroup& g, int rank) : g_(g), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_.size_; }

  void all_reduce_sum(Tensor& t) override {
    if (t.device() != Device::Host) throw Error("in-process all_reduce: tensors must be on host");
    if (t.dtype() != DType::F32 && t.dtype() != DType::BF16)
      throw Error("all_reduce_sum: f32 or bf16 only, got " + t.describe());
    const int64_t n = t.numel();
    std::vector<const void*> bufs = exchange(t.raw(), t.nbytes(), "all_reduce_sum");
    // Rank order, f32 accumulation: the same bits on every rank whatever the thread timing.
    std::vector<float> sum(static_cast<size_t>(n), 0.0f);
    for (const void* b : bufs) {
      if (t.dtype() == DType::F32) {
        const float* p = static_cast<const float*>(b);
        for (int64_t i = 0; i < n; ++i) sum[i] += p[i];
      } else {
        const uint16_t* p = static_cast<const uint16_t*>(b);
        for (int64_t i = 0; i < n; ++i) sum[i] += bf16_to_f32(p[i]);
      }
    }
    g_.leave();  // every rank has read every buffer: now each may overwrite its own
    if (t.dtype() == DType::F32) {
      std::memcpy(t.raw(), sum.data(), static_cast<size_t>(t.nbytes()));
    } else {
      uint16_t* p = t.data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) p[i] = f32_to_bf16(sum[i]);
    }
  }

  void all_gather(const Tensor& in, Tensor& out) override {
    if (in.device() != Device::Host || out.device() != Device::Host)
      throw Error("in-process all_gather: tensors must be on host");
    if (out.dtype() != in.dtype() || out.nbytes() != in.nbytes() * g_.size_)
      throw Error("all_gather: out " + out.describe() + " does not hold " +
                  std::to_string(g_.size_) + " x " + in.describe());
    std::vector<const void*> bufs = exchange(in.raw(), in.nbytes(), "all_gather");
    char* dst = static_cast<char*>(out.raw());
    for (size_t r = 0; r < bufs.size(); ++r)
      std::memcpy(dst + r * in.nbytes(), bufs[r], static_cast<size_t>(in.nbytes()));
    g_.leave();
  }

  void barrier() override {
    std::unique_lock<std::mutex> lock(g_.mu_);
    g_.wait_all(lock);
  }

  void abort(const std::string& why) override { g_.abort(why); }

 private:
  // Posts this rank's buffer, waits for every rank's; throws (every rank alike) on a size mismatch.
  std::vector<const void*> exchange(const void* buf, int64_t bytes, const char* what) {
    g_.arrive(rank_, buf, bytes, what);
    std::vector<const void*> bufs;
    std::vector<int64_t> sizes;
    {
      std::lock_guard<std::mutex> lock(g_.mu_);
      bufs = g_.bufs_;
      sizes = g_.bytes_;
    }
    for (int64_t s : sizes)
      if (s != bytes) {
        g_.leave();
        throw Error(std::string(what) + ": ranks passed buffers of different sizes");
      }
    return bufs;
  }

  InProcessGroup& g_;
  int rank_;
};

InProcessGroup::InProcessGroup(int size) : size_(size) {
  if (size < 1) throw Error("in-process group: size must be >= 1");
  bufs_.assign(static_cast<size_t>(size), nullptr);
  bytes_.assign(static_cast<size_t>(size), 0);
  for (int r = 0; r < size; ++r) comms_.push_back(std::make_unique<Comm>(*this, r));
}

InProcessGroup::~InProcessGroup() = default;

void InProcessGroup::wait_all(std::unique_lock<std::mutex>& lock) {
  if (aborted_) throw CollectiveAborted("collective aborted: " + abort_reason_);
  const uint64_t gen = generation_;
  if (++arrived_ == size_) {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
    return;
  }
  cv_.wait(lock, [&] { return generation_ != gen || aborted_; });
  if (generation_ == gen) throw CollectiveAborted("collective aborted: " + abort_reason_);
}

void InProcessGroup::arrive(int rank, const void* buf, int64_t bytes, const char* what) {
  (void)what;
  std::unique_lock<std::mutex> lock(mu_);
  bufs_[static_cast<size_t>(rank)] = buf;
  bytes_[static_cast<size_t>(rank)] = bytes;
  wait_all(lock);
}

void InProcessGroup::leave() {
  std::unique_lock<std::mutex> lock(mu_);
  wait_all(lock);
}

void InProcessGroup::abort(const std::string& why) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!aborted_) abort_reason_ = why;
  aborted_ = true;
  cv_.notify_all();
}

void run_ranks(InProcessGroup& group, const std::function<void(int rank)>& fn) {
  const int n = group.size();
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = std::current_exception();
        group.abort("rank " + std::to_string(r) + ": " + e.what());
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
        group.abort("rank " + std::to_string(r) + " failed");
      }
    });
  for (auto& t : threads) t.join();
  // The rank that failed first, not the ranks its abort woke.
  std::exception_ptr first;
  for (const auto& e : errors) {
    if (!e) continue;
    try {
      std::rethrow_exception(e);
    } catch (const CollectiveAborted&) {
      if (!first) first = e;
    } catch (...) {
      std::rethrow_exception(e);
    }
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace redknot
