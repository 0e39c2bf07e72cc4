"""MLflow tracking of pipeline runs: :mod:`.mlflow_adapter` (the only module importing mlflow),
:mod:`.collect` (reading stage outputs), :mod:`.track` (the ``track`` stage), :mod:`.serving` (the logged
model's form), :mod:`.promotion` (champion/challenger) and :mod:`.compare` (comparison report)."""
