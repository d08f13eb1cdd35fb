"""Janus / Janus-Pro (transformers' JanusForConditionalGeneration) as a gapray UnifiedModel.

Loads a hub id (deepseek-community/Janus-Pro-1B, -7B) or any save_pretrained directory holding the
model and its processor (the shipped shapes-world model is one). Generation goes through our own CFG
loop (`sampler.cfg_decode`); judging through one forward pass (logits mode) or transformers' text
generate (generate mode).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from transformers import GenerationConfig, JanusForConditionalGeneration, JanusProcessor
from transformers.utils import logging as hf_logging

from gapray.models.base import SampleOutput, ScoreOutput, UnifiedModel
from gapray.models.sampler import SamplingParams, cfg_decode, derive_seed, guided_logprobs, row_uniforms, \
    uncond_input_ids
from gapray.verdict import ANSWER_PREFIX, AnswerTokens, answer_tokens, parse_answer, verdict_question

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCORE_MODES = ("logits", "generate")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def image_token_logprobs(model: JanusForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         tokens: torch.Tensor, sampling: SamplingParams | None = None,
                         uncond_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) teacher-forced log-probs of image `tokens` given left-padded prompts ending in <begin_of_image>.

    The one definition gapray has (notes/janus.md 1.6): prompt embeddings + generation embeddings of
    tokens[:, :-1] through the language model, then the generation head. `sampling=None` gives the plain
    conditional distribution (the training objective); otherwise the distribution `sample` draws from,
    with `uncond_ids` (the prompts' unconditional rows) when it is guided. A module-level function so the
    trainer can call it on a model that DeepSpeed wraps (its ZeRO-3 hooks sit on these submodules).
    """
    B = tokens.shape[0]
    ids, mask, img = input_ids, attention_mask, tokens
    if uncond_ids is not None:
        ids, mask, img = torch.cat([ids, uncond_ids]), torch.cat([mask, mask]), torch.cat([tokens, tokens])
    L = ids.shape[1]
    embeds = torch.cat([model.get_input_embeddings()(ids),
                        model.prepare_embeddings_for_image_generation(img[:, :-1])], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(img[:, :-1])], dim=1)
    h = model.model.language_model(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
    logits = model.model.generation_head(h[:, L - 1:])  # position L-1+t predicts image token t
    if sampling is None:
        logp = logits.float().log_softmax(-1)
    else:
        logp = guided_logprobs(logits[:B], logits[B:] if uncond_ids is not None else None, sampling)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def vq_nearest_codes(vq, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Janus' VQ encoder on pixels in [-1, 1] -> (l2-normalised latents (B, h, w, D), the l2-normalised codebook,
    codes (B, h, w)): the nearest code on the unit sphere, the lookup decode reads (LlamaGen's VQ)."""
    z = torch.nn.functional.normalize(vq.quant_conv(vq.encoder(pixels)).permute(0, 2, 3, 1), dim=-1)
    codebook = torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=-1)
    return z, codebook, (z @ codebook.T).argmax(-1)  # max cosine = min distance between unit vectors


def append_tokens(enc: dict, ids: tuple[int, ...]) -> dict:
    """The same attended tokens appended to every row of left-padded inputs (whose ends line up): token ids,
    not text, so they read exactly as the tokenizer writes them after the rows' last tokens. Per-token side
    tensors some processors return (token_type_ids, Qwen2-VL's mm_token_type_ids) are extended to match."""
    if not ids:
        return enc
    input_ids = enc["input_ids"]
    tail = torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device).expand(len(input_ids), -1)
    enc["input_ids"] = torch.cat([input_ids, tail], 1)
    for key, fill in (("attention_mask", 1), ("token_type_ids", 0), ("mm_token_type_ids", 0)):
        if key in enc:
            enc[key] = torch.cat([enc[key], torch.full_like(tail, fill, dtype=enc[key].dtype)], 1)
    return enc


@contextlib.contextmanager
def quiet_progress():
    """transformers' "Loading weights" / "Writing model shards" bars off for one call: a run loads and saves
    models in every phase, and a bar per call would be most of its log."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class JanusModel(UnifiedModel):
    def __init__(self, model: JanusForConditionalGeneration, processor: JanusProcessor, compile: bool = False):
        self.model = model.eval()
        self.compile = compile  # sample() runs its decode step through torch.compile (config: model.compile)
        self.processor = processor
        # The verdict question carries Janus' system text verbatim; the processor must not add it again.
        processor.use_default_system_prompt = False
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.pad_id = self.tokenizer.pad_token_id
        self.bos_id = self.tokenizer.bos_token_id
        self.boi_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.boi_token)
        vision = model.config.vision_config
        self.image_size = vision.image_size
        self.n_image_tokens = vision.num_image_tokens
        self._answer: AnswerTokens | None = None

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", device: str = "cpu",
                        local_files_only: bool = False, compile: bool = False) -> "JanusModel":
        with quiet_progress():
            model = JanusForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype],
                                                                  local_files_only=local_files_only)
        processor = JanusProcessor.from_pretrained(path, local_files_only=local_files_only)
        return cls(model.to(resolve_device(device)), processor, compile=compile)

    def save_pretrained(self, path: str) -> None:
        with quiet_progress():
            self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- generation -------------------------------------------------------------------------------
    def generation_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded prompt ids ending in <begin_of_image>, as Janus' chat template writes them."""
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": p}]}], add_generation_prompt=True)
            for p in prompts]
        enc = self.processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def sample(self, prompts: list[str], n_per_prompt: int = 1, sampling: SamplingParams = SamplingParams(),
               seeds: int | list[int] = 0) -> SampleOutput:
        if isinstance(seeds, int):
            seeds = [derive_seed(seeds, i, j) for i in range(len(prompts)) for j in range(n_per_prompt)]
        if len(seeds) != len(prompts) * n_per_prompt:
            raise ValueError(f"need {len(prompts) * n_per_prompt} seeds, got {len(seeds)}")
        enc = self.generation_inputs(prompts)
        ids = enc["input_ids"].repeat_interleave(n_per_prompt, 0)
        mask = enc["attention_mask"].repeat_interleave(n_per_prompt, 0)
        uniforms = row_uniforms(seeds, self.n_image_tokens).to(self.device)
        tokens, logps = cfg_decode(self.model, ids, mask, self.n_image_tokens, sampling,
                                   keep_ids=[self.bos_id, self.boi_id], pad_id=self.pad_id, uniforms=uniforms,
                                   compile=self.compile)
        return SampleOutput(tokens=tokens.cpu(), logprobs=logps.cpu(), seeds=list(seeds))

    def image_logprobs(self, prompts: list[str], tokens: torch.Tensor,
                       sampling: SamplingParams | None = None) -> torch.Tensor:
        enc = self.generation_inputs(prompts)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        uncond = None
        if sampling is not None and sampling.guided:  # cond and uncond rows in one pass, as the sampler runs them
            uncond = uncond_input_ids(ids, [self.bos_id, self.boi_id], self.pad_id)
        return image_token_logprobs(self.model, ids, mask, tokens.to(self.device), sampling, uncond)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        pix = self.model.decode_image_tokens(tokens.to(self.device)).float()
        return ((pix.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()

    @torch.no_grad()  # not inference_mode: the tokens may index embeddings in a training step
    def encode_images(self, images: np.ndarray, batch: int = 256) -> torch.Tensor:
        """VQ encoder, then the nearest code under the l2-normalised lookup that decode uses (LlamaGen's VQ,
        Janus' image tokenizer). transformers' JanusVQVAE.encode compares unnormalised vectors, which picks
        other codes than the ones decode reads: not used here."""
        vq = self.model.model.vqmodel
        out = []
        for i in range(0, len(images), batch):
            pixels = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).to(self.device)
            pixels = pixels.permute(0, 3, 1, 2).to(self.model.dtype) / 127.5 - 1
            out.append(vq_nearest_codes(vq, pixels)[2].flatten(1).cpu())
        return torch.cat(out)

    # ---- understanding ----------------------------------------------------------------------------
    def verdict_text(self, prompt: str) -> str:
        return self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": verdict_question(prompt)}]}],
            add_generation_prompt=True)

    def understanding_inputs(self, texts: list[str], images) -> dict:
        """Texts holding one <image_placeholder> each + their images -> model inputs (left-padded), on device."""
        enc = self.processor(text=texts, images=list(images), generation_mode="text", padding=True,
                             return_tensors="pt").to(self.device)
        enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        return enc

    @torch.inference_mode()
    def score(self, prompts: list[str], images: np.ndarray, mode: str = "logits",
              max_new_tokens: int = 16) -> ScoreOutput:
        if mode not in SCORE_MODES:
            raise ValueError(f"score mode must be one of {SCORE_MODES}, got {mode!r}")
        texts = [self.verdict_text(p) for p in prompts]
        if mode == "logits":
            texts = [f"{t} {ANSWER_PREFIX}" for t in texts]
        enc = self.understanding_inputs(texts, images)
        if mode == "logits":
            if self._answer is None:
                self._answer = answer_tokens(self.tokenizer, texts[0])
            # The tokens both answers start with (a lone space token in split-digit BPEs) are teacher-forced,
            # so the last position predicts the digit itself.
            enc = append_tokens(enc, self._answer.shared_suffix_ids)
            logits = self.model(**enc, logits_to_keep=1).logits[:, -1].float()
            two = logits[:, [self._answer.one, self._answer.zero]].softmax(-1)
            return ScoreOutput(p_aligned=two[:, 0].double().cpu().numpy(), answers=[None] * len(prompts))
        greedy = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, bos_token_id=self.bos_id,
                                  pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id)
        out = self.model.generate(**enc, generation_mode="text", generation_config=greedy)
        answers = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        answers = [a.strip() for a in answers]
        return ScoreOutput(p_aligned=np.array([parse_answer(a) for a in answers], dtype=np.float64),
                           answers=answers)
