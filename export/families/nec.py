"""The NEC family's PyTorch side: its graphs, frozen factorized tables and parity checks.

The encoder graph maps images to the integer symbols the coder takes,
``round(y - median)`` per channel (int32, coder layout ``(B, C, T)``), and also returns
the continuous latent for quality checks; the decoder graphs map symbols back to
embeddings ``(B, T, C)``, through the first MAE decoder block to ``(B, T - 1, D)``, or,
for a classifier, to class scores. The runtime side is :mod:`nec_serve.families.nec`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from nec_export.graphs import check_graph
from nec_export.plan import ExportPlan, FamilyExporter, GraphPlan, register_exporter
from nec_models.nec import NECClassifier, NECFactorized, NECHyperprior
from nec_serve.contract import FACTORIZED, DataType, GraphRole, InputSpec, TensorSpec
from nec_serve.errors import InvalidInput
from nec_serve.families.nec import NEC, NecParams
from nec_serve.imagery import Normalisation
from nec_serve.tables import EntropyTables

__all__ = [
    "EncoderGraph",
    "DecoderGraph",
    "ClassifierGraph",
    "NEC_GRAPHS",
    "NecExporter",
    "tables_from_model",
]


class EncoderGraph(nn.Module):
    """images ``(B, 3, H, W)`` float32 -> symbols ``(B, C, T)`` int32, latent float32."""

    def __init__(self, model: NECFactorized):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symbols for the coder and the continuous latent they round."""
        latent = self.model.latent(images)
        return self.model.symbols(latent), latent


class DecoderGraph(nn.Module):
    """symbols ``(B, C, T)`` int32 -> embeddings, optionally through decoder block 1."""

    def __init__(self, model: NECFactorized, first_block: bool = False):
        super().__init__()
        self.model = model
        self.first_block = first_block

    def forward(self, symbols: torch.Tensor) -> torch.Tensor:
        """Dequantized embeddings ``(B, T, C)`` or block-1 features ``(B, T-1, D)``."""
        embeddings = self.model.dequantize(symbols)
        if self.first_block:
            return self.model.first_decoder_block(embeddings)
        return embeddings


class ClassifierGraph(nn.Module):
    """symbols ``(B, C, T)`` int32 -> class scores ``(B, K)`` float32 (softmax).

    The head of a :class:`~nec_models.nec.NECClassifier` on the embeddings a consumer
    decodes, so a consumer step outputs labels without ever seeing pixels.
    """

    def __init__(self, model: NECClassifier):
        super().__init__()
        self.model = model

    def forward(self, symbols: torch.Tensor) -> torch.Tensor:
        """Softmax over the head's logits of the dequantized embeddings."""
        embeddings = self.model.backbone.dequantize(symbols)
        return torch.softmax(self.model.forward_embeddings(embeddings), dim=-1)


def _backbone(model: nn.Module) -> NECFactorized:
    return model.backbone if isinstance(model, NECClassifier) else model


#: The module behind each graph role NEC exports, built from the exported model (an
#: :class:`NECFactorized`, or an :class:`NECClassifier` and its backbone).
NEC_GRAPHS: dict[GraphRole, Callable[[nn.Module], nn.Module]] = {
    GraphRole.ENCODER: lambda m: EncoderGraph(_backbone(m)),
    GraphRole.DECODER: lambda m: DecoderGraph(_backbone(m)),
    GraphRole.FEATURES: lambda m: DecoderGraph(_backbone(m), first_block=True),
    GraphRole.CLASSIFIER: ClassifierGraph,
}


def tables_from_model(model: NECFactorized) -> EntropyTables:
    """Freeze the bottleneck's tables: the checkpoint's own if it has them, else update().

    A checkpoint saved after CompressAI's ``update()`` carries the tables it was evaluated
    with; those are used as they are, since recomputing them elsewhere may differ.
    """
    eb = model.entropy_bottleneck
    if eb._quantized_cdf.numel() == 0 or eb._offset.numel() == 0:
        eb.update(force=True)
    return EntropyTables(
        quantized_cdf=eb._quantized_cdf.cpu().numpy(),
        cdf_length=eb._cdf_length.cpu().numpy(),
        offset=eb._offset.cpu().numpy(),
        medians=model.medians().cpu().numpy(),
        precision=int(eb.entropy_coder_precision),
    )


def _class_names(model: nn.Module, trained: Mapping[str, Any]) -> tuple[str, ...]:
    """The classifier's class names (the trainer's, else ``class_0`` ...), checked."""
    k = model.head.out_features
    given = trained.get("class_names")
    names = tuple(given) if given else tuple(f"class_{i}" for i in range(k))
    if len(names) != k or len(set(names)) != k or not all(names):
        raise InvalidInput(
            f"the classifier scores {k} classes; class names {list(names)} must be {k} "
            "distinct non-empty names"
        )
    return names


class NecExporter(FamilyExporter):
    """Exports :class:`NECFactorized` models and :class:`NECClassifier` heads on them."""

    family = NEC

    def accepts(self, model: nn.Module) -> bool:
        """NEC models with a factorized prior; the hyperprior is refused, naming why."""
        if isinstance(model, NECHyperprior):
            raise InvalidInput(
                "the hyperprior NEC model is not exported for serving: its decoder derives "
                "Gaussian scale indexes from a float network output, which differs in the "
                "last bit between machines and corrupts streams (DESIGN section 3)"
            )
        return isinstance(model, NECClassifier | NECFactorized)

    def graph_roles(self, model: nn.Module) -> list[GraphRole]:
        """Encoder and decoder, plus what the model has for the others.

        Block-1 features need the first decoder block (a classifier trained without it
        drops it); the classifier needs a linear head.
        """
        nec = _backbone(model)
        roles = [GraphRole.ENCODER, GraphRole.DECODER]
        if hasattr(nec, "decoder_blocks") and hasattr(nec, "decoder_embed"):
            roles.append(GraphRole.FEATURES)
        if isinstance(model, NECClassifier) and isinstance(model.head, nn.Linear):
            roles.append(GraphRole.CLASSIFIER)
        return roles

    def graph_module(self, model: nn.Module, role: GraphRole) -> nn.Module:
        """The graph wrapper of ``role`` (:data:`NEC_GRAPHS`)."""
        return NEC_GRAPHS[role](model)

    def plan(self, model: nn.Module, options: Any, trained: Mapping[str, Any]) -> ExportPlan:
        """Every graph the model has, checked on random images; the bottleneck's tables."""
        if options.eo4eu_names:
            raise InvalidInput("--eo4eu-names applies to the RVQ family's graphs")
        nec = _backbone(model).eval()
        roles = self.graph_roles(model)
        names = _class_names(model, trained) if GraphRole.CLASSIFIER in roles else ()
        tables = tables_from_model(nec)
        c, t, s = nec.embed_dim, nec.num_tokens, nec.img_size
        gen = torch.Generator().manual_seed(options.seed)
        images = torch.randn(options.check_batch, nec.in_chans, s, s, generator=gen)
        modules = {role: self.graph_module(model, role) for role in roles}
        with torch.no_grad():
            symbols = modules[GraphRole.ENCODER](images)[0]
        fp32, sym = DataType.TYPE_FP32, TensorSpec("symbols", DataType.TYPE_INT32, (c, t))
        tensors = {  # role -> (inputs, outputs), the encoder's in the order the role fixes
            GraphRole.ENCODER: (
                (TensorSpec("images", fp32, (nec.in_chans, s, s)),),
                (sym, TensorSpec("latent", fp32, (c, t))),
            ),
            GraphRole.DECODER: ((sym,), (TensorSpec("embeddings", fp32, (t, c)),)),
            GraphRole.FEATURES: (
                (sym,),
                (TensorSpec("features", fp32, (t - 1, nec.decoder_embed_dim)),),
            ),
            GraphRole.CLASSIFIER: ((sym,), (TensorSpec("scores", fp32, (len(names),)),)),
        }
        encoder_check = partial(check_graph, medians=nec.medians())
        graphs = tuple(
            GraphPlan(
                role,
                module,
                *tensors[role],
                images if role == GraphRole.ENCODER else symbols,
                encoder_check if role == GraphRole.ENCODER else check_graph,
            )
            for role, module in modules.items()
        )
        # The statistics the model expects of [0, 1] pixels with its band count.
        norm = Normalisation.for_dtype("float32", nec.in_chans)
        return ExportPlan(
            family=NEC,
            model=getattr(model, "registry_name", type(nec).__name__),
            input=InputSpec(s, nec.in_chans, norm.mean, norm.std),
            entropy_kind=FACTORIZED.kind,
            tables=tables,
            graphs=graphs,
            family_params=NecParams(c, t, nec.decoder_embed_dim, names),
            rebuild_kwargs=_rebuild_kwargs(model),
        )

    def calibrate(
        self, model: nn.Module, inputs: Iterable[tuple[str, np.ndarray]], tiles: int
    ) -> Any:
        """Fit the bottleneck's density to ``tiles`` tiles of ``inputs`` (encoder frozen)."""
        from nec_export.calibrate import calibrate_from_inputs

        return calibrate_from_inputs(_backbone(model), inputs, tiles)


def _rebuild_kwargs(model: nn.Module) -> dict:
    """What rebuilds ``model`` from the registry beside its name and image size."""
    if isinstance(model, NECClassifier):
        return {"num_classes": model.head.out_features, "with_decoder": model.with_decoder}
    return {}


register_exporter(NecExporter())
