#include "backend/nccl_communicator.h"

#include <gtest/gtest.h>

#include "core/error.h"

namespace redknot {
namespace {

// Without NCCL (this CI), loading fails with an error that names the library, and every entry
// point throws it rather than crashing. With NCCL, a unique id can be made.
TEST(NcclCommunicator, ClearErrorWithoutNcclAndAnIdWithIt) {
  const std::string why = nccl_unavailable_reason();
  if (why.empty()) {
    const NcclUniqueId a = nccl_unique_id(), b = nccl_unique_id();
    EXPECT_NE(a, b);  // fresh ids name different communicators
    return;
  }
  EXPECT_NE(why.find("libnccl.so.2"), std::string::npos) << why;
  try {
    nccl_unique_id();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("NCCL"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace redknot
