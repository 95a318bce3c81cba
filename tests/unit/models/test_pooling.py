"""kvyard.model.pooling: the sentence-transformers files of a model folder -> PoolingConfig, and the
pooling itself over a batch of whole prompts."""
import json

import pytest
import torch
import torch.nn.functional as F

from kvyard.model.pooling import PoolingConfig, pool, pooling_config_from_folder


def write(folder, modules, pooling=None):
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
         for i, (kind, path) in enumerate(modules)]))
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


def test_folder_without_sentence_transformers_files_declares_nothing(tmp_path):
    assert pooling_config_from_folder(str(tmp_path)) is None


@pytest.mark.parametrize("mode,method", [("pooling_mode_lasttoken", "last"), ("pooling_mode_mean_tokens", "mean"),
                                         ("pooling_mode_cls_token", "cls")])
@pytest.mark.parametrize("normalize", [True, False])
def test_pooling_module_and_normalize_are_read(tmp_path, mode, method, normalize):
    modules = [("Transformer", ""), ("Pooling", "1_Pooling")] + ([("Normalize", "2_Normalize")] if normalize else [])
    write(tmp_path, modules, {mode: True})
    assert pooling_config_from_folder(str(tmp_path / "model.safetensors")) == PoolingConfig(method, normalize)


@pytest.mark.parametrize("modules,pooling,message", [
    ([("Transformer", ""), ("Pooling", "1_Pooling"), ("Dense", "2_Dense")], {"pooling_mode_mean_tokens": True},
     "Dense is not supported yet"),
    ([("Transformer", ""), ("Pooling", "1_Pooling")], {"pooling_mode_max_tokens": True},
     "pooling_mode_max_tokens is not supported yet"),
    ([("Transformer", ""), ("Pooling", "1_Pooling")], {"pooling_mode_mean_tokens": True,
                                                       "pooling_mode_cls_token": True}, "exactly one"),
])
def test_what_cannot_be_reproduced_is_refused_by_name(tmp_path, modules, pooling, message):
    write(tmp_path, modules, pooling)
    with pytest.raises(ValueError, match=message):
        pooling_config_from_folder(str(tmp_path))


def test_pool_over_whole_prompts():
    hidden = torch.randn(6, 4)
    fb = type("FB", (), {"extend_seq_lens_cpu": [2, 4]})()
    torch.testing.assert_close(pool(hidden, fb, PoolingConfig("last", False)), hidden[[1, 5]])
    torch.testing.assert_close(pool(hidden, fb, PoolingConfig("cls", False)), hidden[[0, 2]])
    mean = torch.stack([hidden[:2].mean(0), hidden[2:].mean(0)])
    torch.testing.assert_close(pool(hidden, fb, PoolingConfig("mean", True)), F.normalize(mean, dim=-1))
