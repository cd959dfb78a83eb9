"""The model contract: what an export promises every reader of it, as typed, frozen data.

``nec-serve export`` writes one :class:`Manifest` to ``<export>/manifest.json``; the coder
(:class:`nec_serve.bundle.ModelBundle`), the Triton client, the Python-backend model,
deployment, the demo, the CLI and the benchmarks read it through :meth:`Manifest.load`,
which validates every field and names the one that is wrong. Nothing else spells a
manifest key or a graph name: the keys are the field names of the dataclasses below, and
each family's Triton model names are registered once, with the family.

Three registries make the contract extensible without touching this module's logic:

- **graph roles** (:func:`register_graph_role`): what a graph does in the pipeline. The
  encoder maps images to ``(symbols, latent)``; every other role maps symbols to one output
  and names the ``decompress --output`` it serves (``embeddings``, ``features``; a task head
  would add ``scores``).
- **entropy models** (:func:`register_entropy_model`): how an export's frozen tables are
  read and turned into a coder (``factorized``: one quantized CDF per channel).
- **model families** (:func:`register_family`): which roles a family exports and under which
  Triton model names, which entropy models it may use, and its own manifest section
  (``family_params``, a frozen dataclass with the same field-named JSON form).

Schema versions: :data:`SCHEMA_VERSION` is written into every manifest. Manifests without
one were written before this contract existed (the untyped dict, implicitly version 1);
they and manifests of any other version are refused with :class:`SchemaVersionError`,
whose message says to re-export.

No PyTorch and no ONNX here: the contract is core, read by every deployable.
"""

from __future__ import annotations

import json
import math
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Protocol, Union, get_args, get_origin, get_type_hints

from nec_serve.categorical import CategoricalCodec
from nec_serve.codec import FactorizedCodec, LatentCodec
from nec_serve.errors import InvalidInput, ManifestError, SchemaVersionError
from nec_serve.tables import EntropyTables

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_FILENAME",
    "SYMBOLS_OUTPUT",
    "UNNAMED_FAMILY",
    "DataType",
    "TensorSpec",
    "GraphRole",
    "register_graph_role",
    "decode_outputs",
    "GraphSpec",
    "InputSpec",
    "EntropyModelSpec",
    "EntropyModelKind",
    "FrozenTables",
    "register_entropy_model",
    "entropy_model",
    "FamilyParams",
    "ModelFamily",
    "register_family",
    "model_family",
    "model_families",
    "rate_knobs",
    "Manifest",
    "FACTORIZED",
    "CATEGORICAL",
    "Trainer",
    "check_positive",
    "check_not_empty",
]

#: Written into every manifest; manifests of any other version are refused.
#: 1 was the unversioned dict that exports wrote before this contract.
SCHEMA_VERSION = 2
MANIFEST_FILENAME = "manifest.json"
#: The family of containers written before families were named (they hold no ``family``).
UNNAMED_FAMILY = "nec"
#: The ``decompress --output`` that needs no graph: the entropy-decoded symbols themselves.
SYMBOLS_OUTPUT = "symbols"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")  # Triton model and tensor names


# ------------------------------------------------------------------------------ tensors


class DataType(StrEnum):
    """Tensor element types, spelt as Triton's ``model_config.proto`` ``DataType``.

    The export writes these into the Triton configs unchanged; :attr:`v2` is the KServe v2
    protocol's spelling that servers report in model metadata.
    """

    TYPE_FP32 = "TYPE_FP32"
    TYPE_FP16 = "TYPE_FP16"
    TYPE_INT32 = "TYPE_INT32"
    TYPE_INT64 = "TYPE_INT64"
    TYPE_UINT8 = "TYPE_UINT8"

    @property
    def v2(self) -> str:
        """KServe v2 datatype (``FP32``, ``INT32``, ...)."""
        return self.value.removeprefix("TYPE_")


def _check_dims(dims: tuple[int, ...]) -> str | None:
    if not dims or any(d == 0 or d < -1 for d in dims):
        return "must be a non-empty list of integers >= 1 (or -1 for a variable size)"
    return None


def _check_name(name: str) -> str | None:
    return None if _NAME.match(name) else "must be letters, digits, '_', '.' or '-'"


def _check_sha256(value: str | None) -> str | None:
    if value is None or _SHA256.match(value):
        return None
    return "must be 64 lowercase hex digits"


def _check_extras(value: dict[str, str] | None) -> str | None:
    if value is None or all(isinstance(v, str) and _SHA256.match(v) for v in value.values()):
        return None
    return "must map names to 64 lowercase hex digits"


def _check_relative_file(value: str) -> str | None:
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
        return "must be a relative path inside the export directory"
    return None


def check_not_empty(value: tuple) -> str | None:
    """A field check (see :func:`_from_json`): the value must not be empty."""
    return None if value else "must not be empty"


def check_positive(value: int) -> str | None:
    """A field check (see :func:`_from_json`): the value must be >= 1."""
    return None if value >= 1 else "must be >= 1"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a graph: name, element type, dims without the batch axis.

    The field names are those of Triton's ``ModelInput``/``ModelOutput``, so the export puts
    these objects straight into its Triton configs.
    """

    name: str = field(metadata={"check": _check_name})
    data_type: DataType
    dims: tuple[int, ...] = field(metadata={"check": _check_dims})

    def __post_init__(self) -> None:
        """Keep dims a tuple of ints whatever sequence was passed."""
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))


# ------------------------------------------------------------------------------ graph roles

_ROLES: dict[str, GraphRole] = {}


@dataclass(frozen=True)
class GraphRole:
    """What a graph does in the pipeline; registered once, used like an enum member.

    Attributes:
        value: the role's key under ``graphs`` in the manifest.
        output: the ``decompress --output`` a decoding role produces (None for the encoder,
            which maps images to ``(symbols, latent)``, its outputs in that order).
    """

    ENCODER: ClassVar[GraphRole]
    DECODER: ClassVar[GraphRole]
    FEATURES: ClassVar[GraphRole]
    CLASSIFIER: ClassVar[GraphRole]
    RECONSTRUCTION: ClassVar[GraphRole]

    value: str
    output: str | None = None

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, value: str) -> GraphRole:
        """The registered role ``value``; :class:`ManifestError` naming the known ones."""
        try:
            return _ROLES[value]
        except (KeyError, TypeError):
            raise ManifestError(
                f"unknown graph role {value!r}, expected one of {', '.join(sorted(_ROLES))}"
            ) from None

    @classmethod
    def members(cls) -> tuple[GraphRole, ...]:
        """Every registered role, in registration order."""
        return tuple(_ROLES.values())


def register_graph_role(value: str, *, output: str | None = None) -> GraphRole:
    """Register a graph role (idempotent for the same definition) and return it.

    Args:
        value: the role's manifest key, e.g. ``"task_head"``.
        output: the ``decompress --output`` it produces, e.g. ``"scores"``; None for roles
            that do not decode symbols (the encoder).

    Raises:
        ValueError: for a malformed name, or a value or output already taken.
    """
    role = GraphRole(value, output)
    if not _NAME.match(value) or (output is not None and not _NAME.match(output)):
        raise ValueError(f"invalid graph role {value!r} / output {output!r}")
    if value in _ROLES:
        if _ROLES[value] != role:
            raise ValueError(f"graph role {value!r} is already registered as {_ROLES[value]}")
        return _ROLES[value]
    if output is not None and (output == SYMBOLS_OUTPUT or output in decode_outputs()):
        raise ValueError(f"decompress output {output!r} is already produced by another role")
    _ROLES[value] = role
    return role


def decode_outputs() -> dict[str, GraphRole | None]:
    """``decompress --output`` choices -> the role whose graph produces it (symbols: None)."""
    outputs: dict[str, GraphRole | None] = {r.output: r for r in _ROLES.values() if r.output}
    outputs[SYMBOLS_OUTPUT] = None
    return outputs


GraphRole.ENCODER = register_graph_role("encoder")
GraphRole.DECODER = register_graph_role("decoder", output="embeddings")
GraphRole.FEATURES = register_graph_role("decoder_block1", output="features")
#: symbols -> class scores (softmax) of a classifier head trained on decoded embeddings.
GraphRole.CLASSIFIER = register_graph_role("classifier", output="classes")
#: codebook indices -> reconstructed bands (the RVQ family's decoder).
GraphRole.RECONSTRUCTION = register_graph_role("reconstruction", output="bands")


# ------------------------------------------------------------------------------ reading JSON


class _Fields:
    """One JSON object of a manifest, read field by field; every error names the field.

    Args:
        data: the decoded JSON value that should be an object.
        where: dotted path of the object in the manifest ("" for the top level).
        source: what to call the manifest in errors (its path).
    """

    def __init__(self, data: Any, where: str, source: str):
        self.where, self.source = where, source
        if not isinstance(data, dict):
            raise self._error(where or "the manifest", f"must be a JSON object, got {_kind(data)}")
        self._data = data
        self._seen: set[str] = set()

    def path(self, key: str) -> str:
        """Dotted path of ``key``."""
        return f"{self.where}.{key}" if self.where else key

    def _error(self, path: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.source}: {path} {problem}")

    def error(self, key: str, problem: str) -> ManifestError:
        """A :class:`ManifestError` about ``key``."""
        return self._error(self.path(key), problem)

    def keys(self) -> list[str]:
        """The object's keys."""
        return list(self._data)

    def raw(self, key: str) -> Any:
        """The value of a required key, unchecked."""
        self._seen.add(key)
        if key not in self._data:
            raise self.error(key, "is missing")
        return self._data[key]

    def obj(self, key: str) -> _Fields:
        """A nested object."""
        return _Fields(self.raw(key), self.path(key), self.source)

    def has(self, key: str) -> bool:
        """Whether the object holds ``key`` (for fields with a default, which may be absent)."""
        return key in self._data

    def typed(self, key: str, hint: Any, check: Callable[[Any], str | None] | None = None) -> Any:
        """The value of ``key`` converted to the type ``hint``, then ``check``-ed."""
        value = self._convert(self.raw(key), hint, self.path(key))
        problem = check(value) if check else None
        if problem:
            raise self.error(key, f"{problem}, got {self.raw(key)!r}")
        return value

    def done(self) -> None:
        """Refuse keys that were not read: a misspelt key must not pass silently."""
        extra = sorted(set(self._data) - self._seen)
        if extra:
            where = f"{self.where} has" if self.where else "the manifest has"
            raise ManifestError(f"{self.source}: {where} unknown field(s) {', '.join(extra)}")

    def _convert(self, value: Any, hint: Any, path: str) -> Any:
        origin, args = get_origin(hint), get_args(hint)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self._convert(value, inner, path)
        if origin is tuple:
            if not isinstance(value, list):
                raise self._error(path, f"must be a list, got {_kind(value)}")
            return tuple(self._convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if is_dataclass(hint):
            return _from_json(hint, _Fields(value, path, self.source))
        try:
            return _scalar(value, origin or hint)
        except _WrongType as err:
            raise self._error(path, f"must be {err}") from None


class _WrongType(Exception):
    """What a JSON value should have been (a private signal of :func:`_scalar`)."""


def _scalar(value: Any, hint: Any) -> Any:
    """``value`` as a ``hint`` (str, int, float, a StrEnum, dict or Any), else _WrongType."""
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        if value in hint._value2member_map_:
            return hint(value)
        raise _WrongType(f"one of {', '.join(m.value for m in hint)}, got {value!r}")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = {
        str: isinstance(value, str) and bool(value),
        int: number and isinstance(value, int),
        float: number and math.isfinite(value),
        dict: isinstance(value, dict),
    }
    wanted = {
        str: "a non-empty string",
        int: "an integer",
        float: "a finite number",
        dict: "a JSON object or null",
    }
    if hint not in ok:
        raise TypeError(f"the contract cannot read a {hint!r}")  # a bug here, not bad input
    if not ok[hint]:
        raise _WrongType(f"{wanted[hint]}, got {_kind(value)}")
    return float(value) if hint is float else value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list {value!r}" if len(repr(value)) < 60 else "a list"
    return f"{type(value).__name__} {value!r}"


def _json_fields(cls: type) -> list:
    return [f for f in fields(cls) if f.init and not f.metadata.get("custom")]


def _from_json(cls: type, src: _Fields, **given: Any) -> Any:
    """Build dataclass ``cls`` from ``src``, one JSON key per field (the field's name).

    Each field is converted to its annotated type and passed to the ``check`` in its
    metadata, if any (a function returning what is wrong, or None); fields whose metadata
    says ``custom`` are not read here (pass them in ``given``). When the object has a
    ``problem()`` method, a ``(field, what is wrong)`` it returns is raised as well: that is
    where fields are checked against each other.
    """
    hints = get_type_hints(cls)
    values = {
        f.name: src.typed(f.name, hints[f.name], f.metadata.get("check"))
        for f in _json_fields(cls)
        if f.name not in given and (src.has(f.name) or f.default is MISSING)
    }
    src.done()
    obj = cls(**values, **given)
    problem = obj.problem() if hasattr(obj, "problem") else None
    if problem:
        raise src.error(*problem)
    return obj


def _to_json(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_json(getattr(obj, f.name)) for f in _json_fields(type(obj))}
    if isinstance(obj, StrEnum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [_to_json(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): _to_json(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------ graphs, input


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its role, Triton model name, ONNX file and tensors.

    Attributes:
        role: what it does (the key it is filed under in the manifest).
        name: the Triton model name it is served as.
        file: the ONNX graph, relative to the export directory.
        inputs: its inputs (the first is the one the pipeline feeds).
        outputs: its outputs, in the graph's order.
        parity: the export's PyTorch-vs-onnxruntime check of it (see ``nec_export.graphs``).
    """

    role: GraphRole = field(metadata={"custom": True})
    name: str = field(metadata={"check": _check_name})
    file: str = field(metadata={"check": _check_relative_file})
    inputs: tuple[TensorSpec, ...] = field(metadata={"check": check_not_empty})
    outputs: tuple[TensorSpec, ...] = field(metadata={"check": check_not_empty})
    parity: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """Keep tensors in tuples."""
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))


@dataclass(frozen=True)
class InputSpec:
    """What the encoder takes: square tiles of ``img_size`` pixels with ``in_chans`` bands.

    ``mean`` and ``std`` are the per-band statistics of the ``[0, 1]``-scaled pixels the
    model expects (``(x / scale - mean) / std``); the scale depends on the pixel dtype and
    is chosen per container (:meth:`nec_serve.imagery.Normalisation.for_dtype`).
    """

    img_size: int = field(metadata={"check": check_positive})
    in_chans: int = field(metadata={"check": check_positive})
    mean: tuple[float, ...]
    std: tuple[float, ...] = field(
        metadata={"check": lambda v: None if all(s > 0 for s in v) else "must all be > 0"}
    )

    def __post_init__(self) -> None:
        """Keep the statistics in tuples."""
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def problem(self) -> tuple[str, str] | None:
        """(field, what is wrong) when the fields disagree with each other, else None."""
        for f in ("mean", "std"):
            n = len(getattr(self, f))
            if n != self.in_chans:
                return f, f"has {n} value(s) for {self.in_chans} band(s)"
        return None


# ------------------------------------------------------------------------------ entropy models


class FrozenTables(Protocol):
    """What an entropy model's frozen tables offer: their hash and their file form."""

    @property
    def sha256(self) -> str:
        """SHA-256 of the file form, recorded in the manifest."""

    def save(self, path: Path) -> None:
        """Write the file form to ``path``."""


@dataclass(frozen=True)
class EntropyModelKind:
    """How the tables of one kind of entropy model are read and coded with.

    Attributes:
        kind: its name in manifests (``entropy.kind``).
        load_tables: path of the tables file -> tables object with a ``sha256`` attribute.
        make_codec: tables object -> the coder the pipeline runs.
    """

    kind: str
    load_tables: Callable[[Path], FrozenTables]
    make_codec: Callable[[Any], LatentCodec]


_ENTROPY_MODELS: dict[str, EntropyModelKind] = {}


def register_entropy_model(
    kind: str,
    load_tables: Callable[[Path], FrozenTables],
    make_codec: Callable[[Any], LatentCodec],
) -> EntropyModelKind:
    """Register an entropy model kind (e.g. ``"rvq_categorical"``) and return it.

    Raises:
        ValueError: for a malformed name or one already registered.
    """
    if not _NAME.match(kind):
        raise ValueError(f"invalid entropy model kind {kind!r}")
    if kind in _ENTROPY_MODELS:
        raise ValueError(f"entropy model kind {kind!r} is already registered")
    _ENTROPY_MODELS[kind] = EntropyModelKind(kind, load_tables, make_codec)
    return _ENTROPY_MODELS[kind]


def entropy_model(kind: str) -> EntropyModelKind:
    """The registered entropy model ``kind``; :class:`ManifestError` naming the known ones."""
    try:
        return _ENTROPY_MODELS[kind]
    except KeyError:
        raise ManifestError(
            f"unknown entropy model kind {kind!r}, expected one of "
            f"{', '.join(sorted(_ENTROPY_MODELS))}"
        ) from None


def _check_entropy_kind(kind: str) -> str | None:
    if kind in _ENTROPY_MODELS:
        return None
    return f"is not a registered entropy model kind ({', '.join(sorted(_ENTROPY_MODELS))})"


@dataclass(frozen=True)
class EntropyModelSpec:
    """The entropy model an export ships: its kind and its frozen tables with their hash.

    ``code_extras`` names, by SHA-256, what besides the tables decides what the symbols
    mean (for RVQ: ``codebooks``); with the tables' hash it makes the export's code
    fingerprint (:attr:`nec_serve.bundle.ModelBundle.code_sha256`), which format 3
    containers record. Exports written before it was recorded have none.
    """

    kind: str = field(metadata={"check": _check_entropy_kind})
    tables_file: str = field(metadata={"check": _check_relative_file})
    sha256: str = field(metadata={"check": _check_sha256})
    code_extras: dict[str, str] | None = field(default=None, metadata={"check": _check_extras})

    def load(self, root: str | Path) -> tuple[Any, Any]:
        """Read the tables under ``root``, verify them against :attr:`sha256`; (tables, codec).

        Raises:
            InvalidInput: unreadable tables, or tables whose hash is not the manifest's.
        """
        kind = entropy_model(self.kind)
        tables = kind.load_tables(Path(root) / self.tables_file)
        if tables.sha256 != self.sha256:
            raise InvalidInput(
                f"{root}: entropy tables hash {tables.sha256[:12]} differs from the manifest's "
                f"{self.sha256[:12]}: the export directory is inconsistent"
            )
        return tables, kind.make_codec(tables)


FACTORIZED = register_entropy_model("factorized", EntropyTables.load, FactorizedCodec)
#: One static categorical table per codebook level (the RVQ family).
CATEGORICAL = register_entropy_model("categorical", EntropyTables.load, CategoricalCodec)


# ------------------------------------------------------------------------------ families


class FamilyParams:
    """Base of a family's own manifest section (``family_params``), a frozen dataclass.

    Its fields are read and written by name like the rest of the manifest (field metadata
    ``{"check": fn}`` validates one field; an optional ``problem()`` method compares fields
    of the section); :meth:`check` then compares them with the rest of the manifest. Every
    section has ``channels`` and ``tokens`` (a tile's symbol array is ``(channels, tokens)``).
    The other methods are what the pipeline asks a family; their defaults suit a family of
    unscaled images decoded to arrays.
    """

    def describe(self) -> str:
        """What a tile codes to, in words (``nec-serve export`` prints it)."""
        raise NotImplementedError

    def check(self, manifest: Manifest, source: str) -> None:
        """Refuse a manifest whose graphs or input disagree with these parameters.

        Raises:
            ManifestError: naming the fields that disagree.
        """
        raise NotImplementedError

    def pixel_scale(self) -> float | None:
        """Raw pixels over this number are the ``[0, 1]`` input ``mean``/``std`` apply to.

        None (the default): the scale follows the pixel dtype
        (:meth:`nec_serve.imagery.Normalisation.for_dtype`).
        """
        return None

    def admit(self, name: str, raw: Any) -> None:
        """Refuse an image ``(bands, H, W)`` this family cannot code (default: none).

        Raises:
            InvalidInput: naming the image and what is wrong with it.
        """

    def score_names(self) -> tuple[str, ...]:
        """What each score of a ``classes`` output means, in order (default: none)."""
        return ()

    def output_bands(self) -> tuple[tuple[str, ...], str] | None:
        """(band names, pixel dtype) of a ``bands`` output, or None when it has none."""
        return None


@dataclass(frozen=True)
class Trainer:
    """A ``nec-serve train <stage>`` command of a family, imported only when it runs.

    Attributes:
        config: ``"module:Class"``, its config dataclass (one flag per field).
        run: ``"module:function"``, called as ``run(config, resume=, progress=)`` (the
            one training loop, :func:`nec_models.loop.fit`, behind it); returns a JSON-able
            result.
        help: one line for ``nec-serve train --help``.
        flag_help: help of some flags, by config field name.
        options: extra ``add_argument`` keywords by field name (e.g. ``choices``).
    """

    config: str
    run: str
    help: str
    flag_help: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelFamily:
    """A family of models served through one path.

    A family lives in its own modules: a runtime one under :mod:`nec_serve.families` (this
    registration and its :class:`FamilyParams`, no PyTorch) and a PyTorch one under
    ``nec_export.families`` (its graphs, tables and parity checks). Both packages load every
    module they hold, so adding a family touches no other file.

    Attributes:
        name: its name in manifests (``family``).
        graph_names: the Triton model name of each role it can export.
        entropy_kinds: the entropy model kinds it may ship.
        params: its ``family_params`` dataclass, a :class:`FamilyParams`.
        required_roles: roles every export of it must have.
        rate: the name of its per-request rate knob (``codebooks``): the container header
            key, the request parameter and the CLI flag; None for a fixed rate. Its codec
            checks a value with ``check_levels``.
        rate_help: the help of that CLI flag.
        default_output: what decoding gives when no output is asked for (default: the
            output of its first decoding graph, else symbols).
        georeferenced: its containers record each source's CRS and transform.
        shared_streams: a batch of its tiles is entropy-coded as one stream (one final-state
            flush, one length): the tiles' symbol rows joined, row by row, as one tile of
            ``batch x tokens`` positions. False keeps one stream per tile (NEC: the
            payload of an image stays CompressAI's).
        default_roles: roles an export with default options has, which ``k8s/`` serves
            (``nec_serve.deploy``); empty: every role of ``graph_names``.
        trainers: its ``nec-serve train`` stages.
    """

    name: str
    graph_names: Mapping[GraphRole, str]
    entropy_kinds: tuple[str, ...]
    params: type
    required_roles: tuple[GraphRole, ...] = (GraphRole.ENCODER,)
    default_roles: tuple[GraphRole, ...] = ()
    rate: str | None = None
    rate_help: str = ""
    default_output: str | None = None
    georeferenced: bool = False
    shared_streams: bool = False
    trainers: Mapping[str, Trainer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Freeze the tables; fill in the default output."""
        object.__setattr__(self, "graph_names", types.MappingProxyType(dict(self.graph_names)))
        object.__setattr__(self, "trainers", types.MappingProxyType(dict(self.trainers)))
        if self.default_output is None:
            first = next((r.output for r in self.graph_names if r.output), SYMBOLS_OUTPUT)
            object.__setattr__(self, "default_output", first)

    def graph_name(self, role: GraphRole) -> str:
        """The Triton model name of ``role`` in this family."""
        try:
            return self.graph_names[role]
        except KeyError:
            raise ManifestError(f"model family {self.name!r} has no {role} graph") from None


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Register a model family and return it.

    Raises:
        ValueError: a name already taken, an unregistered role or entropy kind, a Triton
            model name used twice, or a ``params`` that is not a dataclass.
    """
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    for role in (*family.graph_names, *family.required_roles):
        if _ROLES.get(role.value) != role:
            raise ValueError(f"family {family.name!r}: graph role {role} is not registered")
    if not set(family.default_roles) <= set(family.graph_names):
        raise ValueError(f"family {family.name!r}: default roles must be among its graph roles")
    outputs = {r.output for r in family.graph_names if r.output} | {SYMBOLS_OUTPUT}
    if family.default_output not in outputs:
        raise ValueError(
            f"family {family.name!r}: default output {family.default_output!r} is none of "
            f"its graphs' outputs {sorted(outputs)}"
        )
    for kind in family.entropy_kinds:
        entropy_model(kind)
    taken = {n for f in _FAMILIES.values() for n in f.graph_names.values()}
    names = list(family.graph_names.values())
    if len(set(names)) != len(names) or taken & set(names):
        raise ValueError(f"family {family.name!r}: Triton model names {names} are not unique")
    if not (is_dataclass(family.params) and issubclass(family.params, FamilyParams)):
        raise ValueError(f"family {family.name!r}: params must be a FamilyParams dataclass")
    stages = {s for f in _FAMILIES.values() for s in f.trainers}
    if stages & set(family.trainers):
        raise ValueError(
            f"family {family.name!r}: trainer stage(s) {stages & set(family.trainers)} taken"
        )
    _FAMILIES[family.name] = family
    return family


_DISCOVERED: list[bool] = []


def _discover() -> None:
    """Load every module of :mod:`nec_serve.families` once (each registers its family)."""
    if not _DISCOVERED:
        _DISCOVERED.append(True)
        from nec_serve.families import load_families  # imports this module: not at the top

        load_families()


def model_families() -> tuple[ModelFamily, ...]:
    """Every registered family, the built-in ones first."""
    _discover()
    return tuple(_FAMILIES.values())


def rate_knobs() -> tuple[str, ...]:
    """The rate knob names of every family (:attr:`ModelFamily.rate`), sorted."""
    return tuple(sorted({f.rate for f in model_families() if f.rate}))


def model_family(name: str) -> ModelFamily:
    """The registered family ``name``; :class:`ManifestError` naming the known ones."""
    _discover()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ManifestError(
            f"unknown model family {name!r}, expected one of {', '.join(sorted(_FAMILIES))}"
        ) from None


def _check_family(name: str) -> str | None:
    _discover()
    if name in _FAMILIES:
        return None
    return f"is not a registered model family ({', '.join(sorted(_FAMILIES))})"


# ------------------------------------------------------------------------------ the manifest


@dataclass(frozen=True)
class Manifest:
    """What an export holds, as written to ``manifest.json`` (JSON keys = field names).

    Attributes:
        family: the model family (:func:`register_family`).
        model: the registry name of the exported model.
        model_version: the version directory of the Triton repositories.
        input: what the encoder takes.
        graphs: the exported graphs by role.
        entropy: the entropy model and its tables.
        family_params: the family's own section (its :class:`FamilyParams`).
        checkpoint_sha256: SHA-256 of the checkpoint the weights came from, if any.
        calibration: how the entropy model was fitted to imagery, if it was.
        created_by: the nec-serve that exported it.
        torch_version: the PyTorch it was exported with.
        schema_version: :data:`SCHEMA_VERSION`.
    """

    family: str = field(metadata={"check": _check_family})
    model: str
    model_version: str
    input: InputSpec
    graphs: Mapping[GraphRole, GraphSpec] = field(metadata={"custom": True})
    entropy: EntropyModelSpec
    family_params: Any = field(metadata={"custom": True})
    checkpoint_sha256: str | None = field(metadata={"check": _check_sha256})
    calibration: dict[str, Any] | None
    created_by: str
    torch_version: str | None
    schema_version: int = field(default=SCHEMA_VERSION, metadata={"custom": True})

    def __post_init__(self) -> None:
        """Freeze the graph table."""
        object.__setattr__(self, "graphs", types.MappingProxyType(dict(self.graphs)))

    # -- reading -----------------------------------------------------------------------

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        """Read and validate ``<root>/manifest.json``, as written by ``nec-serve export``.

        Raises:
            ManifestError: no manifest, not JSON, or a field that breaks the contract (the
                message names it).
            SchemaVersionError: a manifest of another schema version, or of none.
        """
        path = Path(root) / MANIFEST_FILENAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ManifestError(
                f"{root} is not a model export: no {MANIFEST_FILENAME} (run `nec-serve export` "
                "first)"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise ManifestError(f"cannot read {path}: {err}") from err
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ManifestError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_FILENAME) -> Manifest:
        """Validate a decoded manifest; ``source`` names it in errors."""
        src = _Fields(data, "", source)
        _check_schema_version(data, source)
        src.raw("schema_version")
        family = model_family(src.typed("family", str, _check_family))
        graphs = _read_graphs(src.obj("graphs"), family)
        params = _from_json(family.params, src.obj("family_params"))
        manifest = _from_json(cls, src, graphs=graphs, family_params=params)
        if manifest.entropy.kind not in family.entropy_kinds:
            raise ManifestError(
                f"{source}: entropy.kind {manifest.entropy.kind!r} is not an entropy model of "
                f"family {family.name!r} ({', '.join(family.entropy_kinds)})"
            )
        params.check(manifest, source)
        return manifest

    # -- writing -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; :meth:`from_dict` of it gives an equal manifest."""
        return {f.name: _to_json(getattr(self, f.name)) for f in fields(self)}

    def save(self, root: str | Path) -> Path:
        """Validate, then write ``<root>/manifest.json``; returns its path."""
        data = self.to_dict()
        Manifest.from_dict(json.loads(json.dumps(data)), source="the manifest being written")
        path = Path(root) / MANIFEST_FILENAME
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    # -- using -------------------------------------------------------------------------

    @property
    def family_spec(self) -> ModelFamily:
        """The registered family of this export."""
        return model_family(self.family)

    def graph(self, role: GraphRole) -> GraphSpec:
        """The graph exported for ``role``.

        Raises:
            ManifestError: the export has no such graph (the message lists those it has).
        """
        try:
            return self.graphs[role]
        except KeyError:
            have = ", ".join(r.value for r in self.graphs)
            raise ManifestError(
                f"the export of {self.model!r} has no {role} graph (it has: {have})"
            ) from None


def _check_schema_version(data: dict, source: str) -> None:
    if "schema_version" not in data:
        raise SchemaVersionError(
            f"{source} has no schema_version (written by an older nec-serve): re-export the "
            "model with `nec-serve export`"
        )
    version = data["schema_version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise SchemaVersionError(
            f"{source} has schema_version {version!r}, this nec-serve reads schema_version "
            f"{SCHEMA_VERSION}: re-export the model with this nec-serve's `nec-serve export`, "
            "or read it with the nec-serve that wrote it"
        )


def _read_graphs(src: _Fields, family: ModelFamily) -> dict[GraphRole, GraphSpec]:
    graphs = {}
    for key in src.keys():
        if key not in _ROLES:
            raise src.error(key, f"is not a registered graph role ({', '.join(sorted(_ROLES))})")
        role = _ROLES[key]
        if role not in family.graph_names:
            raise src.error(key, f"is not a graph role of family {family.name!r}")
        graphs[role] = _from_json(GraphSpec, src.obj(key), role=role)
    missing = [r.value for r in family.required_roles if r not in graphs]
    if missing:
        raise src.error(missing[0], "is missing")
    src.done()
    return graphs
