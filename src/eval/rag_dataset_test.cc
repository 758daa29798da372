// Dataset parsing, prompt layout and SQuAD-style metrics.
#include "eval/rag_dataset.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"

namespace redknot {
namespace {

std::string write_file(const std::string& name, const std::string& text, bool gzip = false) {
  std::string path = ::testing::TempDir() + "/" + name;
  if (gzip) {
    gzFile f = gzopen(path.c_str(), "wb");
    gzwrite(f, text.data(), static_cast<unsigned>(text.size()));
    gzclose(f);
  } else {
    std::ofstream(path) << text;
  }
  return path;
}

TEST(RagMetrics, NormalizationFollowsSquad) {
  EXPECT_EQ(normalize_answer("The  Quick, brown fox!"), "quick brown fox");
  EXPECT_EQ(normalize_answer("an Apple a day"), "apple day");
  EXPECT_EQ(exact_match(" Vornheim.", {"vornheim"}), 1.0);
  EXPECT_EQ(exact_match("Vornheim city", {"Vornheim"}), 0.0);
  EXPECT_EQ(exact_match("blue", {"red", "Blue"}), 1.0);
}

TEST(RagMetrics, F1CountsTokenOverlap) {
  EXPECT_NEAR(f1_score("cat sat", {"the cat sat on mat"}), 2 * 1.0 * 0.5 / 1.5, 1e-9);
  EXPECT_EQ(f1_score("dog", {"cat"}), 0.0);
  EXPECT_EQ(f1_score("a b", {"x", "b a"}), 1.0);
  EXPECT_EQ(f1_score("", {""}), 1.0);
}

TEST(RagDataset, ReadsPlainAndGzip) {
  const std::string text =
      "{\"segments\": [\"doc one\", \"doc two\"], \"question\": \"q?\", \"answers\": [\"a\"], "
      "\"task\": \"single\", \"id\": \"s-1\"}\n\n"
      "{\"segments\": [], \"question\": \"q2\", \"answers\": [\"b\", \"c\"]}\n";
  for (bool gz : {false, true}) {
    auto samples = load_rag_dataset(write_file(gz ? "d.jsonl.gz" : "d.jsonl", text, gz));
    ASSERT_EQ(samples.size(), 2u);
    EXPECT_EQ(samples[0].segments[1], "doc two");
    EXPECT_EQ(samples[0].task, "single");
    EXPECT_EQ(samples[0].id, "s-1");
    EXPECT_EQ(samples[1].id, "");
    EXPECT_EQ(samples[1].answers.size(), 2u);
  }
  EXPECT_EQ(load_rag_dataset(write_file("d2.jsonl", text), 1).size(), 1u);
}

TEST(RagDataset, BadLinesNameFileAndLine) {
  auto expect_error = [](const std::string& text, const std::string& needle) {
    std::string path = write_file("bad.jsonl", text);
    try {
      load_rag_dataset(path);
      FAIL() << "no error for " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error("{\"segments\": [\"x\"], \"question\": \"q\", \"answers\": [\"a\"]}\n{oops\n", ":2");
  expect_error("{\"segments\": \"x\", \"question\": \"q\", \"answers\": [\"a\"]}\n", "segments");
  expect_error("{\"segments\": [], \"question\": 3, \"answers\": [\"a\"]}\n", "question");
  expect_error("{\"segments\": [], \"question\": \"q\", \"answers\": []}\n", "answers");
  expect_error("", "no samples");
  EXPECT_THROW(load_rag_dataset("/nonexistent/x.jsonl"), Error);
}

}  // namespace
}  // namespace redknot
