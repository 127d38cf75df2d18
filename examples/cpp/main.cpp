// latkit C++ example: load the exported latency predictor, predict a CSV batch, print CSV.
//
// One source, two executables (see CMakeLists.txt):
//   latkit_predict_ort  exported/latency_predictor.onnx  queries.csv [--bench N]   (ONNX Runtime)
//   latkit_predict_ts   exported/latency_predictor.ts    queries.csv [--bench N]   (libtorch)
//
// queries.csv: header + rows with the columns vision_tokens, text_tokens, tier (low/medium/high
// or 0-2; "tier_idx" also accepted), top_k, num_active_blocks, output_tokens, in any order.
// stdout: the six input columns (tier as its index) followed by the predictor's nine outputs,
// by name, in its order: prefill_ms, decode_total_ms, decode_per_token_ms, total_ms, then the
// bounds prefill_p90_ms, prefill_p95_ms, prefill_p50_ms, total_p90_ms, total_p95_ms (an
// unbounded level prints as inf).
// --bench N: also time N batch-1 calls (after a warm-up) and print the median in microseconds
// on stderr, as "latkit-cpp backend=... batch=1 calls=N median_us=X".

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(LATKIT_BACKEND_ORT)
#include <onnxruntime_cxx_api.h>
#elif defined(LATKIT_BACKEND_TORCH)
#include <ATen/Parallel.h>
#include <torch/script.h>
#else
#error "define LATKIT_BACKEND_ORT or LATKIT_BACKEND_TORCH"
#endif

namespace {

constexpr int kFeatures = 5;  // vision_tokens, text_tokens, tier_idx, top_k, num_active_blocks

struct Batch {
  std::vector<float> features;       // [rows * 5], row-major
  std::vector<float> output_tokens;  // [rows]
  int64_t rows = 0;
};

std::string trim(const std::string& s) {
  const auto begin = s.find_first_not_of(" \t\r\n\"");
  if (begin == std::string::npos) return "";
  const auto end = s.find_last_not_of(" \t\r\n\"");
  return s.substr(begin, end - begin + 1);
}

std::vector<std::string> split_csv_line(const std::string& line) {
  std::vector<std::string> out;
  std::stringstream stream(line);
  std::string cell;
  while (std::getline(stream, cell, ',')) out.push_back(trim(cell));
  if (!line.empty() && line.back() == ',') out.emplace_back();
  return out;
}

float parse_number(const std::string& text, int64_t row, const std::string& column) {
  char* end = nullptr;
  const float value = std::strtof(text.c_str(), &end);
  if (text.empty() || end == text.c_str() || *end != '\0' || !std::isfinite(value)) {
    throw std::runtime_error("row " + std::to_string(row) + " column " + column +
                             ": not a finite number: '" + text + "'");
  }
  return value;
}

float parse_tier(std::string text, int64_t row) {
  std::transform(text.begin(), text.end(), text.begin(), ::tolower);
  if (text == "low" || text == "0") return 0.0f;
  if (text == "medium" || text == "1") return 1.0f;
  if (text == "high" || text == "2") return 2.0f;
  throw std::runtime_error("row " + std::to_string(row) + ": unknown tier '" + text + "'");
}

Batch read_csv(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw std::runtime_error("cannot open " + path);
  std::string line;
  if (!std::getline(file, line)) throw std::runtime_error(path + ": empty file");
  const auto header = split_csv_line(line);
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < header.size(); ++i) index[header[i]] = i;
  if (!index.count("tier") && index.count("tier_idx")) index["tier"] = index["tier_idx"];
  const char* numeric[] = {"vision_tokens", "text_tokens", "top_k", "num_active_blocks",
                           "output_tokens"};
  for (const char* name : numeric) {
    if (!index.count(name)) throw std::runtime_error(path + ": missing column " + name);
  }
  if (!index.count("tier")) throw std::runtime_error(path + ": missing column tier");

  Batch batch;
  int64_t row = 0;
  while (std::getline(file, line)) {
    if (trim(line).empty()) continue;
    ++row;
    const auto cells = split_csv_line(line);
    auto cell = [&](const std::string& name) -> const std::string& {
      const size_t i = index.at(name);
      if (i >= cells.size()) throw std::runtime_error("row " + std::to_string(row) + ": too few cells");
      return cells[i];
    };
    batch.features.push_back(parse_number(cell("vision_tokens"), row, "vision_tokens"));
    batch.features.push_back(parse_number(cell("text_tokens"), row, "text_tokens"));
    batch.features.push_back(parse_tier(cell("tier"), row));
    batch.features.push_back(parse_number(cell("top_k"), row, "top_k"));
    batch.features.push_back(parse_number(cell("num_active_blocks"), row, "num_active_blocks"));
    batch.output_tokens.push_back(parse_number(cell("output_tokens"), row, "output_tokens"));
  }
  batch.rows = row;
  if (batch.rows == 0) throw std::runtime_error(path + ": no rows");
  return batch;
}

template <typename Fn>
double median_us(Fn&& call, int calls) {
  for (int i = 0; i < std::min(calls, 2000); ++i) call();  // warm-up
  std::vector<double> times(calls);
  for (int i = 0; i < calls; ++i) {
    const auto start = std::chrono::steady_clock::now();
    call();
    const auto stop = std::chrono::steady_clock::now();
    times[i] = std::chrono::duration<double, std::micro>(stop - start).count();
  }
  std::nth_element(times.begin(), times.begin() + calls / 2, times.end());
  return times[calls / 2];
}

#if defined(LATKIT_BACKEND_ORT)
// ------------------------------------------------------------------ ONNX Runtime backend
constexpr const char* kBackend = "ort";

class Predictor {
 public:
  explicit Predictor(const std::string& path) : env_(ORT_LOGGING_LEVEL_WARNING, "latkit") {
    Ort::SessionOptions options;
    // Batch-1 queries are fastest on one thread: no thread-pool hand-off.
    options.SetIntraOpNumThreads(1);
    options.SetInterOpNumThreads(1);
    options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    session_ = std::make_unique<Ort::Session>(env_, path.c_str(), options);
    Ort::AllocatorWithDefaultOptions allocator;
    for (size_t i = 0; i < session_->GetOutputCount(); ++i) {
      output_names_.push_back(session_->GetOutputNameAllocated(i, allocator).get());
    }
  }

  const std::vector<std::string>& output_names() const { return output_names_; }

  // Inputs are copied into buffers bound once per batch size (an Ort::IoBinding), and ORT
  // writes the outputs straight into ours: a call allocates nothing and looks up no names
  // (this matters at batch 1: ~0.4 us of ~9 against Run() with name arrays).
  void run(const float* features, const float* tokens, int64_t rows,
           std::vector<std::vector<float>>& outputs) {
    if (rows != bound_rows_) bind(rows);
    std::copy(features, features + rows * kFeatures, in_features_.begin());
    std::copy(tokens, tokens + rows, in_tokens_.begin());
    session_->Run(run_options_, *binding_);
    outputs.resize(out_.size());
    for (size_t i = 0; i < out_.size(); ++i) outputs[i].assign(out_[i].begin(), out_[i].end());
  }

 private:
  void bind(int64_t rows) {
    in_features_.assign(static_cast<size_t>(rows * kFeatures), 0.0f);
    in_tokens_.assign(static_cast<size_t>(rows), 0.0f);
    feature_shape_[0] = rows;
    row_shape_[0] = rows;
    inputs_.clear();
    inputs_.push_back(Ort::Value::CreateTensor<float>(memory_, in_features_.data(),
                                                      in_features_.size(), feature_shape_, 2));
    inputs_.push_back(Ort::Value::CreateTensor<float>(memory_, in_tokens_.data(),
                                                      in_tokens_.size(), row_shape_, 1));
    out_.assign(output_names_.size(), std::vector<float>(static_cast<size_t>(rows)));
    results_.clear();
    for (auto& out : out_) {
      results_.push_back(
          Ort::Value::CreateTensor<float>(memory_, out.data(), out.size(), row_shape_, 1));
    }
    binding_ = std::make_unique<Ort::IoBinding>(*session_);
    binding_->BindInput("features", inputs_[0]);
    binding_->BindInput("output_tokens", inputs_[1]);
    for (size_t i = 0; i < results_.size(); ++i) {
      binding_->BindOutput(output_names_[i].c_str(), results_[i]);
    }
    bound_rows_ = rows;
  }

  Ort::Env env_;
  std::unique_ptr<Ort::Session> session_;
  Ort::RunOptions run_options_;
  Ort::MemoryInfo memory_ = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<std::string> output_names_;
  // Declared after the session so that they are released before it.
  int64_t bound_rows_ = -1;
  int64_t feature_shape_[2] = {0, kFeatures};
  int64_t row_shape_[1] = {0};
  std::vector<float> in_features_, in_tokens_;
  std::vector<std::vector<float>> out_;
  std::vector<Ort::Value> inputs_, results_;
  std::unique_ptr<Ort::IoBinding> binding_;  // last: released first
};

#else
// ------------------------------------------------------------------ libtorch backend
constexpr const char* kBackend = "torchscript";

class Predictor {
 public:
  explicit Predictor(const std::string& path) {
    at::set_num_threads(1);
    module_ = torch::jit::load(path);
    module_.eval();
    // forward() returns the contract's tuple, in this order (the names also travel in the
    // file's metadata, latkit_metadata.json).
    output_names_ = {"prefill_ms",     "decode_total_ms", "decode_per_token_ms",
                     "total_ms",       "prefill_p90_ms",  "prefill_p95_ms",
                     "prefill_p50_ms", "total_p90_ms",    "total_p95_ms"};
  }

  const std::vector<std::string>& output_names() const { return output_names_; }

  void run(const float* features, const float* tokens, int64_t rows,
           std::vector<std::vector<float>>& outputs) {
    c10::InferenceMode guard;
    auto x = torch::from_blob(const_cast<float*>(features), {rows, kFeatures}, torch::kFloat32);
    auto n = torch::from_blob(const_cast<float*>(tokens), {rows}, torch::kFloat32);
    const auto result = module_.forward({x, n}).toTuple();
    const auto& elements = result->elements();
    if (elements.size() != output_names_.size()) {
      throw std::runtime_error("the TorchScript predictor returned " +
                               std::to_string(elements.size()) + " outputs, expected " +
                               std::to_string(output_names_.size()) + ": re-export it");
    }
    outputs.resize(elements.size());
    for (size_t i = 0; i < elements.size(); ++i) {
      const auto tensor = elements[i].toTensor().contiguous();
      outputs[i].assign(tensor.data_ptr<float>(), tensor.data_ptr<float>() + rows);
    }
  }

 private:
  torch::jit::script::Module module_;
  std::vector<std::string> output_names_;
};
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL QUERIES.csv [--bench N]\n";
    return 2;
  }
  int bench_calls = 0;
  for (int i = 3; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--bench") bench_calls = std::max(1, std::atoi(argv[i + 1]));
  }
  try {
    const Batch batch = read_csv(argv[2]);
    Predictor predictor(argv[1]);
    std::vector<std::vector<float>> outputs;
    predictor.run(batch.features.data(), batch.output_tokens.data(), batch.rows, outputs);

    std::cout << "vision_tokens,text_tokens,tier_idx,top_k,num_active_blocks,output_tokens";
    for (const auto& name : predictor.output_names()) std::cout << ',' << name;
    std::cout << '\n';
    char buffer[64];
    for (int64_t r = 0; r < batch.rows; ++r) {
      for (int f = 0; f < kFeatures; ++f) {
        std::snprintf(buffer, sizeof buffer, "%.9g,", batch.features[r * kFeatures + f]);
        std::cout << buffer;
      }
      std::snprintf(buffer, sizeof buffer, "%.9g", batch.output_tokens[r]);
      std::cout << buffer;
      for (const auto& column : outputs) {
        std::snprintf(buffer, sizeof buffer, ",%.9g", column[r]);
        std::cout << buffer;
      }
      std::cout << '\n';
    }

    if (bench_calls > 0) {
      std::vector<std::vector<float>> single;
      const double us = median_us(
          [&] { predictor.run(batch.features.data(), batch.output_tokens.data(), 1, single); },
          bench_calls);
      std::fprintf(stderr, "latkit-cpp backend=%s batch=1 calls=%d median_us=%.3f\n", kBackend,
                   bench_calls, us);
    }
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << '\n';
    return 1;
  }
  return 0;
}
