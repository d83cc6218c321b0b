// fastdrag_export: a fastdrag export folder's edit loops in C++, on ONNX Runtime's C++ API.
//
// What a C++ service embeds. An Editor reads manifest.json, the ONNX graphs, text_embedding.bin and,
// optionally, a `fastdrag refit` weights file (another image's LoRA-merged weights and prompt), and
// nothing of Python; it runs export/standalone.py's protocol: invert, drag on `unet_drag`, denoise
// the (source, edited) pair, decode. fastdrag_edit.cpp is its command line; tests/test_drag_export.py
// checks that they write standalone.py's numbers bit for bit.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastdrag {

// fastdrag's version (the Python package's, and the CMake package's: tests/test_drag_export.py keeps them equal)
// and the manifest schema version this code reads.
inline constexpr const char* kVersion = "0.1.0";
inline constexpr int kManifestSchemaVersion = 1;

// Bad input or an export this code cannot serve; the message names the problem.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A row-major float tensor. `half` holds fp16 values in place of `data` where a graph gave them and
// they are kept as given (an fp16 export's source keys and values: half the memory of float32).
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
  std::vector<Ort::Float16_t> half{};
};

// Drag pairs as the drag graph takes them: (row, col) at the supervision size, one pair after another.
struct Points {
  std::vector<float> handles, targets;
};

struct Edited {
  Tensor image;                 // (1, 3, H, W) in [-1, 1]
  int drag_iterations = 0;      // drag iterations run (the loop stops once every handle is within reach)
  bool kept_inversion = false;  // the image was the last one edited: its z_t was reused
  bool kept_source_kv = false;  // and its source keys and values: the edited latent denoised alone (unet_kept)
};

// Told each stage's seconds as it ends ("invert", "drag", "denoise", "decode"), with the edit so far
// (drag_iterations is there from "drag" on).
using StageCallback = std::function<void(const std::string& stage, double seconds, const Edited& so_far)>;

// Told each looped stage's progress ("invert", "drag", "denoise"): `done` 0 before its first step, then the
// steps done after each (the drag's `total` is its most steps: it stops once every handle is within reach;
// a stage an edit skips, as a kept inversion, tells nothing). An exception it throws (a service's own:
// a client went away, a deadline passed) ends the call there and comes out of it; nothing of the stopped
// stage is kept, so the Editor's next edit is the one it would have made without the stopped call.
using StepCallback = std::function<void(const std::string& stage, int done, int total)>;

// One export folder's sessions (made at first use and kept, as a service keeps them between requests)
// and what a later edit of the last image reuses. Threads may share one: its calls (invert, preload, edit,
// warm_up, release) take turns, since that memory is shared; for edits in parallel, keep an Editor per worker. A call
// from a callback of a running call is refused (std::logic_error): it would wait for itself.
class Editor {
 public:
  // `folder`: the export; `refit`: another image's `fastdrag refit` file, whose weights replace each
  // graph's initializers (refit.json says which) and whose text embeddings replace the export's;
  // `threads`: ONNX Runtime's intra-op threads (0: its default); `provider`: where the graphs run, "cpu",
  // "cuda" or "cuda:N" (ONNX Runtime's CUDA execution provider on GPU 0 or GPU N, for a library built
  // with it: the constructor refuses it, naming the library's providers, where it is not).
  explicit Editor(const std::filesystem::path& folder, const std::optional<std::filesystem::path>& refit = std::nullopt,
                  int threads = 0, const std::string& provider = "cpu");
  ~Editor();
  Editor(const Editor&) = delete;
  Editor& operator=(const Editor&) = delete;

  const nlohmann::json& manifest() const;
  // Throws unless the export has the drag graph (`unet_drag`), which a whole edit needs.
  void require_drag_graph() const;

  // Throws unless `image` is (1, 3, H, W) at the export's size. `where` names it in the message.
  void check_image(const Tensor& image, const std::string& where) const;
  // [[[hx, hy], [tx, ty]], ...] in image pixels, checked as fastdrag's editor checks them (1 to the drag
  // graph's number of pairs, inside the image, handle != target) and mapped to the supervision map:
  // (round(y * sh / H), round(x * sw / W)).
  Points points(const nlohmann::json& pairs, const std::string& where) const;
  // An (H, W) mask (above 0.5: may change) at latent size, nearest; empty when nothing is above 0.5,
  // which edits without a mask.
  Tensor latent_mask(const Tensor& mask, const std::string& where) const;

  // The image's latent z_t at the drag timestep (float32).
  Tensor invert(const Tensor& image, const StepCallback& on_step = {});
  // Invert `image` now and keep its z_t, as an edit with `remember` keeps it, so that the image's next
  // edit skips the inversion (a service calls it while a user places the points). Returns whether it
  // was kept already (the last image edited or preloaded).
  bool preload(const Tensor& image, const StepCallback& on_step = {});
  // Make every session an edit uses and run each once: an edit of a mid-grey image with one drag step (and, with
  // `unet_kept`, a repeated one). A service calls it at start-up so that its first request does not pay ONNX
  // Runtime's session creation and first runs. Keeps nothing of the grey edits: what the Editor kept before
  // (the last image's inversion) is kept after. Returns its seconds. `on_step` is told the grey edits' steps, as
  // edit()'s is; an exception it throws (a service stopping during its start-up) ends the warm-up there.
  double warm_up(const StepCallback& on_step = {});
  // Free the sessions and what the Editor keeps (the last image's inversion, keys and values), as a service does
  // before a long idle spell; the next call makes each session again at its first use.
  void release();
  // A whole edit. `latent_mask` from latent_mask() or empty; `drag_steps` in place of the manifest's.
  // `remember`: reuse and keep what a repeated edit of the same image needs (its z_t; with an export
  // that has `unet_kept`, the source keys and values of its first denoising).
  Edited edit(const Tensor& image, const Points& points, const Tensor& latent_mask,
              std::optional<int> drag_steps = std::nullopt, bool remember = true, const StageCallback& on_stage = {},
              const StepCallback& on_step = {});

 private:
  struct State;
  std::unique_ptr<State> state_;
};

std::string read_file(const std::filesystem::path& path);
std::string shape_text(const std::vector<int64_t>& shape);  // (1, 3, 64, 64)
int64_t element_count(const std::vector<int64_t>& shape);

}  // namespace fastdrag
