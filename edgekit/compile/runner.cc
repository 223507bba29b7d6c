// ek_runner: run a compiled edgekit artifact (Relax VM library) with only the TVM runtime
// (libtvm_runtime.so + libtvm_ffi.so): no Python, no TVM compiler on the device.
//
// File mode (the compiler's qemu bit-exactness check, edgekit/compile/emulate.py):
//
//   ek_runner MODEL.so INPUT.bin OUTPUT.bin NDIM D0 D1 ... [REPEATS]
//
//   INPUT.bin holds one or more int8 input tensors (row-major, back to back); for each, OUTPUT.bin
//   receives every output tensor's bytes, one after another. Prints one line per output
//   ("output <i> <dtype-bits> <shape...>") and, with REPEATS > 0, "median_us <t>" over that many runs.
//
// Serve mode (the device agent's "tvm" runtime, edgekit/device/runtimes/tvm_runner.py):
//
//   ek_runner --serve MODEL.so
//
//   Loads the library once, prints "ready <load_ns>", then answers commands on stdin, one text line
//   each, tensors as a header line "T <dtype code> <bits> <ndim> <d0> ..." followed by the raw
//   row-major bytes. Every answer is one line "ok ..." (then any tensors) or "err <message>".
//     run N + N tensors              -> ok <n outputs> <ns>, then the output tensors
//     time WARMUP REPEATS N + tensors -> ok <warmup ns> <ns of run 1> ... <ns of run REPEATS>
//     layers REPEATS N + tensors      -> ok K, then K lines "<mean ns per run> <calls per run> <kernel>"
//     intermediates N + tensors       -> ok K, then K times a line "<kernel>" and that call's output tensor
//     stats                           -> ok <peak rss KiB> <current rss KiB>
//     quit
//   Times come from std::chrono::steady_clock (monotonic) around the VM call only. Per-kernel times
//   use the Relax VM's instrument hook, on a second VM instance so timed runs carry no hook.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using tvm::ffi::Tensor;

namespace {
struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (tvm::ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n ? n : 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

using Clock = std::chrono::steady_clock;

int64_t Ns(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count();
}

tvm::ffi::Module LoadVM(tvm::ffi::Module lib) {
  tvm::ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<tvm::ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);  // pooled allocator
  return vm;
}

std::vector<Tensor> Outputs(const tvm::ffi::Any& r) {
  std::vector<Tensor> outs;
  if (auto t = r.try_cast<Tensor>()) {
    outs.push_back(*t);
  } else {
    for (const tvm::ffi::Any& a : r.cast<tvm::ffi::Array<tvm::ffi::Any>>()) outs.push_back(a.cast<Tensor>());
  }
  return outs;
}

size_t Bytes(const DLTensor* t) {
  size_t n = 1;
  for (int d = 0; d < t->ndim; ++d) n *= t->shape[d];
  return n * ((t->dtype.bits * t->dtype.lanes + 7) / 8);
}

// ---- serve mode ---------------------------------------------------------------------------------

bool ReadLine(std::string* line) {
  line->clear();
  int c;
  while ((c = std::fgetc(stdin)) != EOF && c != '\n') line->push_back(static_cast<char>(c));
  return c != EOF || !line->empty();
}

Tensor ReadTensor() {
  std::string line;
  if (!ReadLine(&line)) throw std::runtime_error("end of input inside a command");
  std::istringstream in(line);
  std::string tag;
  int code = 0, bits = 0, ndim = 0;
  in >> tag >> code >> bits >> ndim;
  if (tag != "T" || !in || ndim < 0 || ndim > 8 || bits <= 0 || bits % 8) {
    throw std::runtime_error("bad tensor header: " + line);
  }
  std::vector<int64_t> shape(ndim);
  for (int d = 0; d < ndim; ++d) in >> shape[d];
  if (!in) throw std::runtime_error("bad tensor shape: " + line);
  DLDataType dt{static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1};
  Tensor x = Tensor::FromNDAlloc(CPUAlloc(), tvm::ffi::Shape(shape), dt, DLDevice{kDLCPU, 0});
  size_t n = Bytes(x.GetDLTensorPtr());
  if (n && std::fread(x.data_ptr(), 1, n, stdin) != n) throw std::runtime_error("end of input inside a tensor");
  return x;
}

void WriteTensor(const Tensor& t) {
  const DLTensor* d = t.GetDLTensorPtr();
  std::printf("T %d %d %d", d->dtype.code, d->dtype.bits, d->ndim);
  for (int i = 0; i < d->ndim; ++i) std::printf(" %lld", static_cast<long long>(d->shape[i]));
  std::printf("\n");
  std::fwrite(static_cast<const char*>(d->data) + d->byte_offset, 1, Bytes(d), stdout);
}

std::vector<tvm::ffi::Any> ReadInputs(int n) {
  std::vector<tvm::ffi::Any> xs;
  for (int i = 0; i < n; ++i) xs.emplace_back(ReadTensor());
  return xs;
}

tvm::ffi::Any Call(const tvm::ffi::Function& f, const std::vector<tvm::ffi::Any>& xs) {
  std::vector<tvm::ffi::AnyView> views(xs.begin(), xs.end());
  tvm::ffi::Any rv;
  f.CallPacked(views.data(), static_cast<int32_t>(views.size()), &rv);
  return rv;
}

long RssKiB(bool peak) {
  if (peak) {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
  }
  long pages = 0, rss = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &rss) != 2) rss = 0;
    std::fclose(f);
  }
  return rss * (sysconf(_SC_PAGESIZE) / 1024);
}

struct LayerClock {
  bool capture = false;  // false: time each kernel call; true: keep a copy of each kernel's output
  std::vector<std::string> order;
  std::map<std::string, std::pair<int64_t, int64_t>> total;  // kernel -> (ns, calls)
  std::vector<Clock::time_point> started;
  std::vector<std::pair<std::string, Tensor>> outputs;  // capture: (kernel, its output), in call order
};

Tensor Copy(const Tensor& t) {
  const DLTensor* d = t.GetDLTensorPtr();
  Tensor c = Tensor::FromNDAlloc(CPUAlloc(), tvm::ffi::Shape(std::vector<int64_t>(d->shape, d->shape + d->ndim)),
                                 d->dtype, DLDevice{kDLCPU, 0});
  std::memcpy(c.data_ptr(), static_cast<const char*>(d->data) + d->byte_offset, Bytes(d));
  return c;
}

int Serve(const char* model) {
  std::optional<tvm::ffi::Module> lib, vm, vm_prof;
  tvm::ffi::Function entry, entry_prof;
  LayerClock clock;
  auto t0 = Clock::now();
  try {
    lib = tvm::ffi::Module::LoadFromFile(model);
    vm = LoadVM(*lib);
    entry = (*vm)->GetFunction("main").value();
  } catch (const std::exception& e) {
    std::string msg = e.what();
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    std::printf("err cannot load %s: %s\n", model, msg.c_str());
    return 1;
  }
  std::printf("ready %lld\n", static_cast<long long>(Ns(t0, Clock::now())));
  std::fflush(stdout);

  std::string line;
  while (ReadLine(&line)) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    try {
      if (cmd == "quit") {
        break;
      } else if (cmd == "run") {
        int n = 0;
        in >> n;
        auto xs = ReadInputs(n);
        auto a = Clock::now();
        tvm::ffi::Any r = Call(entry, xs);
        auto b = Clock::now();
        auto outs = Outputs(r);
        std::printf("ok %zu %lld\n", outs.size(), static_cast<long long>(Ns(a, b)));
        for (const auto& t : outs) WriteTensor(t);
      } else if (cmd == "time") {
        int warmup = 0, repeats = 0, n = 0;
        in >> warmup >> repeats >> n;
        auto xs = ReadInputs(n);
        auto a = Clock::now();
        for (int i = 0; i < warmup; ++i) Call(entry, xs);
        int64_t warm = Ns(a, Clock::now());
        std::vector<int64_t> ns;
        for (int i = 0; i < repeats; ++i) {
          auto s = Clock::now();
          Call(entry, xs);
          ns.push_back(Ns(s, Clock::now()));
        }
        std::printf("ok %lld", static_cast<long long>(warm));
        for (int64_t t : ns) std::printf(" %lld", static_cast<long long>(t));
        std::printf("\n");
      } else if (cmd == "layers" || cmd == "intermediates") {
        int repeats = 1, n = 0;
        if (cmd == "layers") in >> repeats;
        in >> n;
        auto xs = ReadInputs(n);
        if (!vm_prof) {
          vm_prof = LoadVM(*lib);
          auto hook = tvm::ffi::Function::FromPacked([&clock](tvm::ffi::PackedArgs args, tvm::ffi::Any* rv) {
            std::string sym = args[1].cast<tvm::ffi::String>();
            if (clock.capture) {
              // a kernel's output is its last argument (destination passing); copied now, as the
              // pooled allocator reuses the buffer later in the run
              if (!args[2].cast<bool>() && sym.rfind("vm.builtin.", 0) != 0 && args.size() > 4) {
                if (auto out = args[args.size() - 1].try_cast<Tensor>()) {
                  if (tvm::ffi::IsContiguous(*out->GetDLTensorPtr())) clock.outputs.emplace_back(sym, Copy(*out));
                }
              }
            } else if (args[2].cast<bool>()) {
              clock.started.push_back(Clock::now());
            } else if (!clock.started.empty()) {
              int64_t ns = Ns(clock.started.back(), Clock::now());
              clock.started.pop_back();
              auto it = clock.total.find(sym);
              if (it == clock.total.end()) {
                clock.order.push_back(sym);
                clock.total[sym] = {ns, 1};
              } else {
                it->second.first += ns;
                it->second.second += 1;
              }
            }
            *rv = 0;  // VMInstrumentReturnKind::kNoOp
          });
          (*vm_prof)->GetFunction("set_instrument").value()(hook);
          entry_prof = (*vm_prof)->GetFunction("main").value();
          Call(entry_prof, xs);  // warm-up run, not counted
        }
        if (cmd == "intermediates") {
          clock.capture = true;
          clock.outputs.clear();
          try {
            Call(entry_prof, xs);
          } catch (...) {
            clock.capture = false;
            throw;
          }
          clock.capture = false;
          std::printf("ok %zu\n", clock.outputs.size());
          for (const auto& [sym, t] : clock.outputs) {
            std::printf("%s\n", sym.c_str());
            WriteTensor(t);
          }
          clock.outputs.clear();
          std::fflush(stdout);
          continue;
        }
        clock.order.clear();
        clock.total.clear();
        clock.started.clear();
        repeats = std::max(1, repeats);
        for (int i = 0; i < repeats; ++i) Call(entry_prof, xs);
        std::printf("ok %zu\n", clock.order.size());
        for (const auto& sym : clock.order) {
          const auto& v = clock.total[sym];
          std::printf("%.1f %lld %s\n", static_cast<double>(v.first) / repeats,
                      static_cast<long long>(v.second / repeats), sym.c_str());
        }
      } else if (cmd == "stats") {
        std::printf("ok %ld %ld\n", RssKiB(true), RssKiB(false));
      } else {
        std::printf("err unknown command %s\n", cmd.c_str());
      }
    } catch (const std::exception& e) {
      std::string msg = e.what();
      std::replace(msg.begin(), msg.end(), '\n', ' ');
      std::printf("err %s\n", msg.c_str());
    }
    std::fflush(stdout);
  }
  return 0;
}

// ---- file mode ----------------------------------------------------------------------------------

int RunFiles(int argc, char** argv) {
  int nd = std::atoi(argv[4]);
  if (argc < 5 + nd) return 2;
  std::vector<int64_t> shape;
  for (int i = 0; i < nd; ++i) shape.push_back(std::atoll(argv[5 + i]));
  int repeats = argc > 5 + nd ? std::atoi(argv[5 + nd]) : 0;

  std::ifstream fin(argv[2], std::ios::binary);
  std::vector<char> buf((std::istreambuf_iterator<char>(fin)), std::istreambuf_iterator<char>());

  tvm::ffi::Module lib = tvm::ffi::Module::LoadFromFile(argv[1]);
  tvm::ffi::Module vm = LoadVM(lib);
  tvm::ffi::Function entry = vm->GetFunction("main").value();

  DLDataType i8{kDLInt, 8, 1};
  Tensor x = Tensor::FromNDAlloc(CPUAlloc(), tvm::ffi::Shape(shape), i8, DLDevice{kDLCPU, 0});
  size_t in_bytes = tvm::ffi::GetDataSize(*x.GetDLTensorPtr());
  if (in_bytes == 0 || buf.size() % in_bytes != 0) {
    std::fprintf(stderr, "input file has %zu bytes, not a multiple of the tensor's %zu\n", buf.size(), in_bytes);
    return 2;
  }
  std::ofstream fout(argv[3], std::ios::binary);
  for (size_t k = 0; k < buf.size() / in_bytes; ++k) {
    std::memcpy(x.data_ptr(), buf.data() + k * in_bytes, in_bytes);
    auto outs = Outputs(entry(x));
    for (size_t i = 0; i < outs.size(); ++i) {
      const DLTensor* t = outs[i].GetDLTensorPtr();
      if (k == 0) {
        std::printf("output %zu %d", i, t->dtype.bits);
        for (int d = 0; d < t->ndim; ++d) std::printf(" %lld", static_cast<long long>(t->shape[d]));
        std::printf("\n");
      }
      fout.write(static_cast<const char*>(t->data) + t->byte_offset, Bytes(t));
    }
  }
  if (repeats > 0) {
    std::vector<double> us;
    for (int i = 0; i < repeats; ++i) {
      auto t0 = Clock::now();
      entry(x);
      us.push_back(Ns(t0, Clock::now()) / 1e3);
    }
    std::sort(us.begin(), us.end());
    std::printf("median_us %.2f\n", us[us.size() / 2]);
  }
  return 0;
}
}  // namespace

// Without TVM_NUM_THREADS the TVM runtime asks std::thread::hardware_concurrency() on every parallel
// kernel launch, and glibc answers by reading /sys/devices/system/cpu/online each time: ~3 us per kernel.
// Ask once (the runtime's own default, all online cores) and pin the answer.
static void PinThreadCount() {
  if (std::getenv("TVM_NUM_THREADS") == nullptr && std::getenv("OMP_NUM_THREADS") == nullptr) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    setenv("TVM_NUM_THREADS", std::to_string(n > 0 ? n : 1).c_str(), 0);
  }
}

int main(int argc, char** argv) {
  PinThreadCount();
  if (argc == 3 && std::strcmp(argv[1], "--serve") == 0) return Serve(argv[2]);
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s MODEL.so INPUT.bin OUTPUT.bin NDIM D0 .. [REPEATS]\n       %s --serve MODEL.so\n",
                 argv[0], argv[0]);
    return 2;
  }
  return RunFiles(argc, argv);
}
