"""The quality harness: lip sync, identity, motion and frame-quality metrics of avatar videos (issue 8)."""
