"""fastupg: the Unified Policy Gradient Estimator and Hybrid Post-Training (arXiv 2509.04419), fast."""
from fastupg.estimator import PRESETS, Branch, Estimator, aggregation_weights, policy_loss

__all__ = ["Estimator", "Branch", "PRESETS", "policy_loss", "aggregation_weights"]
__version__ = "0.1.0"
