-- One PostgreSQL for the stack: MLflow's database is created by the image (POSTGRES_DB);
-- Prefect's server and the Optuna studies get their own.
CREATE DATABASE prefect;
CREATE DATABASE optuna;
