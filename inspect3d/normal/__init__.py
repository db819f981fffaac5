"""Normal-only models: anomaly scores from pretrained patch features of good layers alone.

``fit_normal(cfg, out_dir)`` (``inspect3d fit-normal``) builds one; it is saved and exported
like a supervised run, so eval, export, predict and watch work unchanged.
"""
