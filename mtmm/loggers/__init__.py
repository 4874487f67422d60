"""Experiment trackers fed from the same records as metrics.jsonl."""
