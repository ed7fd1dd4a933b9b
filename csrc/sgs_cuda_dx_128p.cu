// cuFFTDx kernel instantiations: the pairs 64x128 and 128x64 (see sgs_cuda_dx.cuh).
#include "sgs_cuda_dx.cuh"

namespace sgs {
namespace dx {
SGS_DX_INSTANTIATE(64, 128)
SGS_DX_INSTANTIATE(128, 64)
}  // namespace dx
}  // namespace sgs
