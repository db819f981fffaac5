"""Training (torch): data loading, the loop, checkpoints, ``train(cfg)``."""
