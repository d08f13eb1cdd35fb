"""The VLM judge on tiny random models of four families, built offline: Qwen2-VL and Qwen2.5-VL (a Qwen2-style
byte-level BPE that splits digits off, so " 1" is "Ġ" then "1"), Idefics3/SmolVLM (GPT-2-style byte-level BPE,
" 1" is one token "Ġ1"), each with its family's chat template and PIL image processor (no torchvision), and
gapray's tiny Janus (word-level tokenizer), the way a Janus-Pro-7B judge of a 1B policy would run."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, PreTrainedTokenizerFast,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen2VLProcessor)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from gapray.judges import JudgeOutput, VLMJudge
from gapray.judges.vlm import verdict_messages
from gapray.models import JanusModel
from gapray.models.builders import build_tiny_janus
from gapray.verdict import ANSWER_PREFIX, verdict_question

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle left of a circle",
           "a circle", "a photo of three yellow squares below a red triangle"]
CORPUS = [f"{verdict_question(p)} {ANSWER_PREFIX} {d}." for p in PROMPTS for d in "01"] + [
    "Yes, it does. No, it does not. I am not sure. You are a helpful assistant. User Assistant system"]

# Qwen2's pre-tokenizer regex: digits are single pieces and a space before one is a piece of its own.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def byte_level_bpe(specials: list[str], qwen2_split: bool) -> Tokenizer:
    byte = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not qwen2_split)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte]) \
        if qwen2_split else byte
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    return tk


# ---- Qwen2-VL and Qwen2.5-VL (one tokenizer, template and image processor) ----------------------------------
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
# Qwen2-VL-Instruct's chat template (Qwen2.5-VL's too), cut to text and image items.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor: transformers type-checks every sub-processor slot, even an
    empty one, against VideoProcessorMixin, which does not exist without torchvision. Its __init__ signature is
    what ProcessorMixin reads the slots from. (Qwen2_5_VLProcessor is the same class under another name.)"""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_qwen(version: str):
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(QWEN_SPECIALS, qwen2_split=True),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    # 4 px patches, 2x2 merge: a 32x32 image is 16 image tokens.
    ip = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    proc = ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                # head_dim 8: 4 rotary frequencies split over (time, height, width)
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                   tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        cfg = Qwen2VLConfig(text_config=text, vision_config=dict(vision, embed_dim=32, mlp_ratio=2), **special)
        return Qwen2VLForConditionalGeneration(cfg), proc
    # Qwen2.5-VL's tower: windowed attention (16 px windows = 2x2 merged tokens) but in the last block.
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(vision, intermediate_size=64, out_hidden_size=32,
                                                                window_size=16, fullatt_block_indexes=[1]), **special)
    return Qwen2_5_VLForConditionalGeneration(cfg), proc


# ---- Idefics3 / SmolVLM ------------------------------------------------------------------------------------
IDEFICS_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                    "<global-img>"]
# SmolVLM-Instruct's chat template.
IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build_idefics3():
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(IDEFICS_SPECIALS, qwen2_split=False),
                                  bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in IDEFICS_SPECIALS}
    # One 32x32 global image, no tiles: (32 / 8)^2 patches / scale_factor^2 = 4 image tokens.
    ip = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                   max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"],
                         pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<image>"], scale_factor=2, tie_word_embeddings=False)
    return Idefics3ForConditionalGeneration(cfg), proc


@dataclass
class Family:
    build: object
    answer_start: str  # what follows the generation prompt before "The score is", as the template writes a reply
    shared: list[str]  # the tokens both answers start with, then the two answer tokens
    one: str
    zero: str


FAMILIES = {
    "qwen2_vl": Family(lambda: build_qwen("2"), "", ["Ġ"], "1", "0"),  # digits split: " 1" is "Ġ" + "1"
    "qwen2_5_vl": Family(lambda: build_qwen("2.5"), "", ["Ġ"], "1", "0"),
    "idefics3": Family(build_idefics3, " ", [], "Ġ1", "Ġ0"),  # the space folds into the digit
    # Janus as an external judge (Janus-Pro-7B judging a 1B policy): gapray's tiny Janus, word-level tokenizer.
    "janus": Family(lambda: build_tiny_janus([*PROMPTS, "I am not sure"]), " ", [], "1", "0"),
}


def make_judge(name: str, seed: int = 0, **kw) -> VLMJudge:
    torch.manual_seed(seed)
    model, proc = FAMILIES[name].build()
    # Logits of std ~2 (hidden states leave the final norm with norm ~sqrt(32)), not the init's ~0.1: p_aligned
    # spreads over (0, 1), neither stuck at 0.5 nor saturated, so a wrong position or token shows.
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=0.3)
    return VLMJudge(model, proc, **kw)


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def test_answer_tokens_per_family(family):
    judge, fam = make_judge(family), FAMILIES[family]
    a = judge.answer_tokens(judge.chat_text(PROMPTS[0], "logits"))
    tok = judge.tokenizer
    assert tok.convert_ids_to_tokens(list(a.shared_suffix_ids)) == fam.shared
    assert tok.convert_ids_to_tokens([a.one, a.zero]) == [fam.one, fam.zero]


def test_logits_match_hand_forward(family):
    """p_aligned from a padded batch = softmax over the "1"/"0" logits of one unpadded forward pass of the
    prompt written out by hand: generation prompt, the reply's start, "The score is", the shared tokens."""
    judge, fam = make_judge(family), FAMILIES[family]
    ims, prompts = images(3), PROMPTS[1:4]  # three lengths in every tokenizer here
    out = judge.judge(ims, prompts, mode="logits", batch_size=3)
    tok, proc = judge.tokenizer, judge.processor
    shared = tok.convert_tokens_to_ids(fam.shared)
    one, zero = tok.convert_tokens_to_ids([fam.one, fam.zero])
    lengths = []
    for i, (im, p) in enumerate(zip(ims, prompts)):
        text = proc.apply_chat_template(verdict_messages(p), tokenize=False, add_generation_prompt=True)
        enc = proc(text=[text + fam.answer_start + ANSWER_PREFIX], images=[Image.fromarray(im)], return_tensors="pt")
        ids = torch.cat([enc["input_ids"], torch.tensor([shared], dtype=torch.long)], 1)
        enc = {**enc, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "mm_token_type_ids" in enc:  # Qwen2-VL's text/image marks (for its 3-D rope): the shared tokens are text
            marks = enc["mm_token_type_ids"]
            enc["mm_token_type_ids"] = torch.cat([marks, marks.new_zeros((1, len(shared)))], 1)
        with torch.no_grad():
            logits = judge.model(**enc).logits[0, -1]
        expected = torch.softmax(logits[[one, zero]].double(), 0)[0].item()
        assert out.p_aligned[i] == pytest.approx(expected, abs=1e-5)
        assert out.verdict[i] == int(expected >= 0.5) and out.answer[i] is None
        lengths.append(ids.shape[1])
    assert len(set(lengths)) == 3  # the batch was padded: the rows had different lengths
    assert max(out.p_aligned) - min(out.p_aligned) > 1e-3  # the rows are told apart


def test_batch_size_does_not_change_p_aligned(family):
    judge = make_judge(family)
    ims = images(5, seed=1)
    one_by_one = judge.judge(ims, PROMPTS, batch_size=1).p_aligned
    batched = judge.judge(ims, PROMPTS, batch_size=4).p_aligned  # a padded batch of 4, then 1
    assert batched == pytest.approx(one_by_one, abs=1e-5)


def test_pil_and_array_images_judge_alike():
    judge = make_judge("qwen2_vl")
    ims = images(2)
    assert judge.judge([Image.fromarray(im) for im in ims], PROMPTS[:2]).p_aligned == \
        pytest.approx(judge.judge(ims, PROMPTS[:2]).p_aligned, abs=1e-6)


def script_answer(judge: VLMJudge, last_prompt_token: int, text: str) -> None:
    """Make the model answer `text` then EOS to any prompt ending in `last_prompt_token`, greedily: every attention
    and MLP output is zeroed, so the last hidden state is the current token's (normed) embedding, and the lm_head
    maps each token of the answer to the next one (a hand-built bigram model)."""
    model = judge.model
    for name, module in model.get_decoder().named_modules():
        if name.endswith(("o_proj", "down_proj")):
            module.weight.data.zero_()
    eos = judge.eos_id if isinstance(judge.eos_id, int) else judge.eos_id[0]
    chain = [last_prompt_token, *judge.tokenizer.encode(text, add_special_tokens=False), eos]
    successor: dict[int, int] = {}
    for a, b in zip(chain, chain[1:]):
        assert successor.setdefault(a, b) == b, "a token with two successors cannot be scripted"
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    head.data.zero_()
    for a, b in successor.items():
        head.data[b] += 100 * torch.nn.functional.normalize(emb[a].detach(), dim=0)


@pytest.mark.parametrize("said,p,verdict", [("The score is 1.", 1.0, 1), ("The score is 0.", 0.0, 0),
                                            ("I am not sure.", None, None)])
def test_generate_mode_parses_scripted_answers(family, said, p, verdict):
    judge, fam = make_judge(family), FAMILIES[family]
    tok = judge.tokenizer
    last = tok.encode(judge.chat_text(PROMPTS[0], "generate"))[-1]
    script_answer(judge, last, fam.answer_start + said)
    out = judge.judge(images(3), PROMPTS[:3], mode="generate", batch_size=3)
    assert isinstance(out, JudgeOutput)
    written = tok.decode(tok.encode(fam.answer_start + said, add_special_tokens=False)).strip()
    assert written == said or family == "janus"  # word-level decoding writes "The score is 1 ."
    assert out.answer == [written] * 3  # all rows of the padded batch, decoded without special tokens
    assert out.p_aligned == [p] * 3 and out.verdict == [verdict] * 3
    assert out.n_unparsed == (3 if verdict is None else 0)


def test_janus_as_judge_matches_its_self_judgement():
    """The same Janus model asked through the VLM judge and through gapray's self-judge (JanusModel.score) reads
    the same prompt and gives the same p_aligned."""
    judge = make_judge("janus")
    self_judge = JanusModel(judge.model, judge.processor)
    ims = np.stack(images(3))
    assert judge.chat_text(PROMPTS[0], "logits") == f"{self_judge.verdict_text(PROMPTS[0])} {ANSWER_PREFIX}"
    expected = self_judge.score(PROMPTS[:3], ims, mode="logits").p_aligned
    assert judge.judge(ims, PROMPTS[:3], batch_size=2).p_aligned == pytest.approx(expected.tolist(), abs=1e-5)


def test_bad_mode_and_length_mismatch_raise():
    judge = make_judge("idefics3")
    with pytest.raises(ValueError, match="judge mode"):
        judge.judge(images(1), PROMPTS[:1], mode="sample")
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        judge.judge(images(2), PROMPTS[:1])


@pytest.mark.parametrize("name", ["idefics3", "janus"])
def test_from_pretrained_round_trip(tmp_path, name):
    """AutoModelForImageTextToText + AutoProcessor load a saved judge and read the same answers. (Not Qwen2-VL here:
    AutoProcessor would build its video processor, which needs torchvision.)"""
    judge = make_judge(name)
    judge.model.save_pretrained(tmp_path)
    judge.processor.save_pretrained(tmp_path)
    loaded = VLMJudge.from_pretrained(str(tmp_path), dtype="float32", device="cpu", local_files_only=True)
    assert loaded.model_id == str(tmp_path)
    expected = judge.judge(images(2), PROMPTS[:2]).p_aligned
    assert loaded.judge(images(2), PROMPTS[:2]).p_aligned == pytest.approx(expected, abs=1e-6)
