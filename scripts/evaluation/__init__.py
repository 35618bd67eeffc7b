"""Evaluation against labels: the metric suite, the lesion report and plots."""
