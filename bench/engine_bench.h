// CPU engine benchmark: prefill and decode tokens/s of a Llama-shaped model with random weights,
// beside the machine's own ceilings measured in the same run (OpenBLAS SGEMM on the same GEMM
// shapes, memory read bandwidth).
#pragma once
#include <cstdint>
#include <string>

namespace redknot::bench {

struct EngineBenchArgs {
  std::string shape = "1b";    // preset_config name
  int64_t layers = 0;          // 0: the preset's
  std::string dtype = "bf16";  // weights: bf16 | f32
  std::string backend = "cpu";
  int32_t prefill_tokens = 256;
  int32_t decode_tokens = 32;
  int32_t repeats = 3;
};

int run_engine_bench(const EngineBenchArgs& args);

// Multi-threaded read bandwidth over a buffer much larger than the caches, GB/s.
double measure_read_bandwidth_gbs(int64_t bytes, int threads);

}  // namespace redknot::bench
