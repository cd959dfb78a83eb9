"""The keys of ``meta_information.nec`` as the wrapper published them before the reports
were typed, in order (docs/formats.md): what the typed reports must keep reproducing."""

from __future__ import annotations

#: A compress step's result.
COMPRESS_KEYS = [
    "images",
    "tiles",
    "raw_bytes",
    "container_bytes",
    "bits_per_pixel",
    "compression_ratio",
    "payload_over_entropy_bound_pct",
    "embedding_rmse",
    "read_s",
    "preprocess_s",
    "inference_s",
    "coding_s",
]
#: Every step's own figures, after its result and ``mode``; the ``SUCCESS`` status event's
#: copy adds ``kafka_s`` after them.
STEP_KEYS = [
    "message_id",
    "input_key",
    "output_key",
    "bytes_in",
    "bytes_out",
    "s3_get_s",
    "process_s",
    "s3_put_s",
    "max_rss_mb",
]
