"""The cohort engine: datalists, the two-pass evaluator and its lung CT form."""
