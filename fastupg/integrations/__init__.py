"""Drop-ins for other trainers. Each module imports its trainer lazily: `import fastupg` never needs TRL or verl.

    fastupg.integrations.trl   FusedGRPOTrainer: TRL's GRPOTrainer with fastupg's fused-linear loss
    fastupg.integrations.verl  register_fastupg_policy_losses(): fastupg estimators as verl policy losses
"""
