"""jaxent: cross-entropy losses for JAX with PyTorch semantics and hand-written gradients."""

from jaxent import objectives as objectives
from jaxent import sharded as sharded
from jaxent._autotune import autotune as autotune
from jaxent._autotune import autotune_key as autotune_key
from jaxent.distill import distillation_loss as distillation_loss
from jaxent.distill import linear_distillation_loss as linear_distillation_loss
from jaxent.inplace import cross_entropy_and_grad as cross_entropy_and_grad
from jaxent.linear import linear_cross_entropy as linear_cross_entropy
from jaxent.losses import binary_cross_entropy as binary_cross_entropy
from jaxent.losses import cross_entropy as cross_entropy
from jaxent.losses import nll_loss as nll_loss
from jaxent.losses import soft_cross_entropy as soft_cross_entropy
from jaxent.rl import linear_log_probs as linear_log_probs
from jaxent.rl import linear_soft_cross_entropy as linear_soft_cross_entropy
from jaxent.rl import token_log_probs as token_log_probs
from jaxent.support import linear_support_log_probs as linear_support_log_probs
from jaxent.support import support_log_probs as support_log_probs
from jaxent.topk import linear_topk_log_probs as linear_topk_log_probs
from jaxent.topk import topk_log_probs as topk_log_probs
from jaxent.torch_style import BCEWithLogitsLoss as BCEWithLogitsLoss
from jaxent.torch_style import CrossEntropyLoss as CrossEntropyLoss
from jaxent.torch_style import NLLLoss as NLLLoss

__version__ = "0.1.0"
