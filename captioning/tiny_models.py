"""Randomly initialised LLaVA-family models built offline: tiny ones for tests and demos,
and one at LLaVA-1.5-7B's shapes (size "7b") to measure captioning throughput on a GPU.

There is no model hub here, so the captioning stage is exercised with models built from
configs, saved with ``save_pretrained`` and loaded back through the same
``AutoProcessor.from_pretrained(folder)`` / ``AutoModelForImageTextToText.from_pretrained(folder)``
path that a real checkpoint such as ``llava-hf/llava-1.5-7b-hf`` takes.

The tokenizer is a byte-level BPE trained on a small built-in corpus (plus any extra
``words``), so any text round-trips exactly and every corpus word is a single token. The
chat template follows llava-hf's LLaVA-1.5 processor template:
``USER: <image>\\n{prompt} ASSISTANT:``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

TINY_KINDS = ("llava", "llava_next")


@dataclass(frozen=True)
class ModelSize:
    vision: dict
    """CLIPVisionConfig arguments (image and patch size apart)."""
    text: dict
    """LlamaConfig arguments (vocabulary apart)."""
    image_size: int
    patch_size: int
    vocab_size: int | None = None
    """None: the tokenizer's own size. Else the tokenizer is trained to this many tokens and
    the embedding padded to a multiple of 64, as llava-hf's checkpoints are (32064)."""


SIZES = {
    "tiny": ModelSize(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
        image_size=64, patch_size=8),
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (576 image tokens) and Llama-2-7B
    "7b": ModelSize(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    projection_dim=768, layer_norm_eps=1e-5),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, rms_norm_eps=1e-5),
        # Llama's 32000 tokens plus <image> and <pad>, padded to 32064 as llava-hf's are
        image_size=336, patch_size=14, vocab_size=32002),
}

MARKER = "tiny_model.json"
_MARKER_VERSION = 1

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE]

# llava-hf/llava-1.5-*-hf's processor template (images first, then text), with plain-string
# content accepted as well. add_generation_prompt appends "ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}"
    "{{ message['content'] + ' ' }}"
    "{% else %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = """\
USER: ASSISTANT: SYSTEM:
Describe this image and its style in a very detailed manner.
Describe the image in detail. What is in this picture? Write a short caption.
The image shows a red circle in the top left corner of a white background.
A small blue square sits next to a large green triangle on a gray background.
There are three objects: a yellow star, an orange rectangle and a purple ellipse.
This is a photograph of a dog running on the grass in a park on a sunny day.
A cat is sleeping on a wooden table near the window, in a cozy room.
A man and a woman are walking along the beach at sunset, with the ocean behind them.
The painting is in the style of impressionism, with soft brush strokes and bright colors.
A close-up of a flower with pink petals, water drops and a blurred background.
The city street at night is full of cars, lights, tall buildings and people.
A mountain landscape with snow, trees, a lake and clouds in the blue sky.
A plate of food with rice, vegetables and meat on a white plate.
The photo is black and white, taken from above, showing a road and a bridge.
An illustration of a castle on a hill, drawn in a cartoon style.
In the center there is one big black circle, and at the bottom right a tiny red square.
left right top bottom center middle above below behind front under over between
one two three four five six seven eight nine ten a an the of in on at with and or
red green blue yellow orange purple pink brown black white gray cyan magenta
circle square triangle rectangle ellipse star diamond hexagon cross line shape shapes
small large big tiny medium huge background foreground object objects scene
"""


def _pseudo_words(count: int, seed: int = 0) -> list[str]:
    """Pronounceable made-up words: a corpus big enough to train a full-size vocabulary."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(count)]


def _word_level(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` tokens (the corpus' words, then made-up
    ones): a full-size vocabulary in milliseconds, where training a BPE that large takes
    minutes. Throughput depends on the vocabulary's size, not on its words."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = dict.fromkeys(SPECIAL_TOKENS)
    vocab.update(dict.fromkeys(re.findall(r"\w+|[^\w\s]", _CORPUS)))
    for word in _pseudo_words(vocab_size * 2):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _train_bpe(words: list[str] | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = _CORPUS.splitlines()
    if words:
        # Each extra word both line-initial and after a space, so both forms become tokens.
        lines += [" ".join(words), *words]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # stop only when no pair is left: every corpus word is one token
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def _with_bos(tok):  # noqa: ANN001, ANN202 - a tokenizers.Tokenizer
    from tokenizers import processors

    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    # Like Llama's tokenizer: BOS in front, no EOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id), (EOS, eos_id)]
    )
    return tok


def build_tokenizer(words: list[str] | None = None, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <pad>, <s>, </s>, <unk> and <image>, left padding and a
    LLaVA-1.5 chat template. ``words`` are added to the training corpus. With ``vocab_size``
    it is instead word-level with exactly that many tokens (made-up words after the corpus')."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_with_bos(_train_bpe(words) if vocab_size is None else _word_level(vocab_size)),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        add_bos_token=True,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-NeXT's grid shapes (1x2, 2x1, 2x2, 1x3, 3x1 tiles) at the tiny tile size."""
    s = image_size
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


def _image_processor(kind: str, image_size: int):
    import transformers

    common = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    if kind == "llava":
        # The PIL backend class: the default CLIPImageProcessor needs torchvision.
        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        return cls(**common)
    cls = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
    return cls(image_grid_pinpoints=_pinpoints(image_size), **common)


def _build(folder: Path, *, kind: str, size: ModelSize, image_size: int, patch_size: int, seed: int,
           words: list[str] | None) -> None:
    import torch
    import transformers
    from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig

    tokenizer = build_tokenizer(words, size.vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    n_patches = (image_size // patch_size) ** 2
    vocab = len(tokenizer) if size.vocab_size is None else -(-len(tokenizer) // 64) * 64

    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, **size.vision)
    text = LlamaConfig(
        vocab_size=vocab, max_position_embeddings=4096, **size.text,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    common = dict(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=n_patches,
    )
    proc_kwargs = dict(
        image_processor=_image_processor(kind, image_size), tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=CHAT_TEMPLATE,
    )
    if kind == "llava":
        config = transformers.LlavaConfig(**common)
        model_cls, processor = transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor(**proc_kwargs)
    else:
        config = transformers.LlavaNextConfig(image_grid_pinpoints=_pinpoints(image_size), **common)
        model_cls = transformers.LlavaNextForConditionalGeneration
        processor = transformers.LlavaNextProcessor(**proc_kwargs)

    # a 7B model is built where it will run, in bfloat16: 28 GB of float32 on a host is a waste
    large = size.vocab_size is not None
    device = "cuda" if large and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if large else torch.float32
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):  # seed without touching the caller's RNG
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = model_cls(config).eval()
        finally:
            torch.set_default_dtype(default_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built random %s (%d params, vocab %d) in %s", kind, n_params, len(tokenizer), folder)


def _marker(kind: str, size: str, image_size: int, patch_size: int, seed: int, words: list[str] | None) -> dict:
    marker = {"version": _MARKER_VERSION, "kind": kind, "image_size": image_size, "patch_size": patch_size,
              "seed": seed, "words": list(words) if words else []}
    if size != "tiny":  # markers written before sizes existed stay valid
        marker["size"] = size
    return marker


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _complete(folder: Path, marker: dict) -> bool:
    needed = ("config.json", "generation_config.json", "tokenizer.json", "processor_config.json")
    weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return _read_marker(folder) == marker and weights and all((folder / name).is_file() for name in needed)


def build_tiny_llava(folder: str, *, kind: str = "llava", size: str = "tiny", image_size: int | None = None,
                     patch_size: int | None = None, seed: int = 0, words: list[str] | None = None) -> str:
    """Build a random LLaVA (``kind="llava"``) or LLaVA-NeXT (``"llava_next"``) model plus its
    processor into ``folder`` and return ``folder``: ``size="tiny"`` (CPU tests) or ``"7b"``
    (LLaVA-1.5-7B's shapes, built on the GPU if there is one; 14 GB in bfloat16). Image and
    patch size default to the size's.

    Same arguments give byte-identical weights. If ``folder`` already holds a complete model
    built with the same arguments, nothing is rebuilt. The model is built in a temporary
    sibling folder and moved into place, so a reader never sees a half-written model; an
    existing ``folder`` is replaced only if it is empty or was built here (holds the marker).
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"kind must be one of {TINY_KINDS}, got {kind!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    spec = SIZES[size]
    image_size, patch_size = image_size or spec.image_size, patch_size or spec.patch_size
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    target = Path(folder)
    marker = _marker(kind, size, image_size, patch_size, seed, words)
    if _complete(target, marker):
        log.debug("tiny %s already built in %s", kind, target)
        return folder
    if target.exists() and any(target.iterdir()) and _read_marker(target) is None:
        raise FileExistsError(f"{target} is not empty and was not built by build_tiny_llava")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        _build(tmp, kind=kind, size=spec, image_size=image_size, patch_size=patch_size, seed=seed, words=words)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for path in tmp.iterdir():  # some files are written 0600 through temporary files
            path.chmod(0o666 & ~umask)
        if _complete(target, marker):  # another process finished first
            return folder
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
