"""The one typed config tree of a ring-rl run, validated at load.

`load_config(path, overrides)` reads a YAML file (or the defaults when path is None), applies
dotted overrides such as `trainer.lr=1e-5` (values parsed as YAML, so lists and mappings work),
and validates. Every mistake surfaces as one `ConfigError` naming the dotted key and what was
expected. `save_config` writes the resolved tree; a saved config loads back equal.
"""

from __future__ import annotations

import difflib
import os
import string
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that does not fit the tree; the message names the key."""


class _Section(BaseModel):
    # extra="forbid": a typo must fail loudly; validate_assignment keeps edits in code honest.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field("tiny", description="preset name (tiny, ring-mini-linear-2.0), a config.json or a checkpoint dir")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="dtype the weights are held and run in by the rollout engine")


class ArithArgs(_Section):
    n_train: int = Field(8000, ge=1, description="training problems of the synthetic set")
    n_test: int = Field(1000, ge=1, description="test problems (disjoint from training)")
    seed: int = Field(0, description="seed of the problem draw")
    max_operand: int = Field(99, ge=1, description="operands range over 0..max_operand")


class DataConfig(_Section):
    train_files: list[str] = Field(["runs/data/arith/train.jsonl"], description="JSONL/Parquet files or globs of training prompts")
    test_files: list[str] = Field(["runs/data/arith/test.jsonl"], description="JSONL/Parquet files or globs of evaluation prompts")
    format: Literal["auto", "gsm8k", "prompt_answer"] = Field("auto", description="row layout; auto picks by columns")
    prompt_template: str = Field("{prompt}", description="prompt text; {prompt} and {question} both stand for the row's question")
    max_prompt_tokens: int = Field(512, ge=1, description="prompts longer than this (in tokens) are bad rows")
    bad_rows: Literal["error", "skip"] = Field("error", description="a malformed row stops the load, or is skipped and counted")
    builtin: Literal["arith"] | None = Field(None, description="write this synthetic set to the train/test files when they are missing")
    builtin_args: ArithArgs = Field(default_factory=ArithArgs, description="size and seed of the builtin set")

    @field_validator("prompt_template")
    @classmethod
    def _known_placeholders(cls, v: str) -> str:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:  # an unbalanced brace
            raise ValueError(f"not a valid template ({e}); write literal braces as {{{{ }}}}") from None
        unknown = names - {"prompt", "question"}
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; use {{prompt}} or {{question}}")
        return v


class RewardConfig(_Section):
    kind: Literal["math_verify"] = Field("math_verify", description="how a response is scored against the gold answer")
    timeout_s: float = Field(5.0, gt=0, description="hard wall-clock limit per answer for the math_verify path")
    max_answer_chars: int = Field(256, ge=1, description="longer extracted answers score 0 without parsing")
    format_reward: float = Field(0.0, description="added when the answer is boxed or the response is a bare number")
    numeric_fast_path: bool = Field(False, description="compare two plain numbers exactly in-process instead of through math_verify (faster, same verdicts on plain numbers)")


class RolloutConfig(_Section):
    engine: Literal["native", "vllm"] = Field("native", description="generation engine")
    group_size: int = Field(8, ge=2, description="G: responses sampled per prompt")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 = off)")
    max_new_tokens: int = Field(6, ge=1, description="response length limit in tokens")
    num_actors: int = Field(1, ge=1, description="rollout actors")
    cpus_per_actor: float = Field(1.0, ge=0, description="Ray CPUs reserved per rollout actor")
    gpus_per_actor: float = Field(0.0, ge=0, description="Ray GPUs reserved per rollout actor")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel size per actor")
    weight_sync: Literal["object_store", "collective", "cuda_ipc"] = Field("object_store", description="how updated weights reach the rollout actors: through Ray's object store (host memory), broadcast by the trainer over a group of their own (NCCL between GPUs, gloo on CPU), or, for actors sharing the trainer's GPU, by CUDA IPC handles to the trainer's GPU memory (ring_rl.rl.weight_sync)")
    gpu_memory_utilization: float = Field(0.4, gt=0, lt=1, description="vLLM on a GPU: share of the card's memory it takes (weights, KV cache, state slots); the rest is a colocated trainer's")
    seed: int = Field(0, description="sampling seed (combined with step and actor rank)")
    max_staleness: int = Field(0, ge=0, le=1, description="weight versions a trained-on rollout may trail the trainer: 0 = on-policy; 1 = generate step n+1 while the trainer updates on step n (one-step off-policy, rollout and trainer busy at once)")


class TrainerConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="decay after warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup, in optimizer steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward/backward per worker")
    num_minibatches: int = Field(1, ge=1, description="optimizer steps per epoch over a GRPO step's sequences")
    ppo_epochs: int = Field(1, ge=1, description="passes over a GRPO step's sequences")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip (0 = off)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    clip_low: float = Field(0.2, ge=0, lt=1, description="ratio clipped below at 1 - clip_low")
    clip_high: float = Field(0.28, ge=0, description="ratio clipped above at 1 + clip_high (clip-higher)")
    loss_agg: Literal["token", "sequence"] = Field("token", description="mean over all tokens, or mean of per-sequence means")
    adv_std_norm: bool = Field(True, description="divide group-centred rewards by the group std")
    kl_coef: float = Field(0.0, ge=0, description="reference-model KL penalty weight (0 = off, no reference model)")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator for the reference penalty")
    filter_equal_reward_groups: bool = Field(False, description="drop groups whose rewards are all equal (zero advantage)")
    bf16: bool = Field(False, description="bf16 mixed precision in the trainer (fp32 master weights)")
    share_prompts: bool = Field(True, description="the trainer's forward and backward run each distinct prompt of a micro-batch once (a GRPO group shares it) instead of once per sample; same maths, fewer rows")


class GateRule(_Section):
    metric: str = Field("k3", min_length=1, description="alignment metric name, as alignment_checks reports it")
    op: Literal[">", "<"] = Field(">", description="the rule fires when `metric op threshold`")
    threshold: float = Field(0.01, description="the value compared against")
    action: Literal["warn", "skip", "abort"] = Field("warn", description="what happens when it fires")


class AlignmentConfig(_Section):
    policy: Literal["none", "recompute", "tis", "mis", "icepop"] = Field("recompute", description="what is done with the rollout/trainer mismatch")
    tis_cap: float = Field(2.0, ge=1, description="TIS: weight min(ratio, C)")
    mis_threshold: float = Field(2.0, gt=1, description="MIS: drop when ratio leaves [1/C, C]")
    mis_level: Literal["token", "sequence"] = Field("token", description="MIS drops tokens or whole sequences")
    icepop_alpha: float = Field(0.5, gt=0, lt=1, description="IcePop: mask when ratio < alpha")
    icepop_beta: float = Field(2.0, gt=1, description="IcePop: mask when ratio > beta")
    gate: list[GateRule] = Field([], description="rules checked before each update, in order")
    routing_replay: bool = Field(False, description="trainer replays the rollout's MoE expert choices")
    mode: Literal["default", "exact"] = Field("default", description="exact = the trainer's logprob pass replays the rollout's schedule (whole or chunked prefill, then one decode step per token; on CPU the same batches, on GPU batch-invariant kernels in both engines): bitwise-equal logprobs, checked every step")


class RunSection(_Section):
    dir: str = Field("runs/tiny-arith", description="run directory: checkpoints, metrics, report")
    steps: int = Field(100, ge=1, description="GRPO steps")
    prompts_per_step: int = Field(4, ge=1, description="prompts per step (each sampled group_size times)")
    seed: int = Field(0, description="seed for data order and initialisation")
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    eval_every: int = Field(0, ge=0, description="steps between evaluations (0 = off)")
    eval_prompts: int = Field(64, ge=0, description="test prompts per evaluation (0 = all)")
    resume: bool = Field(False, description="continue from the newest checkpoint in dir (error if none)")
    auto_resume: bool = Field(False, description="continue if dir has a checkpoint, else start fresh")


class SftConfig(_Section):
    enabled: bool = Field(False, description="build model.name_or_path by SFT when it holds no checkpoint yet")
    init_preset: str = Field("tiny", description="model preset the warm-up starts from (random init)")
    init_from: str | None = Field(None, description="checkpoint dir to start from instead (null = random init)")
    steps: int = Field(300, ge=1, description="warm-up optimizer steps (the most, with target_accuracy)")
    batch_size: int = Field(64, ge=1, description="examples per warm-up step")
    target_accuracy: float | None = Field(None, gt=0, le=1, description="stop once greedy accuracy on eval_prompts held-out train prompts reaches this (null = run all steps): the start's accuracy then does not hang on when training happens to take off")
    eval_every: int = Field(10, ge=1, description="steps between held-out checks (with target_accuracy)")
    eval_prompts: int = Field(256, ge=1, description="train prompts held out of the warm-up to check target_accuracy on")
    trainer: TrainerConfig = Field(default_factory=lambda: TrainerConfig(lr=1e-3), description="optimiser of the warm-up (lr, schedule, ZeRO stage)")


class RayConfig(_Section):
    address: str | None = Field(None, description="null: start Ray locally; 'auto' or host:port: join a cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance (null = all)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local Ray instance (null = all)")
    trainer_workers: int = Field(1, ge=1, description="trainer ranks (data parallel / ZeRO world size)")
    trainer_cpus_per_worker: float = Field(1.0, ge=0, description="Ray CPUs reserved per trainer rank")
    trainer_gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPUs reserved per trainer rank")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK"] = Field("PACK", description="Ray placement group strategy")
    call_timeout_s: float = Field(1800.0, gt=0, description="a remote call not answered in this time reports its actor as hung")
    max_rollout_restarts: int = Field(3, ge=0, description="dead or hung rollout actors replaced per run (their unfinished prompts re-run)")
    max_trainer_restarts: int = Field(2, ge=0, description="with run.resume/auto_resume: restarts from the newest checkpoint after a trainer actor failure")
    malloc_mmap_threshold_mb: int | None = Field(
        256, ge=1, description="glibc malloc in the Ray worker processes: blocks under this many MiB come from the "
        "heap and freed memory is kept for reuse (trimmed past 4x this), so CPU tensors do not page-fault in fresh "
        "mmaps; null: glibc's default, whose threshold climbs only as large blocks are freed (the first steps run slower)")


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="the policy model")
    data: DataConfig = Field(default_factory=DataConfig, description="prompt files and template")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="response scoring")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="generation")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="optimisation")
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig, description="rollout/trainer mismatch policy and gate")
    run: RunSection = Field(default_factory=RunSection, description="steps, checkpoints, evaluation")
    ray: RayConfig = Field(default_factory=RayConfig, description="cluster and resources")
    sft: SftConfig = Field(default_factory=SftConfig, description="supervised warm-up (`ring-rl sft`) before GRPO")

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        seqs = self.run.prompts_per_step * self.rollout.group_size
        if seqs % self.trainer.num_minibatches:
            raise ValueError(
                f"trainer.num_minibatches: {self.trainer.num_minibatches} does not divide the step's "
                f"{seqs} sequences (run.prompts_per_step * rollout.group_size)")
        if self.data.builtin is not None:
            folder = os.path.dirname(self.data.train_files[0]) if self.data.train_files else ""
            expected = ([os.path.join(folder, "train.jsonl")], [os.path.join(folder, "test.jsonl")])
            if (self.data.train_files, self.data.test_files) != expected:
                raise ValueError(f"data.builtin={self.data.builtin}: train_files/test_files must be "
                                 f"[DIR/train.jsonl] and [DIR/test.jsonl] in one DIR, got "
                                 f"{self.data.train_files} and {self.data.test_files}")
        if self.alignment.mode == "exact":
            self._check_exact()
            if self.rollout.max_staleness:
                raise ValueError("alignment.mode=exact needs the rollout's own weights in the trainer: "
                                 "set rollout.max_staleness=0")
        if self.rollout.weight_sync == "collective":
            self._check_collective_sync()
        if self.rollout.weight_sync == "cuda_ipc":
            self._check_cuda_ipc()
        if self.run.resume and self.run.auto_resume:
            raise ValueError("run.resume and run.auto_resume: set at most one")
        return self

    def _check_collective_sync(self) -> None:
        if self.rollout.max_staleness:
            raise ValueError("rollout.weight_sync=collective broadcasts the trainer's weights as they are; "
                             "with rollout.max_staleness=1 use weight_sync=object_store")
        shares = (self.rollout.gpus_per_actor, self.ray.trainer_gpus_per_worker)
        if any(0 < g < 1 for g in shares):
            raise ValueError(f"rollout.weight_sync=collective: NCCL needs every member on a GPU of its own, but "
                             f"rollout.gpus_per_actor={shares[0]} and ray.trainer_gpus_per_worker={shares[1]} "
                             "share one; colocated actors use weight_sync=object_store")

    def _check_cuda_ipc(self) -> None:
        shares = (self.rollout.gpus_per_actor, self.ray.trainer_gpus_per_worker)
        if not all(0 < g < 1 for g in shares):
            raise ValueError(f"rollout.weight_sync=cuda_ipc shares the trainer's GPU memory with rollout actors on the "
                             f"same GPU: rollout.gpus_per_actor and ray.trainer_gpus_per_worker must both be "
                             f"fractions of one GPU, got {shares[0]} and {shares[1]}")
        if self.rollout.max_staleness:
            raise ValueError("rollout.weight_sync=cuda_ipc hands out the trainer's live buffers; with "
                             "rollout.max_staleness=1 use weight_sync=object_store")

    def _check_exact(self) -> None:
        """Exact mode needs both engines to run the same arithmetic: same dtype, same threads."""
        if self.rollout.engine == "vllm" and not self.rollout.gpus_per_actor:
            raise ValueError("alignment.mode=exact with rollout.engine=vllm needs a GPU (rollout.gpus_per_actor > 0): "
                             "its batch-invariant attention reads vLLM's CUDA KV cache; on CPU use rollout.engine=native")
        if (self.model.dtype == "bf16") != self.trainer.bf16:
            raise ValueError(f"alignment.mode=exact: model.dtype={self.model.dtype} (rollout) and "
                             f"trainer.bf16={self.trainer.bf16} must agree")
        r, t = int(max(self.rollout.cpus_per_actor, 1)), int(max(self.ray.trainer_cpus_per_worker, 1))
        if not self.rollout.gpus_per_actor and r != t:
            raise ValueError(f"alignment.mode=exact: rollout.cpus_per_actor ({r}) and "
                             f"ray.trainer_cpus_per_worker ({t}) set the torch threads of each side; "
                             "CPU matmuls block by thread count, so they must be equal")


# ---------------------------------------------------------------- loading and saving

def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (or defaults), then `a.b=value` overrides, validated into a RunConfig."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r}: no such file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    for item in overrides:
        _apply_override(tree, item)
    return validate_config(tree, source=str(path) if path is not None else None)


def validate_config(tree: dict[str, Any], source: str | None = None) -> RunConfig:
    """Validate a plain nested dict; errors become one ConfigError listing every bad key."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        lines = [_describe_error(err) for err in e.errors()]
        where = f"config {source!r}" if source else "config"
        raise ConfigError(f"{where}: " + "; ".join(lines) if len(lines) == 1
                          else f"{where}: {len(lines)} problems:\n  " + "\n  ".join(lines)) from None


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved tree as YAML (atomically: a reader never sees half a file)."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _apply_override(tree: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. trainer.lr=1e-5")
    parts = key.split(".")
    if _is_text_field(parts) and raw.strip() not in ("null", "~"):
        value: Any = raw  # text fields take the raw text: YAML would turn "Q: {question}" into a mapping
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe_error(err: dict[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    key = ".".join(str(p) for p in loc)
    kind, got = err.get("type", ""), err.get("input")
    if kind == "extra_forbidden":
        hint = _close_match(loc)
        return f"unknown config key {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
    if kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        allowed = ",".join(a.strip().strip("'") for a in allowed.replace(" or ", ",").split(","))
        return f"{key}: {got!r} is not one of {allowed}"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if not loc:  # a cross-field check: its message names the keys itself
        return msg
    return f"{key}: {msg}, got {_short(got)}"


def _section_at(path: tuple) -> type[BaseModel] | None:
    """The section class a dotted path leads to (list indices skipped), or None."""
    model: Any = RunConfig
    for part in path:
        if isinstance(part, int) or str(part).isdigit():
            continue  # an index into a list of sections (alignment.gate.0)
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        model = getattr(ann, "__args__", (ann,))[0] if not isinstance(ann, type) else ann
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _is_text_field(parts: list[str]) -> bool:
    section = _section_at(tuple(parts[:-1]))
    field = section.model_fields.get(parts[-1]) if section else None
    return field is not None and field.annotation in (str, str | None)


def _close_match(loc: tuple) -> str | None:
    """The nearest field name beside an unknown key, e.g. trainer.lrr -> trainer.lr."""
    model = _section_at(loc[:-1])
    if model is None:
        return None
    hits = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    prefix = ".".join(str(p) for p in loc[:-1])
    return f"{prefix}.{hits[0]}" if hits and prefix else (hits[0] if hits else None)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
