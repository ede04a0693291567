"""cluster.yaml's read/write roots: paths outside them are refused at submit/run, and again in the ranks."""
from __future__ import annotations

import os

import pytest

from specs.paths import (PathNotAllowedError, check_corpus_readable, check_job_paths, make_roots, normalize)
from tests.test_bad_input import BASE, Sandbox, refused


def test_normalize_folds_dots_and_keeps_buckets_apart(tmp_path):
    assert normalize("s3://b/x/../../../etc") == "s3://etc"
    assert normalize(str(tmp_path / "a" / ".." / "b")) == str(tmp_path.resolve() / "b")
    roots = make_roots("s3://bucket/runs", read=["s3://bucket/data", str(tmp_path)])
    assert roots.can_read("s3://bucket/data/x.jsonl") and roots.can_read("s3://bucket/runs/j/ckpt")
    assert not roots.can_read("s3://bucket/database/x") and not roots.can_read("s3://bucketx/data/x")
    assert not roots.can_read("s3://bucket/data/../secret/x") and not roots.can_read("gs://bucket/data/x")
    assert roots.can_read(str(tmp_path / "c.txt")) and not roots.can_read(str(tmp_path) + "-evil/c.txt")
    assert not roots.can_read(str(tmp_path / ".." / "other.txt"))
    assert roots.can_write("s3://bucket/runs/x") and not roots.can_write("s3://bucket/data/x")


@pytest.fixture
def box(tmp_path):
    inside, outside = tmp_path / "data", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    for d in (inside, outside):
        (d / "c.txt").write_text("hello world\n" * 50)
        (d / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "site").mkdir()
    b = Sandbox(tmp_path / "site", extra=f"paths: {{read: [{inside}], write: [{tmp_path / 'shared'}]}}\n")
    b.inside, b.outside = inside, outside
    return b


@pytest.mark.parametrize("command", ["submit", "run"])
@pytest.mark.parametrize("override, needle", [
    ("data.corpus={outside}/c.txt", "data.corpus"),
    ("data.corpus={inside}/../elsewhere/c.txt", "data.corpus"),
    ("data.corpus={outside}/*.txt", "data.corpus"),
    ("model.init_from={outside}", "model.init_from"),
    ("model.init_from=/etc", "model.init_from"),
])
def test_paths_outside_the_read_roots_are_refused(box, capsys, command, override, needle):
    spec = box.root / "s.yaml"
    spec.write_text(BASE)
    override = override.format(inside=box.inside, outside=box.outside)
    line = refused(box, capsys, [command, str(spec), "--set", override], needle)
    assert "outside the read roots of cluster.yaml" in line


@pytest.mark.parametrize("command", ["submit", "run"])
def test_rlhf_paths_are_checked(box, capsys, command):
    spec = box.root / "s.yaml"
    spec.write_text(BASE.replace("name: ok", "name: ok\nkind: sft"))
    refused(box, capsys, [command, str(spec), "--set", f"rlhf.data.demonstrations={box.outside}/sft.jsonl"],
            "rlhf.data.demonstrations")
    refused(box, capsys, [command, str(spec), "--set", f"rlhf.data.dir={box.inside}/out"],
            "rlhf.data.dir: ")  # readable, but not a write root


def test_paths_inside_the_roots_are_accepted(box, capsys):
    from orchestrator.job_store import JobStore

    spec = box.root / "s.yaml"
    spec.write_text(BASE)
    code, lines = box.cli("submit", str(spec), "--set", f"data.corpus={box.inside}/c.txt", capsys=capsys)
    assert code == 0, lines
    assert len(JobStore(str(box.store)).list()) == 1


def test_a_pipeline_stage_outside_the_roots_is_refused(box, capsys):
    pipe = box.root / "p.yaml"
    pipe.write_text("pipeline: instructgpt\nname: p\n"
                    f"base: {{model: {{family: llama, preset: tiny}}, rlhf: {{data: {{prompts: {box.outside}/sft.jsonl}}}}}}\n"
                    "sft: {train: {steps: 2}}\nrm: {train: {steps: 2}}\nppo: {train: {steps: 20}}\n")
    refused(box, capsys, ["submit", str(pipe)], "rlhf.data.prompts")


def test_a_cluster_yaml_without_paths_reads_only_under_its_folder(tmp_path):
    from orchestrator.cluster_config import load_cluster_config

    (tmp_path / "cluster.yaml").write_text(f"storage: {tmp_path / 'runs'}\n")
    roots = load_cluster_config(str(tmp_path / "cluster.yaml")).path_roots()
    assert roots.can_read(str(tmp_path / "corpus.txt")) and not roots.can_read("/etc/passwd")
    assert roots.can_write(str(tmp_path / "runs" / "x")) and not roots.can_write(str(tmp_path / "corpus.txt"))


def test_the_ranks_check_again_with_the_roots_the_storage_carries(tmp_path):
    """A spec that got past submit (stored before the roots changed, or a link inside a root) stops in the rank."""
    from data.storage import Storage
    from orchestrator.cluster_config import load_cluster_config
    from orchestrator.runner import storage_of
    from specs.job import validate_spec

    data, secret = tmp_path / "data", tmp_path / "secret"
    data.mkdir()
    secret.mkdir()
    (secret / "key.txt").write_text("do not train on me\n")
    os.symlink(secret / "key.txt", data / "link.txt")
    (data / "ok.txt").write_text("fine\n")
    (tmp_path / "cluster.yaml").write_text(f"storage: {tmp_path / 'runs'}\npaths: {{read: [{data}]}}\n")
    storage = storage_of(load_cluster_config(str(tmp_path / "cluster.yaml")))
    assert storage.roots is not None
    check_corpus_readable(str(data / "ok.txt"), storage)
    with pytest.raises(PathNotAllowedError, match="link may point out"):
        check_corpus_readable(str(data / "*.txt"), storage)
    with pytest.raises(PathNotAllowedError, match="data.corpus"):
        check_corpus_readable(str(secret / "key.txt"), storage)
    spec = validate_spec({"train": {"steps": 2}, "model": {"init_from": str(secret)}})
    with pytest.raises(PathNotAllowedError, match="rank 0: model.init_from"):
        check_job_paths(spec, storage.roots, where="rank 0")
    check_job_paths(spec, Storage(str(tmp_path)).roots)  # no roots (a Storage made in code): unrestricted


def test_rank_entry_points_refuse_before_reading(tmp_path):
    """The rank actor's data and training entry points check the roots themselves, before reading anything."""
    import types

    from data.shards import TokenSource
    from data.storage import Storage
    from specs.job import validate_spec
    from workers.rank import RankWorker

    (tmp_path / "secret.txt").write_text("x\n")
    storage = Storage(str(tmp_path / "runs"), roots=make_roots(str(tmp_path / "runs"), read=[str(tmp_path / "data")]))
    rank = object.__new__(RankWorker)  # no __init__: it redirects this process's output to the rank log
    rank.rank, rank.world_size, rank.storage, rank._stop_early, rank._log_local = 0, 1, storage, False, None
    with pytest.raises(PathNotAllowedError, match="data.corpus"):
        rank.prepare_data(TokenSource(str(tmp_path / "secret.txt")), storage)
    spec = validate_spec({"train": {"steps": 2}, "data": {"corpus": str(tmp_path / "secret.txt")}})
    import logging

    logger = logging.getLogger("workers")
    before = (list(logger.handlers), logger.level, logger.propagate)
    try:
        with pytest.raises(PathNotAllowedError, match="rank 0: data.corpus"):
            rank.train(types.SimpleNamespace(spec=spec, storage=storage))
    finally:  # train() points the workers logger at this process's stderr, as a rank's would be
        logger.handlers[:], logger.level, logger.propagate = before[0], before[1], before[2]
