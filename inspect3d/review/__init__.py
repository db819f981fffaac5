"""QA review: HTML reports, review decisions in the watcher's store, reviewed labels as a manifest.

Scoring-path code: numpy, OpenCV, jinja2 and the standard library only (no torch), so it runs on
the shop-floor PC beside the watcher.
"""
