"""Synthetic cohorts (brain MRI, lung CT) for the demo, tests and studies.

Never needed to run the bundle on real data.
"""
