"""What a family's PyTorch side gives the one exporter: its graphs, tables and checks.

Each family has a module under :mod:`nec_export.families` that registers a
:class:`FamilyExporter`. :func:`nec_export.repository.export_model` asks the exporter that
accepts a model for an :class:`ExportPlan` (the graphs by role with their tensors, check
inputs and parity checks; the frozen tables; the manifest's input and family sections)
and carries it out the same way for every family: ONNX files, parity, Triton
repositories, manifest.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nec_serve.contract import (
    FamilyParams,
    FrozenTables,
    GraphRole,
    InputSpec,
    ModelFamily,
    TensorSpec,
)
from nec_serve.errors import InvalidInput

__all__ = [
    "GraphPlan",
    "ExportPlan",
    "FamilyExporter",
    "register_exporter",
    "exporter_for",
    "exporters",
    "graph_module",
]

#: ``(name, module, onnx path, check inputs) -> report``: the parity check of one graph.
ParityCheck = Callable[[str, nn.Module, Path, torch.Tensor], Any]


@dataclass(frozen=True)
class GraphPlan:
    """One graph to export: its role, module, tensors, check inputs and parity check.

    ``inputs[0]`` is what the module takes; ``outputs`` are its outputs in order. The
    module is exported with the first two rows of ``check_input`` and checked against
    onnxruntime on all of them.
    """

    role: GraphRole
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    check_input: torch.Tensor
    check: ParityCheck


@dataclass(frozen=True)
class ExportPlan:
    """Everything family-specific an export writes.

    Attributes:
        family: the registered family.
        model: the registry name the export records.
        input: what the encoder takes (the manifest's ``input``).
        entropy_kind: the entropy model kind of ``tables``.
        tables: the frozen tables (an object with ``save(path)`` and ``sha256``).
        graphs: the graphs, in the order they are exported.
        family_params: the manifest's ``family_params``.
        rebuild_kwargs: what rebuilds the model from the registry beside its name and
            image size (the torch runtime's ``model_kwargs``).
        code_extras: what besides the tables decides the meaning of the symbols, by name
            (for RVQ the codebooks): it goes into the code fingerprint
            (:func:`nec_serve.fingerprint.code_fingerprint`).
    """

    family: ModelFamily
    model: str
    input: InputSpec
    entropy_kind: str
    tables: FrozenTables
    graphs: tuple[GraphPlan, ...]
    family_params: FamilyParams
    rebuild_kwargs: Mapping[str, Any] = field(default_factory=dict)
    code_extras: Mapping[str, bytes] = field(default_factory=dict)


class FamilyExporter:
    """A family's PyTorch side: which models it exports, their graphs and plan.

    Subclasses set :attr:`family` and implement :meth:`accepts`, :meth:`graph_roles`,
    :meth:`graph_module` and :meth:`plan`; :meth:`calibrate` is optional.
    """

    family: ModelFamily

    def accepts(self, model: nn.Module) -> bool:
        """Whether ``model`` is one of this family's (raise InvalidInput for one it refuses)."""
        raise NotImplementedError

    def graph_roles(self, model: nn.Module) -> list[GraphRole]:
        """The graph roles ``model`` can export."""
        raise NotImplementedError

    def graph_module(self, model: nn.Module, role: GraphRole) -> nn.Module:
        """The module of ``role`` (what is exported, or run by the torch runtime)."""
        raise NotImplementedError

    def plan(self, model: nn.Module, options: Any, trained: Mapping[str, Any]) -> ExportPlan:
        """The plan of exporting ``model`` (in eval mode) with ``options``.

        ``trained`` is what the checkpoint's trainer recorded (its ``args``), possibly empty.

        Raises:
            InvalidInput: a model or option this family cannot export, before any file is
                written.
        """
        raise NotImplementedError

    def calibrate(
        self, model: nn.Module, inputs: Iterable[tuple[str, np.ndarray]], tiles: int
    ) -> Any:
        """Fit the entropy model to imagery (encoder frozen); a report with ``as_dict()``.

        Raises:
            InvalidInput: this family has no calibration.
        """
        raise InvalidInput(f"the {self.family.name!r} family has no entropy-model calibration")


_EXPORTERS: dict[str, FamilyExporter] = {}
_DISCOVERED: list[bool] = []


def register_exporter(exporter: FamilyExporter) -> FamilyExporter:
    """Register a family's exporter and return it.

    Raises:
        ValueError: its family already has one.
    """
    name = exporter.family.name
    if name in _EXPORTERS:
        raise ValueError(f"family {name!r} already has an exporter")
    _EXPORTERS[name] = exporter
    return exporter


def _discover() -> None:
    if not _DISCOVERED:
        _DISCOVERED.append(True)
        import nec_export.families as package  # imports this module: not at the top

        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            importlib.import_module(f"{package.__name__}.{info.name}")


def exporters() -> tuple[FamilyExporter, ...]:
    """Every registered exporter, the built-in families' loaded first."""
    _discover()
    return tuple(_EXPORTERS.values())


def exporter_for(model: nn.Module) -> FamilyExporter:
    """The exporter of the family ``model`` belongs to.

    Raises:
        InvalidInput: no family exports it.
    """
    _discover()
    for exporter in _EXPORTERS.values():
        if exporter.accepts(model):
            return exporter
    raise InvalidInput(
        f"cannot export {type(model).__name__}: no model family exports it "
        f"(families with an exporter: {', '.join(sorted(_EXPORTERS))})"
    )


def graph_module(model: nn.Module, role: GraphRole) -> nn.Module:
    """The PyTorch module of ``role`` for ``model``, whatever its family.

    Raises:
        InvalidInput: ``model`` exports no such graph.
    """
    exporter = exporter_for(model)
    if role not in exporter.graph_roles(model):
        raise InvalidInput(f"{type(model).__name__} exports no {role} graph")
    return exporter.graph_module(model, role)
