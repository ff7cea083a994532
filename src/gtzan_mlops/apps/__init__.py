"""The commands that run a registered model: predict, serve, listen."""
