"""training.architectures, .encoders and .pipelines with real diffusers / transformers: the
transformer registry (PixArt-XL/2 counted on the meta device), tiny T5 encoder + sentencepiece
tokenizer and VAE built offline and reloaded through from_pretrained, and an exported
PixArtAlphaPipeline that samples."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
from PIL import Image
from transformers import AutoTokenizer, T5EncoderModel

from training.architectures import TRANSFORMERS, build_transformer, num_parameters, transformer_config
from training.encoders import MARKER, build_text_encoder, build_vae, vae_scale_factor
from training.pipelines import MAX_SEQUENCE_LENGTH, export_pipeline, generate

CORPUS = [
    "A red circle in the top left corner of a white background.",
    "A small blue square sits next to a large green triangle on a gray background.",
    "There are three objects: a yellow star, an orange rectangle and a purple ellipse.",
    "A photograph of a dog running on the grass in a park on a sunny day.",
    "The painting is in the style of impressionism, with soft brush strokes and bright colors.",
] * 4
CAPTION = "A small red circle in the top left corner of a gray background."
TINY = dict(resolution=64, vae_scale_factor=2)  # the tiny VAE halves each side


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> str:
    return build_text_encoder(str(tmp_path_factory.mktemp("te") / "t5"), corpus=CORPUS)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    return build_vae(str(tmp_path_factory.mktemp("vae") / "vae"))


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory, text_dir, vae_dir) -> str:
    transformer = build_transformer("PixArt-tiny/2", init="default", **TINY)  # nonzero outputs
    return export_pipeline(str(tmp_path_factory.mktemp("pipe") / "pixart"), transformer=transformer,
                           text_encoder_dir=text_dir, vae_dir=vae_dir)


# ---------------------------------------------------------------- transformer registry
@pytest.mark.parametrize("resolution, sample_size, scale, size_conditions",
                         [(256, 32, 1, False), (512, 64, 1, False), (1024, 128, 2, True)])
def test_pixart_xl_config_and_size_on_meta(resolution, sample_size, scale, size_conditions):
    model = build_transformer("PixArt-XL/2", resolution=resolution, device="meta")
    cfg = model.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.patch_size) == (28, 16, 72, 2)
    assert (cfg.caption_channels, cfg.cross_attention_dim, cfg.in_channels, cfg.out_channels) == (4096, 1152, 4, 8)
    assert cfg.norm_type == "ada_norm_single" and cfg.sample_size == sample_size
    assert cfg.interpolation_scale == scale and cfg.use_additional_conditions is size_conditions
    assert all(p.device.type == "meta" for p in model.parameters())
    assert 600e6 < num_parameters(model) < 620e6  # the paper's 0.6B


def test_config_validation_and_overrides():
    with pytest.raises(ValueError, match="unknown transformer"):
        transformer_config("PixArt-XXL/2", resolution=256)
    with pytest.raises(ValueError, match="multiple"):
        transformer_config("PixArt-tiny/2", resolution=100)
    cfg = transformer_config("PixArt-tiny/2", resolution=256, latent_channels=3, caption_channels=32,
                             learned_sigma=False, vae_scale_factor=2)
    # sample_size 128 yet not 1024 px: size conditions stay off (diffusers would switch them on).
    assert (cfg["in_channels"], cfg["out_channels"], cfg["caption_channels"]) == (3, 3, 32)
    assert cfg["sample_size"] == 128 and cfg["use_additional_conditions"] is False
    assert transformer_config("PixArt-XL/2", resolution=768)["interpolation_scale"] == 1.5
    assert set(TRANSFORMERS) >= {"PixArt-XL/2", "PixArt-mini/2", "PixArt-tiny/2"}


@pytest.mark.parametrize("name, low, high", [("PixArt-tiny/2", 1e6, 3e6), ("PixArt-mini/2", 6e6, 9e6)])
def test_tiny_transformers_forward(name, low, high):
    model = build_transformer(name, **TINY)
    assert low < num_parameters(model) < high
    text = torch.randn(2, MAX_SEQUENCE_LENGTH, model.config.caption_channels)
    mask = torch.zeros(2, MAX_SEQUENCE_LENGTH, dtype=torch.long)
    mask[:, :7] = 1
    for h, w in ((32, 32), (32, 48)):  # square and non-square latents
        out = model(torch.randn(2, 4, h, w), encoder_hidden_states=text, encoder_attention_mask=mask,
                    timestep=torch.tensor([10, 900]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)[0]
        assert out.shape == (2, 8, h, w)  # ε and variance (learned sigma)
        assert torch.count_nonzero(out) == 0  # PixArt's zero-initialised final layer


def test_transformer_init_is_seeded_and_leaves_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_transformer("PixArt-tiny/2", seed=1, init="default", learned_sigma=False, **TINY)
    assert torch.equal(torch.rand(1), expected)
    b = build_transformer("PixArt-tiny/2", seed=1, init="default", learned_sigma=False, **TINY)
    c = build_transformer("PixArt-tiny/2", seed=2, init="default", learned_sigma=False, **TINY)
    assert a.config.out_channels == 4
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.proj_out.weight, c.proj_out.weight)
    out = a(torch.randn(1, 4, 32, 32), encoder_hidden_states=torch.randn(1, 5, 64), timestep=torch.tensor([3]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert out.shape == (1, 4, 32, 32) and out.abs().sum() > 0


# ---------------------------------------------------------------- text encoder
def test_tokenizer_round_trips_and_pads_to_120(text_dir):
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    assert type(tokenizer).__name__ == "T5Tokenizer"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer(CAPTION).input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTION
    # Words outside the corpus still encode without <unk>: all printable ASCII is in the vocabulary.
    odd = "Zebra #42 @ xyz!"
    assert tokenizer.decode(tokenizer(odd).input_ids, skip_special_tokens=True) == odd
    batch = tokenizer([CAPTION, "a dog"], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                      truncation=True, return_attention_mask=True, return_tensors="pt")
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, MAX_SEQUENCE_LENGTH)
    assert batch.attention_mask[0].sum() == len(ids) and batch.attention_mask[0, len(ids):].sum() == 0
    assert (batch.input_ids[0, len(ids):] == tokenizer.pad_token_id).all()


def test_text_encoder_reloads_and_is_deterministic(text_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    encoder = T5EncoderModel.from_pretrained(text_dir).eval()
    batch = tokenizer([CAPTION], padding="max_length", max_length=MAX_SEQUENCE_LENGTH, return_tensors="pt")
    with torch.no_grad():
        states = encoder(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    assert states.shape == (1, MAX_SEQUENCE_LENGTH, 64) and torch.isfinite(states).all()

    again = Path(build_text_encoder(str(tmp_path / "again"), corpus=CORPUS))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(again / name) == _sha(Path(text_dir) / name)
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    build_text_encoder(str(again), corpus=CORPUS)  # same arguments: kept
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    build_text_encoder(str(again), corpus=CORPUS, seed=1)  # other arguments: rebuilt in place
    assert _sha(again / "model.safetensors") != _sha(Path(text_dir) / "model.safetensors")
    assert '"seed": 1' in (again / MARKER).read_text()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_text_encoder(str(foreign), corpus=CORPUS)


# ---------------------------------------------------------------- VAE
def test_vae_round_trip_shapes_and_determinism(vae_dir, tmp_path):
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    assert vae_scale_factor(vae) == 2 and vae_scale_factor(vae.config) == 2
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
        decoded = vae.decode(posterior.mean).sample
    assert posterior.mean.shape == posterior.std.shape == (1, 4, 32, 32)
    assert decoded.shape == (1, 3, 64, 64) and torch.isfinite(decoded).all()

    again = Path(build_vae(str(tmp_path / "again")))
    assert _sha(again / "diffusion_pytorch_model.safetensors") == _sha(Path(vae_dir) / "diffusion_pytorch_model.safetensors")
    deeper = AutoencoderKL.from_pretrained(build_vae(str(tmp_path / "deeper"), latent_channels=8,
                                                     block_out_channels=(16, 32, 32)))
    assert vae_scale_factor(deeper) == 4
    with torch.no_grad():
        assert deeper.encode(image).latent_dist.mean.shape == (1, 8, 16, 16)


# ---------------------------------------------------------------- pipeline
def test_exported_pipeline_loads_and_generates(pipe_dir):
    pipe = PixArtAlphaPipeline.from_pretrained(pipe_dir)
    assert isinstance(pipe.transformer, PixArtTransformer2DModel)
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert (sched.num_train_timesteps, sched.beta_schedule, sched.beta_start, sched.beta_end) == (1000, "linear", 0.0001, 0.02)
    prompts = ["a red circle on a white background", "a blue square"]
    for height, width in ((64, 64), (64, 96)):
        images = generate(pipe, prompts, height=height, width=width, steps=2)
        assert len(images) == 2
        assert all(isinstance(im, Image.Image) and im.size == (width, height) for im in images)
    first = generate(pipe_dir, prompts[:1], height=64, width=64, steps=2, seed=7)[0]
    second = generate(pipe_dir, prompts[:1], height=64, width=64, steps=2, seed=7)[0]
    assert np.array_equal(np.asarray(first), np.asarray(second))
    with pytest.raises(ValueError, match="multiples"):
        generate(pipe, prompts, height=64, width=68, steps=1)


def test_export_replaces_a_pipeline_and_checks_compatibility(pipe_dir, text_dir, vae_dir, tmp_path):
    transformer = PixArtTransformer2DModel.from_pretrained(Path(pipe_dir) / "transformer")
    export_pipeline(pipe_dir, transformer=str(Path(pipe_dir) / "transformer"), text_encoder_dir=text_dir,
                    vae_dir=vae_dir)
    assert (Path(pipe_dir) / "model_index.json").is_file()
    assert not [p for p in Path(pipe_dir).parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    wide = build_transformer("PixArt-tiny/2", caption_channels=32, **TINY)
    with pytest.raises(ValueError, match="caption_channels"):
        export_pipeline(str(tmp_path / "bad"), transformer=wide, text_encoder_dir=text_dir, vae_dir=vae_dir)
    assert transformer.config.caption_channels == 64
