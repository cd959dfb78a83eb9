"""The NEC controller: workflow configs in, KafkaSources (or local subscriptions) out."""

__all__: list[str] = []
