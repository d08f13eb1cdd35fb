"""Verdict scoring on the tokenizer families real checkpoints use, trained offline in-test: word-level (the
tiny models'), byte-level BPE with the space folded into the digit (GPT-2 style) or written apart because
digits are split off first (DeepSeek's, Janus-Pro's: " 1" is "Ġ" then "1"), and Llama-style sentencepiece
(metaspace "▁1" as one token or, digits split, "▁" then "1")."""

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import JanusForConditionalGeneration, PreTrainedTokenizerFast

from gapray.models import JanusModel
from gapray.models.builders import BOI, BOS, EOI, EOS, IMAGE, PAD, SPECIALS, TINY, UNK, build_processor, \
    build_tokenizer, janus_config
from gapray.models.janus import append_tokens
from gapray.verdict import ANSWER_PREFIX, answer_tokens, parse_answer, verdict_question

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle left of a circle"]


def chat(question: str) -> str:
    """One user turn with an image, as Janus' chat template renders it (tests/test_scoring.py checks the template)."""
    return f"<|User|>: {IMAGE}\n{question}\n\n<|Assistant|>:"


# Both answer formats: Janus-Pro's "The score is 1." and the shapes world's "The score is 1 ." (world/pretrain.py).
CORPUS = [f"{chat(verdict_question(p))} {ANSWER_PREFIX} {d}{end}{EOS}" for p in PROMPTS for d in "01"
          for end in (".", " .")] + ["Yes, it does. No, it does not."]


def wrap(tk: Tokenizer) -> PreTrainedTokenizerFast:
    """Janus' special tokens and BOS-first encoding, as gapray.models.builders.build_tokenizer sets them."""
    tk.add_special_tokens(SPECIALS)
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tk.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   padding_side="left",
                                   extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI})


def bpe(pre_tokenizer, decoder, initial_alphabet=()) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(unk_token=UNK))
    tk.pre_tokenizer, tk.decoder = pre_tokenizer, decoder
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIALS, initial_alphabet=list(initial_alphabet),
                                  show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    return wrap(tk)


def byte_level(split_digits: bool) -> PreTrainedTokenizerFast:
    byte = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), "isolated"), byte]) if split_digits else byte
    return bpe(pre, decoders.ByteLevel(), pre_tokenizers.ByteLevel.alphabet())


def metaspace(split_digits: bool) -> PreTrainedTokenizerFast:
    meta = pre_tokenizers.Metaspace()
    pre = pre_tokenizers.Sequence([meta, pre_tokenizers.Digits(individual_digits=True)]) if split_digits else meta
    return bpe(pre, decoders.Metaspace())


# name -> (builder, the shared tokens, the answer tokens for "1" and "0")
KINDS = {
    "word_level": (lambda: build_tokenizer(PROMPTS), [], ["1", "0"]),
    "byte_level": (lambda: byte_level(False), [], ["Ġ1", "Ġ0"]),
    "byte_level_split_digits": (lambda: byte_level(True), ["Ġ"], ["1", "0"]),
    "metaspace": (lambda: metaspace(False), [], ["▁1", "▁0"]),
    "metaspace_split_digits": (lambda: metaspace(True), ["▁"], ["1", "0"]),
}


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request):
    build, shared, answers = KINDS[request.param]
    return build(), shared, answers


def prefix() -> str:
    return f"{chat(verdict_question(PROMPTS[0]))} {ANSWER_PREFIX}"


def test_answer_tokens_per_tokenizer_kind(kind):
    tok, shared, answers = kind
    a = answer_tokens(tok, prefix())
    # The split-digit kinds are the ones fixed: the old answer_token_ids read the shared space token for both
    # answers and raised.
    assert tok.convert_ids_to_tokens(list(a.shared_suffix_ids)) == shared
    assert tok.convert_ids_to_tokens([a.one, a.zero]) == answers and a.one != a.zero
    base = tok.encode(prefix(), add_special_tokens=False)
    for digit, answer_id in (("1", a.one), ("0", a.zero)):  # prefix + shared + answer is how the tokenizer writes it
        assert [*base, *a.shared_suffix_ids, answer_id] == tok.encode(f"{prefix()} {digit}", add_special_tokens=False)


@pytest.mark.parametrize("answer,expected", [
    ("The score is 1.", 1.0), ("The score is 0.", 0.0), ("The score is 1 .", 1.0), ("The score is {0}.", 0.0),
    ("Yes, it does.", 1.0), ("No, it does not.", 0.0), ("The score is {your score}.", None),
])
def test_decoded_answers_parse(kind, answer, expected):
    """Generate mode decodes the tokens after the prompt (special tokens skipped, stripped), then parses."""
    tok, _, _ = kind
    prompt = chat(verdict_question(PROMPTS[0]))
    base = tok.encode(prompt)
    full = tok.encode(f"{prompt} {answer}{EOS}")
    assert full[:len(base)] == base
    decoded = tok.decode(full[len(base):], skip_special_tokens=True).strip()
    got = parse_answer(decoded)
    assert (expected is None and got != got) or got == expected, decoded


def test_unknown_or_identical_answers_raise():
    tk = Tokenizer(models.WordLevel(vocab={UNK: 0, "The": 1, "score": 2, "is": 3}, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(ValueError, match="does not distinguish"):  # "1" and "0" both unk
        answer_tokens(wrap(tk), ANSWER_PREFIX)


def test_append_tokens_extends_left_padded_rows():
    enc = {"input_ids": torch.tensor([[9, 9, 5, 6], [5, 6, 7, 8]]), "attention_mask": torch.tensor([[0, 0, 1, 1], [1] * 4])}
    out = append_tokens(dict(enc), (3,))
    assert out["input_ids"].tolist() == [[9, 9, 5, 6, 3], [5, 6, 7, 8, 3]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1] * 5]
    assert append_tokens(dict(enc), ())["input_ids"] is enc["input_ids"]


def test_logits_mode_teacher_forces_the_shared_space_token():
    """A tiny random Janus speaking the split-digit byte-level tokenizer: score equals P(1) / (P(1) + P(0)) read
    after the lone space token, from one full forward over the text that ends in it."""
    tok = byte_level(True)
    special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
               "image": tok.convert_tokens_to_ids(IMAGE)}
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(janus_config(vocab_size=len(tok), special_ids=special, **TINY)).eval()
    jm = JanusModel(model, build_processor(tok, TINY["image_size"], 64))
    prompts = PROMPTS[:2]  # different lengths: the rows are left-padded
    images = np.stack([np.full((32, 32, 3), 255, np.uint8), np.zeros((32, 32, 3), np.uint8)])
    got = jm.score(prompts, images).p_aligned

    def forward(suffix: str):
        texts = [f"{jm.verdict_text(p)} {ANSWER_PREFIX}{suffix}" for p in prompts]
        enc = jm.processor(text=texts, images=list(images), generation_mode="text", padding=True, return_tensors="pt")
        with torch.no_grad():
            return enc, jm.model(**enc).logits[:, -1]  # every position, no logits_to_keep

    enc, logits = forward(" ")  # the text itself ends in the lone space token
    assert tok.convert_ids_to_tokens(enc["input_ids"][:, -1].tolist()) == ["Ġ", "Ġ"]
    one, zero = tok.convert_tokens_to_ids(["1", "0"])
    expected = torch.softmax(logits[:, [one, zero]], -1)[:, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    _, before_space = forward("")  # what reading right after "is" would give: not the same
    assert np.abs(torch.softmax(before_space[:, [one, zero]], -1)[:, 0].numpy() - got).min() > 1e-4
