"""Data: layer naming, the single preprocessing, manifests, splits, synthetic layers, fetchers.

Modules here import no torch (the scoring path uses them); torch datasets live in
``inspect3d.train``.
"""
