"""Small, real, deterministically trained sample models used by qlin's tests and README.

Rebuild everything with ``python sample_models/make.py`` (see that file).
"""
