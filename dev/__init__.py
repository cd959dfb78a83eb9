"""Development tooling, not part of the product: the local stack and the demo.

The embedded Kafka broker and S3 server (``stack``), the local ``tritonserver`` launcher
(``triton``), the child-process lifecycle they share (``process``), where the data is
(``data``), the demo and the workflow demo, and the perf_analyzer helpers of the benchmarks
(``perf``). It reaches into the checkout (``scripts/``, ``data/samples/``, and
``../shared/data`` beside it) and needs the ``dev`` extra; the runtime images do not contain
it.
"""

__all__: list[str] = []
