// Safetensors (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a
// JSON header {name: {dtype, shape, data_offsets: [begin, end)}} and a data section. Reading maps
// the file and hands out views into it; nothing is copied unless a tensor is misaligned.
#pragma once
#include <map>
#include <memory>
#include <string>

#include "core/mmap_file.h"
#include "core/tensor.h"

namespace redknot {

struct SafetensorsFile {
  std::shared_ptr<MappedFile> file;  // every view below holds it
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;  // "__metadata__" string pairs
};

// Maps `path` and validates the header (length, JSON, dtypes F32/F16/BF16/I32/F8_E4M3, offsets
// inside the data section, sizes consistent with shape*dtype, no overlaps). Tensors are host views
// whose holder is the MappedFile; a tensor whose data is not aligned to its element size is copied.
// A 0-d (scalar) tensor is returned with shape [1] (an empty Tensor shape means "absent").
SafetensorsFile read_safetensors(const std::string& path);

// Loads every tensor of a HF model directory: model.safetensors, or the shards named by
// model.safetensors.index.json (weight_map: tensor name -> shard file).
std::map<std::string, Tensor> read_safetensors_dir(const std::string& dir);

// Writes host tensors (F32, F16, BF16, I32, F8_E4M3) as a safetensors file, header padded to 8
// bytes.
void write_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace redknot
