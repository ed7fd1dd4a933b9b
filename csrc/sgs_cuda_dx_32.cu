// cuFFTDx kernel instantiations: 32x32 and 32x64 (see sgs_cuda_dx.cuh).
#include "sgs_cuda_dx.cuh"

namespace sgs {
namespace dx {
SGS_DX_INSTANTIATE(32, 32)
SGS_DX_INSTANTIATE(32, 64)
}  // namespace dx
}  // namespace sgs
