// cuFFTDx kernel instantiations: 64x64 and 64x32 (see sgs_cuda_dx.cuh).
#include "sgs_cuda_dx.cuh"

namespace sgs {
namespace dx {
SGS_DX_INSTANTIATE(64, 64)
SGS_DX_INSTANTIATE(64, 32)
}  // namespace dx
}  // namespace sgs
