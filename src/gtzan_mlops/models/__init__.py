"""The model families: building, training and loading them, and the training records."""
