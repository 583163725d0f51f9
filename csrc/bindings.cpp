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

// dtype codes: 0 = float32, 1 = float64; algorithm codes: see Algorithm in geometry.h.
template <typename F32, typename F64>
void by_dtype(int algo, int dtype, F32 f32, F64 f64) {
  if (algo < 0 || algo >= kAlgorithms) throw std::invalid_argument("unknown algorithm code");
  if (dtype == 0)
    f32(active().f32[algo]);
  else if (dtype == 1)
    f64(active().f64[algo]);
  else
    throw std::invalid_argument("unsupported dtype code");
}

template <typename T>
void run_gemm(void (*fn)(const GemmArgs<T>&, int), py::tuple shape, uintptr_t a, int64_t rs_a,
              int64_t cs_a, uintptr_t b, int64_t rs_b, int64_t cs_b, uintptr_t c, int64_t ldc,
              bool accumulate, uintptr_t scale, uintptr_t shift, bool per_row, bool relu, int nt) {
  GemmArgs<T> g{};
  g.M = shape[0].cast<int64_t>();
  g.N = shape[1].cast<int64_t>();
  g.K = shape[2].cast<int64_t>();
  g.a = ptr<T>(a);
  g.rs_a = rs_a;
  g.cs_a = cs_a;
  g.b = ptr<T>(b);
  g.rs_b = rs_b;
  g.cs_b = cs_b;
  g.c = ptr<T>(c);
  g.ldc = ldc;
  g.accumulate = accumulate;
  g.epi.scale = ptr<T>(scale);
  g.epi.shift = ptr<T>(shift);
  g.epi.per_row = per_row;
  g.epi.relu = relu;
  py::gil_scoped_release nogil;
  fn(g, nt);
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

  // C = A * B (+ C) with the epilogue, for tests and benchmarks (fastconv.ops.gemm).
  m.def("gemm", [](int dtype, py::tuple shape, uintptr_t a, int64_t rs_a, int64_t cs_a,
                   uintptr_t b, int64_t rs_b, int64_t cs_b, uintptr_t c, int64_t ldc,
                   bool accumulate, uintptr_t scale, uintptr_t shift, bool per_row, bool relu,
                   int nt) {
    if (dtype == 0)
      run_gemm<float>(active().gemm_f32, shape, a, rs_a, cs_a, b, rs_b, cs_b, c, ldc, accumulate,
                      scale, shift, per_row, relu, nt);
    else if (dtype == 1)
      run_gemm<double>(active().gemm_f64, shape, a, rs_a, cs_a, b, rs_b, cs_b, c, ldc, accumulate,
                       scale, shift, per_row, relu, nt);
    else
      throw std::invalid_argument("unsupported dtype code");
  });
  m.def("gemm_blocking", [](int dtype) {
    const GemmBlocking b = dtype == 0 ? active().gemm_blocking_f32 : active().gemm_blocking_f64;
    py::dict d;
    d["mr"] = b.mr;
    d["nr"] = b.nr;
    d["kc"] = b.kc;
    d["mc"] = b.mc;
    d["nc"] = b.nc;
    return d;
  }, "Register tile and cache blocks of the active ISA's GEMM (dtype 0 = f32, 1 = f64)");
  m.def(
      "forward",
      [](int algo, int dtype, const GeomArgs& ga, uintptr_t x, int xl, uintptr_t w, uintptr_t b,
         uintptr_t y, int yl, int nt) {
        const ConvGeom g = to_geom(ga);
        py::gil_scoped_release nogil;
        by_dtype(
            algo, dtype, [&](auto& k) { k.forward(g, ptr<float>(x), xl, ptr<float>(w), ptr<float>(b), ptr<float>(y), yl, nt); },
            [&](auto& k) { k.forward(g, ptr<double>(x), xl, ptr<double>(w), ptr<double>(b), ptr<double>(y), yl, nt); });
      });
  m.def(
      "grad_input",
      [](int algo, int dtype, const GeomArgs& ga, uintptr_t gy, int gyl, uintptr_t w, uintptr_t gx, int gxl,
         int nt) {
        const ConvGeom g = to_geom(ga);
        py::gil_scoped_release nogil;
        by_dtype(
            algo, dtype, [&](auto& k) { k.grad_input(g, ptr<float>(gy), gyl, ptr<float>(w), ptr<float>(gx), gxl, nt); },
            [&](auto& k) { k.grad_input(g, ptr<double>(gy), gyl, ptr<double>(w), ptr<double>(gx), gxl, nt); });
      });
  m.def(
      "grad_weight",
      [](int algo, int dtype, const GeomArgs& ga, uintptr_t gy, int gyl, uintptr_t x, int xl, uintptr_t gw,
         int nt) {
        const ConvGeom g = to_geom(ga);
        py::gil_scoped_release nogil;
        by_dtype(
            algo, dtype, [&](auto& k) { k.grad_weight(g, ptr<float>(gy), gyl, ptr<float>(x), xl, ptr<float>(gw), nt); },
            [&](auto& k) { k.grad_weight(g, ptr<double>(gy), gyl, ptr<double>(x), xl, ptr<double>(gw), nt); });
      });
  m.def(
      "grad_bias",
      [](int dtype, const GeomArgs& ga, uintptr_t gy, int gyl, uintptr_t gb, int nt) {
        const ConvGeom g = to_geom(ga);
        py::gil_scoped_release nogil;
        by_dtype(
            kDirect, dtype, [&](auto& k) { k.grad_bias(g, ptr<float>(gy), gyl, ptr<float>(gb), nt); },
            [&](auto& k) { k.grad_bias(g, ptr<double>(gy), gyl, ptr<double>(gb), nt); });
      });
}
