"""Request limits: exceeding one is RESOURCE_EXHAUSTED, and the server keeps serving.

The message size limit is gRPC's own (``max_message_mb``, both directions);
the others are checked before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ResourceExhausted

__all__ = ["Limits"]

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """
    Attributes
    ----------
    max_message_mb : int
        Largest gRPC message, sent or received (MiB).  Larger tensors go through NormalizeStream.
    max_tensor_elements : int
        Largest tensor (x of Normalize/NormalizeStream, any moments tensor).
    max_layers_per_request : int
        Layers one UpdateStats / AllReduceMoments / GetLayer / WatchLayer may name.
    max_layers : int
        Layers the store may hold; CreateLayer beyond it fails.
    stream_chunk_bytes : int
        Size of the y chunks NormalizeStream sends back.
    max_page_size : int
        Largest ListLayers page.
    """

    max_message_mb: int = 64
    max_tensor_elements: int = 1 << 28
    max_layers_per_request: int = 4096
    max_layers: int = 1_000_000
    stream_chunk_bytes: int = 1 * MiB
    max_page_size: int = 1000
    default_page_size: int = 100

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * MiB)

    def check_layers_per_request(self, n: int, field: str) -> None:
        if n > self.max_layers_per_request:
            raise ResourceExhausted(
                f"{field} names {n} layers: expected at most {self.max_layers_per_request} per request "
                "(split the request)",
                field=field,
            )

    def check_statistics(self, shape: tuple, field: str) -> None:
        """A layer's statistics shape: at most ``max_tensor_elements`` values, and an answer that fits a message."""
        n = 1
        for size in shape:
            n *= size
        if n > self.max_tensor_elements:
            raise ResourceExhausted(
                f"{field} gives the layer {n} statistics per tensor: expected at most {self.max_tensor_elements}",
                field=field,
            )
        if 16 * n + 64 * 1024 > self.max_message_bytes:  # mean and variance, float64, in one answer
            raise ResourceExhausted(
                f"{field} gives the layer {n} statistics per tensor: its answers would exceed the "
                f"{self.max_message_mb} MiB message limit (expected at most "
                f"{(self.max_message_bytes - 64 * 1024) // 16})",
                field=field,
            )

    def check_layer_count(self, n: int) -> None:
        if n >= self.max_layers:
            raise ResourceExhausted(
                f"the store holds {n} layers, the server's maximum: delete layers before creating more",
                field="name",
                reason="TOO_MANY_LAYERS",
            )
