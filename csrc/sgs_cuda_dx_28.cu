// cuFFTDx kernel instantiations: 28x28 (see sgs_cuda_dx.cuh).
#include "sgs_cuda_dx.cuh"

namespace sgs {
namespace dx {
SGS_DX_INSTANTIATE(28, 28)
}  // namespace dx
}  // namespace sgs
