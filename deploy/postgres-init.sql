-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d), by psql as the
-- superuser (POSTGRES_USER=postgres), with the container's environment. Two roles, neither a superuser, each
-- owning its own databases: san (the service's job store: database san) and mlflow (MLflow's backend store:
-- database mlflow; its basic-auth app's users and permissions: database mlflow_auth). CONNECT is revoked from
-- PUBLIC, so neither role can open the other's databases. Passwords: SAN_DB_PASSWORD, MLFLOW_DB_PASSWORD.
-- deploy/k8s/postgres.yaml carries this file verbatim (ConfigMap postgres-init); the deploy tests check it.
\set ON_ERROR_STOP on
\getenv san_password SAN_DB_PASSWORD
\getenv mlflow_password MLFLOW_DB_PASSWORD
\if :{?san_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'postgres-init.sql: set SAN_DB_PASSWORD in the postgres container'; END $$;
\endif
\if :{?mlflow_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'postgres-init.sql: set MLFLOW_DB_PASSWORD in the postgres container'; END $$;
\endif

CREATE ROLE san LOGIN PASSWORD :'san_password';
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE san OWNER san;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE CONNECT, TEMPORARY ON DATABASE san FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE mlflow FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE mlflow_auth FROM PUBLIC;
