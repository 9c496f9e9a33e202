"""Lightning attention: reference implementations, Pallas kernels and the public op."""

from pallas_kernels.lightning.decode import lightning_decode_step, lightning_decode_step_nodonate
from pallas_kernels.lightning.op import lightning_attention, lightning_attention_kernel
from pallas_kernels.lightning.reference import (
    lightning_attention_chunked,
    lightning_attention_recurrent,
    lightning_decode_reference,
)

__all__ = [
    "lightning_attention",
    "lightning_attention_kernel",
    "lightning_decode_step",
    "lightning_decode_step_nodonate",
    "lightning_attention_chunked",
    "lightning_attention_recurrent",
    "lightning_decode_reference",
]
