"""Training on Ray: FFCV data (`training.data`), the JobSpec (`config`), the loop (`loop`), the Ray Train
launch (`launch`, `run`) and MLflow tracking (`tracking`). Never imports FastAPI."""
