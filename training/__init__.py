"""Training on Ray: FFCV data, the training loop, job launch and MLflow tracking (see shared DESIGN.md).

Nothing lives here yet; the data writers and loaders, then the Ray Train jobs, arrive package by package.
"""
