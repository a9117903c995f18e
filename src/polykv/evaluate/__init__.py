"""Evaluation: task files, metrics and the shipped long-context task suite."""
