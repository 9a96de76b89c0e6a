"""Training: pair datasets, the L_gen + L_con losses, the trainer, pair annotation and evaluation."""
