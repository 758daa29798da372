// GGUF (llama.cpp) reader: header, metadata key/values, tensor infos and data, memory-mapped.
// Versions 2 and 3, little-endian. Only what a Llama checkpoint needs is converted further.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/mmap_file.h"
#include "core/tensor.h"
#include "loader/checkpoint.h"

namespace redknot {

enum class GgufType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  Bool = 7,
  String = 8,
  Array = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};

// One metadata value. Scalars fill `i` (integers and bools), `f` (floats) or `s`; arrays set
// elem_type and fill ints / floats / strings (nested arrays keep only their length).
struct GgufValue {
  GgufType type = GgufType::U8;
  GgufType elem_type = GgufType::U8;
  int64_t i = 0;
  double f = 0.0;
  std::string s;
  uint64_t array_len = 0;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<std::string> strings;

  bool is_int() const;
  bool is_float() const { return type == GgufType::F32 || type == GgufType::F64; }
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> shape;  // row-major (outermost first): GGUF ne reversed
  uint32_t ggml_type = 0;
  DType dtype = DType::F32;
  uint64_t offset = 0;  // from the start of the data section
};

struct GgufFile {
  std::shared_ptr<MappedFile> file;
  uint32_t version = 0;
  uint64_t alignment = 32;
  uint64_t data_start = 0;  // absolute file offset of the data section
  std::map<std::string, GgufValue> metadata;
  std::vector<GgufTensorInfo> tensors;  // file order

  // View of a tensor's bytes inside the mapping (holder = the MappedFile).
  Tensor view(const GgufTensorInfo& info) const;
};

// Parses and validates the whole structure; every tensor is checked to lie inside the file.
// Tensor types F32, F16, BF16 and Q8_0 only (others: Error naming tensor and type).
GgufFile read_gguf(const std::string& path);

// A GGUF Llama model as a Checkpoint: HF tensor names, Q/K rows converted to rotate-half order
// (owned copies, same dtype), everything else views into the mapping; config and vocab from
// the metadata.
Checkpoint load_gguf_checkpoint(const std::string& path);

// HF name for a GGUF tensor name ("blk.3.ffn_up.weight" -> "model.layers.3.mlp.up_proj.weight"),
// or "" when there is none.
std::string gguf_to_hf_name(const std::string& gguf_name);

// Reorders the rows of a [heads * head_dim, cols] projection from interleaved rotary pairs
// (GGUF / llama2.c: 2i, 2i+1) to HF rotate-half (i, i + head_dim/2). Returns an owned copy.
Tensor unpermute_rotary_rows(const Tensor& w, int64_t heads, int64_t head_dim);

}  // namespace redknot
