"""Scores with their uncertainty, the selection and promotion rules, behaviour checks."""
