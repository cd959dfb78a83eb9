"""The NEC family at run time: its manifest section and its registration (no PyTorch).

Neural Embedding Compression: an MAE ViT encoder whose latent a factorized prior codes,
decoded to embeddings, block-1 features or, with a trained head, class scores. Its
PyTorch side (graphs, tables, parity checks) is :mod:`nec_export.families.nec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nec_serve.contract import (
    FACTORIZED,
    DataType,
    FamilyParams,
    GraphRole,
    Manifest,
    ModelFamily,
    Trainer,
    check_positive,
    register_family,
)
from nec_serve.errors import ManifestError

__all__ = ["NecParams", "NEC"]


@dataclass(frozen=True)
class NecParams(FamilyParams):
    """``family_params`` of NEC: the latent the encoder codes and the decoder block's width.

    Attributes:
        channels: latent channels C (768 for ViT-B).
        tokens: tokens per tile T, the CLS token included.
        decoder_embed_dim: width of the first MAE decoder block's features.
        class_names: what each score of the ``classifier`` graph means, in its order
            (empty when the export has no classifier).
    """

    channels: int = field(metadata={"check": check_positive})
    tokens: int = field(metadata={"check": check_positive})
    decoder_embed_dim: int = field(metadata={"check": check_positive})
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Keep the class names in a tuple."""
        object.__setattr__(self, "class_names", tuple(self.class_names))

    def describe(self) -> str:
        """What a tile codes to, in words."""
        return f"{self.tokens} tokens x {self.channels} channels"

    def score_names(self) -> tuple[str, ...]:
        """The classifier's class names."""
        return self.class_names

    def check(self, manifest: Manifest, source: str) -> None:
        """The encoder takes ``(in_chans, S, S)`` images and returns int32 ``(C, T)`` symbols."""
        enc = manifest.graphs[GraphRole.ENCODER]
        inp = manifest.input
        want_in = (inp.in_chans, inp.img_size, inp.img_size)
        if enc.inputs[0].dims != want_in:
            raise ManifestError(
                f"{source}: graphs.encoder.inputs[0].dims {list(enc.inputs[0].dims)} disagree "
                f"with input.in_chans and input.img_size {list(want_in)}"
            )
        symbols = enc.outputs[0]
        if symbols.data_type != DataType.TYPE_INT32 or symbols.dims != (
            self.channels,
            self.tokens,
        ):
            raise ManifestError(
                f"{source}: graphs.encoder.outputs[0] is {symbols.data_type} "
                f"{list(symbols.dims)}, but family_params.channels and tokens make it "
                f"TYPE_INT32 [{self.channels}, {self.tokens}]"
            )
        head = manifest.graphs.get(GraphRole.CLASSIFIER)
        classes = head.outputs[0].dims if head else (0,)
        if classes != (len(self.class_names),):
            raise ManifestError(
                f"{source}: family_params.class_names holds {len(self.class_names)} names but "
                f"the classifier graph scores {list(classes) if head else 'no'} classes"
            )
        if len(set(self.class_names)) != len(self.class_names):
            raise ManifestError(f"{source}: family_params.class_names repeats a name")


#: Neural Embedding Compression: MAE ViT encoder with a factorized prior.
NEC = register_family(
    ModelFamily(
        name="nec",
        graph_names={
            GraphRole.ENCODER: "nec_encoder",
            GraphRole.DECODER: "nec_decoder",
            GraphRole.FEATURES: "nec_decoder_block1",
            GraphRole.CLASSIFIER: "nec_classifier",
        },
        entropy_kinds=(FACTORIZED.kind,),
        params=NecParams,
        # The classifier needs a trained head: only classifier exports have it.
        default_roles=(GraphRole.ENCODER, GraphRole.DECODER, GraphRole.FEATURES),
        trainers={
            "mae": Trainer(
                "nec_models.train:MAEConfig",
                "nec_models.train:train_mae",
                "MAE pretraining from scratch on EuroSAT RGB, resumable",
                {
                    "data": "EuroSAT RGB root (<Class>/<Class>_<n>.jpg)",
                    "out": "run folder: split, cache, log.csv, checkpoint",
                    "model": "registered MAE ViT",
                    "blr": "base lr; lr = blr * batch / 256",
                    "norm_pix_loss": "per-patch normalised target",
                    "seed": "model init, data order, masks",
                    "split_seed": "the train/val/test split",
                    "max_items": "first N images per class (0: all)",
                    "threads": "torch threads (0: default)",
                },
            ),
            "nec": Trainer(
                "nec_models.train:NECConfig",
                "nec_models.train:train_nec",
                "NEC compression fine-tuning from an MAE checkpoint",
                {
                    "init": "runs/mae/checkpoint.pth (its split is reused)",
                    "out": "run folder",
                    "lmbda": "reconstruction weight vs bits",
                    "rate_on": "rate term on the visible tokens (official) or on all tokens "
                    "(what is coded)",
                    "bottleneck_lr": "the entropy model's density",
                },
                {"rate_on": {"choices": ("visible", "all")}},
            ),
            "galileo_nec": Trainer(
                "nec_models.train_galileo_nec:GalileoNECConfig",
                "nec_models.train_galileo_nec:train_galileo_nec",
                "NEC on the frozen Galileo-nano encoder (adapter + bottleneck), resumable; "
                "not exportable yet",
                {
                    "data": "EuroSAT RGB root (<Class>/<Class>_<n>.jpg)",
                    "out": "run folder: split copy, cache, log.csv, checkpoint",
                    "split": "path,label,split file (train and val are used, never test)",
                    "lmbda": "weight of the token MSE vs bits per image",
                    "bottleneck_lr": "the entropy model's density and the per-channel gain",
                    "max_items": "first N images per class of train and val (0: all)",
                },
            ),
            "classifier": Trainer(
                "nec_models.train:ClassifierConfig",
                "nec_models.train:train_classifier",
                "classifier head on a NEC run's decoded embeddings, resumable",
                {
                    "init": "runs/nec-L/checkpoint.pth",
                    "out": "run folder",
                    "with_decoder": "through the first decoder block",
                    "evaluate_test": "also top-1 on the test split (final numbers)",
                },
            ),
        },
    )
)
