// Python bindings: ISA selection and the kernel entry points. The module does not link
// libtorch; Python hands it data pointers of dense tensors (no copies) and the problem
// geometry, and the GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/geometry.h"

namespace py = pybind11;
using namespace fastconv;

namespace {

bool cpu_has(const std::string& isa) {
  if (isa == "scalar") return true;
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  return false;
}

const IsaKernels* table_for(const std::string& isa) {
  if (isa == "avx512") return &avx512::kernels();
  if (isa == "avx2") return &avx2::kernels();
  if (isa == "scalar") return &scalar::kernels();
  return nullptr;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"avx512", "avx2", "scalar"})
    if (cpu_has(isa)) out.push_back(isa);
  return out;
}

std::atomic<const IsaKernels*> g_active{nullptr};

const IsaKernels& active() {
  const IsaKernels* t = g_active.load(std::memory_order_acquire);
  if (!t) {
    t = table_for(available_isas().front());
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

void set_isa(const std::string& isa) {
  const IsaKernels* t = table_for(isa);
  if (!t)
    throw std::invalid_argument("unknown ISA '" + isa + "': expected avx512, avx2 or scalar");
  if (!cpu_has(isa))
    throw std::runtime_error("this CPU does not support the '" + isa + "' kernels");
  g_active.store(t, std::memory_order_release);
}

// Geometry as one flat tuple of 18 ints, in ConvGeom's field order. Read by hand: pybind11's
// std::array caster costs ~1.4 us per call, most of a tiny convolution's budget.
using GeomArgs = py::tuple;
ConvGeom to_geom(const py::tuple& t) {
  constexpr int kFields = 18;
  if (t.size() != kFields) throw std::invalid_argument("geometry must be a tuple of 18 ints");
  int64_t a[kFields];
  for (int i = 0; i < kFields; ++i) {
    a[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(t.ptr(), i));
    if (a[i] == -1 && PyErr_Occurred()) throw py::error_already_set();
  }
  return ConvGeom{a[0], a[1], a[2],  a[3],  a[4],  a[5],  a[6],  a[7],  a[8],
                  a[9], a[10], a[11], a[12], a[13], a[14], a[15], a[16], a[17]};
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// dtype codes: 0 = float32, 1 = float64.
template <typename F32, typename F64>
void by_dtype(int dtype, F32 f32, F64 f64) {
  if (dtype == 0)
    f32(active().f32);
  else if (dtype == 1)
    f64(active().f64);
  else
    throw std::invalid_argument("unsupported dtype code");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastconv C++ kernels (raw-buffer interface; use fastconv.conv2d)";
  m.def("available_isas", &available_isas, "ISAs this CPU can run, fastest first");
  m.def("set_isa", &set_isa, py::arg("isa"));
  m.def("get_isa", []() { return std::string(active().name); });
  m.def("release_workspaces", &release_workspaces,
        "Free the calling thread's scratch buffers (they are otherwise kept for reuse)");

  // Arguments are converted with the GIL held; the kernels run with it released.

  m.def(
      "forward",
      [](int dtype, const GeomArgs& ga, uintptr_t x, int xl, uintptr_t w, uintptr_t b,
         uintptr_t y, int yl, int nt) {
        const ConvGeom g = to_geom(ga);
        py::gil_scoped_release nogil;
        by_dtype(
            dtype, [&](auto& k) { k.forward(g, ptr<float>(x), xl, ptr<float>(w), ptr<float>(b), ptr<float>(y), yl, nt); },
            [&](auto& k) { k.forward(g, ptr<double>(x), xl, ptr<double>(w), ptr<double>(b), ptr<double>(y), yl, nt); });
      });
  m.def(
      "grad_input",
      [](int dtype, const GeomArgs& ga, uintptr_t gy, int gyl, uintptr_t w, uintptr_t gx, int gxl,
         int nt) {
        const ConvGeom g = to_geom(ga);
        py::gil_scoped_release nogil;
        by_dtype(
            dtype, [&](auto& k) { k.grad_input(g, ptr<float>(gy), gyl, ptr<float>(w), ptr<float>(gx), gxl, nt); },
            [&](auto& k) { k.grad_input(g, ptr<double>(gy), gyl, ptr<double>(w), ptr<double>(gx), gxl, nt); });
      });
  m.def(
      "grad_weight",
      [](int dtype, const GeomArgs& ga, uintptr_t gy, int gyl, uintptr_t x, int xl, uintptr_t gw,
         int nt) {
        const ConvGeom g = to_geom(ga);
        py::gil_scoped_release nogil;
        by_dtype(
            dtype, [&](auto& k) { k.grad_weight(g, ptr<float>(gy), gyl, ptr<float>(x), xl, ptr<float>(gw), nt); },
            [&](auto& k) { k.grad_weight(g, ptr<double>(gy), gyl, ptr<double>(x), xl, ptr<double>(gw), nt); });
      });
  m.def(
      "grad_bias",
      [](int dtype, const GeomArgs& ga, uintptr_t gy, int gyl, uintptr_t gb, int nt) {
        const ConvGeom g = to_geom(ga);
        py::gil_scoped_release nogil;
        by_dtype(
            dtype, [&](auto& k) { k.grad_bias(g, ptr<float>(gy), gyl, ptr<float>(gb), nt); },
            [&](auto& k) { k.grad_bias(g, ptr<double>(gy), gyl, ptr<double>(gb), nt); });
      });
}
