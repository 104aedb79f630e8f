"""Training losses, one family per module (import the module you need directly)."""
