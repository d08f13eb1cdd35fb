"""A VLM judge: any transformers image-text-to-text model (Qwen2/2.5/3-VL, Idefics3/SmolVLM, LLaVA, InternVL...)
asked the paper's verdict question about an image, in the model's own chat template.

Two ways to read the answer, as for self-judging (gapray/verdict.py):
  - logits: the chat continues an assistant turn that already says "The score is"; the tokens both answers
    start with (a lone space token where digits are split off) are teacher-forced, and p_aligned is the
    softmax over the next-token logits of "1" and "0". One forward pass, no sampling.
  - generate: greedy, a few tokens, parsed by gapray.verdict.parse_answer. An unparsed answer gets
    p_aligned None and verdict None, and is counted apart (`JudgeOutput.n_unparsed`), never as 0 or 1.

Batches are left-padded, so every row ends at the answer position. The model always runs through `generate`,
even in logits mode (one new token, its raw logits kept): generate is where transformers derives position ids
from the attention mask for every family (cumsum for Llama-style models, Qwen2-VL's 3-D rope index) and keeps
only the last position's logits, so a padded row reads like an unpadded one and a 150k vocabulary is
projected once per row, not once per token. (A plain forward numbers padding as positions: harmless under
1-D RoPE, which sees only offsets, but not for models with absolute position embeddings.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from gapray.models.janus import DTYPES, append_tokens, resolve_device
from gapray.verdict import ANSWER_PREFIX, AnswerTokens, answer_tokens, parse_answer, to_verdict, verdict_question

JUDGE_MODES = ("logits", "generate")


@dataclass
class JudgeOutput:
    p_aligned: list[float | None]  # P("1") / (P("1") + P("0")) in logits mode; 1.0 / 0.0 / None (unparsed) in generate
    verdict: list[int | None]  # 1 aligned, 0 misaligned, None unparsed
    answer: list[str | None]  # the raw generated text in generate mode, None in logits mode

    @property
    def n_unparsed(self) -> int:
        return sum(v is None for v in self.verdict)


def verdict_messages(prompt: str, answer_prefix: str | None = None) -> list[dict]:
    """One user turn holding the image and the verdict question; with `answer_prefix`, the assistant's turn
    already begun (rendered with continue_final_message, so the template decides the spacing before it)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": verdict_question(prompt)}]}]
    if answer_prefix is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer_prefix}]})
    return msgs


def to_pil(image) -> Image.Image:
    # HxWx3 uint8 arrays go through PIL so image processors never have to guess the channel axis.
    return image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))


class VLMJudge:
    def __init__(self, model, processor, model_id: str | None = None, batch_size: int = 8,
                 threshold: float = 0.5, max_new_tokens: int = 16):
        self.model = model.eval()
        self.processor = processor
        if getattr(processor, "use_default_system_prompt", False):
            # Janus' processor can prepend its system text; the verdict question already carries it verbatim.
            processor.use_default_system_prompt = False
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # the answer is read (and written) at the right end of every row
        if self.tokenizer.pad_token is None:  # many chat tokenizers ship none; padded positions are masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model_id = model_id or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.batch_size = batch_size
        self.threshold = threshold
        self.max_new_tokens = max_new_tokens
        eos = model.generation_config.eos_token_id
        self.eos_id = eos if eos is not None else self.tokenizer.eos_token_id
        self._answer: AnswerTokens | None = None

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "bfloat16", device: str = "auto", device_map: str | None = None,
                        local_files_only: bool = False, **kwargs) -> "VLMJudge":
        """A hub id (Qwen/Qwen2.5-VL-7B-Instruct) or a save_pretrained directory; kwargs go to __init__.
        `device_map` ("auto") shards a judge too big for one device (72B in bf16 is ~145 GB) and overrides `device`."""
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype], device_map=device_map,
                                                            local_files_only=local_files_only)
        if device_map is None:
            model = model.to(resolve_device(device))
        processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only)
        return cls(model, processor, model_id=path, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def chat_text(self, prompt: str, mode: str) -> str:
        if mode == "logits":
            return self.processor.apply_chat_template(verdict_messages(prompt, ANSWER_PREFIX), tokenize=False,
                                                      continue_final_message=True)
        return self.processor.apply_chat_template(verdict_messages(prompt), tokenize=False, add_generation_prompt=True)

    def answer_tokens(self, text: str) -> AnswerTokens:
        # How " 1" / " 0" follow "The score is" depends on the tokenizer, not on the prompt before it: computed once.
        if self._answer is None:
            self._answer = answer_tokens(self.tokenizer, text)
        return self._answer

    def inputs(self, texts: list[str], images: list) -> dict:
        enc = self.processor(text=texts, images=[to_pil(im) for im in images], padding=True, padding_side="left",
                             return_tensors="pt").to(self.device)
        if "pixel_values" in enc:  # float32 out of the processor; the model may run in bf16
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        return dict(enc)

    def greedy(self, max_new_tokens: int, **kw) -> GenerationConfig:
        # A fresh config, so a checkpoint's sampling defaults (Qwen ships top_k/temperature) never apply.
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_id, **kw)

    def logits_batch(self, prompts: list[str], images: list) -> list[float]:
        texts = [self.chat_text(p, "logits") for p in prompts]
        ans = self.answer_tokens(texts[0])
        enc = append_tokens(self.inputs(texts, images), ans.shared_suffix_ids)
        out = self.model.generate(**enc, generation_config=self.greedy(1, output_logits=True,
                                                                         return_dict_in_generate=True))
        two = out.logits[0].float()[:, [ans.one, ans.zero]].softmax(-1)  # raw logits of the first new token
        return two[:, 0].double().tolist()

    def generate_batch(self, prompts: list[str], images: list) -> list[str]:
        enc = self.inputs([self.chat_text(p, "generate") for p in prompts], images)
        out = self.model.generate(**enc, generation_config=self.greedy(self.max_new_tokens))
        answers = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [a.strip() for a in answers]

    @torch.inference_mode()
    def judge(self, images: list, prompts: list[str], mode: str = "logits",
              batch_size: int | None = None) -> JudgeOutput:
        """One verdict per (image, prompt) pair: images are HxWx3 uint8 arrays or PIL images."""
        if mode not in JUDGE_MODES:
            raise ValueError(f"judge mode must be one of {JUDGE_MODES}, got {mode!r}")
        images = list(images)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        bs = batch_size or self.batch_size
        p: list[float | None] = []
        answers: list[str | None] = []
        for i in range(0, len(prompts), bs):
            chunk_p, chunk_im = prompts[i:i + bs], images[i:i + bs]
            if mode == "logits":
                p += self.logits_batch(chunk_p, chunk_im)
                answers += [None] * len(chunk_p)
            else:
                texts = self.generate_batch(chunk_p, chunk_im)
                parsed = [parse_answer(t) for t in texts]
                p += [None if x != x else x for x in parsed]  # NaN (unparsed) -> None
                answers += texts
        verdicts = [None if x is None else to_verdict(x, self.threshold) for x in p]
        return JudgeOutput(p_aligned=p, verdict=verdicts, answer=answers)


class VLMExternalJudge:
    """A VLMJudge as the self-judging core's external judge (gapray.judges.ExternalJudge): every prompt, in one
    configured mode; its name (the ledger's judge_model) is the model id or path it was loaded from."""

    def __init__(self, vlm: VLMJudge, mode: str = "logits"):
        if mode not in JUDGE_MODES:
            raise ValueError(f"judge mode must be one of {JUDGE_MODES}, got {mode!r}")
        self.vlm, self.mode = vlm, mode
        self.name = vlm.model_id

    def covers(self, prompt) -> bool:
        return True  # any text prompt: the verdict question needs no metadata

    def __call__(self, images, prompts: list) -> list[tuple[int | None, float | None]]:
        if not prompts:
            return []
        out = self.vlm.judge(images, [p.prompt for p in prompts], mode=self.mode)
        return list(zip(out.verdict, out.p_aligned))
