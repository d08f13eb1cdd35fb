"""Self-scoring: the verdict prompt, logits mode against a full forward, generate mode against a model
taught (in-test, a few seconds) to answer the verdict question from the image."""

import copy
import math

import numpy as np
import pytest
import torch

from gapray.models import JanusModel
from gapray.verdict import ANSWER_PREFIX, VERDICT_QUESTION

WHITE = np.full((32, 32, 3), 255, np.uint8)
BLACK = np.zeros((32, 32, 3), np.uint8)


def test_verdict_prompt_renders_question_once_with_image(tiny):
    text = tiny.verdict_text("a photo of a red circle")
    assert text.startswith("<|User|>: <image_placeholder>\n") and text.endswith("\n\n<|Assistant|>:")
    assert text.count("You are a helpful language and vision assistant.") == 1  # no default system prompt added
    assert VERDICT_QUESTION.format(prompt="a photo of a red circle").replace("{your score}", "{your score}") in text


def test_logits_mode_equals_full_forward(tiny):
    prompts = ["a photo of a red circle", "a photo of two blue squares"]
    images = np.stack([WHITE, BLACK])
    got = tiny.score(prompts, images).p_aligned
    texts = [f"{tiny.verdict_text(p)} {ANSWER_PREFIX}" for p in prompts]
    enc = tiny.processor(text=texts, images=list(images), generation_mode="text", padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = tiny.model(**enc).logits[:, -1]  # every position, no logits_to_keep
    one, zero = tiny.tokenizer.convert_tokens_to_ids(["1", "0"])
    expected = torch.softmax(logits[:, [one, zero]], -1)[:, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert ((got > 0) & (got < 1)).all()


@pytest.fixture(scope="module")
def judge(tiny):
    """A copy of the tiny model trained to answer 'The score is 1 .' for white images and '0' for black."""
    model = JanusModel(copy.deepcopy(tiny.model), tiny.processor)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.model.parameters(), lr=5e-3)
    prompts = ["a photo of a red circle", "a photo of two blue squares"] * 2
    images = [WHITE, WHITE, BLACK, BLACK]
    answers = ["1", "1", "0", "0"]
    texts = [f"{model.verdict_text(p)} {ANSWER_PREFIX} {a} ." for p, a in zip(prompts, answers)]
    enc = model.processor(text=texts, images=images, generation_mode="text", padding=True, return_tensors="pt")
    n_answer = len(model.tokenizer.encode(f"{ANSWER_PREFIX} 1 .", add_special_tokens=False))
    labels = enc["input_ids"].clone()
    labels[:, :-n_answer] = -100  # learn the answer only
    model.model.train()
    for _ in range(100):
        loss = model.model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.model.eval()
    assert loss.item() < 0.05
    return model


def test_both_modes_read_the_taught_answer(judge):
    prompts = ["a photo of a red circle", "a photo of two blue squares"]
    images = np.stack([WHITE, BLACK])
    logits_mode = judge.score(prompts, images, mode="logits")
    assert logits_mode.p_aligned[0] > 0.9 and logits_mode.p_aligned[1] < 0.1
    gen = judge.score(prompts, images, mode="generate")
    assert gen.answers[0].startswith("The score is 1") and gen.answers[1].startswith("The score is 0")
    assert gen.p_aligned.tolist() == [1.0, 0.0]


def test_generate_mode_unparsed_is_nan_never_a_verdict(tiny):
    out = tiny.score(["a photo of a red circle"], WHITE[None], mode="generate", max_new_tokens=3)
    assert len(out.answers) == 1 and "score is" not in out.answers[0]  # a random model babbles
    assert math.isnan(out.p_aligned[0])


def test_bad_score_mode(tiny):
    with pytest.raises(ValueError, match="score mode"):
        tiny.score(["x"], WHITE[None], mode="vibes")


def test_decode_is_uint8_rgb_at_model_resolution(tiny):
    tokens = torch.randint(0, 64, (3, tiny.n_image_tokens))
    images = tiny.decode(tokens)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    pix = tiny.model.decode_image_tokens(tokens).clamp(-1, 1)
    np.testing.assert_array_equal(images, ((pix + 1) * 127.5).round().to(torch.uint8).numpy())


def test_save_and_reload_gives_the_same_model(tiny, tiny_dir):
    from gapray.models import SamplingParams

    again = JanusModel.from_pretrained(tiny_dir)
    a = tiny.sample(["a photo of a red circle"], 2, SamplingParams(), seeds=5)
    b = again.sample(["a photo of a red circle"], 2, SamplingParams(), seeds=5)
    assert torch.equal(a.tokens, b.tokens)
    np.testing.assert_allclose(tiny.score(["a photo of a red circle"], WHITE[None]).p_aligned,
                               again.score(["a photo of a red circle"], WHITE[None]).p_aligned, atol=1e-6)
