"""Simulated federations of hospitals on one machine, comparisons, reports, the demo."""
