"""Operations: deletion requests (ledger), the scheduled deletion run, the MLflow model registry and review, ONNX export, Prefect orchestration."""
