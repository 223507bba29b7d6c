// ek_runner: run a compiled edgekit artifact (Relax VM library) with only the TVM runtime.
// Used to check aarch64 artifacts under qemu-user; needs no Python on the device.
//
//   ek_runner MODEL.so INPUT.bin OUTPUT.bin NDIM D0 D1 ... [REPEATS]
//
// INPUT.bin holds one or more int8 input tensors (row-major, back to back); for each, OUTPUT.bin
// receives every output tensor's bytes, one after another. Prints one line per output ("output <i> <dtype-bits> <shape...>")
// and, with REPEATS > 0, "median_us <t>" over that many timed runs.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
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
}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s MODEL.so INPUT.bin OUTPUT.bin NDIM D0 .. [REPEATS]\n", argv[0]);
    return 2;
  }
  int nd = std::atoi(argv[4]);
  if (argc < 5 + nd) return 2;
  std::vector<int64_t> shape;
  for (int i = 0; i < nd; ++i) shape.push_back(std::atoll(argv[5 + i]));
  int repeats = argc > 5 + nd ? std::atoi(argv[5 + nd]) : 0;

  std::ifstream fin(argv[2], std::ios::binary);
  std::vector<char> buf((std::istreambuf_iterator<char>(fin)), std::istreambuf_iterator<char>());

  tvm::ffi::Module lib = tvm::ffi::Module::LoadFromFile(argv[1]);
  tvm::ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<tvm::ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);  // pooled allocator
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
    tvm::ffi::Any r = entry(x);
    std::vector<Tensor> outs;
    if (auto t = r.try_cast<Tensor>()) {
      outs.push_back(*t);
    } else {
      for (const tvm::ffi::Any& a : r.cast<tvm::ffi::Array<tvm::ffi::Any>>()) outs.push_back(a.cast<Tensor>());
    }
    for (size_t i = 0; i < outs.size(); ++i) {
      const DLTensor* t = outs[i].GetDLTensorPtr();
      size_t n = 1;
      if (k == 0) std::printf("output %zu %d", i, t->dtype.bits);
      for (int d = 0; d < t->ndim; ++d) {
        n *= t->shape[d];
        if (k == 0) std::printf(" %lld", static_cast<long long>(t->shape[d]));
      }
      if (k == 0) std::printf("\n");
      fout.write(static_cast<const char*>(t->data) + t->byte_offset, n * ((t->dtype.bits + 7) / 8));
    }
  }
  if (repeats > 0) {
    std::vector<double> us;
    for (int i = 0; i < repeats; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      entry(x);
      us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(us.begin(), us.end());
    std::printf("median_us %.2f\n", us[us.size() / 2]);
  }
  return 0;
}
