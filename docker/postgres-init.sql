-- Run once by the postgres image on an empty volume, as POSTGRES_USER in POSTGRES_DB (mlflow):
-- the Prefect server's database beside MLflow's.
CREATE DATABASE prefect;
