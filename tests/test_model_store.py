"""Model discovery and loading: both layouts, and start-up errors that say what was found."""

import json
import shutil

import pytest
import torch

from sdserve import model_store
from sdserve.model_store import ModelStoreError, discover


def test_root_diffusers_folder(models):
    layout = discover(models["sdxl"])
    assert layout.base == models["sdxl"] and layout.refiner is None


def test_base_and_refiner_folders_with_other_entries_ignored(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sdxl-refiner"], root)
    (root / "README.md").write_text("notes")
    (root / "loras").mkdir()
    layout = discover(root)
    assert layout.base == root / "base" and layout.refiner == root / "refiner"


def test_base_only_and_explicit_refiner(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sdxl-refiner"] / "base", root / "base")
    assert discover(root).refiner is None
    layout = discover(models["sdxl"], refiner_dir=models["sdxl-refiner"] / "refiner")
    assert layout.refiner == models["sdxl-refiner"] / "refiner"


def test_missing_directory(tmp_path):
    with pytest.raises(ModelStoreError, match=r"model directory .*nope does not exist"):
        discover(tmp_path / "nope")


def test_folder_without_a_model_lists_what_it_found(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelStoreError) as err:
        discover(tmp_path)
    message = str(err.value)
    assert "expected model_index.json at its root, or a base/ folder" in message
    assert "found: unet/, weights.safetensors" in message


def test_refiner_folder_without_index(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sdxl-refiner"], root)
    (root / "refiner" / "model_index.json").unlink()
    with pytest.raises(ModelStoreError, match="refiner directory .* has no model_index.json; found: scheduler/"):
        discover(root)


def test_malformed_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelStoreError, match="cannot read .*model_index.json"):
        model_store.load(discover(tmp_path), torch.device("cpu"), torch.float32)
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ModelStoreError, match="has no '_class_name' naming the pipeline"):
        model_store.load(discover(tmp_path), torch.device("cpu"), torch.float32)


def test_unsupported_pipeline_class(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sd"], root)
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelStoreError, match="FluxPipeline is not supported; supported: StableDiffusionXLPipeline"):
        model_store.load(discover(root), torch.device("cpu"), torch.float32)


def test_pickle_weights_are_refused(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sd"], root)
    unet = root / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelStoreError, match=r"unet holds only pickle weights \(diffusion_pytorch_model.bin\); sdserve loads safetensors only"):
        model_store.load(discover(root), torch.device("cpu"), torch.float32)


def test_missing_component_folder(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sd"], root)
    shutil.rmtree(root / "vae")
    with pytest.raises(ModelStoreError, match="component folder vae/ named in model_index.json is missing"):
        model_store.load(discover(root), torch.device("cpu"), torch.float32)


def test_fp16_variant_only_folders_load(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sd"], root)
    for weights in root.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    loaded = model_store.load(discover(root), torch.device("cpu"), torch.float32)
    assert loaded.capabilities.pipeline_class == "StableDiffusionPipeline"


def test_refiner_shares_text_encoder_2_and_vae(models):
    loaded = model_store.load(discover(models["sdxl-refiner"]), torch.device("cpu"), torch.float32)
    assert loaded.refiner.text_encoder_2 is loaded.base.text_encoder_2
    assert loaded.refiner.vae is loaded.base.vae
    caps = loaded.capabilities
    assert caps.is_sdxl and caps.has_refiner and caps.default_width == 256 and caps.default_guidance_scale == 5.0


def test_refiner_must_pair_with_sdxl(models):
    with pytest.raises(ModelStoreError, match="must be a StableDiffusionXLImg2ImgPipeline next to a StableDiffusionXLPipeline base"):
        model_store.load(
            discover(models["sd"], refiner_dir=models["sdxl-refiner"] / "refiner"), torch.device("cpu"), torch.float32
        )
