"""params.yaml read, overridden and validated into one typed object."""
