"""The pretraining CLI's own modules: LLaMA configs, data, checkpoints, run folders, the optimizer menu."""
