"""Tiny random diffusers pipelines for the tests, built from diffusers' own classes and saved
with ``save_pretrained`` (no weights can be downloaded here).

- ``build_sd(path)``: Stable-Diffusion text-to-image (UNet 4->8 channels, VAE with scale factor 2,
  a 2-layer CLIP text encoder and a byte-level CLIP tokenizer written from tiny vocab/merges files).
- ``build_sd_img2img(path)``: the same components saved as StableDiffusionImg2ImgPipeline.
- ``build_sd3(path)``: a DiT / flow-matching pipeline (SD3 transformer, FlowMatchEulerDiscreteScheduler,
  two CLIP encoders with projection, no T5 encoder).

Every builder seeds torch first, so the same call gives the same weights.
"""
from __future__ import annotations

import json
import os

import torch

TEXT_DIM = 32


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for the bytes 0..255 (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_clip_tokenizer(folder: str) -> None:
    """A byte-level CLIP BPE tokenizer: the 256 byte symbols, their end-of-word forms, a few
    merges and the two special tokens (vocab.json + merges.txt, what CLIPTokenizer reads)."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("r", "e"), ("i", "n")]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as fh:
        json.dump({tok: i for i, tok in enumerate(vocab)}, fh)
    with open(os.path.join(folder, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(vocab=os.path.join(folder, "vocab.json"), merges=os.path.join(folder, "merges.txt"),
                        model_max_length=16)
    tok.save_pretrained(folder)


def _clip_tokenizer(tmp: str):
    from transformers import CLIPTokenizer
    write_clip_tokenizer(tmp)
    return CLIPTokenizer.from_pretrained(tmp)


def _clip_config(projection: bool = False):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(bos_token_id=517, eos_token_id=518, pad_token_id=518, hidden_size=TEXT_DIM,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=520, max_position_embeddings=16,
                          **({"projection_dim": TEXT_DIM} if projection else {}))


def _vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=latent_channels, norm_num_groups=2, sample_size=32)


def _sd_components(path: str) -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16,
                                in_channels=4, out_channels=4, norm_num_groups=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=TEXT_DIM, attention_head_dim=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(0)
    vae = _vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    return dict(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                tokenizer=_clip_tokenizer(path + ".tok"), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def build_sd(path: str) -> str:
    from diffusers import StableDiffusionPipeline
    StableDiffusionPipeline(**_sd_components(path)).save_pretrained(path)
    return path


def build_sd_img2img(path: str) -> str:
    from diffusers import StableDiffusionImg2ImgPipeline
    StableDiffusionImg2ImgPipeline(**_sd_components(path)).save_pretrained(path)
    return path


def build_sd3(path: str) -> str:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4,
                                        caption_projection_dim=TEXT_DIM, joint_attention_dim=TEXT_DIM,
                                        pooled_projection_dim=2 * TEXT_DIM, out_channels=4)
    torch.manual_seed(0)
    enc1 = CLIPTextModelWithProjection(_clip_config(projection=True))
    torch.manual_seed(1)
    enc2 = CLIPTextModelWithProjection(_clip_config(projection=True))
    torch.manual_seed(0)
    vae = _vae()
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5035)
    tok = _clip_tokenizer(path + ".tok")
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                             text_encoder=enc1, tokenizer=tok, text_encoder_2=enc2, tokenizer_2=tok,
                             text_encoder_3=None, tokenizer_3=None).save_pretrained(path)
    return path


def reference_pipeline(path: str):
    """The pipeline loaded by diffusers directly (absent optional components passed as None)."""
    from diffusers import DiffusionPipeline

    with open(os.path.join(path, "model_index.json")) as fh:
        index = json.load(fh)
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipe = DiffusionPipeline.from_pretrained(path, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(path: str, seed: int, n: int = 1, **kwargs) -> list:
    """Image i drawn with Generator().manual_seed(seed + i), each its own diffusers call."""
    pipe = reference_pipeline(path)
    return [pipe(generator=torch.Generator().manual_seed(seed + i), **kwargs).images[0] for i in range(n)]


def red_image(size: int = 32):
    """A deterministic input image for image-to-image tests (a gradient, not a flat colour)."""
    from PIL import Image
    img = Image.new("RGB", (size, size))
    img.putdata([(200, 8 * (i % size) % 256, 4 * (i // size) % 256) for i in range(size * size)])
    return img


def build_video(path: str) -> str:
    """A text-to-video pipeline (TextToVideoSDPipeline: a 3D UNet over frames, the SD VAE)."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet3DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=TEXT_DIM,
                                attention_head_dim=4, norm_num_groups=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(0)
    vae = _vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    TextToVideoSDPipeline(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                          tokenizer=_clip_tokenizer(path + ".tok")).save_pretrained(path)
    return path
