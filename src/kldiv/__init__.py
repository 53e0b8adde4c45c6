"""kldiv: the Keras Kullback-Leibler divergence loss on every array library.

``kldiv.kl_divergence(y_true, y_pred)`` computes ``sum(t * log(t / p), axis=-1)`` with both
inputs clipped to ``[1e-7, 1]``, in ``y_pred``'s library (NumPy, CuPy, PyTorch, JAX, Dask or
any array-API namespace) and on its device. ``kldiv.KLDivergence`` is the Keras-style loss
class with reductions and sample weights. For distillation, the divergences also take
log-probabilities or logits with a temperature (``inputs=``, ``temperature=``), and the family
has the reverse KL (``reverse_kl_divergence``, ``ReverseKLDivergence``) and the generalized
Jensen-Shannon divergence (``js_divergence``, ``JensenShannonDivergence``).

Importing kldiv imports NumPy and array-api-compat only: a framework is touched only once
an array of it is passed in.
"""

from . import backends, losses, metrics
from ._dispatch import use_generic
from ._estimator_loss import KLEstimator
from ._estimators import kl_estimate
from ._family import jensen_shannon_divergence, js_divergence, reverse_kl_divergence
from ._files import evaluate_files
from ._functional import KLD, kl_divergence, kld, kullback_leibler_divergence
from ._fused_linear import FusedLinearDivergence, fused_linear_divergence
from ._kernel import EPSILON
from ._npyio import DataFileError
from ._reduction import Reduction
from ._stream import evaluate_batches
from .losses import JensenShannonDivergence, KLDivergence, ReverseKLDivergence

__version__ = "0.1.0"

__all__ = [
    "EPSILON",
    "KLD",
    "DataFileError",
    "FusedLinearDivergence",
    "JensenShannonDivergence",
    "KLDivergence",
    "KLEstimator",
    "Reduction",
    "ReverseKLDivergence",
    "__version__",
    "backends",
    "evaluate_batches",
    "evaluate_files",
    "fused_linear_divergence",
    "jensen_shannon_divergence",
    "js_divergence",
    "kl_divergence",
    "kl_estimate",
    "kld",
    "kullback_leibler_divergence",
    "losses",
    "metrics",
    "reverse_kl_divergence",
    "use_generic",
]
