"""Lightning attention: reference implementations, Pallas kernels and the public op."""

from pallas_kernels.lightning.op import lightning_attention
from pallas_kernels.lightning.reference import (
    lightning_attention_chunked,
    lightning_attention_recurrent,
    lightning_decode_reference,
)

__all__ = [
    "lightning_attention",
    "lightning_attention_chunked",
    "lightning_attention_recurrent",
    "lightning_decode_reference",
]
