"""Rollout-vs-trainer alignment: mismatch metrics, correction policies, the gate, the report."""
