"""The pack's model folders in the host's folder_paths (nodes/paths.py), in-process on a scratch tree:
what the loaders list, what they say when a name is not there, and loading when a folder cannot be made."""
from __future__ import annotations

import copy
import json
import logging

import pytest

from conftest import comfy_on_path


@pytest.fixture
def host_paths(tmp_path, monkeypatch):
    """The host's folder_paths with models/ in tmp_path (its tables restored after the test)."""
    comfy_on_path()
    import folder_paths

    from blip_diffusion.nodes import paths

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", copy.deepcopy(folder_paths.folder_names_and_paths))
    for name in (paths.BLIP_FOLDER, paths.SUBJECT_FOLDER, paths.FINETUNE_FOLDER):
        folder_paths.folder_names_and_paths.pop(name, None)
    return paths, tmp_path / "models"


def released(folder, *subfolders):
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "BlipDiffusionPipeline"}))
    for sub in subfolders:
        (folder / sub).mkdir()


def test_the_controlnet_loader_lists_only_folders_with_a_controlnet(host_paths):
    paths, models = host_paths
    paths.register_model_folders()
    released(models / "blip_diffusion" / "blipdiffusion", "qformer", "unet")
    released(models / "blip_diffusion" / "blipdiffusion-controlnet", "qformer", "unet", "controlnet")
    assert paths.list_model_folders() == ["blipdiffusion", "blipdiffusion-controlnet"]
    assert paths.list_model_folders(having="controlnet") == ["blipdiffusion-controlnet"]
    with pytest.raises(FileNotFoundError, match=r"the folders there are 'blipdiffusion-controlnet': choose"):
        paths.resolve_model_folder("controlnet", having="controlnet")   # what its node lists, no more


def test_a_name_not_there_is_answered_with_the_folders_that_are(host_paths):
    paths, models = host_paths
    paths.register_model_folders()
    with pytest.raises(FileNotFoundError) as err:
        paths.resolve_model_folder("blipdiffusion")
    assert "the folders there are" not in str(err.value)   # none: only where to put one
    assert "put the released folder (with model_index.json) into models/blip_diffusion/" in str(err.value)
    released(models / "blip_diffusion" / "Salesforce-blipdiffusion")
    with pytest.raises(FileNotFoundError) as err:
        paths.resolve_model_folder("blipdiffusion")
    assert "the folders there are 'Salesforce-blipdiffusion': choose one in the node's list" in str(err.value)


@pytest.mark.parametrize("blocker", ["file", "dangling link"])
def test_nodes_load_when_a_model_folder_cannot_be_created(host_paths, blocker, caplog):
    # models/ is a file (a read-only or odd mount), or models/blip_diffusion a link to an unmounted drive
    paths, models = host_paths
    if blocker == "file":
        models.write_text("not a folder")
    else:
        models.mkdir()
        (models / "blip_diffusion").symlink_to(models / "unmounted" / "drive")
    with caplog.at_level(logging.WARNING):
        paths.register_model_folders()
    assert "BLIP-Diffusion: could not create" in caplog.text
    assert paths.list_model_folders() == []
