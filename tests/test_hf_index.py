"""A sharded Hugging Face checkpoint's index may only name shard files inside its own folder (issue 11)."""
import json

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from models.hf import HFError, _read_weights


def _folder(tmp_path, weight_map):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_shards_inside_the_folder_are_read(tmp_path):
    folder = _folder(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    save_file({"a": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(folder / "model-00002-of-00002.safetensors"))
    out = _read_weights(str(folder), fsspec.filesystem("file"))
    assert set(out) == {"a", "b"} and out["b"].shape == (3,)


@pytest.mark.parametrize("name", ["../secret.safetensors", "../../etc/passwd", "/etc/x.safetensors",
                                  "sub/x.safetensors", "s3://bucket/x.safetensors", "x.bin", "..safetensors",
                                  "", 5, None, "a\\..\\b.safetensors"])
def test_shard_names_that_leave_the_folder_are_refused(tmp_path, name):
    outside = tmp_path / "secret.safetensors"
    save_file({"a": torch.ones(2)}, str(outside))
    folder = _folder(tmp_path, {"a": name})
    with pytest.raises(HFError, match="a shard must be a plain") as e:
        _read_weights(str(folder), fsspec.filesystem("file"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("body", ["not json", "[]", '{"weight_map": []}', '{"weight_map": {}}', '{"other": 1}'])
def test_malformed_indexes_are_one_line_errors(tmp_path, body):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(body)
    with pytest.raises(HFError) as e:
        _read_weights(str(folder), fsspec.filesystem("file"))
    assert "\n" not in str(e.value)
