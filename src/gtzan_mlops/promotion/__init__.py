"""Promotion: served models scored on the same raw audio, the behaviour gate, the rule that
moves the champion alias, and the registry's champion as promotion meets it."""
