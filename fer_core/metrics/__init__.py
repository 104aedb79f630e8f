"""Evaluation metrics, one family per module (import the module you need directly)."""
