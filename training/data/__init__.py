"""Datasets as FFCV ``.beton`` files: writers from the real distribution formats, the catalog, loaders.

This is the only package that imports ffcv, so another loader could replace it here alone.
"""
