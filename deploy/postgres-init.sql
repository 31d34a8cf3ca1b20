-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d), as POSTGRES_USER (san),
-- after it has created POSTGRES_DB (san, the service's job store). MLflow gets its own database, owned by san.
-- The Kubernetes manifests carry the same statement in deploy/k8s/postgres.yaml (ConfigMap postgres-init).
CREATE DATABASE mlflow;
