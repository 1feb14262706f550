"""Train the synthetic domain's text encoder: a small T5, from scratch, here.

PixArt reads prompts through a frozen T5 encoder. A random encoder passes each word through
(its embedding is a fixed random vector) but mixes words at random, so nothing tells the
diffusion model which colour belongs to which shape: a calibration run learned backgrounds
(one word, one global fact) and left object colours at chance. This encoder is trained so that
every token's state carries its object's facts.

How, and why:
* Text-to-text, as T5 itself (``T5ForConditionalGeneration``; only the encoder is shipped, as
  PixArt uses T5-XXL's encoder). The only supervision is text from the synthetic grammar's
  corpus (``scenes.corpus``): no images.
* The task for dense captions is *restating* them in another order: the caption lists objects
  in reading order ("a small red star at the top left, a large blue circle ..."), the target
  lists each object kind-first and sorted by kind ("circle blue large center; star red small
  top left; background blue plain"). To write a kind's attributes the decoder has to find them
  through cross-attention from the encoder's states, which rewards states in which every word
  of an object phrase carries the others (binding). T5's span corruption would not: masked
  colours and positions are random in this grammar, so there is nothing to infer.
* Alt-text lines (LAION-like, mostly noise) are restated as themselves, so the encoder also
  sees, and keeps, the words the alt-text experiments feed it.
* The tokenizer is the one the random tiny T5 uses (sentencepiece trained on the fixed corpus),
  and the encoder's width (64) matches the demo's PixArt ``caption_channels``.
* Fresh scenes every step (seeded by step); held-out scenes from a disjoint seed stream are
  scored by exact restatement (greedy decoding). Deterministic given the seed.

``python -m training.train_text_encoder OUT [--steps N] [--seed S]``; ``make train-text-encoder``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from synthetic import scenes

log = logging.getLogger(__name__)

HELD_OUT_STREAM = 1_000_033
TOKENIZER_CORPUS = (2000, 0)  # scenes.corpus(count, seed): the random tiny T5's tokenizer corpus


@dataclass
class TextEncoderTrainConfig:
    seed: int = 0
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    d_model: int = 64
    heads: int = 4
    encoder_layers: int = 3
    decoder_layers: int = 2
    max_objects: int = 6
    alt_text_fraction: float = 0.25
    eval_lines: int = 256
    log_every: int = 50
    checkpoint_every: int = 250


def restatement(text: str) -> str:
    """The target for one corpus line: a dense caption's facts kind-first, sorted by kind
    (then by reading order); any other line (alt text) unchanged."""
    parsed = scenes.parse_description(text)
    if parsed.background is None:
        return text
    objects = sorted(enumerate(parsed.objects), key=lambda io: (scenes.KINDS.index(io[1][2]), io[0]))
    parts = [f"{kind} {colour} {size} {position}" for _, (size, colour, kind, position) in objects]
    return "; ".join(parts + [f"background {parsed.background} {parsed.texture}"])


def lines(seed: int, stream: int, index: int, count: int, cfg: TextEncoderTrainConfig) -> list[str]:
    """``count`` corpus lines: dense captions of fresh scenes (1 to ``max_objects`` objects),
    a ``alt_text_fraction`` of them replaced by the same scene's alt text."""
    rng = np.random.default_rng([seed, stream, index])
    options = scenes.SceneOptions(max_objects=cfg.max_objects)
    out = []
    for _ in range(count):
        scene = scenes.sample_scene(rng, options)
        text = scenes.alt_text(scene, rng) if rng.random() < cfg.alt_text_fraction else scenes.describe(scene)
        out.append(text or "image")
    return out


def tokenizer():  # -> T5Tokenizer
    from training.encoders import tokenizer_from_sentencepiece, train_sentencepiece

    return tokenizer_from_sentencepiece(train_sentencepiece(scenes.corpus(*TOKENIZER_CORPUS)))


def build(cfg: TextEncoderTrainConfig, vocab_size: int):  # -> T5ForConditionalGeneration
    from transformers import T5ForConditionalGeneration

    from training.encoders import t5_config

    config = t5_config(vocab_size, cfg.d_model, cfg.encoder_layers, cfg.heads)
    config.num_decoder_layers = cfg.decoder_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return T5ForConditionalGeneration(config)


def batch(tok, texts: list[str]) -> dict[str, torch.Tensor]:  # noqa: ANN001
    inputs = tok(texts, padding=True, return_tensors="pt")
    labels = tok([restatement(t) for t in texts], padding=True, return_tensors="pt").input_ids
    labels[labels == tok.pad_token_id] = -100  # no loss on padding
    return {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask, "labels": labels}


def evaluate(model, tok, cfg: TextEncoderTrainConfig) -> dict[str, float]:  # noqa: ANN001
    """Exact restatement of held-out lines, dense captions and alt text apart (greedy)."""
    model.eval()
    right = {"dense": [], "alt_text": []}
    with torch.inference_mode():
        for start in range(0, cfg.eval_lines, 64):
            texts = lines(cfg.seed, HELD_OUT_STREAM, start, min(64, cfg.eval_lines - start), cfg)
            inputs = tok(texts, padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=160, do_sample=False, num_beams=1)
            for text, said in zip(texts, tok.batch_decode(out, skip_special_tokens=True)):
                kind = "dense" if scenes.parse_description(text).background else "alt_text"
                right[kind].append(said.strip() == restatement(text))
    model.train()
    return {f"{k}_exact": round(float(np.mean(v)), 4) for k, v in right.items() if v} | {
        f"{k}_lines": len(v) for k, v in right.items()}


def encoder_only(model):  # noqa: ANN001  -> T5EncoderModel
    """The encoder half (shared embedding + encoder stack) as the T5EncoderModel PixArt loads."""
    from transformers import T5EncoderModel

    encoder = T5EncoderModel(model.config)
    missing, unexpected = encoder.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k.startswith(("shared.", "encoder."))}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"encoder weights do not line up: missing {missing}, unexpected {unexpected}")
    return encoder.eval()


def train(out: str, cfg: TextEncoderTrainConfig) -> dict:
    """Train (resuming from an interrupted run's state), measure, save the encoder + tokenizer."""
    from training.architectures import num_parameters
    from training.script_training import ScriptRun

    run = ScriptRun(out, cfg.seed, log)
    tok = tokenizer()
    model = build(cfg, len(tok))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    run.resume(model, optimizer)
    log.info("T5: %.2fM parameters (encoder %.2fM), vocab %d; %d steps of %d", num_parameters(model) / 1e6,
             num_parameters(model.encoder) / 1e6, len(tok), cfg.steps, cfg.batch_size)
    run.train(lambda step: model(**batch(tok, lines(cfg.seed, 0, step, cfg.batch_size, cfg))).loss,
              steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, floor=0.05,
              log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, unit="lines")
    metrics = evaluate(model, tok, cfg)
    log.info("held-out restatement: %s", metrics)
    encoder = encoder_only(model)
    summary = {"parameters": num_parameters(model), "encoder_parameters": num_parameters(encoder),
               "vocab_size": len(tok), "steps": cfg.steps, "batch_size": cfg.batch_size, "held_out": metrics,
               "config": asdict(cfg), "torch": torch.__version__, "median_lines_per_s": run.median_rate("lines")}

    def save(tmp: Path) -> None:
        encoder.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    run.finish(save, summary, model_card(summary))
    return summary


def model_card(summary: dict) -> str:
    cfg, held = summary["config"], summary["held_out"]
    example = "A small red star at the top left and a large blue circle in the center, on a plain white background."
    return f"""# synthetic-t5

A transformers `T5EncoderModel` ({summary['encoder_parameters'] / 1e6:.2f}M parameters; d_model {cfg['d_model']},
{cfg['encoder_layers']} layers, {cfg['heads']} heads, gated-GELU as T5 v1.1) and its sentencepiece tokenizer
(vocabulary {summary['vocab_size']}), trained from scratch by `make train-text-encoder`
(training/train_text_encoder.py, seed {cfg['seed']}) on this project's synthetic caption grammar. It is
PixArt's text encoder for the embedded demo, in place of T5-XXL. Load it with
`T5EncoderModel.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`.

## Why it was trained, and how
A random frozen encoder passes each word through but mixes words at random, so nothing
tells the diffusion model which colour belongs to which shape. In a calibration run the model
learned background colours and left object colours at chance.

This encoder was trained as the encoder half of a T5 (with a {cfg['decoder_layers']}-layer decoder, not shipped).
The task was to restate each dense caption kind-first and sorted by kind, so the decoder must
fetch every object's attributes from the encoder's states. For example:

    {example}
    -> {restatement(example)}

Alt-text lines ({cfg['alt_text_fraction']:.0%} of the lines) are restated unchanged. Scenes have 1 to {cfg['max_objects']} objects.
The only supervision is text; no images were used.

- Training: {summary['steps']} steps of {summary['batch_size']} fresh lines, AdamW lr {cfg['lr']} (warm-up, cosine), float32
  on CPU, about {summary['median_lines_per_s'] or float('nan'):.0f} lines/s on the 2-vCPU development machine.
- Held-out exact restatement (greedy decoding): dense captions {held.get('dense_exact', float('nan')):.1%} of {held['dense_lines']},
  alt text {held.get('alt_text_exact', float('nan')):.1%} of {held['alt_text_lines']}.
"""


def main(argv: Sequence[str] | None = None) -> int:
    from training.script_training import script_main, script_parser

    parser = script_parser("python -m training.train_text_encoder", __doc__,
                           "output folder (a T5EncoderModel + tokenizer + card)", TextEncoderTrainConfig)
    return script_main(parser, argv,
                       lambda args: train(args.out, TextEncoderTrainConfig(steps=args.steps, seed=args.seed)))


if __name__ == "__main__":
    sys.exit(main())
