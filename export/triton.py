"""Triton model configuration as typed, frozen dataclasses.

The classes mirror the fields of Triton's ``model_config.proto`` that this project uses,
with the proto's field names, and :func:`to_pbtxt` writes them in protobuf text format.
Nothing is templated by hand; tests parse every generated file with Triton's own
``ModelConfig`` message, so a misspelt field fails there.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

# ``DataType`` and ``ModelInput``/``ModelOutput`` (``TensorSpec``) are the model contract's:
# the manifest and the Triton configs describe a graph's tensors with the same objects.
from nec_serve.contract import DataType, TensorSpec

__all__ = [
    "DataType",
    "Kind",
    "TensorSpec",
    "InstanceGroup",
    "DynamicBatching",
    "Accelerator",
    "ModelConfig",
    "to_pbtxt",
    "PREFERRED_BATCH_SIZES",
    "triton_config",
    "gpu_config",
    "cpu_config",
    "local_config",
]


class Kind(enum.Enum):
    """``ModelInstanceGroup.Kind``."""

    KIND_GPU = "KIND_GPU"
    KIND_CPU = "KIND_CPU"


@dataclass(frozen=True)
class InstanceGroup:
    """``ModelInstanceGroup``."""

    kind: Kind
    count: int = 1


@dataclass(frozen=True)
class DynamicBatching:
    """``ModelDynamicBatching``."""

    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0


@dataclass(frozen=True)
class Accelerator:
    """``ModelOptimizationPolicy.ExecutionAccelerators.Accelerator``."""

    name: str
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecutionAccelerators:
    """``ModelOptimizationPolicy.ExecutionAccelerators``."""

    gpu_execution_accelerator: tuple[Accelerator, ...] = ()
    cpu_execution_accelerator: tuple[Accelerator, ...] = ()


@dataclass(frozen=True)
class Optimization:
    """``ModelOptimizationPolicy`` (the accelerator part)."""

    execution_accelerators: ExecutionAccelerators | None = None


@dataclass(frozen=True)
class StringParameter:
    """``ModelParameter``."""

    string_value: str


@dataclass(frozen=True)
class ModelConfig:
    """``ModelConfig``: one model of a Triton model repository."""

    name: str
    backend: str
    max_batch_size: int
    input: tuple[TensorSpec, ...]
    output: tuple[TensorSpec, ...]
    instance_group: tuple[InstanceGroup, ...] = ()
    dynamic_batching: DynamicBatching | None = None
    optimization: Optimization | None = None
    parameters: dict[str, StringParameter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Reject configs Triton would refuse, with the reason."""
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size {self.max_batch_size} must be >= 0")
        for spec in self.input + self.output:
            if not spec.dims or any(d == 0 or d < -1 for d in spec.dims):
                raise ValueError(f"tensor {spec.name!r} has invalid dims {spec.dims}")


def _scalar(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, int):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to pbtxt")


def _emit(name: str, value: Any, indent: str, out: list[str]) -> None:
    if value is None:
        return
    if isinstance(value, (tuple, list)):
        if value and not is_dataclass(value[0]):
            out.append(f"{indent}{name}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            for item in value:
                _emit(name, item, indent, out)
    elif isinstance(value, dict):
        for key in sorted(value):
            out.append(f"{indent}{name} {{")
            out.append(f"{indent}  key: {_scalar(key)}")
            _emit("value", value[key], indent + "  ", out)
            out.append(f"{indent}}}")
    elif is_dataclass(value):
        out.append(f"{indent}{name} {{")
        _emit_fields(value, indent + "  ", out)
        out.append(f"{indent}}}")
    else:
        out.append(f"{indent}{name}: {_scalar(value)}")


def _emit_fields(obj: Any, indent: str, out: list[str]) -> None:
    for f in fields(obj):
        _emit(f.name, getattr(obj, f.name), indent, out)


def to_pbtxt(config: ModelConfig) -> str:
    """Protobuf text format of ``config``, as Triton reads ``config.pbtxt``."""
    out: list[str] = []
    _emit_fields(config, "", out)
    return "\n".join(out) + "\n"


# The dynamic batcher's preferred sizes that export ships, by device kind; sizes above the
# config's max batch are dropped. The perf sweep (nec_dev.perf) builds its variants with the
# same defaults, so what it measures is what export writes.
PREFERRED_BATCH_SIZES: dict[Kind, tuple[int, ...]] = {
    Kind.KIND_GPU: (8, 16, 32),
    Kind.KIND_CPU: (4, 8),
}


def triton_config(
    name: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    *,
    kind: Kind,
    backend: str = "onnxruntime",
    max_batch_size: int,
    instances: int = 1,
    max_queue_delay_us: int | None,
    preferred_batch_sizes: tuple[int, ...] | None = None,
    parameters: dict[str, str] | None = None,
    gpu_accelerators: tuple[Accelerator, ...] = (),
) -> ModelConfig:
    """The one Triton config builder: export's configs and the perf sweep's variants.

    Args:
        name: the model's name in the repository.
        inputs: its inputs (dims without the batch axis).
        outputs: its outputs.
        kind: where its instances run.
        backend: ``onnxruntime``, or ``python`` for the local repository.
        max_batch_size: largest batch Triton forms.
        instances: instances of ``kind``.
        max_queue_delay_us: the dynamic batcher's delay; ``None``: no dynamic batcher.
        preferred_batch_sizes: the batcher's preferred sizes; ``None``:
            :data:`PREFERRED_BATCH_SIZES` of ``kind``. Sizes above ``max_batch_size`` are
            dropped.
        parameters: string parameters (onnxruntime thread counts, ...).
        gpu_accelerators: GPU execution accelerators (TensorRT).
    """
    if preferred_batch_sizes is None:
        preferred_batch_sizes = PREFERRED_BATCH_SIZES[kind]
    batching = None
    if max_queue_delay_us is not None:
        batching = DynamicBatching(
            preferred_batch_size=tuple(b for b in preferred_batch_sizes if b <= max_batch_size),
            max_queue_delay_microseconds=max_queue_delay_us,
        )
    optimization = None
    if gpu_accelerators:
        optimization = Optimization(
            ExecutionAccelerators(gpu_execution_accelerator=gpu_accelerators)
        )
    return ModelConfig(
        name=name,
        backend=backend,
        max_batch_size=max_batch_size,
        input=inputs,
        output=outputs,
        instance_group=(InstanceGroup(kind, instances),),
        dynamic_batching=batching,
        optimization=optimization,
        parameters={k: StringParameter(v) for k, v in (parameters or {}).items()},
    )


def gpu_config(
    name: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    *,
    max_batch_size: int = 32,
    instances: int = 1,
    max_queue_delay_us: int = 2000,
    tensorrt_fp16: bool = True,
    engine_cache_path: str = "/tmp/trt_cache",
) -> ModelConfig:
    """GPU variant: KIND_GPU, dynamic batching, TensorRT FP16 with an engine cache."""
    accel = ()
    if tensorrt_fp16:
        accel = (
            Accelerator(
                "tensorrt",
                {
                    "precision_mode": "FP16",
                    "max_workspace_size_bytes": str(1 << 31),
                    "trt_engine_cache_enable": "1",
                    "trt_engine_cache_path": engine_cache_path,
                },
            ),
        )
    return triton_config(
        name,
        inputs,
        outputs,
        kind=Kind.KIND_GPU,
        max_batch_size=max_batch_size,
        instances=instances,
        max_queue_delay_us=max_queue_delay_us,
        gpu_accelerators=accel,
    )


def cpu_config(
    name: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    *,
    max_batch_size: int = 8,
    instances: int = 1,
    intra_op_threads: int = 0,
    inter_op_threads: int = 1,
    max_queue_delay_us: int | None = 5000,
    backend: str = "onnxruntime",
) -> ModelConfig:
    """CPU variant: KIND_CPU with onnxruntime thread settings (0 = all cores).

    ``max_queue_delay_us=None`` leaves the dynamic batcher out.
    """
    return triton_config(
        name,
        inputs,
        outputs,
        kind=Kind.KIND_CPU,
        backend=backend,
        max_batch_size=max_batch_size,
        instances=instances,
        max_queue_delay_us=max_queue_delay_us,
        parameters={
            "intra_op_thread_count": str(intra_op_threads),
            "inter_op_thread_count": str(inter_op_threads),
        },
    )


def local_config(
    name: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    **kwargs,
) -> ModelConfig:
    """Local variant: the CPU configuration with Triton's Python backend running the graph.

    For the ``tritonserver`` bundled with PyTriton, which has no onnxruntime backend; the
    model's ``model.py`` reads the same thread parameters.
    """
    return cpu_config(name, inputs, outputs, backend="python", **kwargs)
