"""Rollout engines: the native engine (ring_rl.rollout.native) behind the RolloutWorker."""
