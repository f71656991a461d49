// Python bindings of the optional CUDA extension `sparsedoctor_kernels._C`.
// The kernels themselves live in *.cu files beside this one, which include no PyTorch headers, so that they
// compile with plain nvcc as a CI check. For now the extension reports how it was built, which lets
// `sparsedoctor check` and the backend dispatch tell a working GPU build from a missing one.
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include <string>

namespace {

int cuda_runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

std::string build_info() {
  return "sparsedoctor_kernels._C built with CUDA runtime " + std::to_string(CUDART_VERSION) +
         ", torch " + TORCH_VERSION;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsedoctor_kernels CUDA extension";
  m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime version seen at run time");
  m.def("build_info", &build_info, "how this extension was built");
}
