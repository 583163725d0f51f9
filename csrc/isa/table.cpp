// The kernel table of one ISA: every algorithm's entry points and the GEMM.
#include "../common/isa_api.h"

namespace fastconv {
namespace FASTCONV_ISA {

const IsaKernels& kernels() {
  static const IsaKernels table{FASTCONV_STR(FASTCONV_ISA),
                                {direct_kernels<float>(), im2col_kernels<float>()},
                                {direct_kernels<double>(), im2col_kernels<double>()},
                                &gemm<float>,
                                &gemm<double>,
                                gemm_blocking<float>(),
                                gemm_blocking<double>()};
  return table;
}

}  // namespace FASTCONV_ISA
}  // namespace fastconv
