"""2:4 structured sparsity: mask math (pure), the mask module, and the CUDA sparse-kernel path."""
from .functional import in_channel_axis, is_2of4, mask_2of4
from .mask import Sparse24Mask
from .semi_structured import SemiStructuredReport, semi_structured_available, to_semi_structured

__all__ = ["Sparse24Mask", "SemiStructuredReport", "in_channel_axis", "is_2of4", "mask_2of4",
           "semi_structured_available", "to_semi_structured"]
