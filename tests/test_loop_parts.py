"""Unit tier: the loop's parts that decide without a cluster: checkpoint cadence and resume layout, the PPO
shares on the spec, the failure policy."""
import pytest

from orchestrator import failure_policy
from orchestrator.scheduler import Fail, Restart
from specs.errors import UsageError, UserError
from specs.job import validate_spec
from workers.checkpoint import CheckpointInfo, Checkpointer


def _spec(**over):
    raw = {"train": {"steps": 10}, "checkpoint": {"every": 4}}
    for k, v in over.items():
        raw[k] = v
    return validate_spec(raw)


def test_checkpoint_cadence_every_n_and_the_last_step_once():
    c = Checkpointer(_spec(), storage=None, run_dir="r", rank=0, world_size=2)
    assert [s for s in range(1, 11) if c.due(s, last_step=s == 10)] == [4, 8, 10]
    c.last_saved = 10
    assert not c.due(10, last_step=True)              # stopped at the last step after saving it: no second save


def test_resume_layout_one_rule_for_world_size_changes():
    ckpt = CheckpointInfo(8, "r/checkpoints/step_00000008", {"world_size": 2, "zero_stage": 2, "pp": 1, "ep": 1})
    assert Checkpointer(_spec(), None, "r", 0, 2).resume_layout(ckpt, reshards=True) is False
    assert Checkpointer(_spec(), None, "r", 0, 1).resume_layout(ckpt, reshards=True) is True   # universal
    with pytest.raises(UserError, match="resumes on the number of workers it had"):
        Checkpointer(_spec(), None, "r", 0, 1).resume_layout(ckpt, reshards=False)
    with pytest.raises(UserError, match="parallel.pp"):
        Checkpointer(_spec(), None, "r", 0, 2).resume_layout(CheckpointInfo(8, ckpt.path, {**ckpt.manifest, "pp": 2}),
                                                             reshards=True)
    assert Checkpointer(_spec(), None, "r", 0, 2).resume_layout(None, reshards=False) is False


def test_ppo_shares_are_derived_on_the_spec():
    spec = validate_spec({"kind": "ppo", "model": {"init_from": "sft"}, "train": {"steps": 20},
                          "resources": {"workers": 2},
                          "rlhf": {"ppo": {"reward_model": "rm", "rollout_size": 16, "minibatch_size": 4}}})
    s = spec.ppo_shares
    assert (s.rollout, s.minibatch, s.prompts_per_rollout, s.updates_per_rollout) == (8, 2, 4, 2 * 4)
    assert spec.micro_slices == [slice(0, 8)] and spec.samples_per_rank == 8


def test_failure_policy_user_errors_fail_at_once_faults_restart():
    assert UsageError is UserError
    d = failure_policy.decide(UserError("model.d_model: 30 is not divisible"), 0, 3, job_id="j")
    assert isinstance(d, Fail) and "model.d_model" in d.reason
    assert isinstance(failure_policy.decide(RuntimeError("gloo: connection reset"), 0, 3, job_id="j"), Restart)
    assert isinstance(failure_policy.decide(RuntimeError("gloo: connection reset"), 3, 3, job_id="j"), Fail)


def test_a_long_failure_line_keeps_its_end():
    """A storage fault under a deep run directory: the reason still says which checkpoint is intact and
    what to do (a cut at 300 characters once dropped both). Another error's line is cut in the middle."""
    from workers.checkpoint_store import storage_fault

    deep = "/mnt/team-bucket/" + "/".join(["a-rather-long-folder-name"] * 12) + "/run-sy-20261204-2c21c2"
    err = OSError(30, "Read-only file system", f"{deep}/checkpoints/step_00000016/manifest.json.tmp-a4319cb3")
    fault = storage_fault(err, f"{deep} (checkpoint step 16)", 14)
    d = failure_policy.decide(fault, 0, 3, job_id="j")
    assert isinstance(d, Fail) and len(str(fault)) > 300
    assert d.reason.startswith(f"storage: {deep} (checkpoint step 16) is read-only")
    assert "; the checkpoint at step 14 is intact; free space or make it writable, then resume" in d.reason
    noise = RuntimeError("x" * 150 + "y" * 2000 + " the end of the library's line")
    r = failure_policy.decide(noise, 0, 3, job_id="j").reason
    assert "x" * 140 in r and r.endswith("the end of the library's line") and " ... " in r and len(r) < 400
