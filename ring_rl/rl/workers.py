"""The driver's handle on its actors: one trainer, N rollout workers, versioned weights.

Every remote call has a deadline (`ray.call_timeout_s`), so a hung actor is reported instead
of waited on. Faults are handled by role:
- a rollout actor that dies or hangs is killed and replaced in its placement bundle; the
  replacement gets the current weights and re-runs the calls it owed (its share of the
  step's prompts, with the same per-sequence seeds), so the merged batch holds each sequence
  exactly once (at most `ray.max_rollout_restarts` replacements per run);
- a trainer actor that dies or hangs raises `TrainerFailed`: its optimizer state is gone, so
  the step ends there and the driver resumes from the newest checkpoint or stops."""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from ring_rl.config import RunConfig
from ring_rl.rl.placement import actor_groups, init_ray, placed
from ring_rl.rollout.worker import RolloutWorker
from ring_rl.types import RolloutBatch, SamplingParams, TrainBatch

log = logging.getLogger(__name__)


class ActorFailed(RuntimeError):
    """An actor died or did not answer in time (the message names the actor and the call)."""


class TrainerFailed(ActorFailed):
    """The trainer actor is gone or hung: the run can only go on from a checkpoint."""


class RolloutFailed(ActorFailed):
    """A rollout actor failed and no replacement was allowed or possible."""


class ActorStartFailed(ActorFailed):
    """An actor's constructor raised (a bad config or model dir): restarting will not help."""


class Workers:
    def __init__(self, cfg: RunConfig, model_dir: str | Path, trainer_state: Path | None = None):
        init_ray(cfg)
        self.cfg, self.model_dir = cfg, str(model_dir)
        self.timeout_s = cfg.ray.call_timeout_s
        self.restarts_left = cfg.ray.max_rollout_restarts
        self.restarts = 0  # rollout actors replaced so far in this run
        self.sync_bytes = 0  # bytes of the last collective weight broadcast (rollout.weight_sync=collective)
        self.pg, trainer_idx, self.rollout_bundles = actor_groups(cfg)
        self.trainer, self.rollouts = None, []
        self._payload = None  # the last weights sent, kept when steps overlap (see sync_weights)
        try:
            self._start(trainer_idx[0], trainer_state)
        except BaseException:  # a failed start must not keep the bundles a retry needs
            self.shutdown()
            raise

    def _start(self, trainer_bundle: int, trainer_state: Path | None) -> None:
        from ring_rl.trainer.actor import TrainerActor

        cfg = self.cfg
        t_cpus, t_gpus = cfg.ray.trainer_cpus_per_worker, cfg.ray.trainer_gpus_per_worker
        device = "cuda" if t_gpus else "cpu"
        self.trainer = TrainerActor.options(**placed(self.pg, trainer_bundle, t_cpus, t_gpus)).remote(
            self.model_dir, cfg.trainer, cfg.run.seed, device, int(max(t_cpus, 1)),
            cfg.run.steps * cfg.trainer.ppo_epochs * cfg.trainer.num_minibatches)
        self.rollouts = [self._start_rollout(b) for b in self.rollout_bundles]
        if trainer_state is not None:
            self._trainer_get("load", self.trainer.load.remote(str(trainer_state)))
        self._sync_generation = 0
        if cfg.rollout.weight_sync == "collective":
            self._join_sync_group()
        self.version = -1
        self.sync_weights()  # rollout starts from the trainer's weights (a resumed run's too)

    # -- trainer -----------------------------------------------------------------------------
    def _trainer_get(self, what: str, ref):
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except GetTimeoutError:
            raise TrainerFailed(f"trainer actor: {what} did not answer in {self.timeout_s:.0f} s "
                                "(hung? ray.call_timeout_s sets the limit)") from None
        except RayActorError as e:
            if e.actor_init_failed:
                raise ActorStartFailed(f"trainer actor failed to start: {_cause(e)}") from None
            raise TrainerFailed(f"trainer actor died during {what}: {_first_line(e)}") from None

    def submit_check_and_train(self, batch: TrainBatch, check) -> ray.ObjectRef:
        """Start the step's alignment check and update in the trainer (`check_and_train`);
        `trainer_result` waits for its (train stats, AlignmentReport). The driver may use the
        rollout actors meanwhile (rollout.max_staleness=1)."""
        return self.trainer.check_and_train.remote(batch, check, self.cfg.alignment.routing_replay,
                                                   self.cfg.alignment.mode == "exact", self.cfg.rollout.max_staleness)

    def trainer_result(self, ref: ray.ObjectRef, what: str = "check_and_train"):
        return self._trainer_get(what, ref)

    def save_trainer(self, path: Path) -> None:
        self._trainer_get("save", self.trainer.save.remote(str(path)))

    # -- rollout -----------------------------------------------------------------------------
    def _start_rollout(self, bundle: int):
        r_cpus, r_gpus = self.cfg.rollout.cpus_per_actor, self.cfg.rollout.gpus_per_actor
        return ray.remote(RolloutWorker).options(**placed(self.pg, bundle, r_cpus, r_gpus)).remote(
            self.model_dir, self.cfg.rollout.engine, self.cfg.model.dtype, "cuda" if r_gpus else "cpu",
            0, int(max(r_cpus, 1)), self.cfg.rollout.gpu_memory_utilization,
            self.cfg.alignment.mode == "exact", own_process=True)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int],
                 group_ids: list[int], expect_version: bool = True) -> RolloutBatch:
        """Split the sequences over the rollout workers (whole groups stay together) and merge."""
        n = len(self.rollouts)
        bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
        version = self.version if expect_version else None
        chunks = {i: (lo, hi) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])) if hi > lo}
        parts = self._on_rollouts(
            {i: (lambda w, lo=lo, hi=hi: w.generate.remote(prompts[lo:hi], params, version, seeds[lo:hi],
                                                           group_ids[lo:hi]))
             for i, (lo, hi) in chunks.items()},
            "generate", reload_weights=True)
        parts = [parts[i] for i in sorted(parts)]
        batch = RolloutBatch.concat(parts)  # keeps each actor's call as one schedule entry (exact mode)
        if list(batch.group_ids) != list(group_ids):  # each sequence once, in order, re-runs included
            raise RuntimeError(f"rollout merge: {len(batch.group_ids)} sequences back for {len(group_ids)} sent")
        return batch

    def request_weights(self) -> ray.ObjectRef:
        """Ask the trainer for its weights now (ahead of any call queued after this one);
        `sync_weights(ref)` hands them out later."""
        return self.trainer.weights_for_rollout.remote()

    def sync_weights(self, requested: ray.ObjectRef | None = None) -> int:
        """Trainer → object store → every rollout worker; returns the new version. The
        trainer's result goes to the workers as an ObjectRef, never through the driver.
        requested: a `request_weights()` made earlier, else the trainer's weights now.
        With rollout.weight_sync=collective the trainer broadcasts them instead."""
        if self.cfg.rollout.weight_sync == "collective":
            return self._broadcast_weights()
        if self.cfg.rollout.weight_sync == "cuda_ipc":  # handles, not weights, through Ray
            payload, load = self.trainer.weights_ipc.remote(), "load_weights_ipc"
        else:
            payload, load = self._weights_payload(requested), "load_weights_payload"
        versions = self._on_rollouts({i: (lambda w: getattr(w, load).remote(payload))
                                      for i in range(len(self.rollouts))}, "load_weights", reload_weights=False)
        self.version = versions[0]
        # Overlapped steps generate while the trainer already holds newer weights: a replaced
        # rollout actor must get these, so keep them (one more copy in the object store).
        self._payload = payload if self.cfg.rollout.max_staleness else None
        return self.version

    def _join_sync_group(self) -> None:
        """(Re)build the trainer → rollout broadcast group (ring_rl.rl.weight_sync); again
        after a rollout actor was replaced, since a group's members are fixed."""
        self._sync_generation += 1
        (host, port), manifest = self._trainer_get("sync_setup", self.trainer.sync_setup.remote())
        world, gen = 1 + len(self.rollouts), self._sync_generation
        refs = [self.trainer.sync_join.remote(host, port, world, gen)]
        refs += [r.sync_join.remote(host, port, i + 1, world, manifest, gen) for i, r in enumerate(self.rollouts)]
        try:
            ray.get(refs, timeout=self.timeout_s)
        except (GetTimeoutError, RayActorError) as e:
            raise ActorFailed(f"weight-sync group ({world} members at {host}:{port}) did not form: "
                              f"{_first_line(e)}") from None

    def _broadcast_weights(self) -> int:
        send = self.trainer.sync_send.remote()
        try:
            versions = ray.get([r.sync_receive.remote() for r in self.rollouts], timeout=self.timeout_s)
        except (GetTimeoutError, RayActorError) as e:
            raise RolloutFailed(f"weight broadcast to the rollout actors failed: {_first_line(e)}") from None
        version, self.sync_bytes = self._trainer_get("sync_send", send)
        if set(versions) != {version}:
            raise RolloutFailed(f"weight broadcast: rollout actors report versions {versions}, the trainer sent {version}")
        self.version = version
        return version

    def _weights_payload(self, requested: ray.ObjectRef | None = None):
        """The trainer's (version, state dict) as an ObjectRef, once it exists. Waiting here
        (without pulling the weights into the driver) keeps a hung trainer from looking like
        hung rollout actors that wait on their argument."""
        payload = requested if requested is not None else self.request_weights()
        if not ray.wait([payload], timeout=self.timeout_s, fetch_local=False)[0]:
            raise TrainerFailed(f"trainer actor: weights_for_rollout did not answer in {self.timeout_s:.0f} s "
                                "(hung? ray.call_timeout_s sets the limit)")
        return payload

    def _on_rollouts(self, calls: dict[int, Callable[[Any], Any]], what: str, reload_weights: bool) -> dict[int, Any]:
        """`calls[i](actor_i)` on each listed rollout actor, results by index. A dead or hung
        actor is replaced (with the current weights if `reload_weights`) and its call re-run."""
        pending = {}  # ObjectRef -> (actor index, deadline)

        def submit(i: int) -> None:
            pending[calls[i](self.rollouts[i])] = (i, time.monotonic() + self.timeout_s)

        for i in calls:
            submit(i)
        results: dict[int, Any] = {}
        while pending:
            wait_s = max(0.0, min(d for _, d in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            failed = []
            for ref in ready:
                i, _ = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except RayActorError as e:
                    self._raise_unless_rollout_died(e, i, what)
                    failed.append((i, f"died during {what} ({_first_line(e)})"))
            now = time.monotonic()
            for ref, (i, deadline) in list(pending.items()):
                if deadline <= now:
                    pending.pop(ref)
                    failed.append((i, f"did not answer {what} in {self.timeout_s:.0f} s (hung?)"))
            for i, reason in failed:
                self._replace_rollout(i, reason, reload_weights)
                submit(i)
        return results

    def _raise_unless_rollout_died(self, e: RayActorError, i: int, what: str) -> None:
        """An argument's failure arrives as the callee's error: the weights payload of a dead
        trainer must not look like dead rollout actors. A replacement that cannot even start
        will not start the next time either."""
        trainer = e.actor_id is not None and e.actor_id == self.trainer._actor_id.hex()
        if e.actor_init_failed:
            raise ActorStartFailed(f"{'trainer actor' if trainer else f'rollout actor {i}'} failed to start: "
                                   f"{_cause(e)}") from None
        if trainer:
            raise TrainerFailed(f"trainer actor died before {what} on rollout actor {i}: {_first_line(e)}") from None

    def _replace_rollout(self, i: int, reason: str, reload_weights: bool) -> None:
        if self.restarts_left <= 0:
            raise RolloutFailed(f"rollout actor {i} {reason}; no replacement left "
                                f"(ray.max_rollout_restarts={self.cfg.ray.max_rollout_restarts} used up)")
        self.restarts_left -= 1
        self.restarts += 1
        log.warning("rollout actor %d %s: replacing it (weights version %d) and re-running its prompts",
                    i, reason, self.version)
        ray.kill(self.rollouts[i], no_restart=True)
        self.rollouts[i] = self._start_rollout(self.rollout_bundles[i])
        if self.cfg.rollout.weight_sync == "collective":
            self._join_sync_group()  # the replacement's first weights still come through the object store
        if reload_weights and self.version >= 0:
            payload = self._payload if self._payload is not None else self._weights_payload()
            try:
                got = ray.get(self.rollouts[i].load_weights_payload.remote(payload), timeout=self.timeout_s)
            except GetTimeoutError:
                raise RolloutFailed(f"replacement rollout actor {i}: loading weights took over "
                                    f"{self.timeout_s:.0f} s") from None
            except RayActorError as e:
                self._raise_unless_rollout_died(e, i, "load_weights")
                raise RolloutFailed(f"replacement rollout actor {i} died loading weights: {_first_line(e)}") from None
            if got != self.version:
                raise RolloutFailed(f"replacement rollout actor {i} got weights version {got}, "
                                    f"the others have {self.version}")

    # -- teardown ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for actor in [self.trainer, *self.rollouts]:
            if actor is not None:
                ray.kill(actor)
        remove_placement_group(self.pg)


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # Ray colours its messages
    return text[0][:300] if text else type(e).__name__


def _cause(e: BaseException) -> str:
    """The exception line at the bottom of a remote traceback ("ValueError: ..."), if any."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*:", ln)]
    return (errors[-1] if errors else _first_line(e))[:500]
