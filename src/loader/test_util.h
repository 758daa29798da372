// Helpers shared by the loader tests: a self-deleting temp directory and raw file I/O.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/error.h"

namespace redknot::testing_util {

inline const std::string kShared = REDKNOT_SHARED_DIR;
inline const std::vector<std::string> kRefModels = {"llama3-tiny",      "mistral-tiny",
                                                    "mistral-swa-tiny", "qwen2-tiny",
                                                    "qwen3-tiny",       "qwen3-tiny-bf16"};
inline std::string ref_dir(const std::string& model) { return kShared + "/refs/" + model; }

class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string("rk_loader_") + (info ? info->name() : "x") + "_" +
                       std::to_string(::getpid()) + "_" + std::to_string(counter()++);
    path_ = std::filesystem::temp_directory_path() / name;
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  static int& counter() {
    static int n = 0;
    return n;
  }
  std::filesystem::path path_;
};

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Runs fn, expects a redknot::Error whose message contains every one of `needles`.
template <typename Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& needles) {
  try {
    fn();
    ADD_FAILURE() << "expected redknot::Error containing '" << needles.front() << "'";
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const std::string& n : needles)
      EXPECT_NE(msg.find(n), std::string::npos) << "message: " << msg << "\nmissing: " << n;
  }
}

}  // namespace redknot::testing_util
