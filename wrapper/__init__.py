"""The NEC workflow step: Kafka- or HTTP-triggered compression and decompression."""

__all__: list[str] = []
