"""CLIP models and LAION's aesthetic head, as the scoring stage loads them.

Two kinds of folder go through one path: a hub CLIP (``openai/clip-vit-large-patch14``, or a
local copy of it) and the demo's ``analysis/models/synthetic-clip`` trained here
(``analysis/train_clip.py``). Both are a transformers ``CLIPModel`` + a processor saved with
``save_pretrained``, loaded by ``CLIPModel.from_pretrained`` / ``AutoProcessor.from_pretrained``.

The synthetic CLIP's tokenizer is word level over the scene grammar: a ``tokenizers``
WordLevel model wrapped as ``PreTrainedTokenizerFast``. In transformers 5.x that class *is*
``TokenizersBackend``; ``CLIPProcessor`` takes any tokenizer and saves it with
``"tokenizer_class": "TokenizersBackend"``, which ``AutoProcessor`` loads back. (``CLIPTokenizer``
would need a byte-level BPE vocab + merges: nothing gained for a 60-word grammar.)

``AestheticHead`` is improved-aesthetic-predictor's MLP with its key names, so LAION's
``sac+logos+ava1-l14-linearMSE.pth`` (d=768, over ViT-L/14 embeddings) loads into it as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

# CLIP's own special-token names. Ids: pad 0, unk 1, bos 2, eos 3. eos must not be 2: a CLIP
# text config with eos_token_id == 2 takes the legacy pooling path (argmax of the ids), which
# is right only for OpenAI's vocabulary, where eos is the largest id.
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class ClipSpec:
    """The synthetic CLIP's shape. Small on purpose: 64 px scenes of flat shapes need little,
    and a 2-vCPU machine trains it in minutes (the card says how well it learnt)."""

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 96
    vision_layers: int = 3
    text_width: int = 64
    text_layers: int = 2
    heads: int = 4
    projection_dim: int = 64
    max_text_tokens: int = 77  # OpenAI CLIP's context; a 6-object caption is about 62 tokens


# --------------------------------------------------------------------------- building
def build_tokenizer(max_length: int = ClipSpec.max_text_tokens):  # -> PreTrainedTokenizerFast
    """One token per word of the scene grammar (``scenes.vocabulary``), case-folded, plus ','
    and '.'; ``<|startoftext|> ... <|endoftext|>`` around every text, as CLIP's tokenizer does.
    Words outside the grammar (alt text's) become ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from synthetic import scenes

    vocab = {piece: i for i, piece in enumerate([PAD, UNK, BOS, EOS, *scenes.vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and runs of punctuation apart
    tok.decoder = decoders.WordPiece(cleanup=True)  # joins with spaces, no space before ',' '.'
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, model_max_length=max_length, padding_side="right")


def build_processor(spec: ClipSpec = ClipSpec()):  # -> CLIPProcessor
    """Images squashed to ``image_size`` square (no centre crop: a crop would cut off objects
    the caption names, on wide scenes), CLIP's mean/std."""
    import transformers

    # The PIL image processor: this project's CPU machines have no working torchvision. The
    # saved config says "CLIPImageProcessor"; transformers picks the backend when loading.
    image_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    square = {"height": spec.image_size, "width": spec.image_size}
    images = image_cls(size=square, crop_size=square, do_center_crop=False)
    return transformers.CLIPProcessor(image_processor=images, tokenizer=build_tokenizer(spec.max_text_tokens))


def build_model(spec: ClipSpec, tokenizer, seed: int = 0):  # -> CLIPModel  # noqa: ANN001
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=spec.text_width, intermediate_size=4 * spec.text_width,
                num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
                max_position_embeddings=spec.max_text_tokens, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=spec.vision_width, intermediate_size=4 * spec.vision_width,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.heads,
                  image_size=spec.image_size, patch_size=spec.patch_size)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.projection_dim)
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        return CLIPModel(config)


TINY_SPEC = ClipSpec(vision_width=32, vision_layers=1, text_width=32, text_layers=1, heads=2, projection_dim=16)


def build_tiny_clip(folder: str | Path, seed: int = 0, spec: ClipSpec = TINY_SPEC) -> Path:
    """A randomly initialised synthetic-shaped CLIP saved as a model folder (tests; seconds)."""
    processor = build_processor(spec)
    build_model(spec, processor.tokenizer, seed).save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return Path(folder)


# --------------------------------------------------------------------------- using
def load_clip(folder_or_hub_id: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32):  # -> (CLIPModel, processor)
    """A CLIP model (eval mode, on ``device`` in ``dtype``) and its processor. Weights shipped
    in float16 are cast to ``dtype`` (float32 by default: CPUs have no fast float16)."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(folder_or_hub_id), dtype=dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(str(folder_or_hub_id))


def _pooled(out) -> torch.Tensor:  # noqa: ANN001
    # transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:  # noqa: ANN001
    p = next(model.parameters())
    return p.device, p.dtype


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """L2-normalised float32 embeddings of preprocessed images, on the model's device."""
    device, dtype = _device_dtype(model)
    return nn.functional.normalize(_pooled(model.get_image_features(pixel_values=pixel_values.to(device, dtype))).float(), dim=-1)


def text_features(model, tokens) -> torch.Tensor:  # noqa: ANN001 - the processor's BatchEncoding or a dict
    """L2-normalised float32 embeddings of tokenised texts, on the model's device."""
    device, _ = _device_dtype(model)
    out = model.get_text_features(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
    return nn.functional.normalize(_pooled(out).float(), dim=-1)


@torch.inference_mode()
def image_embeddings(model, processor, images: Sequence, batch_size: int = 256) -> torch.Tensor:  # noqa: ANN001
    """L2-normalised image embeddings (float32, CPU, one row per image) of PIL images."""
    rows = []
    for start in range(0, len(images), batch_size):
        chunk = [im.convert("RGB") for im in images[start:start + batch_size]]
        rows.append(image_features(model, processor(images=chunk, return_tensors="pt")["pixel_values"]).cpu())
    return torch.cat(rows) if rows else torch.empty(0, model.config.projection_dim)


@torch.inference_mode()
def text_embeddings(model, processor, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:  # noqa: ANN001
    """L2-normalised text embeddings (float32, CPU); texts longer than the model's context are
    cut at it (77 tokens for OpenAI's CLIPs)."""
    rows = []
    for start in range(0, len(texts), batch_size):
        tokens = processor(text=list(texts[start:start + batch_size]), padding=True, truncation=True,
                           return_tensors="pt")
        rows.append(text_features(model, tokens).cpu())
    return torch.cat(rows) if rows else torch.empty(0, model.config.projection_dim)


# --------------------------------------------------------------------------- the aesthetic head
class AestheticHead(nn.Module):
    """improved-aesthetic-predictor's MLP (github.com/christophschuhmann/improved-aesthetic-predictor),
    layer for layer, so its ``.pth`` state dicts (keys ``layers.0.weight`` ... ``layers.7.bias``)
    load unchanged. It has no activations, as the original: in eval mode the whole head is one
    affine map of the L2-normalised CLIP image embedding, i.e. a linear probe with dropout while
    training."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores of already normalised embeddings (N, d) -> (N,)."""
        return self.layers(embeddings)[..., 0]

    @torch.inference_mode()
    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores (float32, CPU) of image embeddings, L2-normalised here as LAION's code does."""
        p = next(self.parameters())
        x = nn.functional.normalize(embeddings.to(p.device, p.dtype), dim=-1)
        return self(x).float().cpu()

    @staticmethod
    def _shapes(input_size: int) -> dict[str, torch.Size]:
        dims = [(0, input_size, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]
        out = {}
        for i, d_in, d_out in dims:
            out[f"layers.{i}.weight"], out[f"layers.{i}.bias"] = torch.Size((d_out, d_in)), torch.Size((d_out,))
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> AestheticHead:
        """Load a state dict: a ``.safetensors`` file, or a torch ``.pth``/``.pt`` file (read with
        ``weights_only=True``: a weights file is data, never code). A folder means its
        ``model.safetensors``. The input size comes from ``layers.0.weight``; anything that is
        not exactly this MLP's keys and shapes is refused with ``ValueError``."""
        path = Path(path)
        if path.is_dir():
            path = path / "model.safetensors"
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 (each loader has its own error types)
            raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
        first = state.get("layers.0.weight")
        if first is None or first.ndim != 2:
            raise ValueError(f"{path}: no 2-D 'layers.0.weight'; not an aesthetic-predictor MLP "
                             f"(keys: {sorted(state)[:8]})")
        expected = cls._shapes(int(first.shape[1]))
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: keys do not match the aesthetic-predictor MLP: missing {missing}, "
                             f"unexpected {unexpected}")
        wrong = {k: tuple(state[k].shape) for k in expected if state[k].shape != expected[k]}
        if wrong:
            raise ValueError(f"{path}: wrong shapes {wrong}; expected {({k: tuple(expected[k]) for k in wrong})}")
        head = cls(int(first.shape[1]))
        head.load_state_dict({k: v.float() for k, v in state.items()})
        return head.eval()

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the state dict under LAION's key names: safetensors for a ``.safetensors`` path,
        else a torch file like LAION's ``.pth``. ``dtype`` (e.g. float16) halves the bytes."""
        path = Path(path)
        state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in self.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(path), metadata={"format": "pt", "input_size": str(self.input_size)})
        else:
            torch.save(state, path)
        return path
