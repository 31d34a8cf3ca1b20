"""The FastAPI job service over the Ray Jobs API (see shared DESIGN.md). Nothing lives here yet."""
