"""training.dit_import with real diffusers models: a tiny random DiT (diffusers folder and an
original-DiT .pt) imported as PixArt reproduces DiT's null-class output at t=500 for any
caption, differs away from it, and the report names every tensor."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from training.dit_import import REPORT, import_dit, main

NUM_CLASSES = 10
NULL = NUM_CLASSES  # DiT's CFG class: the class table's last row
CAPTION_CHANNELS = 24
D = 32  # 2 heads × 16
TOL = 1e-5


def _tiny_dit(norm_eps: float = 1e-6, seed: int = 0) -> DiTTransformer2DModel:
    """Two blocks, 2 heads × 16, 8×8 latents, learned sigma. Every tensor gets seeded noise on
    top of PyTorch's init, so the adaLN, class and timestep weights all matter."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
                                    norm_eps=norm_eps)
        with torch.no_grad():
            for param in dit.parameters():
                param.add_(torch.randn_like(param) * 0.1)
    return dit.eval()


def _latents(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _captions(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(2, tokens, CAPTION_CHANNELS, generator=torch.Generator().manual_seed(seed))


def _dit_out(dit: DiTTransformer2DModel, x: torch.Tensor, t: int) -> torch.Tensor:
    with torch.no_grad():
        return dit(x, timestep=torch.full((len(x),), t), class_labels=torch.full((len(x),), NULL)).sample


def _pixart_out(pixart: PixArtTransformer2DModel, x: torch.Tensor, t: int, caption: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pixart(x, encoder_hidden_states=caption, timestep=torch.full((len(x),), t)).sample


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny diffusers DiT saved with save_pretrained and imported from its folder."""
    root = tmp_path_factory.mktemp("dit_import")
    dit = _tiny_dit()
    dit.save_pretrained(root / "dit")
    report = import_dit(root / "dit", root / "pixart", caption_channels=CAPTION_CHANNELS)
    pixart = PixArtTransformer2DModel.from_pretrained(root / "pixart").eval()
    return dit, pixart, report, root


# --------------------------------------------------------------------------- diffusers folder
def test_reproduces_null_class_at_t500_for_any_caption(imported):
    dit, pixart, report, _ = imported
    x = _latents()
    expected = _dit_out(dit, x, 500)
    # attn2's output projection is zero, so neither the caption nor its length matters.
    for caption in (_captions(5, 2), _captions(17, 3) * 10, torch.zeros(2, 1, CAPTION_CHANNELS)):
        assert _max_diff(_pixart_out(pixart, x, 500, caption), expected) <= TOL
    assert report.max_abs_diff is not None and report.max_abs_diff <= TOL
    # ...and the match is not trivial: a real class gives something else.
    with torch.no_grad():
        other = dit(x, timestep=torch.full((2,), 500), class_labels=torch.tensor([3, 7])).sample
    assert _max_diff(other, expected) > 1e-2


@pytest.mark.parametrize("t", [100, 999])
def test_differs_away_from_t500(imported, t):
    """adaLN-single shares one timestep function over blocks; DiT has one per block."""
    dit, pixart, _, _ = imported
    x = _latents()
    assert _max_diff(_pixart_out(pixart, x, t, _captions(5, 2)), _dit_out(dit, x, t)) > 1e-2


def _pairs(block_keys: list[tuple[str, str]], depth: int = 2) -> set[tuple[str, str]]:
    return {(dst.format(i=i), src.format(i=i)) for i in range(depth) for dst, src in block_keys}


def test_report_names_every_tensor(imported):
    dit, pixart, report, root = imported
    wb = ("weight", "bias")
    shared = [(f"transformer_blocks.{{i}}.{m}.{k}",) * 2 for m in
              ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2") for k in wb]
    expected_copied = _pairs(shared) | {(f"pos_embed.proj.{k}", f"pos_embed.proj.{k}") for k in wb} | {
        (f"proj_out.{k}", f"proj_out_2.{k}") for k in wb} | {
        (f"adaln_single.emb.timestep_embedder.{lin}.{k}", f"transformer_blocks.0.norm1.emb.timestep_embedder.{lin}.{k}")
        for lin in ("linear_1", "linear_2") for k in wb} | {
        (f"adaln_single.linear.{k}", f"transformer_blocks.0.norm1.linear.{k}") for k in wb}
    assert set(report.copied) == expected_copied and len(report.copied) == 34
    assert sorted(report.reparameterised) == ["scale_shift_table", "transformer_blocks.0.scale_shift_table",
                                              "transformer_blocks.1.scale_shift_table"]
    assert set(report.new) == {f"transformer_blocks.{i}.attn2.{m}.{k}" for i in range(2)
                               for m in ("to_q", "to_k", "to_v", "to_out.0") for k in wb} | {
        f"caption_projection.{lin}.{k}" for lin in ("linear_1", "linear_2") for k in wb}
    assert set(report.dropped) == {
        "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
        "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight",
        *(f"transformer_blocks.1.norm1.emb.timestep_embedder.{lin}.{k}" for lin in ("linear_1", "linear_2") for k in wb),
        *(f"transformer_blocks.1.norm1.linear.{k}" for k in wb),
        *(f"proj_out_1.{k}" for k in wb),
    }
    # A partition of both sides: every PixArt tensor accounted for once, every DiT tensor used or dropped.
    pixart_keys = [dst for dst, _ in report.copied] + report.reparameterised + report.new
    assert sorted(pixart_keys) == sorted(pixart.state_dict())
    assert {src for _, src in report.copied} | set(report.dropped) == set(dit.state_dict())
    on_disk = json.loads((root / "pixart" / REPORT).read_text())
    assert on_disk == json.loads(json.dumps(report.to_json()))
    assert on_disk["summary"] == report.summary() and "34 copied" in report.summary()
    assert (report.t, report.null_class, report.source_format) == (500, NULL, "diffusers")


def test_pixart_config_and_new_weights(imported, tmp_path):
    dit, pixart, _, root = imported
    cfg = pixart.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.patch_size, cfg.sample_size,
            cfg.in_channels, cfg.out_channels) == (2, 2, 16, 2, 8, 4, 8)
    assert (cfg.caption_channels, cfg.cross_attention_dim, cfg.norm_type) == (CAPTION_CHANNELS, D, "ada_norm_single")
    assert cfg.norm_eps == dit.config.norm_eps and cfg.use_additional_conditions is False
    for block in pixart.transformer_blocks:
        assert not block.attn2.to_out[0].weight.any() and not block.attn2.to_out[0].bias.any()
        assert block.attn2.to_q.weight.any()
    # The new tensors are seeded: same seed, same weights; another seed, others.
    again = import_dit(root / "dit", tmp_path / "again", caption_channels=CAPTION_CHANNELS, seed=0, check=False)
    other = import_dit(root / "dit", tmp_path / "other", caption_channels=CAPTION_CHANNELS, seed=1, check=False)
    assert again.max_abs_diff is None and other.new == again.new
    first = pixart.state_dict()
    same = PixArtTransformer2DModel.from_pretrained(tmp_path / "again").state_dict()
    differ = PixArtTransformer2DModel.from_pretrained(tmp_path / "other").state_dict()
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert not torch.equal(first["caption_projection.linear_1.weight"], differ["caption_projection.linear_1.weight"])
    assert torch.equal(first["transformer_blocks.1.scale_shift_table"], differ["transformer_blocks.1.scale_shift_table"])


def test_default_norm_eps(tmp_path):
    """diffusers' DiT hard-codes eps 1e-6 before attention and uses norm_eps (default 1e-5)
    before the MLP; PixArt has one eps (kept = norm_eps). With DiT's pre-attention eps set to
    the same value the import is exact, so that eps is the only residual."""
    dit = _tiny_dit(norm_eps=1e-5)
    dit.save_pretrained(tmp_path / "dit")
    report = import_dit(tmp_path / "dit", tmp_path / "pixart", caption_channels=CAPTION_CHANNELS)
    pixart = PixArtTransformer2DModel.from_pretrained(tmp_path / "pixart").eval()
    assert pixart.config.norm_eps == 1e-5
    assert report.max_abs_diff < 1e-4 and any("eps" in note for note in report.notes)
    for block in dit.transformer_blocks:
        block.norm1.norm.eps = 1e-5
    x = _latents()
    assert _max_diff(_pixart_out(pixart, x, 500, _captions(5, 2)), _dit_out(dit, x, 500)) <= TOL


# --------------------------------------------------------------------------- original .pt
def _to_original(dit: DiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """facebookresearch/DiT's state dict for a diffusers DiT whose blocks share block 0's
    timestep and class embedders (the original has one of each)."""
    sd = {k: v.clone() for k, v in dit.state_dict().items()}
    emb = "transformer_blocks.0.norm1.emb"
    out = {"pos_embed": dit.pos_embed.pos_embed.clone(),
           "y_embedder.embedding_table.weight": sd[f"{emb}.class_embedder.embedding_table.weight"]}
    for k in ("weight", "bias"):
        out[f"x_embedder.proj.{k}"] = sd[f"pos_embed.proj.{k}"]
        out[f"t_embedder.mlp.0.{k}"] = sd[f"{emb}.timestep_embedder.linear_1.{k}"]
        out[f"t_embedder.mlp.2.{k}"] = sd[f"{emb}.timestep_embedder.linear_2.{k}"]
        out[f"final_layer.adaLN_modulation.1.{k}"] = sd[f"proj_out_1.{k}"]
        out[f"final_layer.linear.{k}"] = sd[f"proj_out_2.{k}"]
        for i in range(dit.config.num_layers):
            b = f"transformer_blocks.{i}"
            out[f"blocks.{i}.attn.qkv.{k}"] = torch.cat([sd[f"{b}.attn1.to_{n}.{k}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{k}"] = sd[f"{b}.attn1.to_out.0.{k}"]
            out[f"blocks.{i}.mlp.fc1.{k}"] = sd[f"{b}.ff.net.0.proj.{k}"]
            out[f"blocks.{i}.mlp.fc2.{k}"] = sd[f"{b}.ff.net.2.{k}"]
            out[f"blocks.{i}.adaLN_modulation.1.{k}"] = sd[f"{b}.norm1.linear.{k}"]
    return out


def _original_timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """DiT's TimestepEmbedder.timestep_embedding (from GLIDE), written out."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_original_checkpoint(tmp_path):
    """An original DiT (eps 1e-6 throughout, one timestep/class embedder, GLIDE's sinusoid) as
    a training checkpoint with EMA weights and its argparse args."""
    dit = _tiny_dit(norm_eps=1e-6, seed=5)
    with torch.no_grad():
        for block in dit.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
    original = _to_original(dit)
    decoy = {k: torch.zeros_like(v) for k, v in original.items()}  # "model" must lose to "ema"
    torch.save({"model": decoy, "ema": original, "args": argparse.Namespace(model="DiT-tiny/2")},
               tmp_path / "dit.pt")

    report = import_dit(tmp_path / "dit.pt", tmp_path / "pixart", caption_channels=CAPTION_CHANNELS, num_heads=2)
    pixart = PixArtTransformer2DModel.from_pretrained(tmp_path / "pixart").eval()
    assert pixart.config.norm_eps == 1e-6 and report.source_format == "original"

    # The reference: this diffusers DiT computing the original's timestep sinusoid (diffusers'
    # own DiT uses another one, which the import must not follow for an original checkpoint).
    x = _latents()
    assert _max_diff(_pixart_out(pixart, x, 500, _captions(7, 4)), _dit_out(dit, x, 500)) > 1e-4
    steps = torch.tensor([0, 100, 500, 999])
    for block in dit.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    assert torch.allclose(dit.transformer_blocks[0].norm1.emb.time_proj(steps), _original_timestep_embedding(steps),
                          atol=1e-6)
    expected = _dit_out(dit, x, 500)
    assert _max_diff(_pixart_out(pixart, x, 500, _captions(7, 4)), expected) <= TOL
    assert report.max_abs_diff <= TOL
    assert _max_diff(_pixart_out(pixart, x, 100, _captions(7, 4)), _dit_out(dit, x, 100)) > 1e-2

    copied = dict(report.copied)
    assert copied["transformer_blocks.0.attn1.to_q.weight"] == "blocks.0.attn.qkv.weight[0:32]"
    assert copied["transformer_blocks.1.attn1.to_v.bias"] == "blocks.1.attn.qkv.bias[64:96]"
    assert copied["transformer_blocks.1.attn1.to_out.0.weight"] == "blocks.1.attn.proj.weight"
    assert copied["transformer_blocks.0.ff.net.0.proj.weight"] == "blocks.0.mlp.fc1.weight"
    assert copied["adaln_single.emb.timestep_embedder.linear_2.bias"] == "t_embedder.mlp.2.bias"
    assert copied["adaln_single.linear.weight"] == "blocks.0.adaLN_modulation.1.weight"
    assert copied["pos_embed.proj.weight"] == "x_embedder.proj.weight"
    assert copied["proj_out.bias"] == "final_layer.linear.bias"
    assert len(copied) == 34 and len(report.new) == 20
    assert set(report.dropped) == {"pos_embed", "y_embedder.embedding_table.weight", "blocks.1.adaLN_modulation.1.weight",
                                   "blocks.1.adaLN_modulation.1.bias", "final_layer.adaLN_modulation.1.weight",
                                   "final_layer.adaLN_modulation.1.bias"}


def test_original_checkpoint_needs_heads_for_unknown_width(tmp_path):
    torch.save(_to_original(_tiny_dit()), tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="num_heads"):
        import_dit(tmp_path / "dit.pt", tmp_path / "pixart", caption_channels=CAPTION_CHANNELS)
    assert not (tmp_path / "pixart").exists()


# --------------------------------------------------------------------------- CLI and guards
def test_cli(imported, tmp_path):
    _, pixart, _, root = imported
    dst = tmp_path / "cli"
    argv = [str(root / "dit"), str(dst), "--caption-channels", str(CAPTION_CHANNELS), "--t", "500"]
    assert main(argv) == 0
    assert json.loads((dst / REPORT).read_text())["t"] == 500
    assert main(argv) == 0  # an import of ours is replaced
    reloaded = PixArtTransformer2DModel.from_pretrained(dst).state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in pixart.state_dict().items())

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    assert main([str(root / "dit"), str(foreign), "--caption-channels", "24"]) == 2
    assert (foreign / "keep.txt").read_text() == "not ours"
    assert main([str(root / "dit"), str(tmp_path / "x"), "--caption-channels", "24", "--null-class", "11"]) == 2


def test_other_t_and_class(imported, tmp_path):
    """t and the reproduced class are parameters: at t=250 for class 3 PixArt is DiT(3)."""
    dit, _, _, root = imported
    report = import_dit(root / "dit", tmp_path / "p", caption_channels=CAPTION_CHANNELS, t=250, null_class=3)
    pixart = PixArtTransformer2DModel.from_pretrained(tmp_path / "p").eval()
    x = _latents()
    with torch.no_grad():
        expected = dit(x, timestep=torch.full((2,), 250), class_labels=torch.full((2,), 3)).sample
    assert _max_diff(_pixart_out(pixart, x, 250, _captions(3, 9)), expected) <= TOL
    assert (report.t, report.null_class) == (250, 3)
