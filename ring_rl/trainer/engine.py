"""TrainerEngine: the policy model under DeepSpeed — logprobs, GRPO updates, SFT, checkpoints.

One instance per trainer rank. On CPU it runs a single-process gloo group; on GPUs one
process per GPU with NCCL (the env vars RANK/WORLD_SIZE/... come from the launcher or Ray).

Gradient accumulation is done here, not by DeepSpeed's micro-step counter: a minibatch has
as many micro-batches as its sequences need, each micro-batch's loss is scaled by its share
of the minibatch's tokens (or sequences), and the last one marks the accumulation boundary.
The sum of the micro-batch gradients is then exactly the gradient of the minibatch loss.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from ring_rl.config import TrainerConfig
from ring_rl.model.checkpoint import CheckpointError, load_checkpoint
from ring_rl.trainer.loss import kl_penalty, masked_aggregate, policy_loss
from ring_rl.trainer.stats import StepStats, check_batch
from ring_rl.trainer import checkpoint as ckpt
from ring_rl.trainer.distributed import init_distributed
from ring_rl.trainer.ds_config import build_ds_config, clips_itself, lr_factor
from ring_rl.trainer.logprobs import (FlatPolicy, logprob_temperature, micro_batches, pack, pack_rollout,
                                      score, stack_router_ids)
from ring_rl.types import (AlignmentReport, RolloutBatch, TensorDict, TensorList, TrainBatch,
                            check_policy_lag)


class TrainerEngine:
    def __init__(self, model_dir: str | os.PathLike, trainer_cfg: TrainerConfig, seed: int = 0,
                 device: str = "cpu", num_threads: int | None = None, total_steps: int | None = None):
        """total_steps: optimizer steps of the whole run (needed by the cosine schedule only)."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read by DeepSpeed on first use
        if num_threads:
            torch.set_num_threads(num_threads)
        torch.manual_seed(seed)
        self.cfg, self.model_dir = trainer_cfg, Path(model_dir)
        init_distributed(device)
        import deepspeed
        import torch.distributed as dist

        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # fp32 master weights; DeepSpeed casts the module to bf16 itself when configured.
        self.model = load_checkpoint(model_dir, dtype=torch.float32)
        self.moe_layers = [layer.layer_idx for layer in self.model.model.layers if layer.is_moe]
        self.policy = FlatPolicy(self.model)
        if trainer_cfg.zero_stage == 3:
            self._prepare_zero3(deepspeed)
        factor = lr_factor(trainer_cfg, total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.policy, model_parameters=[p for p in self.policy.parameters() if p.requires_grad],
            config=build_ds_config(trainer_cfg, self.world_size),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
        if trainer_cfg.zero_stage == 0 and self.engine.dp_world_size == 1:  # its all-reduce: copies, nothing summed
            self.engine.enable_backward_allreduce = False
        self.device = self.engine.device
        self.reference = None
        if trainer_cfg.kl_coef > 0:  # frozen copy of the starting weights, never sharded
            ref = load_checkpoint(model_dir, dtype=torch.bfloat16 if trainer_cfg.bf16 else torch.float32)
            self.reference = FlatPolicy(ref.to(self.device).requires_grad_(False)).eval()
        self.version = 0      # weight version: +1 per train_step / sft_step
        self.optimizer_steps = 0

    def _prepare_zero3(self, deepspeed) -> None:
        """ZeRO-3 gathers a module's own parameters when its forward runs. A few are read by
        their parent instead (the lightning output norm's weight, the router and the stacked
        experts inside MoE, the lm_head in FlatPolicy): make those parents leaves (gathered
        whole) and register the lm_head as an external parameter of FlatPolicy."""
        from deepspeed.utils import set_z3_leaf_modules

        from ring_rl.model.attention import LightningAttention
        from ring_rl.model.mlp import MoE

        set_z3_leaf_modules(self.model, [LightningAttention, MoE], raise_if_not_found=False)
        deepspeed.zero.register_external_parameter(self.policy, self.model.lm_head.weight)

    def _gathered(self, modify: bool = False):
        """Full parameters on every rank for the duration (ZeRO-3); a no-op below stage 3."""
        if self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0 if modify else None)

    # -- logprobs -------------------------------------------------------------------------
    def _pack_rollout(self, rollout: RolloutBatch, idx: list[int], replay: bool):
        return pack_rollout(rollout, idx, self.device, self.moe_layers, self.cfg.share_prompts, replay)

    @torch.no_grad()
    def compute_logprobs(self, rollout: RolloutBatch, temperature: float | None = None,
                         replay_routing: bool = False, exact: bool = False):
        """→ (logprobs, entropies, router_ids), one entry per sequence.

        logprobs[i], entropies[i]: fp32 [R_i] on the CPU for response token t given the
        prompt and tokens < t. router_ids[i]: the trainer's experts [num_moe_layers, P_i+R_i-1,
        top_k] int16, layers sorted (the RolloutBatch layout; [L, 0, k] for an empty response).
        With replay_routing the rollout's recorded experts are forced in every MoE layer.
        exact: replay the rollout's own schedule instead (`exact_logprobs`; its experts are
        the rollout's by construction, so replay_routing changes nothing there)."""
        if exact:
            return self.exact_logprobs(rollout, temperature)
        temperature = temperature or logprob_temperature(rollout.sampling)
        if replay_routing and rollout.router_ids is None:
            raise ValueError("replay_routing=True but the rollout batch has no router_ids")
        out = self._no_scores(len(rollout))
        live = [i for i in range(len(rollout)) if len(rollout.response_ids[i]) > 0]
        for idx in micro_batches(live, self.cfg.micro_batch_size):
            packed = self._pack_rollout(rollout, idx, replay_routing)
            self._put_scores(out, idx, packed, *score(self.engine, packed, temperature))
        return out

    def _no_scores(self, n: int) -> tuple[TensorList, TensorList, TensorList]:
        """compute_logprobs' result for n empty responses, to be filled by _put_scores."""
        k = self.model.config.num_experts_per_tok
        return (TensorList(torch.zeros(0) for _ in range(n)), TensorList(torch.zeros(0) for _ in range(n)),
                TensorList(torch.zeros(len(self.moe_layers), 0, k, dtype=torch.int16) for _ in range(n)))

    @staticmethod
    def _put_scores(out, idx: list[int], packed, logp, ent, router_ids) -> None:
        """One scored packed batch of sequences `idx` into compute_logprobs' lists."""
        logprobs, entropies, routers = out
        ids = stack_router_ids(router_ids, packed.seqlens.tolist())
        for j, (lp, en) in enumerate(zip(packed.split(logp.detach().float().cpu()), packed.split(ent.float().cpu()))):
            logprobs[idx[j]], entropies[idx[j]] = lp, en
            if ids[j] is not None:
                routers[idx[j]] = ids[j]

    @torch.no_grad()
    def exact_logprobs(self, rollout: RolloutBatch, temperature: float | None = None):
        """compute_logprobs' result in exact mode: the rollout's own schedule replayed.

        Each engine call recorded in `rollout.schedule` is re-run through
        `ring_rl.model.stepping.run_schedule` (same packed prefill and chunking, the same
        rows at every decode step, the recorded tokens fed back), so on the same weights,
        dtype and thread count the logprobs and experts are bitwise the rollout's. On a GPU it
        runs `BATCH_INVARIANT_OPS` like the exact-mode engines, so vLLM's unknown batches do not
        matter. Gradients still come from the fast packed forward in train_step."""
        from ring_rl.model.ops import BATCH_INVARIANT_OPS, using_ops
        from ring_rl.model.stepping import ReplayChooser, run_schedule, stack_routes

        temperature = temperature or logprob_temperature(rollout.sampling)
        n = len(rollout)
        schedule = rollout.schedule or [list(range(n))]
        if sorted(i for part in schedule for i in part) != list(range(n)):
            raise ValueError(f"exact mode: rollout.schedule does not cover the {n} sequences exactly once")
        logprobs, entropies, routers = [None] * n, [None] * n, [None] * n
        was_training = self.model.training
        self.model.eval()
        try:
            ops = BATCH_INVARIANT_OPS if self.device.type == "cuda" else self.model.ops
            with self._gathered(), using_ops(self.model, ops):
                for part in schedule:
                    responses = [rollout.response_ids[i] for i in part]
                    if any(r.numel() == 0 for r in responses):
                        raise ValueError("exact mode: a rollout sequence has an empty response")
                    res = run_schedule(self.model, [rollout.prompt_ids[i].tolist() for i in part],
                                       max(r.numel() for r in responses), ReplayChooser(responses),
                                       temperature, rollout.prefill_chunk, with_entropy=True)
                    for j, i in enumerate(part):
                        logprobs[i] = res.logprobs[j].float().cpu()
                        entropies[i] = res.entropies[j].float().cpu()
                        routers[i] = stack_routes(res.routes[j])
        finally:
            self.model.train(was_training)
        return TensorList(logprobs), TensorList(entropies), TensorList(routers)

    # -- GRPO update ------------------------------------------------------------------------
    def check_and_train(self, batch: TrainBatch, check, replay_routing: bool = False, exact: bool = False,
                        max_lag: int = 0) -> tuple[dict[str, float], AlignmentReport]:
        """The step's alignment check, then its update unless the check forbids it.

        check(rollout, trainer_logprobs, trainer_router_ids) -> AlignmentReport (the driver's
        `alignment_checks.step.StepCheck`) sees the trainer's logprobs of the rollout's tokens
        under the weights before the update, and picks the update's old logprobs and token
        weights. When the update is a single pass (one epoch, one minibatch, one micro-batch;
        not exact mode, which keeps its own replay pass), that pass's forward is the logprob
        pass: the check runs on its detached logprobs before backward, so the ratio against
        recomputed old logprobs is exactly 1, as it would be after a separate recompute.
        Otherwise the logprobs come from `compute_logprobs` first.
        max_lag: how many versions the rollout's weights may trail this trainer's
        (rollout.max_staleness); beyond that StaleWeightsError. → (train stats, {} when the
        update did not run; the report)."""
        rollout = batch.rollout
        lag = check_policy_lag(self.version, rollout.weight_version, max_lag)
        live = [i for i in range(len(rollout)) if len(rollout.response_ids[i]) > 0]
        cfg = self.cfg
        if (not exact and live and cfg.ppo_epochs == 1 and cfg.num_minibatches == 1
                and len(live) <= cfg.micro_batch_size):
            stats, report = self._fused_step(batch, check, live, replay_routing)
        else:
            t0 = time.perf_counter()
            logprobs, _, router_ids = self.compute_logprobs(rollout, None, replay_routing, exact)
            t_logprobs = time.perf_counter() - t0
            report = check(rollout, logprobs, router_ids)
            stats = {}
            if report.update:
                stats = self.train_step(replace(batch, old_logprobs=report.old_logprobs,
                                                token_weights=report.token_weights), replay_routing)
                stats.update(logprob_s=t_logprobs, fused=0.0)
        report.metrics.update({"rollout/staleness": float(lag), "weights/version": self.version})
        return stats, report

    def _fused_step(self, batch: TrainBatch, check, live: list[int], replay: bool):
        """check_and_train's single pass: one forward serves the check and the update."""
        t0, rollout = time.perf_counter(), batch.rollout
        temperature = logprob_temperature(rollout.sampling)
        self.engine.set_gradient_accumulation_boundary(True)
        packed = self._pack_rollout(rollout, live, replay)
        logp, ent, router_ids = score(self.engine, packed, temperature)
        scores = self._no_scores(len(rollout))
        self._put_scores(scores, live, packed, logp, ent, router_ids)
        report = check(rollout, scores[0], scores[2])
        if not report.update:
            return {}, report
        batch = replace(batch, old_logprobs=report.old_logprobs, token_weights=report.token_weights)
        check_batch(batch, batch.old_logprobs)
        acc = StepStats()
        lens = {i: len(rollout.response_ids[i]) for i in live}
        self._micro_step(batch, batch.old_logprobs, packed, logp, ent, live, lens, 1.0, temperature, acc)
        acc.add_step(*self._optimizer_step())
        return self._finish(acc, t0, logprob_s=0.0, fused=1.0), report

    def train_step(self, batch: TrainBatch, replay_routing: bool = False) -> dict[str, float]:
        """ppo_epochs x num_minibatches optimizer steps over the batch's sequences."""
        t0, cfg = time.perf_counter(), self.cfg
        rollout = batch.rollout
        temperature = logprob_temperature(rollout.sampling)
        old = batch.old_logprobs
        if old is None:  # the weights before this update are the old policy
            old = self.compute_logprobs(rollout, temperature, replay_routing)[0]
        check_batch(batch, old)
        n, parts = len(rollout), cfg.num_minibatches
        bounds = [round(j * n / parts) for j in range(parts + 1)]
        acc = StepStats()
        for _ in range(cfg.ppo_epochs):
            for lo, hi in zip(bounds, bounds[1:]):
                live = [i for i in range(lo, hi) if len(rollout.response_ids[i]) > 0]
                if live:
                    self._minibatch_step(batch, old, live, temperature, replay_routing, acc)
        return self._finish(acc, t0)

    def _finish(self, acc: "StepStats", t0: float, **extra: float) -> dict[str, float]:
        self.version += 1
        elapsed = time.perf_counter() - t0
        out = acc.result()
        out.update({"time_s": elapsed, "tokens_per_s": acc.tokens / max(elapsed, 1e-9), "version": self.version},
                   **extra)
        return out

    def _minibatch_step(self, batch, old, live, temperature, replay, acc: "StepStats") -> None:
        cfg, rollout = self.cfg, batch.rollout
        lens = {i: len(rollout.response_ids[i]) for i in live}
        # Denominator of the whole minibatch: token-mean over all its tokens, or the mean
        # over its sequences (every live sequence has >= 1 token).
        denom = sum(lens.values()) if cfg.loss_agg == "token" else len(live)
        chunks = micro_batches(live, cfg.micro_batch_size)
        for j, idx in enumerate(chunks):
            self.engine.set_gradient_accumulation_boundary(j == len(chunks) - 1)
            packed = self._pack_rollout(rollout, idx, replay)
            logp, ent, _ = score(self.engine, packed, temperature)
            share = (sum(lens[i] for i in idx) if cfg.loss_agg == "token" else len(idx)) / denom
            self._micro_step(batch, old, packed, logp, ent, idx, lens, share, temperature, acc)
        acc.add_step(*self._optimizer_step())

    def _micro_step(self, batch, old, packed, logp, ent, idx, lens, share, temperature, acc: "StepStats") -> None:
        """Loss of one scored micro-batch (sequences `idx`), scaled by its `share` of the
        minibatch, and its backward."""
        cfg = self.cfg
        logp2d = packed.padded(logp)
        mask = packed.padded(torch.ones_like(logp, dtype=torch.bool), False)
        old2d = packed.padded(torch.cat([old[i] for i in idx]).to(logp.device, torch.float32))
        weights = None
        if batch.token_weights is not None:
            weights = packed.padded(torch.cat([batch.token_weights[i] for i in idx]).to(logp.device, torch.float32))
        adv = batch.advantages[idx].float().to(logp.device)
        loss, stats = policy_loss(logp2d, old2d, adv, mask, cfg.clip_low, cfg.clip_high, cfg.loss_agg, weights)
        if self.reference is not None:
            with torch.no_grad():
                ref_logp, _, _ = score(self.reference, packed, temperature, with_entropy=False)
            ref2d = packed.padded(ref_logp)
            kl = masked_aggregate(kl_penalty(logp2d, ref2d, mask, cfg.kl_kind), mask, cfg.loss_agg)
            loss = loss + cfg.kl_coef * kl
            stats["kl_ref"] = kl.detach()
        self.engine.backward(loss * share, scale_wrt_gas=False)
        acc.add_micro(loss.detach() * share, stats, ent, sum(lens[i] for i in idx))

    def _optimizer_step(self) -> tuple[float, float]:
        """engine.step() at the boundary → (grad norm before clipping, lr used)."""
        lr = float(self.engine.get_lr()[0])
        own_norm = None
        if clips_itself(self.cfg):
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm, foreach=True)
            own_norm = float(norm)
        self.engine.step()
        self.optimizer_steps += 1
        norm = self.engine.get_global_grad_norm()
        return (own_norm if norm is None else float(norm)), lr

    # -- supervised warm-up -------------------------------------------------------------------
    def sft_step(self, input_ids: list[list[int]], loss_mask: list[list[int]]) -> dict[str, float]:
        """One optimizer step of mean cross-entropy over the tokens with loss_mask 1 (a
        token's loss is read from the previous position's logits; position 0 must be 0)."""
        t0 = time.perf_counter()
        seqs = [torch.tensor(s, dtype=torch.long) for s in input_ids]
        masks = [torch.tensor(m, dtype=torch.bool) for m in loss_mask]
        counts = [int(m[1:].sum()) for m in masks]
        live = [i for i, c in enumerate(counts) if c > 0]
        if not live:
            raise ValueError("sft_step: no token has loss_mask 1")
        total = sum(counts)
        chunks = micro_batches(live, self.cfg.micro_batch_size)
        loss_sum = 0.0
        for j, idx in enumerate(chunks):
            self.engine.set_gradient_accumulation_boundary(j == len(chunks) - 1)
            packed = pack([seqs[i] for i in idx], [masks[i] for i in idx], self.device)
            logp, _, _ = score(self.engine, packed, 1.0, with_entropy=False)
            loss = -logp.sum() / total
            self.engine.backward(loss, scale_wrt_gas=False)
            loss_sum += float(loss.detach())
        grad_norm, lr = self._optimizer_step()
        self.version += 1
        elapsed = time.perf_counter() - t0
        return {"loss": loss_sum, "grad_norm": grad_norm, "lr": lr, "tokens": total,
                "tokens_per_s": total / max(elapsed, 1e-9), "time_s": elapsed}

    # -- weights and checkpoints -------------------------------------------------------------
    def weights_for_rollout(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, CPU copies of the model's state_dict) — full tensors even under ZeRO-3."""
        with self._gathered():
            state = TensorDict.packed([(k, v.detach()) for k, v in self.model.state_dict().items()])
        return self.version, state

    def save_model(self, directory: str | os.PathLike) -> None:
        """HF weights only (config.json + model.safetensors), e.g. the result of SFT."""
        with self._gathered():
            if self.rank == 0:
                ckpt.write_weights(Path(directory), self.model)

    def save(self, directory: str | os.PathLike) -> Path:
        """Weights + optimizer + scheduler + counters into `directory`, atomically."""
        import torch.distributed as dist

        final = Path(directory)
        staging = ckpt.staging_dir(final, self.optimizer_steps)
        if self.rank == 0:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        with self._gathered():
            if self.rank == 0:
                ckpt.write_weights(staging, self.model)
        payload = {"optimizer": ckpt.plain_state(self.engine.optimizer.state_dict()),
                   "scheduler": ckpt.plain_state(self.scheduler.state_dict()),
                   "version": self.version, "optimizer_steps": self.optimizer_steps}
        ckpt.write_optimizer_file(staging, self.rank, payload)
        dist.barrier()
        if self.rank == 0:
            ckpt.commit(staging, final, self._layout())
        dist.barrier()
        return final

    def _layout(self) -> dict:
        return {"version": self.version, "optimizer_steps": self.optimizer_steps, "zero_stage": self.cfg.zero_stage,
                "world_size": self.world_size, "bf16": self.cfg.bf16}

    def load(self, directory: str | os.PathLike) -> None:
        """Restore a `save`d state; training then continues as if never stopped."""
        directory = Path(directory)
        state = ckpt.read_state(directory)
        for key in ("zero_stage", "world_size", "bf16"):
            if state[key] != self._layout()[key]:
                raise CheckpointError(f"{directory / ckpt.STATE_FILE}: saved with {key}={state[key]!r}, "
                                      f"this trainer has {key}={self._layout()[key]!r}")
        payload = ckpt.read_optimizer_file(directory, self.rank)
        with self._gathered(modify=True):
            if self.rank == 0 or self.cfg.zero_stage != 3:
                ckpt.load_weights_into(self.model, directory)
        optimizer = self.engine.optimizer
        merged = ckpt.merge_state(optimizer.state_dict(), payload["optimizer"])
        if self.cfg.zero_stage > 0:
            optimizer.load_state_dict([merged], load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            optimizer.load_state_dict(merged)
        self.scheduler.load_state_dict(payload["scheduler"])
        self.version, self.optimizer_steps = int(payload["version"]), int(payload["optimizer_steps"])
