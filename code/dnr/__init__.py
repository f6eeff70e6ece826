"""dnr: Diagnosing & Re-learning for balanced multimodal learning, and the trainer around it.

Layout: data/ (datasets) -> models/ (encoders, fusion, classifier) -> diagnose.py (the D&R core)
-> methods/ (baseline, relearn, ...) -> engine.py (epoch loop pieces) -> ../main.py (the trainer).
"""
__version__ = "0.1.0"
