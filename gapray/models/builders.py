"""Build Janus models from config alone: tiny ones for tests, and the real Janus-Pro shapes with random
weights for benchmarks. Everything here is offline: no hub access, no downloaded tokenizer.

The tokenizer is a word-level `tokenizers` model over a closed vocabulary (the verdict question, digits,
punctuation and whatever words the caller adds), wrapped as a PreTrainedTokenizerFast with Janus'
special tokens, so JanusProcessor, its chat template and save_pretrained/from_pretrained all work as
they do for the hub checkpoints.
"""

from __future__ import annotations

import math

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusProcessor,
                          PreTrainedTokenizerFast)
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

from gapray.verdict import ANSWER_PREFIX, VERDICT_QUESTION

BOS, EOS, PAD, UNK = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<unk>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
SPECIALS = [BOS, EOS, PAD, UNK, IMAGE, BOI, EOI, USER, ASSISTANT]

# Janus' chat template as transformers' converter writes it for the hub checkpoints (one user turn:
# "<|User|>: {content}\n\n<|Assistant|>:"); the tiny processor uses the same one so prompts render alike.
CHAT_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}{%for message in messages%}"
    "{%if message['role']|lower=='user'%}<|User|>: {%elif message['role']|lower=='assistant'%}<|Assistant|>:"
    "{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' and "
    "message['content'][0]['text']=='')%} {%endif%}{%else%}{{message['role'].capitalize()}}: {%endif%}"
    "{%for content in message['content']%}{%if content['type']=='image'%}{%if not loop.first%}{{'\n'}}{%endif%}"
    "<image_placeholder>{%if not loop.last%}{{'\n'}}{%endif%}{%elif content['type']=='text'%}"
    "{%set text=content['text']%}{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}{{' '+text}}{%else%}{{text}}"
    "{%endif%}{%endif%}{%endfor%}{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}{{seps[0]}}{%else%}{{seps[1]}}{%endif%}{%endif%}{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)

_PRE = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def build_tokenizer(texts: list[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose vocabulary covers the verdict question, digits, yes/no and `texts`."""
    base = [VERDICT_QUESTION, ANSWER_PREFIX, "0 1 2 3 4 5 6 7 8 9 Yes No yes no . , : ; ? ! ' \" - { }"]
    words: dict[str, None] = {}
    for text in [*base, *texts]:
        for w, _ in _PRE.pre_tokenize_str(text):
            words.setdefault(w)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = _PRE
    tk.add_special_tokens(SPECIALS)
    # Like the DeepSeek tokenizer of the hub checkpoints: every encoded text starts with BOS.
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, num_image_tokens: int) -> JanusProcessor:
    ip = JanusImageProcessorPil(size={"height": image_size, "width": image_size},
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return JanusProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                          use_default_system_prompt=False, num_image_tokens=num_image_tokens)


def janus_config(*, vocab_size: int, image_size: int, patch_size: int, hidden_size: int, num_layers: int,
                 num_heads: int, intermediate_size: int, codebook_size: int, vision_hidden: int = 32,
                 vision_layers: int = 2, vq_base_channels: int = 32, vq_embed_dim: int = 8,
                 vq_channel_multiplier: list[int] | None = None, special_ids: dict[str, int] | None = None) -> JanusConfig:
    """A self-consistent JanusConfig (dimension rules in shared/notes/janus.md, section 1.5).

    The VQ decoder upsamples once per extra channel level, so len(channel_multiplier) = log2(patch) + 1
    makes generated images exactly `image_size` pixels, the size the understanding encoder reads.
    """
    levels = int(math.log2(patch_size))
    if 2**levels != patch_size or image_size % patch_size:
        raise ValueError("patch_size must be a power of two dividing image_size")
    if vq_channel_multiplier is not None and len(vq_channel_multiplier) != levels + 1:
        raise ValueError(f"vq_channel_multiplier needs {levels + 1} levels for patch_size {patch_size}")
    grid = image_size // patch_size
    ids = special_ids or {}
    cfg = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=4096, pad_token_id=ids.get("pad", 2),
                         bos_token_id=ids.get("bos", 0), eos_token_id=ids.get("eos", 1)),
        vision_config=dict(image_size=image_size, patch_size=patch_size, num_image_tokens=grid * grid,
                           hidden_size=vision_hidden, projection_dim=hidden_size,
                           num_hidden_layers=vision_layers, num_attention_heads=4, mlp_ratio=2, depth=2),
        vq_config=dict(embed_dim=vq_embed_dim, num_embeddings=codebook_size, latent_channels=vq_embed_dim,
                       in_channels=3, base_channels=vq_base_channels,
                       channel_multiplier=vq_channel_multiplier or [1] * (levels + 1), num_res_blocks=1,
                       projection_dim=hidden_size, image_token_embed_dim=hidden_size),
        image_token_id=ids.get("image", 4), tie_word_embeddings=False)
    return cfg


def generation_config(tokenizer) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, guidance_scale=5.0, temperature=1.0, do_sample=True,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)})


def build_janus(words: list[str] = (), *, vocab_size: int | None = None, seed: int = 0, **arch):
    """A randomly initialised Janus model + processor. `arch` goes to `janus_config`."""
    import torch

    tok = build_tokenizer(list(words))
    special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
               "image": tok.convert_tokens_to_ids(IMAGE)}
    cfg = janus_config(vocab_size=vocab_size or len(tok), special_ids=special, **arch)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg).eval()
    model.generation_config = generation_config(tok)
    proc = build_processor(tok, cfg.vision_config.image_size, cfg.vision_config.num_image_tokens)
    return model, proc


TINY = dict(image_size=32, patch_size=4, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
            codebook_size=64)

# The Janus-Pro-1B language model and image tokenizer shapes (Janus-Pro report, Table 1; notes 1.1):
# 24 x 2048 LLM, 384 px images, 16 px patches -> 576 tokens, 16,384-code VQ. The SigLIP-L tower is kept
# small here: benchmarks time generation, which never runs it.
JANUS_PRO_1B = dict(image_size=384, patch_size=16, hidden_size=2048, num_layers=24, num_heads=16,
                    intermediate_size=5632, codebook_size=16384, vq_base_channels=128,
                    vq_channel_multiplier=[1, 1, 2, 2, 4], vision_hidden=64, vision_layers=1)


def build_tiny_janus(words: list[str] = (), seed: int = 0):
    return build_janus(words, seed=seed, **TINY)


def build_janus_pro_1b_random(seed: int = 0):
    return build_janus(vocab_size=102400, seed=seed, **JANUS_PRO_1B)
