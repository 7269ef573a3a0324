"""The config tree: defaults, YAML + overrides, error messages, save/load round trip."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from ring_rl.config import ConfigError, GateRule, RunConfig, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def _error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


def test_tiny_arith_yaml_loads():
    cfg = load_config(REPO / "configs" / "tiny-arith.yaml", [])
    assert cfg.sft.init_preset == "tiny" and cfg.sft.enabled and cfg.data.builtin == "arith"
    assert cfg.rollout.group_size == 8 and cfg.rollout.engine == "native"
    assert cfg.trainer.zero_stage == 0 and cfg.alignment.policy == "recompute"
    assert cfg.alignment.gate == [GateRule(metric="k3", op=">", threshold=0.01, action="warn")]
    assert cfg.data.train_files == ["runs/data/arith/train.jsonl"]
    assert cfg.run.dir == "runs/tiny-arith"


def test_overrides_are_yaml_values():
    cfg = load_config(None, [
        "trainer.lr=1e-5", "trainer.zero_stage=3", "trainer.adv_std_norm=false",
        "data.train_files=[a.jsonl, b.parquet]", "ray.address=null", "ray.num_cpus=4",
        'alignment.gate=[{metric: k3, op: "<", threshold: 2, action: abort}]',
        "data.prompt_template=Q: {question} A:",  # text fields take the raw text, not YAML
    ])
    assert cfg.trainer.lr == 1e-5 and isinstance(cfg.trainer.lr, float)
    assert cfg.trainer.zero_stage == 3 and cfg.trainer.adv_std_norm is False
    assert cfg.data.train_files == ["a.jsonl", "b.parquet"]
    assert cfg.ray.address is None and cfg.ray.num_cpus == 4
    assert cfg.alignment.gate[0].action == "abort" and cfg.alignment.gate[0].threshold == 2.0
    assert cfg.data.prompt_template == "Q: {question} A:"


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 0.5\nrun:\n  steps: 7\n")
    cfg = load_config(path, ["trainer.lr=0.25"])
    assert (cfg.trainer.lr, cfg.run.steps) == (0.25, 7)


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.lrr=1"], "unknown config key 'trainer.lrr' (did you mean 'trainer.lr'?)"),
    (["traner.lr=1"], "unknown config key 'traner' (did you mean 'trainer'?)"),
    (["sft.trainer.lrr=1"], "unknown config key 'sft.trainer.lrr' (did you mean 'sft.trainer.lr'?)"),
    (["alignment.gate=[{metric: k3, opp: x}]"], "unknown config key 'alignment.gate.0.opp' (did you mean 'alignment.gate.0.op'?)"),
    (["trainer.zero_stage=5"], "trainer.zero_stage: 5 is not one of 0,1,2,3"),
    (["rollout.engine=sglang"], "rollout.engine: 'sglang' is not one of native,vllm"),
    (["trainer.lr=-1"], "trainer.lr: Input should be greater than 0, got -1"),
    (["run.steps=many"], "run.steps: Input should be a valid integer"),
    (["data.prompt_template={answer}"], "data.prompt_template: Value error, unknown placeholder(s) ['answer']"),
    (["trainer.num_minibatches=3"], "trainer.num_minibatches: 3 does not divide the step's 32 sequences"),
    (["data.builtin=arith", "data.test_files=[x/test.jsonl]"], "data.builtin=arith: train_files/test_files must be [DIR/train.jsonl] and [DIR/test.jsonl] in one DIR"),
    (["rollout.max_staleness=2"], "rollout.max_staleness: Input should be less than or equal to 1, got 2"),
    (["alignment.mode=exact", "rollout.max_staleness=1"], "alignment.mode=exact needs the rollout's own weights in the trainer: set rollout.max_staleness=0"),
    (["rollout.weight_sync=cuda_ipc"], "rollout.weight_sync=cuda_ipc shares the trainer's GPU memory with rollout actors on the same GPU"),
    (["alignment.mode=exact", "rollout.engine=vllm"], "alignment.mode=exact with rollout.engine=vllm needs a GPU (rollout.gpus_per_actor > 0)"),
    (["trainer.lr"], "override 'trainer.lr': expected KEY=VALUE"),
    (["trainer=3"], "trainer: Input should be a valid dictionary"),
    (["trainer.lr=1", "trainer.lr.x=2"], "override 'trainer.lr.x=2': trainer.lr is a value, not a section"),
])
def test_errors_name_the_key(overrides, expected):
    msg = _error(overrides)
    assert expected.replace("Value error, ", "") in msg, msg
    assert "pydantic" not in msg and "For further information" not in msg


def test_several_errors_are_listed_together():
    msg = _error(["trainer.zero_stage=9", "rollout.top_p=2", "run.bogus=1"])
    assert "3 problems" in msg
    for key in ("trainer.zero_stage", "rollout.top_p", "run.bogus"):
        assert key in msg


def test_file_errors(tmp_path):
    assert "no such file" in _error(path=tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    assert "expected a mapping of sections, got list" in _error(path=bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: {lr: [\n")
    assert "not valid YAML" in _error(path=broken)
    assert issubclass(ConfigError, ValueError)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny-arith.yaml", [
        "trainer.adam_betas=[0.8, 0.95]", "alignment.policy=icepop", "ray.address=auto",
        "data.prompt_template=Question: {question}\nAnswer:", "run.steps=3", "sft.trainer.lr=5e-4",
        'alignment.gate=[{metric: k3_mean, op: ">", threshold: 0.5, action: skip}, {metric: flip_rate, op: ">", threshold: 0.1, action: warn}]',
    ])
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    again = load_config(path, [])
    assert again == cfg
    assert again.trainer.adam_betas == (0.8, 0.95) and len(again.alignment.gate) == 2
    assert again.sft.trainer.lr == 5e-4
    assert load_config(None, []) != cfg  # the comparison can fail


def _sections(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        ann = field.annotation
        for inner in getattr(ann, "__args__", (ann,)):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                yield from _sections(inner)


def test_every_field_has_a_default_and_a_description():
    undocumented = [f"{m.__name__}.{name}" for m in _sections(RunConfig)
                    for name, f in m.model_fields.items() if not f.description]
    assert undocumented == []
    RunConfig()  # every field has a default: constructing with no arguments succeeds
