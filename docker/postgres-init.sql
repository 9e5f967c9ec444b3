-- MLflow keeps its own tables (and its own alembic version) apart from Optuna's.
CREATE DATABASE mlflow OWNER regsearch;
