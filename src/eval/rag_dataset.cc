#include "eval/rag_dataset.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace redknot {

namespace {
// Whole file, transparently gunzipped (gzread passes plain files through).
std::string read_maybe_gzip(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw Error(path + ": cannot open dataset");
  std::string out;
  char buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof(buf))) > 0) out.append(buf, n);
  int err = 0;
  const char* msg = gzerror(f, &err);
  std::string what = (n < 0 && msg) ? msg : "";
  gzclose(f);
  if (n < 0) throw Error(path + ": read error: " + what);
  return out;
}

std::vector<std::string> string_list(const nlohmann::json& j, const char* key,
                                     const std::string& where) {
  if (!j.contains(key) || !j[key].is_array())
    throw Error(where + ": \"" + key + "\" must be a list of strings");
  std::vector<std::string> out;
  for (const auto& v : j[key]) {
    if (!v.is_string()) throw Error(where + ": \"" + key + "\" must be a list of strings");
    out.push_back(v.get<std::string>());
  }
  return out;
}
}  // namespace

std::vector<RagSample> load_rag_dataset(const std::string& path, int64_t limit) {
  std::string text = read_maybe_gzip(path);
  std::vector<RagSample> out;
  std::istringstream in(text);
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(lineno);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      throw Error(where + ": invalid JSON: " + e.what());
    }
    if (!j.is_object()) throw Error(where + ": a sample must be a JSON object");
    RagSample s;
    s.segments = string_list(j, "segments", where);
    s.answers = string_list(j, "answers", where);
    if (!j.contains("question") || !j["question"].is_string())
      throw Error(where + ": \"question\" must be a string");
    s.question = j["question"];
    if (j.contains("task") && j["task"].is_string()) s.task = j["task"];
    if (j.contains("id") && j["id"].is_string()) s.id = j["id"];
    if (s.answers.empty()) throw Error(where + ": \"answers\" is empty");
    out.push_back(std::move(s));
    if (limit > 0 && static_cast<int64_t>(out.size()) >= limit) break;
  }
  if (out.empty()) throw Error(path + ": no samples");
  return out;
}

SegmentedPrompt build_rag_prompt(const Tokenizer& tok, const RagSample& sample) {
  SegmentedPrompt p;
  for (size_t i = 0; i < sample.segments.size(); ++i) {
    std::vector<int32_t> ids;
    if (i == 0 && tok.bos_id() >= 0) ids.push_back(tok.bos_id());
    std::vector<int32_t> body = tok.encode(sample.segments[i] + "\n\n");
    ids.insert(ids.end(), body.begin(), body.end());
    p.segments.push_back(std::move(ids));
  }
  p.query = tok.encode("Question: " + sample.question + "\nAnswer:");
  if (p.segments.empty() && tok.bos_id() >= 0) p.query.insert(p.query.begin(), tok.bos_id());
  return p;
}

std::string normalize_answer(const std::string& s) {
  std::string lower;
  for (unsigned char c : s) {
    if (std::ispunct(c)) continue;
    lower.push_back(static_cast<char>(std::tolower(c)));
  }
  std::istringstream words(lower);
  std::string w, out;
  while (words >> w) {
    if (w == "a" || w == "an" || w == "the") continue;
    if (!out.empty()) out.push_back(' ');
    out += w;
  }
  return out;
}

double exact_match(const std::string& prediction, const std::vector<std::string>& answers) {
  const std::string p = normalize_answer(prediction);
  for (const auto& a : answers)
    if (normalize_answer(a) == p) return 1.0;
  return 0.0;
}

double f1_score(const std::string& prediction, const std::vector<std::string>& answers) {
  auto tokens = [](const std::string& s) {
    std::vector<std::string> t;
    std::istringstream in(normalize_answer(s));
    std::string w;
    while (in >> w) t.push_back(w);
    return t;
  };
  const auto pred = tokens(prediction);
  double best = 0;
  for (const auto& a : answers) {
    const auto gold = tokens(a);
    if (pred.empty() || gold.empty()) {
      best = std::max(best, pred == gold ? 1.0 : 0.0);
      continue;
    }
    std::map<std::string, int> counts;
    for (const auto& w : gold) ++counts[w];
    int common = 0;
    for (const auto& w : pred)
      if (counts[w]-- > 0) ++common;
    if (common == 0) continue;
    const double prec = double(common) / pred.size(), rec = double(common) / gold.size();
    best = std::max(best, 2 * prec * rec / (prec + rec));
  }
  return best;
}

}  // namespace redknot
