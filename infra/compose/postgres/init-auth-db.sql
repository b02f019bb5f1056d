-- Runs once, when the PostgreSQL volume is first initialised: MLflow's basic-auth users and
-- permissions live in a database of their own, beside the tracking store ($POSTGRES_DB).
CREATE DATABASE mlflow_auth;
