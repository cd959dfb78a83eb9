"""Export any family's graphs to ONNX, freeze entropy tables, generate Triton model repositories."""

from nec_export.repository import ExportOptions, export_model
from nec_export.triton import ModelConfig, cpu_config, gpu_config, to_pbtxt

__all__ = [
    "ExportOptions",
    "export_model",
    "ModelConfig",
    "cpu_config",
    "gpu_config",
    "to_pbtxt",
]
