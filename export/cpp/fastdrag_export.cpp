// fastdrag_export.cpp: the Editor of fastdrag_export.hpp, export/standalone.py's protocol in C++.
#include "fastdrag_export.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>
#include <utility>

namespace fastdrag {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t size : shape) count *= size;
  return count;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("cannot read " + path.string());
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

namespace {

// A tensor in float64: the DDIM loops keep their latents in double, as export/standalone.py does.
struct Latents {
  std::vector<int64_t> shape;
  std::vector<double> data;
};

// A value for one of a graph's initializers, from a refit file (kept alive while sessions use it).
struct Initializer {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> fp32;
  std::vector<Ort::Float16_t> fp16;
};

std::vector<float> read_values(const char* bytes, size_t count, const std::string& dtype) {
  std::vector<float> values(count);
  if (dtype == "float32" || dtype == "F32") {
    std::memcpy(values.data(), bytes, 4 * count);
  } else if (dtype == "float16" || dtype == "F16") {
    for (size_t i = 0; i < count; ++i) {
      uint16_t bits;
      std::memcpy(&bits, bytes + 2 * i, 2);
      values[i] = Ort::Float16_t::FromBits(bits).ToFloat();
    }
  } else {
    throw InputError("tensor dtype " + dtype + " is not float32 or float16");
  }
  return values;
}

// float64 -> float16 in one rounding (to nearest, ties to even), as numpy's astype rounds: through a
// float32 rounded to odd, which keeps what the second rounding needs (float32 has 13 more bits).
Ort::Float16_t half_from_double(double value) {
  float narrowed = static_cast<float>(value);
  if (std::isfinite(narrowed) && static_cast<double>(narrowed) != value) {
    if (std::fabs(static_cast<double>(narrowed)) > std::fabs(value)) narrowed = std::nextafter(narrowed, 0.0f);
    uint32_t bits;
    std::memcpy(&bits, &narrowed, 4);
    bits |= 1u;
    std::memcpy(&narrowed, &bits, 4);
  }
  return Ort::Float16_t(narrowed);
}

// A graph input's values: float32, or float64 (the DDIM loops' latents), cast to the input's dtype
// in one rounding, as standalone.py's astype casts them.
struct Feed {
  Feed(const Tensor* tensor)
      : shape(tensor->shape), floats(tensor->data.data()), halves(tensor->half.empty() ? nullptr : tensor->half.data()),
        count(tensor->half.empty() ? tensor->data.size() : tensor->half.size()) {}
  Feed(const Latents* latents) : shape(latents->shape), doubles(latents->data.data()), count(latents->data.size()) {}

  float value(size_t i) const { return halves ? halves[i].ToFloat() : floats[i]; }

  const std::vector<int64_t>& shape;
  const float* floats = nullptr;
  const Ort::Float16_t* halves = nullptr;
  const double* doubles = nullptr;
  size_t count;
};

// One graph's session with its inputs' dtypes from the manifest: feeds float32 or float64 values and
// fetches float tensors, converting where the graph takes or gives float16.
class Graph {
 public:
  Graph(Ort::Session session, const json& artifact) : session_(std::move(session)) {
    for (const json& input : artifact.at("inputs")) half_[input.at("name")] = input.at("dtype") == "float16";
    Ort::AllocatorWithDefaultOptions allocator;
    for (size_t i = 0; i < session_.GetOutputCount(); ++i)
      outputs_.push_back(session_.GetOutputNameAllocated(i, allocator).get());
    for (const std::string& name : outputs_) output_names_.push_back(name.c_str());  // outputs_ is complete: no reallocation
  }

  // The outputs by name; the fp16 ones named in `as_given` stay fp16 (Tensor::half).
  std::map<std::string, Tensor> run(const std::vector<std::pair<std::string, Feed>>& feeds,
                                    const std::vector<std::string>& as_given = {}) {
    std::vector<std::vector<Ort::Float16_t>> halves;  // the converted copies, alive until Run returns
    std::vector<std::vector<float>> narrowed;
    halves.reserve(feeds.size());
    narrowed.reserve(feeds.size());
    std::vector<Ort::Value> values;
    std::vector<const char*> names;
    for (const auto& [name, feed] : feeds) {
      names.push_back(name.c_str());
      if (half_.at(name)) {
        const Ort::Float16_t* data = feed.halves;  // fp16 as given: fed as it is
        if (!data) {
          std::vector<Ort::Float16_t>& half = halves.emplace_back();
          for (size_t i = 0; i < feed.count; ++i) half.push_back(feed.doubles ? half_from_double(feed.doubles[i]) : Ort::Float16_t(feed.floats[i]));
          data = half.data();
        }
        values.push_back(Ort::Value::CreateTensor<Ort::Float16_t>(memory_, const_cast<Ort::Float16_t*>(data), feed.count,
                                                                  feed.shape.data(), feed.shape.size()));
      } else {
        const float* data = feed.floats;
        if (feed.doubles) data = narrowed.emplace_back(feed.doubles, feed.doubles + feed.count).data();
        if (feed.halves) {
          std::vector<float>& widened = narrowed.emplace_back();
          for (size_t i = 0; i < feed.count; ++i) widened.push_back(feed.value(i));
          data = widened.data();
        }
        values.push_back(Ort::Value::CreateTensor<float>(memory_, const_cast<float*>(data), feed.count, feed.shape.data(), feed.shape.size()));
      }
    }
    std::vector<Ort::Value> results = session_.Run(Ort::RunOptions{nullptr}, names.data(), values.data(), values.size(),
                                                   output_names_.data(), output_names_.size());
    std::map<std::string, Tensor> fetched;
    for (size_t i = 0; i < results.size(); ++i) {
      const Ort::TensorTypeAndShapeInfo info = results[i].GetTensorTypeAndShapeInfo();
      Tensor tensor{info.GetShape(), {}};
      const size_t count = info.GetElementCount();
      if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
        const Ort::Float16_t* data = results[i].GetTensorData<Ort::Float16_t>();
        if (std::find(as_given.begin(), as_given.end(), outputs_[i]) != as_given.end()) tensor.half.assign(data, data + count);
        else for (size_t j = 0; j < count; ++j) tensor.data.push_back(data[j].ToFloat());
      } else if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        const float* data = results[i].GetTensorData<float>();
        tensor.data.assign(data, data + count);
      } else {
        throw InputError("output " + outputs_[i] + " is neither float32 nor float16: not a graph fastdrag exports");
      }
      fetched[outputs_[i]] = std::move(tensor);
    }
    return fetched;
  }

 private:
  Ort::Session session_;
  Ort::MemoryInfo memory_ = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::map<std::string, bool> half_;
  std::vector<std::string> outputs_;
  std::vector<const char*> output_names_;
};

// An ONNX Runtime environment, where the library loaded offers the C API version this code was compiled for.
// A library older than the headers offers none (its GetApi answers null) and every Ort:: call would then
// dereference a null function table: say which library it is and what it needs instead.
Ort::Env onnxruntime_env() {
  if (Ort::Global<void>::api_ == nullptr)
    throw std::runtime_error("this ONNX Runtime library (" + std::string(OrtGetApiBase()->GetVersionString()) +
                             ") lacks C API version " + std::to_string(ORT_API_VERSION) +
                             ", which fastdrag_export was built with: run with ONNX Runtime 1." +
                             std::to_string(ORT_API_VERSION) + " or later, or build against older headers");
  return Ort::Env(ORT_LOGGING_LEVEL_ERROR, "fastdrag_export");
}

// An export as a service reads it: the manifest, a session per graph, the text embeddings; with a
// refit file, another image's weights in place of each graph's initializers and its text embeddings.
class Export {
 public:
  Export(const fs::path& folder, const std::optional<fs::path>& refit, int threads, const std::string& provider)
      : folder_(folder), threads_(threads), gpu_(provider_gpu(provider)), env_(onnxruntime_env()) {
    if (gpu_ >= 0) require_cuda_provider(provider);
    const fs::path manifest_path = folder / "manifest.json";
    if (!fs::is_regular_file(manifest_path)) throw InputError("no manifest.json in " + folder.string() + ": not an export folder");
    manifest = json::parse(read_file(manifest_path));
    if (manifest.value("schema_version", 0) != kManifestSchemaVersion)
      throw InputError(manifest_path.string() + " has schema version " + manifest.value("schema_version", json()).dump() +
                       "; this code reads version " + std::to_string(kManifestSchemaVersion));
    if (manifest.value("vae_graphs", true) == false)
      throw InputError(folder.string() + " holds only the UNet graphs of an editor's backend (vae_graphs: false), not the VAE "
                       "graphs a service encodes and decodes with: write its export with `fastdrag export`");
    const json& entry = manifest["artifacts"]["text_embedding"];
    const std::string raw = read_file(folder / entry["file"].get<std::string>());
    text.shape = entry["shape"].get<std::vector<int64_t>>();
    if (raw.size() != (entry["dtype"] == "float16" ? 2u : 4u) * static_cast<size_t>(element_count(text.shape)))
      throw InputError(entry["file"].get<std::string>() + " does not hold the " + shape_text(text.shape) + " tensor the manifest says");
    text.data = read_values(raw.data(), element_count(text.shape), entry["dtype"]);
    if (refit) read_refit(*refit);
  }

  const json& artifact(const std::string& graph) const {
    if (!manifest.at("artifacts").contains(graph)) throw InputError(folder_.string() + " has no " + graph + " graph");
    return manifest.at("artifacts").at(graph);
  }

  // The graph's session, made at its first use and kept: a service keeps its sessions across requests.
  Graph& graph(const std::string& name) {
    std::unique_ptr<Graph>& kept = graphs_[name];
    if (!kept) kept = std::make_unique<Graph>(session(name), artifact(name));
    return *kept;
  }

  // Drop every session (made again at its next use) and the initializer values they read.
  void release() {
    graphs_.clear();
    values_.clear();
  }

  json manifest;
  Tensor text;  // (1, tokens, dim)

 private:
  Ort::Session session(const std::string& graph) {
    Ort::SessionOptions options;
    if (threads_ > 0) options.SetIntraOpNumThreads(threads_);
    if (gpu_ >= 0) {  // the CPU takes what the CUDA provider lacks
      OrtCUDAProviderOptions cuda;
      cuda.device_id = gpu_;
      options.AppendExecutionProvider_CUDA(cuda);
    }
    const Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    for (Initializer& initializer : overrides_[graph]) {
      Ort::Value value = initializer.fp16.empty()
          ? Ort::Value::CreateTensor<float>(memory, initializer.fp32.data(), initializer.fp32.size(),
                                           initializer.shape.data(), initializer.shape.size())
          : Ort::Value::CreateTensor<Ort::Float16_t>(memory, initializer.fp16.data(), initializer.fp16.size(),
                                                     initializer.shape.data(), initializer.shape.size());
      options.AddInitializer(initializer.name.c_str(), value);
      values_.push_back(std::move(value));  // ONNX Runtime reads it while the session lives
    }
    const fs::path path = folder_ / artifact(graph)["file"].get<std::string>();
    return Ort::Session(env_, path.c_str(), options);
  }

  // The GPU a provider names ("cuda": GPU 0, "cuda:N": GPU N), or -1 for "cpu"; anything else is refused.
  static int provider_gpu(const std::string& provider) {
    if (provider == "cpu") return -1;
    if (provider == "cuda") return 0;
    const std::string index = provider.substr(0, 5) == "cuda:" ? provider.substr(5) : "";
    if (index.empty() || index.size() > 4 || index.find_first_not_of("0123456789") != std::string::npos)
      throw InputError("unknown provider " + provider + ": cpu, cuda or cuda:N (GPU N)");
    return std::stoi(index);
  }

  // Refuse a CUDA provider this ONNX Runtime library lacks, before any session is made.
  static void require_cuda_provider(const std::string& provider) {
    const std::vector<std::string> available = Ort::GetAvailableProviders();
    if (std::find(available.begin(), available.end(), "CUDAExecutionProvider") != available.end()) return;
    std::string names;
    for (const std::string& name : available) names += (names.empty() ? "" : ", ") + name;
    throw InputError("provider " + provider + ": this ONNX Runtime library (" + Ort::GetVersionString() + ") has no CUDAExecutionProvider, only " +
                     names + "; link a GPU build's library (ONNXRUNTIME_LIBRARY)");
  }

  void read_refit(const fs::path& path) {
    const std::string raw = read_file(path);
    uint64_t length = 0;
    if (raw.size() < 8) throw InputError(path.string() + " is not a safetensors file");
    std::memcpy(&length, raw.data(), 8);
    if (raw.size() < 8 + length) throw InputError(path.string() + " is not a safetensors file");
    json header = json::parse(raw.substr(8, length));
    const json metadata = header.value("__metadata__", json::object());
    header.erase("__metadata__");
    const std::string identity = manifest["model"]["identity"];
    const std::string width = std::to_string(manifest["image"]["width"].get<int>());
    const std::string height = std::to_string(manifest["image"]["height"].get<int>());
    if (metadata.value("format", "") != "fastdrag-refit-weights")
      throw InputError(path.string() + " is not a fastdrag refit-weights file");
    if (metadata.value("model", "") != identity)
      throw InputError(path.string() + " holds weights of model " + metadata.value("model", "") + "; " + folder_.string() +
                       " was exported from " + identity);
    if (metadata.value("width", "") != width || metadata.value("height", "") != height)
      throw InputError(path.string() + " is for " + metadata.value("width", "?") + "x" + metadata.value("height", "?") +
                       " images; " + folder_.string() + "'s graphs take " + width + "x" + height);
    if (!manifest.contains("refit")) throw InputError(folder_.string() + " has no refit map: its graphs cannot take another image's weights");
    const char* body = raw.data() + 8 + length;
    const auto tensor = [&](const std::string& name) {
      if (!header.contains(name)) throw InputError(path.string() + " has no tensor " + name);
      const json& entry = header[name];
      Tensor values;
      values.shape = entry.at("shape").get<std::vector<int64_t>>();
      const size_t begin = entry.at("data_offsets")[0], end = entry.at("data_offsets")[1];
      const size_t width = entry.at("dtype") == "F16" ? 2 : 4;
      if (end > raw.size() - 8 - length || end - begin != width * element_count(values.shape))
        throw InputError(path.string() + "'s tensor " + name + " does not fit its byte range");
      values.data = read_values(body + begin, element_count(values.shape), entry.at("dtype"));
      return values;
    };
    text = tensor("text_embedding");
    const json maps = json::parse(read_file(folder_ / manifest["refit"]["file"].get<std::string>()))["graphs"];
    for (const auto& [graph, mapping] : maps.items()) {
      for (const auto& [name, entries] : mapping.items()) {
        const Tensor weight = tensor(name);
        for (const json& entry : entries) {  // [initializer, transposed, dtype]
          Initializer initializer{entry[0].get<std::string>(), weight.shape, weight.data, {}};
          if (entry[1].get<bool>() && weight.shape.size() == 2) {
            const int64_t rows = weight.shape[0], cols = weight.shape[1];
            initializer.shape = {cols, rows};
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t c = 0; c < cols; ++c) initializer.fp32[c * rows + r] = weight.data[r * cols + c];
          }
          if (entry[2].get<std::string>() == "float16") {
            for (float value : initializer.fp32) initializer.fp16.emplace_back(value);
            initializer.fp32.clear();
          }
          overrides_[graph].push_back(std::move(initializer));
        }
      }
    }
  }

  fs::path folder_;
  int threads_;
  int gpu_;  // the CUDA provider's GPU, or -1: the CPU alone
  Ort::Env env_;
  std::map<std::string, std::vector<Initializer>> overrides_;
  std::vector<Ort::Value> values_;
  std::map<std::string, std::unique_ptr<Graph>> graphs_;  // after the values: sessions go first
};

Tensor as_floats(const Latents& x) { return {x.shape, std::vector<float>(x.data.begin(), x.data.end())}; }

Tensor scalar(float value) { return {{1}, {value}}; }

// The DDIM update of the manifest's `schedule.update_rule`, in float64.
void ddim(Latents& x, const Tensor& eps, double alpha_from, double alpha_to) {
  for (size_t i = 0; i < x.data.size(); ++i) {
    const double noise = eps.data[i];
    const double x0 = (x.data[i] - std::sqrt(1.0 - alpha_from) * noise) / std::sqrt(alpha_from);
    x.data[i] = std::sqrt(alpha_to) * x0 + std::sqrt(1.0 - alpha_to) * noise;
  }
}

// Tells `on_step`, if there is one, that `stage` has run `done` of its `total` steps.
void report(const StepCallback& on_step, const char* stage, size_t done, size_t total) {
  if (on_step) on_step(stage, static_cast<int>(done), static_cast<int>(total));
}

// ---- the four stages ----

// The image's latent z_t at the drag timestep (float32, as standalone.py returns it).
Tensor invert_image(Export& folder, const Tensor& image, const StepCallback& on_step) {
  Graph &encoder = folder.graph("vae_encoder"), &unet = folder.graph("unet_inversion");
  const json& schedule = folder.manifest["schedule"]["inversion"];
  report(on_step, "invert", 0, schedule.size());
  const Tensor mean = encoder.run({{"image", &image}}).at("latent_mean");
  const double scaling = folder.manifest["model"]["scaling_factor"];
  Latents x{mean.shape, {}};
  for (float value : mean.data) x.data.push_back(static_cast<double>(value) * scaling);
  size_t done = 0;
  for (const json& step : schedule) {
    const Tensor t = scalar(step["t"].get<float>());
    const Tensor eps = unet.run({{"latents", &x}, {"timestep", &t}, {"text_embeddings", &folder.text}}).at("eps");
    ddim(x, eps, step["alpha_from"], step["alpha_to"]);
    report(on_step, "invert", ++done, schedule.size());
  }
  return as_floats(x);
}

// torch.optim.Adam's update (no weight decay) in float32, as the drag loop takes it.
class Adam {
 public:
  Adam(double lr, double beta1, double beta2, double eps) : lr_(lr), beta1_(beta1), beta2_(beta2), eps_(eps) {}

  void step(std::vector<float>& param, const std::vector<float>& grad) {
    if (m_.empty()) m_.assign(param.size(), 0.0f), v_.assign(param.size(), 0.0f);
    ++steps_;
    const float keep1 = static_cast<float>(1 - beta1_), beta2 = static_cast<float>(beta2_), keep2 = static_cast<float>(1 - beta2_);
    const float root2 = static_cast<float>(std::sqrt(1 - std::pow(beta2_, steps_)));
    const float rate = static_cast<float>(lr_ / (1 - std::pow(beta1_, steps_))), eps = static_cast<float>(eps_);
    for (size_t i = 0; i < param.size(); ++i) {
      m_[i] = m_[i] + (grad[i] - m_[i]) * keep1;
      v_[i] = v_[i] * beta2 + grad[i] * grad[i] * keep2;
      const float denominator = std::sqrt(v_[i]) / root2 + eps;
      param[i] = param[i] - rate * m_[i] / denominator;
    }
  }

 private:
  double lr_, beta1_, beta2_, eps_;
  std::vector<float> m_, v_;
  int steps_ = 0;
};

// The manifest's `drag` protocol on `unet_drag`: returns the edited z_t. Handles and targets are
// (row, col) at the supervision size; `mask` is the editable mask at latent size, empty for none.
Tensor drag_latent(Export& folder, const Tensor& z_t, std::vector<float> handles, std::vector<float> targets,
                   const Tensor& mask, std::optional<int> steps, int& steps_run, const StepCallback& on_step) {
  const json& protocol = folder.manifest["drag"];
  Graph& graph = folder.graph(protocol.at("graph").get<std::string>());
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const json& input : folder.artifact(protocol.at("graph").get<std::string>()).at("inputs"))
    shapes[input.at("name").get<std::string>()] = input.at("shape").get<std::vector<int64_t>>();
  const size_t count = handles.size() / 2, slots = protocol["points"];
  handles.resize(2 * slots, 0.0f);  // padding: a handle on its target, fed unchanged
  targets.resize(2 * slots, 0.0f);
  const Tensor target_tensor{{static_cast<int64_t>(slots), 2}, targets};
  const Tensor mask_tensor{shapes["mask"], mask.data.empty() ? std::vector<float>(element_count(shapes["mask"]), 1.0f) : mask.data};
  Tensor latent = z_t, handle_tensor{{static_cast<int64_t>(slots), 2}, handles};
  Tensor features{shapes["handle_features"], std::vector<float>(element_count(shapes["handle_features"]), 0.0f)};
  Tensor x_prev0{latent.shape, std::vector<float>(latent.data.size(), 0.0f)};
  const auto run = [&](float tracking) {
    const Tensor track = scalar(tracking);
    return graph.run({{"latents", &latent}, {"text_embeddings", &folder.text}, {"handles", &handle_tensor},
                      {"targets", &target_tensor}, {"handle_features", &features}, {"x_prev0", &x_prev0},
                      {"mask", &mask_tensor}, {"tracking", &track}});
  };
  {
    std::map<std::string, Tensor> anchors = run(0.0f);
    features = std::move(anchors.at("handle_features_now"));
    x_prev0 = std::move(anchors.at("x_prev"));
  }
  Adam adam(protocol["lr"], protocol["adam"]["betas"][0], protocol["adam"]["betas"][1], protocol["adam"]["eps"]);
  const float reach = protocol["reach_distance"];
  const int total = steps ? *steps : protocol["steps"].get<int>();
  steps_run = 0;
  report(on_step, "drag", 0, total);
  for (int index = 0; index < total; ++index) {
    const std::map<std::string, Tensor> out = run(index > 0 ? 1.0f : 0.0f);
    const std::vector<float>& tracked = out.at("tracked_handles").data;
    std::copy(tracked.begin(), tracked.begin() + 2 * count, handle_tensor.data.begin());
    report(on_step, "drag", ++steps_run, total);
    bool reached = true;
    for (size_t p = 0; p < count; ++p) {
      const float dr = targets[2 * p] - handle_tensor.data[2 * p], dc = targets[2 * p + 1] - handle_tensor.data[2 * p + 1];
      reached = reached && std::sqrt(dr * dr + dc * dc) < reach;
    }
    if (reached) break;
    adam.step(latent.data, out.at("grad").data);
  }
  return latent;
}

// Per swapped denoising step, the source branch's keys and values by name (the manifest's source_kv.tensors).
using SourceKV = std::vector<std::map<std::string, Tensor>>;

// Denoise the (source, edited) pair and return the edited row's clean latent: plain attention row by row
// before reference_control.start_step, then `unet_reference` (the K/V swap inside the graph) on the pair.
// `record` (exports with `unet_kept`) receives each swapped step's source keys and values once the last step
// ran (a stopped denoising leaves it as it was). With `kept` (what a pair's run of the same z_t recorded) the
// edited latent runs alone, through `unet_kept` in the swapped steps: the manifest's source_kv protocol, half
// the work.
Tensor denoise_pair(Export& folder, const Tensor& source, const Tensor& edited, const SourceKV* kept, SourceKV* record,
                    const StepCallback& on_step) {
  const int start_step = folder.manifest["reference_control"]["start_step"];
  const int rows = kept ? 1 : 2;
  Graph &plain = folder.graph("unet_inversion"), &swapped = folder.graph(kept ? "unet_kept" : "unet_reference");
  Latents x{edited.shape, {}};
  x.shape[0] = rows;
  if (!kept) x.data.assign(source.data.begin(), source.data.end());
  x.data.insert(x.data.end(), edited.data.begin(), edited.data.end());
  const size_t row = edited.data.size();
  Tensor texts = folder.text;
  if (!kept) {
    texts.shape[0] = 2;
    texts.data.insert(texts.data.end(), folder.text.data.begin(), folder.text.data.end());
  }
  std::vector<std::string> names;
  if (record && folder.manifest.contains("source_kv")) names = folder.manifest["source_kv"]["tensors"].get<std::vector<std::string>>();
  SourceKV recorded;
  const json& schedule = folder.manifest["schedule"]["denoise"];
  report(on_step, "denoise", 0, schedule.size());
  int index = 0;
  for (const json& step : schedule) {
    const Tensor t = scalar(step["t"].get<float>());
    Tensor eps{x.shape, {}};
    if (index < start_step) {
      for (int r = 0; r < rows; ++r) {
        const Latents latents{edited.shape, std::vector<double>(x.data.begin() + r * row, x.data.begin() + (r + 1) * row)};
        const Tensor part = plain.run({{"latents", &latents}, {"timestep", &t}, {"text_embeddings", &folder.text}}).at("eps");
        eps.data.insert(eps.data.end(), part.data.begin(), part.data.end());
      }
    } else {
      std::vector<std::pair<std::string, Feed>> feeds{{"latents", &x}, {"timestep", &t}, {"text_embeddings", &texts}};
      if (kept)
        for (const auto& [name, tensor] : kept->at(index - start_step)) feeds.emplace_back(name, &tensor);
      std::map<std::string, Tensor> outputs = swapped.run(feeds, names);
      eps = std::move(outputs.at("eps"));
      if (!names.empty()) {
        std::map<std::string, Tensor>& step_kv = recorded.emplace_back();
        for (const std::string& name : names) step_kv[name] = std::move(outputs.at(name));
      }
    }
    ddim(x, eps, step["alpha_from"], step["alpha_to"]);
    report(on_step, "denoise", ++index, schedule.size());
  }
  if (record) *record = std::move(recorded);
  return {edited.shape, std::vector<float>(x.data.end() - row, x.data.end())};
}

Tensor decode_latent(Export& folder, const Tensor& latent) {
  const float scaling = folder.manifest["model"]["scaling_factor"].get<float>();  // float32 / float32, as numpy divides
  Tensor scaled = latent;
  for (float& value : scaled.data) value /= scaling;
  return folder.graph("vae_decoder").run({{"latents", &scaled}}).at("image");
}

// What a repeated edit of the last image reuses: the image, its z_t and, where the export has
// `unet_kept`, the source keys and values of its first pair denoising.
struct Memory {
  std::vector<float> image;
  Tensor z_t;
  SourceKV source_kv;
};

// Keep `image`'s inversion in `memory`: the one there if it is this image's (returns true), else a new one
// (and no source keys and values yet); a stopped inversion leaves `memory` as it was.
bool keep_inversion(Export& folder, Memory& memory, const Tensor& image, const StepCallback& on_step) {
  if (!memory.image.empty() && memory.image == image.data) return true;
  memory = Memory{image.data, invert_image(folder, image, on_step), {}};
  return false;
}

// A whole edit with `memory` (the Editor's, or a fresh one when it is not to remember the image).
Edited edit_image(Export& folder, Memory& memory, bool remember, const Tensor& image, const Points& points,
                  const Tensor& latent_mask, std::optional<int> drag_steps, const StageCallback& on_stage, const StepCallback& on_step) {
  Edited result;
  auto last = std::chrono::steady_clock::now();
  const auto done = [&](const char* stage) {
    const auto now = std::chrono::steady_clock::now();
    if (on_stage) on_stage(stage, std::chrono::duration<double>(now - last).count(), result);
    last = now;
  };
  result.kept_inversion = keep_inversion(folder, memory, image, on_step);
  done("invert");
  const Tensor edited = drag_latent(folder, memory.z_t, points.handles, points.targets, latent_mask, drag_steps,
                                    result.drag_iterations, on_step);
  done("drag");
  result.kept_source_kv = !memory.source_kv.empty();
  const bool record = remember && !result.kept_source_kv && folder.manifest.contains("source_kv");
  const Tensor clean = denoise_pair(folder, memory.z_t, edited, result.kept_source_kv ? &memory.source_kv : nullptr,
                                    record ? &memory.source_kv : nullptr, on_step);
  done("denoise");
  result.image = decode_latent(folder, clean);
  done("decode");
  return result;
}

}  // namespace

struct Editor::State {
  State(const fs::path& path, const std::optional<fs::path>& refit, int threads, const std::string& provider)
      : folder(path, refit, threads, provider), where(path.string()) {}

  // One call at a time (the sessions' buffers and `memory` are shared): other threads' calls wait their turn,
  // and a call from a callback of the running call, on its thread, is refused: it would wait for itself.
  struct Turn {
    explicit Turn(State& state) : owner(state) {
      if (state.running.load() == std::this_thread::get_id())
        throw std::logic_error("an Editor call from a callback of its running call: return from the callback first");
      lock = std::unique_lock<std::mutex>(state.turns);
      state.running = std::this_thread::get_id();
    }
    ~Turn() { owner.running = std::thread::id(); }  // (then `lock` lets the next call in)

    State& owner;
    std::unique_lock<std::mutex> lock;
  };

  Export folder;
  std::string where;
  Memory memory;
  std::mutex turns;
  std::atomic<std::thread::id> running{};
};

Editor::Editor(const fs::path& folder, const std::optional<fs::path>& refit, int threads, const std::string& provider)
    : state_(std::make_unique<State>(folder, refit, threads, provider)) {}

Editor::~Editor() = default;

const json& Editor::manifest() const { return state_->folder.manifest; }

void Editor::require_drag_graph() const {
  if (!state_->folder.manifest.contains("drag"))
    throw InputError(state_->where + " has no drag graph: export with --drag-points N (drag_points=N) for a whole edit");
}

Tensor Editor::invert(const Tensor& image, const StepCallback& on_step) {
  check_image(image, "the image");
  const State::Turn turn(*state_);
  return invert_image(state_->folder, image, on_step);
}

bool Editor::preload(const Tensor& image, const StepCallback& on_step) {
  check_image(image, "the image");
  const State::Turn turn(*state_);
  return keep_inversion(state_->folder, state_->memory, image, on_step);
}

Edited Editor::edit(const Tensor& image, const Points& points, const Tensor& latent_mask, std::optional<int> drag_steps,
                    bool remember, const StageCallback& on_stage, const StepCallback& on_step) {
  require_drag_graph();
  check_image(image, "the image");
  const State::Turn turn(*state_);
  Memory fresh;
  return edit_image(state_->folder, remember ? state_->memory : fresh, remember, image, points, latent_mask, drag_steps, on_stage,
                    on_step);
}

void Editor::release() {
  const State::Turn turn(*state_);
  state_->memory = Memory{};
  state_->folder.release();
}

double Editor::warm_up(const StepCallback& on_step) {
  require_drag_graph();
  const json& manifest = state_->folder.manifest;
  const int64_t height = manifest.at("image").at("height"), width = manifest.at("image").at("width");
  const Tensor grey{{1, 3, height, width}, std::vector<float>(3 * height * width, 0.0f)};
  const Points points{{0.0f, 0.0f}, {1.0f, 1.0f}};  // one pair at the supervision size
  const State::Turn turn(*state_);
  const auto start = std::chrono::steady_clock::now();  // (after the wait for its turn)
  Memory kept = std::move(state_->memory);  // what the grey edits replace, put back after them
  state_->memory = Memory{};
  try {
    edit_image(state_->folder, state_->memory, true, grey, points, {}, 1, {}, on_step);
    if (manifest.contains("source_kv")) edit_image(state_->folder, state_->memory, true, grey, points, {}, 1, {}, on_step);  // unet_kept
  } catch (...) {
    state_->memory = std::move(kept);
    throw;
  }
  state_->memory = std::move(kept);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

Points Editor::points(const json& pairs, const std::string& where) const {
  const json& manifest = state_->folder.manifest;
  require_drag_graph();
  const int width = manifest.at("image").at("width"), height = manifest.at("image").at("height"), slots = manifest.at("drag").at("points");
  const int sup_h = manifest.at("drag").at("supervision_size").at(0), sup_w = manifest.at("drag").at("supervision_size").at(1);
  if (!pairs.is_array() || pairs.empty() || static_cast<int>(pairs.size()) > slots)
    throw InputError(where + ": give 1 to " + std::to_string(slots) +
                     " [[hx, hy], [tx, ty]] pairs (this export's drag graph takes " + std::to_string(slots) + ")");
  Points points;
  for (size_t index = 0; index < pairs.size(); ++index) {
    const json& pair = pairs[index];
    const auto is_point = [](const json& p) { return p.is_array() && p.size() == 2 && p[0].is_number() && p[1].is_number(); };
    if (!pair.is_array() || pair.size() != 2 || !is_point(pair[0]) || !is_point(pair[1]))
      throw InputError("drag pair " + std::to_string(index) + " is not a (handle, target) pair of (x, y) points: " + pair.dump());
    if (pair[0] == pair[1]) throw InputError("drag pair " + std::to_string(index) + " has its handle equal to its target");
    for (size_t which = 0; which < 2; ++which) {
      const double x = pair[which][0], y = pair[which][1];
      if (!(x >= 0 && x <= width - 1 && y >= 0 && y <= height - 1))
        throw InputError(std::string(which ? "target " : "handle ") + pair[which].dump() + " of drag pair " + std::to_string(index) +
                         " is outside the " + std::to_string(width) + "x" + std::to_string(height) + " image");
      const double row = std::clamp(std::nearbyint(y * sup_h / height), 0.0, sup_h - 1.0);
      const double col = std::clamp(std::nearbyint(x * sup_w / width), 0.0, sup_w - 1.0);
      std::vector<float>& into = which ? points.targets : points.handles;
      into.push_back(static_cast<float>(row));
      into.push_back(static_cast<float>(col));
    }
  }
  return points;
}

void Editor::check_image(const Tensor& image, const std::string& where) const {
  const json& manifest = state_->folder.manifest;
  const std::vector<int64_t> wanted{1, 3, manifest.at("image").at("height"), manifest.at("image").at("width")};
  if (image.shape != wanted)
    throw InputError(where + " has shape " + shape_text(image.shape) + "; this export takes " + shape_text(wanted) +
                     " images in [-1, 1]");
}

// Every vae_scale_factor-th pixel, as standalone.py downsamples it.
Tensor Editor::latent_mask(const Tensor& mask, const std::string& where) const {
  const json& manifest = state_->folder.manifest;
  const int64_t height = manifest.at("image").at("height"), width = manifest.at("image").at("width");
  if (mask.shape != std::vector<int64_t>{height, width})
    throw InputError(where + " has shape " + shape_text(mask.shape) + "; the mask must be (" + std::to_string(height) +
                     ", " + std::to_string(width) + ")");
  const int64_t scale = manifest.at("model").at("vae_scale_factor");
  Tensor latent_mask{{1, 1, (height + scale - 1) / scale, (width + scale - 1) / scale}, {}};
  bool any = false;
  for (int64_t r = 0; r < height; r += scale) {
    for (int64_t c = 0; c < width; c += scale) {
      latent_mask.data.push_back(mask.data[r * width + c] > 0.5f ? 1.0f : 0.0f);
    }
  }
  for (float value : mask.data) any = any || value > 0.5f;
  if (!any) latent_mask.data.clear();
  return latent_mask;
}


}  // namespace fastdrag
