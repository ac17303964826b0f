"""Model discovery and loading: both layouts, and start-up errors that say what was found."""

import json
import shutil

import pytest
import torch

from sdserve.models import loading
from sdserve.models.layout import ModelStoreError, discover


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
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelStoreError) as err:
        discover(tmp_path)
    message = str(err.value)
    assert "expected model_index.json at its root, a base/ folder" in message
    assert "found: notes.txt, unet/" in message


def test_refiner_folder_without_index(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sdxl-refiner"], root)
    (root / "refiner" / "model_index.json").unlink()
    with pytest.raises(ModelStoreError, match="refiner directory .* has no model_index.json; found: scheduler/"):
        discover(root)


def test_malformed_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelStoreError, match="cannot read .*model_index.json"):
        loading.load(discover(tmp_path), torch.device("cpu"), torch.float32)
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ModelStoreError, match="has no '_class_name' naming the pipeline"):
        loading.load(discover(tmp_path), torch.device("cpu"), torch.float32)


def test_unsupported_pipeline_class(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sd"], root)
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = "KandinskyV22Pipeline"
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelStoreError, match="KandinskyV22Pipeline is not supported; supported: StableDiffusionXLPipeline"):
        loading.load(discover(root), torch.device("cpu"), torch.float32)


def test_pickle_weights_are_refused(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sd"], root)
    unet = root / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelStoreError, match=r"unet holds only pickle weights \(diffusion_pytorch_model.bin\); sdserve loads safetensors only"):
        loading.load(discover(root), torch.device("cpu"), torch.float32)


def test_missing_component_folder(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sd"], root)
    shutil.rmtree(root / "vae")
    with pytest.raises(ModelStoreError, match="component folder vae/ named in model_index.json is missing"):
        loading.load(discover(root), torch.device("cpu"), torch.float32)


def test_fp16_variant_only_folders_load(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["sd"], root)
    for weights in root.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    loaded = loading.load(discover(root), torch.device("cpu"), torch.float32)
    assert loaded.capabilities.pipeline_class == "StableDiffusionPipeline"


def test_refiner_shares_text_encoder_2_and_vae(models):
    loaded = loading.load(discover(models["sdxl-refiner"]), torch.device("cpu"), torch.float32)
    assert loaded.refiner.text_encoder_2 is loaded.base.text_encoder_2
    assert loaded.refiner.vae is loaded.base.vae
    caps = loaded.capabilities
    assert caps.is_sdxl and caps.has_refiner and caps.default_width == 256 and caps.default_guidance_scale == 5.0


def test_refiner_must_pair_with_sdxl(models):
    with pytest.raises(ModelStoreError, match="must be a StableDiffusionXLImg2ImgPipeline next to a StableDiffusionXLPipeline base"):
        loading.load(
            discover(models["sd"], refiner_dir=models["sdxl-refiner"] / "refiner"), torch.device("cpu"), torch.float32
        )


def test_single_file_checkpoint_with_local_configs(models, tmp_path):
    from sdserve.tiny import build_sd, write_single_file

    checkpoint = write_single_file(build_sd(tmp_path / "scratch"), tmp_path / "sf")
    layout = discover(tmp_path / "sf")  # the folder: its only .safetensors, configs from config/
    assert layout.base == checkpoint and layout.config == tmp_path / "sf" / "config"
    assert discover(checkpoint).base == checkpoint  # or the file itself
    single = loading.load(layout, torch.device("cpu"), torch.float32)
    folder = loading.load(discover(models["sd"]), torch.device("cpu"), torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(single.base, name).state_dict(), getattr(folder.base, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_single_file_errors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelStoreError, match="needs its diffusers configs: give --config_dir"):
        discover(tmp_path)
    (tmp_path / "old.ckpt").write_bytes(b"")
    with pytest.raises(ModelStoreError, match="only .safetensors checkpoints are loaded"):
        discover(tmp_path / "old.ckpt")


def test_sd3_with_and_without_t5(tmp_path):
    from sdserve.models.loading import LoadOptions
    from sdserve.tiny import write_tiny_model

    root = write_tiny_model(tmp_path / "sd3", "sd3")
    full = loading.load(discover(root), torch.device("cpu"), torch.float32)
    assert full.capabilities.family == "sd3" and full.capabilities.has_t5
    assert full.capabilities.scheduler_family == "flow" and full.capabilities.default_width == 256
    slim = loading.load(discover(root), torch.device("cpu"), torch.float32, options=LoadOptions(drop_t5=True))
    assert slim.base.text_encoder_3 is None and not slim.capabilities.has_t5


def test_offload_needs_a_gpu(models):
    from sdserve.models.loading import LoadOptions

    with pytest.raises(ModelStoreError, match="--offload model moves weights to a GPU on demand; it needs a CUDA device"):
        loading.load(discover(models["sd"]), torch.device("cpu"), torch.float32, options=LoadOptions(offload="model"))
