"""`fastupg.estimator` is `fastupg.kernels.estimator` (the same module object, not a copy).

The estimator's math lives inside `fastupg/kernels` so that the kernels package depends on torch and triton only
and can be copied into another trainer as one folder; this name stays because users and docs import it.
"""
import sys

from fastupg.kernels import estimator as _estimator

sys.modules[__name__] = _estimator
