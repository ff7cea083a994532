"""Scores with their uncertainty, the test set every model is scored on, the winner chosen without
it, the reproduction report's protocols and the feature-set comparison."""
