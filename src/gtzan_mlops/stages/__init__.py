"""The pipeline's commands, one per dvc.yaml stage: settings in, libraries called, outputs
written."""
