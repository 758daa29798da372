// Read-only memory map of a whole file. Tensors of a loaded checkpoint point into it (no copy)
// and hold a shared_ptr to it, so the mapping lives as long as any weight view.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace redknot {

class MappedFile {
 public:
  // Throws Error naming the path when the file cannot be opened or mapped.
  static std::shared_ptr<MappedFile> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  std::string path_;
};

}  // namespace redknot
