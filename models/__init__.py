"""NEC models in PyTorch, created by name and loaded from the official checkpoints."""

from nec_models import galileo as _galileo  # noqa: F401  (registers the architectures)
from nec_models import galileo_nec as _galileo_nec  # noqa: F401
from nec_models import nec as _nec  # noqa: F401
from nec_models import rvq as _rvq  # noqa: F401
from nec_models.checkpoint import load_checkpoint
from nec_models.nec import NECClassifier, NECFactorized, NECHyperprior
from nec_models.registry import create_model, list_models, register_model

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "load_checkpoint",
    "NECFactorized",
    "NECHyperprior",
    "NECClassifier",
]
