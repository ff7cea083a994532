"""Promotion: the evaluated winner logged as the served model, scored with the champion on the
same raw audio, the behaviour gate, the rule that moves the champion alias, and registering it."""
