"""Training the tiny Live Avatar models from scratch on a synthetic talking-avatar domain (issue 8)."""
