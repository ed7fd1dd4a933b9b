// cuFFTDx kernel instantiations: 128x128, a 2-CTA cluster per plane (see sgs_cuda_dx.cuh).
#include "sgs_cuda_dx.cuh"

namespace sgs {
namespace dx {
SGS_DX_INSTANTIATE(128, 128)
}  // namespace dx
}  // namespace sgs
