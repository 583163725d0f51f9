// Python bindings: ISA selection, the kernel table and the kernel entry points. The module does
// not link libtorch; Python hands it data pointers of dense tensors (no copies) and the problem
// as a ConvGeom, and the GIL is released while a kernel runs.
//
// Every kernel call goes through run_pass, which (1) finds the kernel in the active ISA's table
// and raises if that entry is missing, and (2) answers degenerate problems (an empty output or
// an empty reduction) itself, so that no kernel ever sees a zero-sized dimension.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/problem.h"
#include "common/tuning.h"
#include "common/phase_times.h"
#include "winograd/winograd.h"
#include "common/workspace.h"
#include "isa/kernel_table.h"

namespace py = pybind11;
using namespace fastconv;

namespace {

// ---------------------------------------------------------------------------------------
// ISA selection
// ---------------------------------------------------------------------------------------

bool cpu_has(const std::string& isa) {
  if (isa == "scalar") return true;
#if defined(FASTCONV_X86_ISAS)
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
#endif
  return false;
}

// The ISA builds in this binary, fastest first.
std::vector<std::string> built_isas() {
#if defined(FASTCONV_X86_ISAS)
  return {"avx512", "avx2", "scalar"};
#else
  return {"scalar"};
#endif
}

const IsaKernels* table_for(const std::string& isa) {
#if defined(FASTCONV_X86_ISAS)
  if (isa == "avx512") return &avx512::kernels();
  if (isa == "avx2") return &avx2::kernels();
#endif
  if (isa == "scalar") return &scalar::kernels();
  return nullptr;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const std::string& isa : built_isas())
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
  if (!t) {
    std::string built;
    for (const std::string& b : built_isas()) built += (built.empty() ? "" : ", ") + b;
    throw std::invalid_argument("unknown ISA '" + isa + "': this build has " + built);
  }
  if (!cpu_has(isa))
    throw std::runtime_error("this CPU does not support the '" + isa + "' kernels");
  g_active.store(t, std::memory_order_release);
}

// ---------------------------------------------------------------------------------------
// Kernel lookup
// ---------------------------------------------------------------------------------------

enum DType : int { kF32 = 0, kF64 = 1 };  // fastconv/backend.py: DTYPE_CODES

const char* pass_name(Pass p) {
  switch (p) {
    case Pass::kForward: return "forward";
    case Pass::kGradInput: return "grad_input";
    case Pass::kGradWeight: return "grad_weight";
  }
  return "?";
}

const AlgorithmEntry& algorithm(int index) {
  const IsaKernels& t = active();
  if (index < 0 || index >= t.num_algorithms)
    throw std::invalid_argument("unknown algorithm index " + std::to_string(index));
  return t.algorithms[index];
}

template <typename T>
const ConvKernels<T>& kernels_of(const AlgorithmEntry& a);
template <>
const ConvKernels<float>& kernels_of(const AlgorithmEntry& a) { return a.f32; }
template <>
const ConvKernels<double>& kernels_of(const AlgorithmEntry& a) { return a.f64; }

template <typename T>
const SharedKernels<T>& shared_of();
template <>
const SharedKernels<float>& shared_of() { return active().f32; }
template <>
const SharedKernels<double>& shared_of() { return active().f64; }

template <typename T>
const char* dtype_name();
template <>
const char* dtype_name<float>() { return "float32"; }
template <>
const char* dtype_name<double>() { return "float64"; }

// The kernel pointer `member` of an algorithm, or an error naming what is missing.
template <typename T, typename Fn>
Fn find_kernel(int index, Fn ConvKernels<T>::*member, Pass pass) {
  const AlgorithmEntry& a = algorithm(index);
  Fn fn = kernels_of<T>(a).*member;
  if (!fn)
    throw std::runtime_error(std::string("fastconv: algorithm '") + a.name + "' has no " +
                             pass_name(pass) + " kernel for " + dtype_name<T>() + " on " +
                             active().isa);
  return fn;
}

template <typename F>
void by_dtype(int dtype, F&& body) {
  if (dtype == kF32)
    body(float{});
  else if (dtype == kF64)
    body(double{});
  else
    throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype));
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// ---------------------------------------------------------------------------------------
// Degenerate problems (answered here, never by a kernel)
// ---------------------------------------------------------------------------------------

// With no input channels the output has none either (torch's rule; fastconv.problem).
bool empty_output(const ConvGeom& g) { return g.N * g.K * g.OH * g.OW == 0 || g.C == 0; }
bool empty_reduction(const ConvGeom& g) { return g.Cg() * g.R * g.S == 0; }

// y = epi(bias broadcast, or zeros): the forward of a convolution with nothing to sum.
template <typename T>
void fill_with_bias(const ConvGeom& g, const Epilogue<T>& epi, T* y, int y_layout) {
  const int64_t OHW = g.OH * g.OW;
  for (int64_t k = 0; k < g.K; ++k) {
    const T z = epi.shift ? epi.shift[k] : T(0);
    const T v = activate(z, epi.act);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t p = 0; p < OHW; ++p)
        y[y_layout == kNHWC ? (n * OHW + p) * g.K + k : (n * g.K + k) * OHW + p] = v;
    if (epi.stats.sum) {
      epi.stats.sum[k] += double(z) * g.N * OHW;
      epi.stats.sum[epi.stats.sq_offset + k] += double(z) * z * g.N * OHW;
    }
  }
}

template <typename T>
void zero(T* p, int64_t count) {
  if (count > 0) std::memset(p, 0, sizeof(T) * count);
}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

// The packed weights of an algorithm's forward for this geometry and these layouts (none for
// degenerate problems, which never reach a kernel).
template <typename T>
WeightPacking packing_of(int algo, const ConvGeom& g, int xl, int yl) {
  const auto fn = kernels_of<T>(algorithm(algo)).weight_packing;
  if (!fn || empty_output(g) || empty_reduction(g)) return {};
  return fn(g, xl, yl);
}

// `packed` (0: none) with `packed_elements` and `packed_variant` as weight_packing gave them
// when it was made; checked again here, so a packing made for another geometry, layout or
// algorithm is refused rather than read. `act`: the fused activation (Activation). `stats`
// (0: none): 2 K float64 values that receive each channel's sum of y, then its sum of y^2
// (batch-norm's statistics, gathered in the same pass; not with an activation).
void forward(int algo, int dtype, const ConvGeom& g, uintptr_t x, int xl, uintptr_t w,
             uintptr_t packed, int64_t packed_elements, int packed_variant, uintptr_t b,
             uintptr_t y, int yl, int act, uintptr_t stats, int nt) {
  if (act < kActNone || act > kActRelu6)
    throw std::invalid_argument("fastconv: unknown activation code " + std::to_string(act));
  if (act != kActNone && stats)
    throw std::invalid_argument("fastconv: a forward gathers statistics or applies an "
                                "activation, not both");
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto fn = find_kernel<T>(algo, &ConvKernels<T>::forward, Pass::kForward);
    if (packed) {
      const WeightPacking want = packing_of<T>(algo, g, xl, yl);
      if (want.elements != packed_elements || want.variant != packed_variant)
        throw std::invalid_argument(
            std::string("fastconv: prepacked weights do not match this call of '") +
            algorithm(algo).name + "' (" + std::to_string(packed_elements) + " elements, variant " +
            std::to_string(packed_variant) + "; expected " + std::to_string(want.elements) +
            ", variant " + std::to_string(want.variant) + ")");
    }
    double* out_stats = ptr<double>(stats);
    if (out_stats) std::fill(out_stats, out_stats + 2 * g.K, 0.0);
    if (empty_output(g)) return;
    py::gil_scoped_release nogil;
    Epilogue<T> epi;
    epi.shift = ptr<const T>(b);
    epi.act = act;
    if (empty_reduction(g)) {
      epi.stats = {out_stats, g.K, 0, 1};
      return fill_with_bias(g, epi, ptr<T>(y), yl);
    }
    // Per-thread sums (a kernel's threads are numbered below nt), added up afterwards.
    const int slabs = std::max(nt, 1);
    std::vector<double> per_thread(out_stats ? size_t(slabs) * 2 * g.K : 0, 0.0);
    if (out_stats) epi.stats = {per_thread.data(), g.K, 2 * g.K, slabs};
    fn(g, ptr<const T>(x), xl, ptr<const T>(w), ptr<const T>(packed), epi, ptr<T>(y), yl, nt);
    for (size_t i = 0; i < per_thread.size(); ++i) out_stats[i % (2 * g.K)] += per_thread[i];
  });
}

void pack_weights(int algo, int dtype, const ConvGeom& g, int xl, int yl, uintptr_t w,
                  uintptr_t out, int nt) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto fn = kernels_of<T>(algorithm(algo)).pack_weights;
    if (!fn || packing_of<T>(algo, g, xl, yl).elements == 0)
      throw std::invalid_argument(std::string("fastconv: '") + algorithm(algo).name +
                                  "' packs no weights for this call");
    py::gil_scoped_release nogil;
    fn(g, xl, yl, ptr<const T>(w), ptr<T>(out), nt);
  });
}

void grad_input(int algo, int dtype, const ConvGeom& g, uintptr_t gy, int gyl, uintptr_t w,
                uintptr_t gx, int gxl, int nt) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto fn = find_kernel<T>(algo, &ConvKernels<T>::grad_input, Pass::kGradInput);
    py::gil_scoped_release nogil;
    if (empty_output(g) || empty_reduction(g)) return zero(ptr<T>(gx), g.N * g.C * g.H * g.W);
    fn(g, ptr<const T>(gy), gyl, ptr<const T>(w), ptr<T>(gx), gxl, nt);
  });
}

// gb (0: not wanted): grad-bias too, from grad-weight's own sweep where the algorithm has
// one (ConvKernels::grad_weight_bias), else from the shared pass after grad-weight.
void grad_weight(int algo, int dtype, const ConvGeom& g, uintptr_t gy, int gyl, uintptr_t x,
                 int xl, uintptr_t gw, uintptr_t gb, int nt) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto fn = find_kernel<T>(algo, &ConvKernels<T>::grad_weight, Pass::kGradWeight);
    const auto fused = kernels_of<T>(algorithm(algo)).grad_weight_bias;
    const auto bias_pass = shared_of<T>().grad_bias;
    if (gb && !bias_pass)  // also what empty problems use
      throw std::runtime_error("fastconv: no grad_bias kernel on " + std::string(active().isa));
    py::gil_scoped_release nogil;
    if (empty_output(g) || empty_reduction(g)) {
      zero(ptr<T>(gw), g.K * g.Cg() * g.R * g.S);
      if (!gb) return;
      if (g.N * g.OH * g.OW == 0) return zero(ptr<T>(gb), g.K);
      return bias_pass(g, ptr<const T>(gy), gyl, ptr<T>(gb), nt);
    }
    if (gb && fused)
      return fused(g, ptr<const T>(gy), gyl, ptr<const T>(x), xl, ptr<T>(gw), ptr<T>(gb), nt);
    fn(g, ptr<const T>(gy), gyl, ptr<const T>(x), xl, ptr<T>(gw), nt);
    if (gb) bias_pass(g, ptr<const T>(gy), gyl, ptr<T>(gb), nt);
  });
}

void grad_bias(int dtype, const ConvGeom& g, uintptr_t gy, int gyl, uintptr_t gb, int nt) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto fn = shared_of<T>().grad_bias;
    if (!fn) throw std::runtime_error("fastconv: no grad_bias kernel on " + std::string(active().isa));
    py::gil_scoped_release nogil;
    if (g.N * g.OH * g.OW == 0) return zero(ptr<T>(gb), g.K);
    fn(g, ptr<const T>(gy), gyl, ptr<T>(gb), nt);
  });
}

// Batch-norm + activation around a convolution's output z (csrc/batchnorm): y from z with
// the batch statistics (mean, invstd: K values each), and the backward's grad_z and the
// affine parameters' gradients (gamma, beta, grad_gamma: 0 when affine=False).
void bn_act_forward(int dtype, const ConvGeom& g, int layout, uintptr_t z, uintptr_t mean,
                    uintptr_t invstd, uintptr_t gamma, uintptr_t beta, int act, uintptr_t y,
                    int nt) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    py::gil_scoped_release nogil;
    if (g.N * g.K * g.OH * g.OW == 0) return;
    shared_of<T>().bn_act_forward(g, layout, ptr<const T>(z), ptr<const T>(mean),
                                  ptr<const T>(invstd), ptr<const T>(gamma),
                                  ptr<const T>(beta), act, ptr<T>(y), nt);
  });
}

void bn_act_backward(int dtype, const ConvGeom& g, int layout, uintptr_t gy, uintptr_t y,
                     uintptr_t z, uintptr_t mean, uintptr_t invstd, uintptr_t gamma, int act,
                     uintptr_t gz, uintptr_t grad_gamma, uintptr_t grad_beta, int nt) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    py::gil_scoped_release nogil;
    if (g.N * g.OH * g.OW == 0) {  // nothing to sum: zero gradients
      zero(ptr<T>(grad_gamma), grad_gamma ? g.K : 0);
      zero(ptr<T>(grad_beta), grad_beta ? g.K : 0);
      return;
    }
    shared_of<T>().bn_act_backward(g, layout, ptr<const T>(gy), ptr<const T>(y),
                                   ptr<const T>(z), ptr<const T>(mean), ptr<const T>(invstd),
                                   ptr<const T>(gamma), act, ptr<T>(gz), ptr<T>(grad_gamma),
                                   ptr<T>(grad_beta), nt);
  });
}

int64_t workspace_bytes(int algo, int dtype, const ConvGeom& g, int pass) {
  if (pass < 0 || pass > 2) throw std::invalid_argument("pass must be 0, 1 or 2");
  int64_t bytes = 0;
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto fn = kernels_of<T>(algorithm(algo)).workspace_bytes;
    if (fn && !empty_output(g) && !empty_reduction(g)) bytes = fn(g, Pass(pass));
  });
  return bytes;
}

// A dict of named values (for the small structs the bindings return).
py::dict named(std::initializer_list<std::pair<const char*, py::object>> items) {
  py::dict d;
  for (const auto& [name, value] : items) d[name] = value;
  return d;
}

template <typename T>
void run_gemm(const SharedKernels<T>& k, py::tuple shape, uintptr_t a, int64_t rs_a,
              int64_t cs_a, uintptr_t b, int64_t rs_b, int64_t cs_b, uintptr_t c, int64_t ldc,
              bool accumulate, uintptr_t scale, uintptr_t shift, bool per_row, bool relu,
              py::tuple segments, int nt) {
  if (!k.gemm) throw std::runtime_error("fastconv: no GEMM on this ISA");
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
  g.epi.act = relu ? kActRelu : kActNone;
  // K segments (gemm.h): (k_seg, k_seg_first, seg_stride_a, seg_stride_b); N segments:
  // (n_seg, n_seg_stride_b, n_seg_stride_c); or empty.
  if (segments.size() == 3) {
    g.n_seg = segments[0].cast<int64_t>();
    g.n_seg_stride_b = segments[1].cast<int64_t>();
    g.n_seg_stride_c = segments[2].cast<int64_t>();
  } else if (segments.size() == 4) {
    g.k_seg = segments[0].cast<int64_t>();
    g.k_seg_first = segments[1].cast<int64_t>();
    g.seg_stride_a = segments[2].cast<int64_t>();
    g.seg_stride_b = segments[3].cast<int64_t>();
  }
  py::gil_scoped_release nogil;
  k.gemm(g, nt);
}

// Tuning fields by name, for fastconv.backend.tuning (tests shrink them to reach every path).
struct TuningField {
  const char* name;
  int64_t Tuning::*member;
};
constexpr TuningField kTuningFields[] = {
    {"layout_budget_bytes", &Tuning::layout_budget_bytes},
    {"im2col_column_budget_bytes", &Tuning::im2col_column_budget_bytes},
    {"im2col_native_min_pixels_pointwise", &Tuning::im2col_native_min_pixels_pointwise},
    {"im2col_native_min_pixels_spatial", &Tuning::im2col_native_min_pixels_spatial},
    {"im2col_native_min_batch_pixels_pointwise_forward",
     &Tuning::im2col_native_min_batch_pixels_pointwise_forward},
    {"im2col_native_min_pixels_strided_1x1", &Tuning::im2col_native_min_pixels_strided_1x1},
    {"im2col_col2im_grad_input_min_pixels", &Tuning::im2col_col2im_grad_input_min_pixels},
    {"pointwise_grad_weight_dw_per_pixel", &Tuning::pointwise_grad_weight_dw_per_pixel},
    {"direct_blocks_fastest_max_weight_bytes", &Tuning::direct_blocks_fastest_max_weight_bytes},
    {"im2col_channel_major_grad_weight_max_pixels_per_filter",
     &Tuning::im2col_channel_major_grad_weight_max_pixels_per_filter},
    {"direct_grad_weight_chunk_pixels", &Tuning::direct_grad_weight_chunk_pixels},
    {"direct_grad_weight_pixel_split_max_bytes", &Tuning::direct_grad_weight_pixel_split_max_bytes},
    {"winograd_tile_block", &Tuning::winograd_tile_block},
    {"winograd_channel_block", &Tuning::winograd_channel_block},
    {"winograd_grad_weight_tile_block", &Tuning::winograd_grad_weight_tile_block},
    {"winograd_grad_weight_channel_block", &Tuning::winograd_grad_weight_channel_block},
    {"depthwise_stream_min_bytes", &Tuning::depthwise_stream_min_bytes},
    {"depthwise_grad_input_stream_min_bytes", &Tuning::depthwise_grad_input_stream_min_bytes},
    {"gemm_own_panels_max_rows", &Tuning::gemm_own_panels_max_rows},
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastconv C++ kernels (raw-buffer interface; use fastconv.conv2d)";
  m.def("built_isas", &built_isas, "ISAs compiled into this binary, fastest first");
  m.def("available_isas", &available_isas, "ISAs this CPU can run, fastest first");
  m.def("set_isa", &set_isa, py::arg("isa"));
  m.def("get_isa", []() { return std::string(active().isa); });
  m.def("advise_huge_pages",
        [](uintptr_t p, int64_t bytes) { advise_huge_pages(reinterpret_cast<void*>(p), bytes); },
        py::arg("ptr"), py::arg("bytes"),
        "Back the whole 2 MiB pages of a fresh buffer with huge pages on first touch (Linux)");
  m.def("release_workspaces", &release_workspaces,
        "Free the calling thread's scratch buffers (they are otherwise kept for reuse)");
  m.def("workspace_high_water", []() {
    py::dict d;
    for (int i = 0; i < kWsSlots; ++i)
      d[workspace_slot_name(WorkspaceSlot(i))] = workspace_high_water_bytes(WorkspaceSlot(i));
    return d;
  }, "Per scratch buffer of the calling thread: the largest size asked since the last release");
  m.def("algorithm_names", []() {
    std::vector<std::string> names;
    const IsaKernels& t = active();
    for (int i = 0; i < t.num_algorithms; ++i) names.push_back(t.algorithms[i].name);
    return names;
  }, "Algorithms in the kernel table, in index order (csrc/isa/table.cpp)");
  m.def("has_kernel", [](int algo, int dtype, int pass) {
    bool found = false;
    by_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      const ConvKernels<T>& k = kernels_of<T>(algorithm(algo));
      found = pass == 0 ? k.forward != nullptr : pass == 1 ? k.grad_input != nullptr
                                                           : k.grad_weight != nullptr;
    });
    return found;
  });

  py::class_<ConvGeom>(m, "ConvGeom", "The problem as the kernels take it (read-only)")
      .def(py::init([](int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t R,
                       int64_t S, int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t dh,
                       int64_t dw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                       int64_t groups) {
             ConvGeom g;
             g.N = N, g.C = C, g.H = H, g.W = W, g.K = K, g.R = R, g.S = S, g.OH = OH, g.OW = OW;
             g.sh = sh, g.sw = sw, g.dh = dh, g.dw = dw;
             g.pt = pt, g.pb = pb, g.pl = pl, g.pr = pr, g.groups = groups;
             return g;
           }),
           py::kw_only(), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("K"),
           py::arg("R"), py::arg("S"), py::arg("OH"), py::arg("OW"), py::arg("sh"),
           py::arg("sw"), py::arg("dh"), py::arg("dw"), py::arg("pt"), py::arg("pb"),
           py::arg("pl"), py::arg("pr"), py::arg("groups"))
      .def_readonly("N", &ConvGeom::N).def_readonly("C", &ConvGeom::C)
      .def_readonly("H", &ConvGeom::H).def_readonly("W", &ConvGeom::W)
      .def_readonly("K", &ConvGeom::K).def_readonly("R", &ConvGeom::R)
      .def_readonly("S", &ConvGeom::S).def_readonly("OH", &ConvGeom::OH)
      .def_readonly("OW", &ConvGeom::OW).def_readonly("groups", &ConvGeom::groups)
      .def("flops", &ConvGeom::flops);

  m.def("get_tuning", []() {
    py::dict d;
    for (const TuningField& f : kTuningFields) d[f.name] = tuning().*f.member;
    return d;
  });
  m.def("set_tuning", [](const std::string& name, int64_t value) {
    if (value < 1) throw std::invalid_argument("tuning values must be positive");
    for (const TuningField& f : kTuningFields)
      if (name == f.name) {
        tuning().*f.member = value;
        return;
      }
    throw std::invalid_argument("unknown tuning field '" + name + "'");
  });

  // Arguments are converted with the GIL held; the kernels run with it released.
  m.def("forward", &forward);
  m.def("weight_packing", [](int algo, int dtype, const ConvGeom& g, int xl, int yl) {
    WeightPacking p;
    by_dtype(dtype, [&](auto tag) { p = packing_of<decltype(tag)>(algo, g, xl, yl); });
    return named({{"elements", py::int_(p.elements)}, {"variant", py::int_(p.variant)}});
  }, "What the forward makes of the weights for this call: elements (0: nothing) and variant");
  m.def("pack_weights", &pack_weights,
        "Write the forward's packed weights (weight_packing's elements) to `out`");
  m.def("grad_input", &grad_input);
  m.def("grad_weight", &grad_weight);
  m.def("grad_bias", &grad_bias);
  m.def("bn_act_forward", &bn_act_forward);
  m.def("bn_act_backward", &bn_act_backward);
  m.def("workspace_bytes", &workspace_bytes,
        "Estimated workspace bytes of one call (algo index, dtype code, geometry, pass 0/1/2)");

  // C = A * B (+ C) with the epilogue, for tests and benchmarks (fastconv.ops.gemm).
  m.def("gemm", [](int dtype, py::tuple shape, uintptr_t a, int64_t rs_a, int64_t cs_a,
                   uintptr_t b, int64_t rs_b, int64_t cs_b, uintptr_t c, int64_t ldc,
                   bool accumulate, uintptr_t scale, uintptr_t shift, bool per_row, bool relu,
                   py::tuple segments, int nt) {
    by_dtype(dtype, [&](auto tag) {
      run_gemm(shared_of<decltype(tag)>(), shape, a, rs_a, cs_a, b, rs_b, cs_b, c, ldc,
               accumulate, scale, shift, per_row, relu, segments, nt);
    });
  });
  m.def("winograd_transform", [](int dtype, int m, int which, uintptr_t in, uintptr_t out,
                                 int64_t count) {
    if (m != 2 && m != 4 && m != 6) throw std::invalid_argument("m must be 2, 4 or 6");
    if (which < 0 || which > 2) throw std::invalid_argument("which must be 0, 1 or 2");
    by_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      shared_of<T>().winograd_transform(m, which, ptr<const T>(in), ptr<T>(out), count);
    });
  }, "Apply the active ISA's Winograd F(m, 3) transform (0 input, 1 filter, 2 output) to "
     "`count` contiguous row-major tiles");
  m.def("winograd_matrices", [](int m) {
    py::dict d;
    auto put = [&](auto tag) {
      using W = decltype(tag);
      auto rows = [](const auto& mat) {
        py::list out;
        for (int i = 0; i < mat.rows; ++i) {
          py::list r;
          for (int j = 0; j < mat.cols; ++j) r.append(mat.v[i][j]);
          out.append(r);
        }
        return out;
      };
      d["BT"] = rows(W::BT);
      d["G"] = rows(W::G);
      d["AT"] = rows(W::AT);
    };
    if (m == 2) put(WinogradMatrices<2>{});
    else if (m == 4) put(WinogradMatrices<4>{});
    else if (m == 6) put(WinogradMatrices<6>{});
    else throw std::invalid_argument("m must be 2, 4 or 6");
    return d;
  }, "The BT, G and AT matrices the Winograd F(m, 3) kernels expand");
  m.def("last_phase_times", []() {
    const PhaseTimes& t = last_phase_times();
    return named({{"filter_transform", py::float_(t.filter_transform)},
                  {"input_transform", py::float_(t.input_transform)},
                  {"gemm", py::float_(t.gemm)},
                  {"output_transform", py::float_(t.output_transform)},
                  {"wall", py::float_(t.wall)},
                  {"threads", py::int_(t.threads)}});
  }, "Seconds per phase (summed over threads) of this thread's last phased kernel call");
  m.def("gemm_blocking", [](int dtype) {
    const GemmBlocking b = dtype == kF32 ? active().f32.gemm_blocking : active().f64.gemm_blocking;
    return named({{"mr", py::int_(b.mr)}, {"nr", py::int_(b.nr)}, {"kc", py::int_(b.kc)},
                  {"mc", py::int_(b.mc)}, {"nc", py::int_(b.nc)}});
  }, "Register tile and cache blocks of the active ISA's GEMM (dtype 0 = f32, 1 = f64)");
}
