"""Launch-time flags resolved in the API process: --download-dir lookups (a folder DIR/<id>, a
Hugging Face cache at DIR; never a download), --base-gpu-id / --gpu-id-step per data-parallel
replica, and what --delete-ckpt-after-loading may delete."""
from __future__ import annotations

import pytest
import torch

from kvyard.frontend import launch
from kvyard.model.source import local_model_path
from kvyard.server_args import ServerArgs


def test_download_dir_folder_and_hub_cache_layouts(tmp_path):
    (tmp_path / "org" / "plain").mkdir(parents=True)
    assert local_model_path("org/plain", download_dir=str(tmp_path)) == str(tmp_path / "org" / "plain")
    # the Hugging Face cache layout SGLang's --download-dir fills (cache_dir of snapshot_download)
    snapshot = tmp_path / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--cached" / "refs").mkdir()
    (tmp_path / "models--org--cached" / "refs" / "main").write_text("abc123")
    assert local_model_path("org/cached", download_dir=str(tmp_path)) == str(snapshot)
    with pytest.raises(ValueError, match=r"model_path: org/absent does not exist .*never downloads"):
        local_model_path("org/absent", download_dir=str(tmp_path))
    with pytest.raises(ValueError, match="download_dir: .* is not a folder"):
        local_model_path("org/absent", download_dir=str(tmp_path / "nope"))


def test_resolve_args_looks_in_the_download_dir(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "tok").mkdir()
    args = launch.resolve_args(ServerArgs(model_path="m", tokenizer_path="tok", download_dir=str(tmp_path),
                                          model_type="llm"))
    assert args.model_path == str(tmp_path / "m") and args.tokenizer_path == str(tmp_path / "tok")


def test_gpu_ids_of_replicas(monkeypatch):
    args = ServerArgs(device="cuda", base_gpu_id=2, gpu_id_step=2, dp_size=2)
    assert [launch.replica_gpu_id(args, i) for i in range(2)] == [2, 4]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 5)
    launch.check_gpu_ids(args)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match="base_gpu_id: replicas would use CUDA device 4; this machine has 4"):
        launch.check_gpu_ids(args)
    with pytest.raises(ValueError, match="base_gpu_id: 1 .* the device is cpu"):
        launch.check_gpu_ids(ServerArgs(device="cpu", base_gpu_id=1))
    launch.check_gpu_ids(ServerArgs(device="cpu"))


def test_checkpoint_to_delete(tmp_path):
    from kvyard.model.source import default_model_path

    assert launch.checkpoint_to_delete(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="not a local folder or file"):
        launch.checkpoint_to_delete("org/hub-id")
    with pytest.raises(ValueError, match="refusing to delete the built-in default model"):
        launch.checkpoint_to_delete(default_model_path())
