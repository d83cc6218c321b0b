// fastdrag_edit: a whole drag edit from a fastdrag export folder alone: the command line of
// fastdrag_export.hpp's Editor (C++, ONNX Runtime).
//
// It reads manifest.json, the ONNX graphs, text_embedding.bin and, with --refit, a `fastdrag refit`
// weights file (another image's LoRA-merged weights and prompt), and nothing of Python: it is
// export/standalone.py's `edit` and inversion commands, and the tests check that both write the same
// numbers. `serve` edits request after request in one process, as a service does: sessions made once,
// the last image's inversion and (exports with `unet_kept`) its source keys and values reused by the
// next edit of the same image.
//
//   fastdrag_edit edit EXPORT_DIR IMAGE.npy POINTS.json OUT.npy [MASK.npy] [options]
//   fastdrag_edit invert EXPORT_DIR IMAGE.npy OUT.npy [options]
//   fastdrag_edit serve EXPORT_DIR [options]     JSON requests on stdin, answers on stdout (see serve below)
//
//   IMAGE.npy    (1, 3, H, W) image in [-1, 1] at the export's size (float32 or float64)
//   POINTS.json  [[[hx, hy], [tx, ty]], ...] handle and target pairs in image pixels
//   MASK.npy     (H, W), above 0.5 where the image may change (float, uint8 or bool)
//   OUT.npy      the edited (1, 3, H, W) image in [-1, 1], or with `invert` the latent z_t
//   options      --refit WEIGHTS.safetensors   another image's weights and text embeddings
//                --drag-steps N                in place of the manifest's drag.steps (serve: unless a request says)
//                --threads N                   ONNX Runtime's intra-op threads (default: its own)
//                --provider cpu|cuda|cuda:N    where the graphs run (default cpu; cuda, GPU 0, and cuda:N, GPU N, need a
//                                              GPU build of ONNX Runtime)
//                --progress-json               a JSON line on stderr per step of a looped stage:
//                                              {"stage": "drag", "done": 3, "total": 80} (serve: with the request's "id")
//                --quiet                       no stage times on stderr
//                --warm-up                     (serve) Editor::warm_up() before the first request
//
// Exit status: 0 done, 2 bad input or export (one line on stderr), 1 anything else, 130 on SIGINT (Ctrl-C) and 143 on
// SIGTERM (as systemd, Docker or Kubernetes stop a process): the running edit stops at its next step, nothing of it
// is written, and one line says so (a second such signal ends the program at once).
#include "fastdrag_export.hpp"

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;
using fastdrag::Edited;
using fastdrag::Editor;
using fastdrag::InputError;
using fastdrag::Points;
using fastdrag::StepCallback;
using fastdrag::Tensor;
using fastdrag::element_count;
using fastdrag::shape_text;

// ---- SIGINT and SIGTERM: stop at the next step ----

// The stop signal received (SIGINT or SIGTERM), or 0. Its handler only notes it; the program stops where it looks:
// at each step of a looped stage, before writing an output, and while serve waits for a request line. (A lock-free
// atomic: the handler may run on any thread that takes the signal, and a lock-free atomic is safe in a handler.)
static std::atomic<int> stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free);

extern "C" void note_stop_signal(int signal) { stop_signal = signal; }

// Thrown where the program looks once a stop signal was noted. Not a std::exception, so that serve's catch-alls,
// which answer a request and go on, pass it on to main.
struct Stopped {
  int signal;
};

static void stop_if_signalled() {
  if (stop_signal != 0) throw Stopped{stop_signal};
}

// Note SIGINT and SIGTERM from now on. SA_RESETHAND: a second one takes the default action and ends the program at
// once (a stop that hangs can still be forced); SA_RESTART: reads the signal interrupts go on.
static void handle_stop_signals() {
  struct sigaction action {};
  action.sa_handler = note_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESETHAND | SA_RESTART;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

// Run `body` on a new thread that leaves SIGINT and SIGTERM to the others (the main thread, ONNX Runtime's), so
// that no signal interrupts its reads.
template <typename Body>
static std::thread thread_without_stop_signals(Body body) {
  sigset_t stops, before;
  sigemptyset(&stops);
  sigaddset(&stops, SIGINT);
  sigaddset(&stops, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stops, &before);  // (a new thread starts with its creator's mask)
  std::thread thread(std::move(body));
  pthread_sigmask(SIG_SETMASK, &before, nullptr);
  return thread;
}

// Write `bytes` to `path` through a temporary file beside it: a reader never sees half a file.
static void write_atomically(const fs::path& path, const std::string& bytes) {
  fs::path partial = path;
  partial += ".partial-" + std::to_string(getpid());
  {
    std::ofstream out(partial, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) {
      fs::remove(partial);
      throw InputError("cannot write " + path.string());
    }
  }
  fs::rename(partial, path);
}

// ---- .npy files (little-endian, C order) ----

static Tensor read_npy(const fs::path& path) {
  const std::string raw = fastdrag::read_file(path);
  if (raw.size() < 10 || raw.compare(0, 6, "\x93NUMPY") != 0) throw InputError(path.string() + " is not a .npy file");
  const auto byte = [&](size_t i) { return static_cast<uint32_t>(static_cast<unsigned char>(raw[i])); };
  const bool short_header = byte(6) == 1;
  const size_t start = short_header ? 10 : 12;
  const uint32_t length = short_header ? byte(8) | byte(9) << 8 : byte(8) | byte(9) << 8 | byte(10) << 16 | byte(11) << 24;
  if (raw.size() < start + length) throw InputError(path.string() + " is cut short");
  const std::string header = raw.substr(start, length);
  const auto value_after = [&](const std::string& key) {
    const size_t at = header.find("'" + key + "':");
    if (at == std::string::npos) throw InputError(path.string() + " has no '" + key + "' in its header");
    return header.substr(header.find_first_not_of(' ', at + key.size() + 3));
  };
  const std::string descr = value_after("descr").substr(1, 3);
  if (value_after("fortran_order").rfind("False", 0) != 0)
    throw InputError(path.string() + " is in Fortran order: save it in C order");
  Tensor tensor;
  const std::string shape = value_after("shape");
  for (size_t at = 1; at < shape.size() && shape[at] != ')';) {
    if (std::isdigit(static_cast<unsigned char>(shape[at]))) {
      size_t used = 0;
      tensor.shape.push_back(std::stoll(shape.substr(at), &used));
      at += used;
    } else {
      ++at;
    }
  }
  const int64_t count = element_count(tensor.shape);
  const char* body = raw.data() + start + length;
  const size_t width = descr == "<f8" ? 8 : descr == "<f4" ? 4 : (descr == "|u1" || descr == "|b1") ? 1 : 0;
  if (width == 0) throw InputError(path.string() + " holds " + descr + " values; float32, float64, uint8 or bool are read");
  if (raw.size() - start - length != static_cast<size_t>(count) * width)
    throw InputError(path.string() + "'s data does not fill its shape " + shape_text(tensor.shape));
  tensor.data.resize(count);
  for (int64_t i = 0; i < count; ++i) {
    if (width == 8) {
      double value;
      std::memcpy(&value, body + 8 * i, 8);
      tensor.data[i] = static_cast<float>(value);
    } else if (width == 4) {
      std::memcpy(&tensor.data[i], body + 4 * i, 4);
    } else {
      tensor.data[i] = static_cast<float>(static_cast<unsigned char>(body[i]));
    }
  }
  return tensor;
}

static void write_npy(const fs::path& path, const Tensor& tensor) {
  stop_if_signalled();  // a stopped command writes nothing; once begun, a write is finished (a stop then ends after it)
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape_text(tensor.shape) + ", }";
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header += '\n';
  std::string bytes = "\x93NUMPY";
  bytes += '\x01';
  bytes += '\x00';
  bytes += static_cast<char>(header.size() & 0xff);
  bytes += static_cast<char>(header.size() >> 8);
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(tensor.data.data()), tensor.data.size() * sizeof(float));
  write_atomically(path, bytes);
}

// ---- the command ----

struct Options {
  std::vector<std::string> positional;
  std::optional<fs::path> refit;
  std::optional<int> drag_steps;
  int threads = 0;
  std::string provider = "cpu";
  bool quiet = false;
  bool progress_json = false;
  bool warm_up = false;
};

static int parse_count(const std::string& flag, const std::string& text, int least) {
  size_t used = 0;
  int value = 0;
  try {
    value = std::stoi(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || value < least) throw InputError(flag + " takes a whole number of at least " + std::to_string(least) + ", not " + text);
  return value;
}

static Options parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool valued = arg == "--refit" || arg == "--drag-steps" || arg == "--threads" || arg == "--provider";
    if (valued && i + 1 >= argc) throw InputError(arg + " needs a value after it");
    if (arg == "--refit") options.refit = argv[++i];
    else if (arg == "--drag-steps") options.drag_steps = parse_count(arg, argv[++i], 0);
    else if (arg == "--threads") options.threads = parse_count(arg, argv[++i], 1);
    else if (arg == "--provider") options.provider = argv[++i];
    else if (arg == "--quiet") options.quiet = true;
    else if (arg == "--progress-json") options.progress_json = true;
    else if (arg == "--warm-up") options.warm_up = true;
    else if (arg.rfind("--", 0) == 0) throw InputError("unknown option " + arg);
    else options.positional.push_back(arg);
  }
  const std::string usage =
      "usage: fastdrag_edit edit EXPORT_DIR IMAGE.npy POINTS.json OUT.npy [MASK.npy] [--refit W.safetensors] [--drag-steps N] "
      "[--threads N] [--provider cpu|cuda|cuda:N] [--progress-json] [--quiet]\n       fastdrag_edit invert EXPORT_DIR IMAGE.npy OUT.npy "
      "[--refit W.safetensors] [--threads N] [--provider cpu|cuda|cuda:N] [--progress-json] [--quiet]\n       fastdrag_edit serve EXPORT_DIR "
      "[--refit W.safetensors] [--drag-steps N] [--threads N] [--provider cpu|cuda|cuda:N] [--progress-json] [--warm-up] "
      "[--quiet]   (JSON requests on stdin)\n       fastdrag_edit --version";
  const size_t given = options.positional.size();
  const std::string command = given ? options.positional[0] : "";
  if (!((command == "edit" && (given == 5 || given == 6)) || (command == "invert" && given == 4) || (command == "serve" && given == 2)))
    throw InputError(usage);
  if (options.warm_up && command != "serve") throw InputError("--warm-up is serve's: an edit or inversion runs once");
  return options;
}

static Tensor read_image(Editor& editor, const fs::path& path) {
  Tensor image = read_npy(path);
  editor.check_image(image, path.string());
  return image;
}

static Tensor read_mask(Editor& editor, const fs::path& path) { return editor.latent_mask(read_npy(path), path.string()); }

static Points read_points(Editor& editor, const fs::path& path) {
  json pairs;
  try {
    pairs = json::parse(fastdrag::read_file(path));
  } catch (const json::parse_error& error) {
    throw InputError(path.string() + " is not JSON: " + error.what());
  }
  return editor.points(pairs, path.string());
}

// A command's on_step: with --progress-json, a JSON line on stderr per step, with `id` (a served request's) unless
// null; then the stop signals' check.
static StepCallback command_steps(const json& id, bool progress_json) {
  return [id, progress_json](const std::string& stage, int done, int total) {
    if (progress_json) {
      json line = {{"stage", stage}, {"done", done}, {"total", total}};
      if (!id.is_null()) line["id"] = id;
      std::fprintf(stderr, "%s\n", line.dump().c_str());
    }
    stop_if_signalled();
  };
}

// Refuse a request without the keys its op needs or with a key it does not take: a misspelt "drag_step" would
// else be an edit at the defaults.
static void check_keys(const json& request, const std::string& op) {
  const auto unknown_keys = [&](const std::set<std::string>& known) {  // "a", "b": the request's keys not in `known`
    std::string unknown;
    for (const auto& [key, value] : request.items())
      if (!known.count(key)) unknown += (unknown.empty() ? "\"" : ", \"") + key + "\"";
    return unknown;
  };
  if (op == "release") {
    if (!unknown_keys({"op", "id"}).empty())
      throw InputError("a release request is {\"op\": \"release\"} (and \"id\") and nothing else");
  } else if (op == "preload") {
    if (!request.contains("image") || !unknown_keys({"op", "id", "image", "deadline_s", "refit"}).empty())
      throw InputError("a preload request is {\"op\": \"preload\", \"image\": \"IMAGE.npy\"} (and \"id\", \"deadline_s\", "
                       "\"refit\") and nothing else");
  } else {
    if (!request.is_object() || !request.contains("image") || !request.contains("points") || !request.contains("out"))
      throw InputError("a request is a JSON object with \"image\", \"points\" and \"out\" (and \"mask\", \"drag_steps\", "
                       "\"deadline_s\", \"refit\", \"id\" if wanted)");
    const std::string unknown = unknown_keys({"op", "id", "image", "points", "out", "mask", "drag_steps", "deadline_s", "refit"});
    if (!unknown.empty())
      throw InputError("unknown request key(s) " + unknown +
                       "; an edit request takes image, points, out, mask, drag_steps, deadline_s, refit and id");
  }
}

// {"op": "preload", "image": "IMAGE.npy"}: the image's inversion now, kept for its edit.
static json preload_request(Editor& editor, const json& request, const StepCallback& on_step) {
  const Tensor image = read_image(editor, request["image"].get<std::string>());
  const auto start = std::chrono::steady_clock::now();
  const bool kept = editor.preload(image, on_step);
  const double spent = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return {{"preloaded", request["image"]}, {"seconds", {{"invert", spent}}}, {"kept", {{"inversion", kept}}}};
}

static json edit_request(Editor& editor, const json& request, std::optional<int> drag_steps, const StepCallback& on_step) {
  const Tensor image = read_image(editor, request["image"].get<std::string>());
  const Points points = editor.points(request["points"], "the request's points");
  const Tensor mask = request.contains("mask") ? read_mask(editor, request["mask"].get<std::string>()) : Tensor{};
  if (request.contains("drag_steps")) {
    if (!request["drag_steps"].is_number_unsigned()) throw InputError("drag_steps is a whole number of at least 0");
    drag_steps = request["drag_steps"].get<int>();
  }
  json seconds = json::object();
  const Edited result = editor.edit(
      image, points, mask, drag_steps, true, [&](const std::string& stage, double spent, const Edited&) { seconds[stage] = spent; },
      on_step);
  write_npy(request["out"].get<std::string>(), result.image);
  return {{"out", request["out"]}, {"drag_iterations", result.drag_iterations}, {"seconds", seconds},
          {"kept", {{"inversion", result.kept_inversion}, {"source_kv", result.kept_source_kv}}}};
}

// A served request stopped by a cancel line or by its deadline; answered "cancelled: <what>".
struct Cancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// serve's answers cannot reach the client: it closed its end of stdout. Ends serve (status 1, one line).
struct ReaderGone : std::runtime_error {
  ReaderGone() : std::runtime_error("the reader of the answers (stdout) went away; stopped serving") {}
};

// serve's request lines, read on a thread of their own (read) while the main thread answers them in order
// (next), so that a cancel line, {"op": "cancel", "id": X}, reaches request X while it waits or runs.
class Requests {
 public:
  struct Line {
    int number;       // the request's place in the input, from 1 (cancel lines are not counted)
    std::string key;  // its "id" as JSON text, empty without one
    std::string text;
  };

  // Take every line of `in` to its end. A request line is queued; a cancel line marks the waiting or running
  // requests of its id cancelled, or, where there are none, is logged on stderr and does nothing.
  void read(std::istream& in) {
    std::string text;
    int number = 0;
    while (std::getline(in, text)) {
      if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
      const json data = json::parse(text, nullptr, false);  // discarded, not thrown, if not JSON
      const bool is_object = data.is_object();
      const bool cancel = is_object && data.value("op", json()) == "cancel";
      const std::string key = is_object && (cancel || data.contains("id")) ? data.value("id", json()).dump() : "";
      std::lock_guard<std::mutex> lock(mutex_);
      if (cancel) {
        std::set<int>& found = waiting_[key];
        cancelled_.insert(found.begin(), found.end());
        if (found.empty()) std::fprintf(stderr, "fastdrag_edit: cancel of id %s: no request of that id is waiting or running\n", key.c_str());
        continue;
      }
      lines_.push_back({++number, key, text});
      if (!key.empty()) waiting_[key].insert(number);
      ready_.notify_one();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    ended_ = true;
    ready_.notify_one();
  }

  // The next request line, waiting for one; nothing once the input ended and every line was taken. Throws Stopped
  // once a stop signal was noted, before a line or while it waits (it looks every 50 ms).
  std::optional<Line> next() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!ready_.wait_for(lock, std::chrono::milliseconds(50), [&] { return ended_ || !lines_.empty(); })) stop_if_signalled();
    stop_if_signalled();  // (a stop before the line, or with it or the input's end)
    if (lines_.empty()) return std::nullopt;
    Line line = std::move(lines_.front());
    lines_.pop_front();
    return line;
  }

  bool cancelled(int number) {
    std::lock_guard<std::mutex> lock(mutex_);
    return cancelled_.count(number) > 0;
  }

  // `line` was answered: a later cancel of its id no longer finds it.
  void answered(const Line& line) {
    std::lock_guard<std::mutex> lock(mutex_);
    cancelled_.erase(line.number);
    if (line.key.empty()) return;
    waiting_[line.key].erase(line.number);
    if (waiting_[line.key].empty()) waiting_.erase(line.key);
  }

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<Line> lines_;
  bool ended_ = false;
  std::map<std::string, std::set<int>> waiting_;  // id (JSON text) -> numbers of its requests not yet answered
  std::set<int> cancelled_;
};

// A request's "deadline_s": a positive number of seconds, or none.
static std::optional<double> deadline_of(const json& request) {
  if (!request.is_object() || !request.contains("deadline_s")) return std::nullopt;
  const json& value = request["deadline_s"];
  if (!value.is_number() || !std::isfinite(value.get<double>()) || value.get<double>() <= 0)
    throw InputError("\"deadline_s\" is a positive number of seconds, not " + value.dump());
  return value.get<double>();
}

// A served request's on_step: its --progress-json line and the stop signals' check, then the checks of a cancel line
// for it and of its deadline.
static StepCallback request_steps(Requests& requests, const Requests::Line& line, const json& id, std::optional<double> deadline_s,
                                  bool progress_json) {
  const StepCallback steps = command_steps(id, progress_json);
  const auto ends = std::chrono::steady_clock::now() + std::chrono::duration<double>(deadline_s.value_or(0.0));
  return [=, &requests](const std::string& stage, int done, int total) {
    steps(stage, done, total);
    const auto where = [&] { return "in the " + stage + " stage at step " + std::to_string(done) + " of " + std::to_string(total); };
    if (requests.cancelled(line.number)) throw Cancelled("by a cancel request, " + where());
    if (deadline_s && std::chrono::steady_clock::now() > ends) {
      char seconds[32];
      std::snprintf(seconds, sizeof seconds, "%g", *deadline_s);
      throw Cancelled(std::string("past its deadline of ") + seconds + " s, " + where());
    }
  };
}

// The Editor serve runs a request on: the one for the refit file it names ("refit": a path, or null for the
// export's own weights; without the key, the command's --refit). One is kept at a time, as a service keeps one
// image's weights in its sessions: another file (or the same file written since) replaces it, and with it the
// sessions (made anew at their first use) and the kept inversion (the other weights' z_t).
class Editors {
 public:
  explicit Editors(const Options& options) : options_(options), refit_(options.refit), written_(written(options.refit)) {
    editor_ = std::make_unique<Editor>(options.positional[1], options.refit, options.threads, options.provider);
  }

  Editor& current() { return *editor_; }

  Editor& for_request(const json& request) {
    std::optional<fs::path> refit = options_.refit;
    if (request.is_object() && request.contains("refit"))
      refit = request["refit"].is_null() ? std::nullopt : std::optional<fs::path>(request["refit"].get<std::string>());
    const fs::file_time_type when = written(refit);
    if (refit != refit_ || when != written_) {  // (the new one is made first: a file it refuses keeps the current one)
      editor_ = std::make_unique<Editor>(options_.positional[1], refit, options_.threads, options_.provider);
      refit_ = refit;
      written_ = when;
    }
    return *editor_;
  }

 private:
  static fs::file_time_type written(const std::optional<fs::path>& refit) {
    std::error_code unreadable;  // (a missing file is named by the Editor that cannot read it)
    return refit ? fs::last_write_time(*refit, unreadable) : fs::file_time_type{};
  }

  const Options& options_;
  std::unique_ptr<Editor> editor_;
  std::optional<fs::path> refit_;
  fs::file_time_type written_;
};

// Edits from stdin, one JSON request a line, one JSON answer a line on stdout, in order, with the sessions kept
// and the last image's inversion (and source keys and values) reused. A request:
//   {"image": "IMAGE.npy", "points": [[[hx, hy], [tx, ty]], ...], "out": "OUT.npy", "mask": "MASK.npy", "drag_steps": N,
//    "deadline_s": S, "refit": "WEIGHTS.safetensors", "id": ...}
// (all but image, points and out optional; "refit" as Editors above takes it). The answer: {"out": ...,
// "drag_iterations": n, "seconds": {stage: s}, "kept": {"inversion": bool, "source_kv": bool}}, or {"error": "..."}
// for a bad request (serving goes on).
// {"op": "preload", "image": "IMAGE.npy"} inverts the image ahead of its edit: {"preloaded": ..., "seconds":
// {"invert": s}, "kept": {"inversion": bool}}. {"op": "release"} frees the sessions and the kept image
// (Editor::release): {"released": true}. A request's "id", if it has one, comes back in its answer.
// A request still running "deadline_s" seconds after it started stops at its next step, and a line
// {"op": "cancel", "id": X} stops request X at its next step, or before it starts if it waits: each is
// answered {"error": "cancelled: ..."}, and, as with Editor's on_step, nothing of the stopped stage is kept.
// A cancel line gets no answer of its own; one that finds no waiting or running request of its id is logged
// on stderr and cancels no later one. A request that fails otherwise (ONNX Runtime's error, say) is answered
// with its error, logged on stderr, and serving goes on. An answer that cannot be written (the client closed
// stdout) ends serve (ReaderGone). SIGINT or SIGTERM stops the running request at its next step, unanswered
// (nothing of it is kept or written), or the wait for the next line, and ends serve (Stopped).
static int serve(Editors& editors, std::optional<int> default_drag_steps, bool progress_json) {
  auto requests = std::make_shared<Requests>();  // shared with the reader, which may outlive a serve that threw
  std::cin.tie(nullptr);  // the reader's getline must not flush std::cout beside the answers (they are flushed each)
  thread_without_stop_signals([requests] { requests->read(std::cin); }).detach();
  while (const std::optional<Requests::Line> line = requests->next()) {
    json answer;
    json id;  // the request's "id", given back with its answer
    try {
      const json request = json::parse(line->text);
      if (request.is_object() && request.contains("id")) id = request["id"];
      const std::string op = request.is_object() ? request.value("op", "edit") : "edit";
      if (op != "edit" && op != "preload" && op != "release")
        throw InputError("\"op\" is \"edit\" (the default), \"preload\" or \"release\", not \"" + op + "\"");
      check_keys(request, op);
      const StepCallback on_step = request_steps(*requests, *line, id, deadline_of(request), progress_json);
      if (requests->cancelled(line->number)) throw Cancelled("by a cancel request, before it ran");
      if (op == "release") {
        editors.current().release();
        answer = {{"released", true}};
      } else {
        Editor& editor = editors.for_request(request);
        answer = op == "preload" ? preload_request(editor, request, on_step) : edit_request(editor, request, default_drag_steps, on_step);
      }
    } catch (const InputError& error) {
      answer = {{"error", error.what()}};
    } catch (const Cancelled& error) {
      answer = {{"error", std::string("cancelled: ") + error.what()}};
    } catch (const json::exception& error) {
      answer = {{"error", std::string("the request is not one serve takes: ") + error.what()}};
    } catch (const std::exception& error) {  // answered, and serving goes on: one request cannot stop the server
      const bool onnxruntime = dynamic_cast<const Ort::Exception*>(&error) != nullptr;
      answer = {{"error", std::string(onnxruntime ? "ONNX Runtime: " : "internal error: ") + error.what()}};
      std::fprintf(stderr, "fastdrag_edit: request %d failed: %s\n", line->number, answer["error"].get<std::string>().c_str());
    }
    requests->answered(*line);
    if (!id.is_null()) answer["id"] = id;
    if (!(std::cout << answer.dump() << std::endl)) throw ReaderGone();  // flushed: the client reads each as it comes
  }
  return 0;
}

static int run(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--version") {  // what a service logs of what it runs
    std::printf("fastdrag_edit %s (manifest schema version %d, ONNX Runtime %s)\n", fastdrag::kVersion,
                fastdrag::kManifestSchemaVersion, Ort::GetVersionString().c_str());
    return 0;
  }
  const Options options = parse_options(argc, argv);
  const std::vector<std::string>& args = options.positional;
  Editors editors(options);  // (serve changes it per request; the other commands run on the command's)
  Editor& editor = editors.current();
  const auto print = [&](const std::string& stage, double seconds, const Edited& so_far) {
    if (options.quiet) return;
    const std::string detail = stage == "drag" ? " (" + std::to_string(so_far.drag_iterations) + " iterations)" : "";
    std::fprintf(stderr, "%s %.3f s%s\n", stage.c_str(), seconds, detail.c_str());
  };
  if (args[0] != "invert") editor.require_drag_graph();
  if (args[0] == "serve") {
    if (options.warm_up) {
      const double seconds = editor.warm_up(command_steps(json(), false));  // (stopped by a stop signal)
      if (!options.quiet) std::fprintf(stderr, "warm-up %.3f s\n", seconds);
    }
    return serve(editors, options.drag_steps, options.progress_json);
  }
  const StepCallback on_step = command_steps(json(), options.progress_json);
  const Tensor image = read_image(editor, args[2]);
  if (args[0] == "invert") {
    const auto start = std::chrono::steady_clock::now();
    const Tensor z_t = editor.invert(image, on_step);
    print("invert", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), Edited{});
    write_npy(args[3], z_t);
    return 0;
  }
  const Points points = read_points(editor, args[3]);
  const Tensor mask = args.size() == 6 ? read_mask(editor, args[5]) : Tensor{};
  write_npy(args[4], editor.edit(image, points, mask, options.drag_steps, false, print, on_step).image);
  return 0;
}

int main(int argc, char** argv) {
  handle_stop_signals();
  std::signal(SIGPIPE, SIG_IGN);  // a closed stdout is a failed write (serve's ReaderGone), not a silent death
  try {
    return run(argc, argv);
  } catch (const Stopped& stopped) {
    std::fprintf(stderr, "fastdrag_edit: %s\n", stopped.signal == SIGTERM ? "terminated" : "interrupted");
    return 128 + stopped.signal;
  } catch (const InputError& error) {
    std::fprintf(stderr, "fastdrag_edit: error: %s\n", error.what());
    return 2;
  } catch (const ReaderGone& error) {
    std::fprintf(stderr, "fastdrag_edit: error: %s\n", error.what());
    return 1;
  } catch (const json::exception& error) {
    std::fprintf(stderr, "fastdrag_edit: error: a JSON file is not what an export holds: %s\n", error.what());
    return 2;
  } catch (const Ort::Exception& error) {
    std::fprintf(stderr, "fastdrag_edit: ONNX Runtime: %s\n", error.what());
    return 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "fastdrag_edit: %s\n", error.what());
    return 1;
  }
}

