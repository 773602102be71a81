"""jaxent: cross-entropy losses for JAX with PyTorch semantics and hand-written gradients."""

from jaxent.losses import binary_cross_entropy as binary_cross_entropy
from jaxent.losses import cross_entropy as cross_entropy
from jaxent.losses import nll_loss as nll_loss
from jaxent.losses import soft_cross_entropy as soft_cross_entropy
from jaxent.torch_style import BCEWithLogitsLoss as BCEWithLogitsLoss
from jaxent.torch_style import CrossEntropyLoss as CrossEntropyLoss
from jaxent.torch_style import NLLLoss as NLLLoss

__version__ = "0.1.0"
