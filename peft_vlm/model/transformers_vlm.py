"""`TransformersVLM`: a vision-language model that `transformers` ships as a class (LLaVA, LLaVA-NeXT, Qwen2-VL,
Qwen2.5-VL, Idefics3 / SmolVLM, PaliGemma, Gemma 3), wrapped so that the methods of `peft_vlm` attach to its decoder.

The wrapped model runs its own code end to end: its processor prepares the inputs (chat template, image tokens,
pixel values, Qwen2-VL's grid sizes), it splices its own image features in and computes its own positions (Qwen2-VL's
M-RoPE included). The wrapper only announces, per position, whether a token is one of the model's image tokens
(`peft_vlm.runtime.token_context`), which the methods that route image tokens read. Its `language_model` is the
decoder inside (the module that holds the decoder layers), where the text methods attach; the vision tower and the
projector stay frozen, the projector trainable on request (`train_projector=True`, group `vision`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from peft_vlm.model.module_base import VisionLanguageModule
from peft_vlm.errors import ConfigError, ModelLoadError
from peft_vlm.runtime import packing, token_context
from peft_vlm.runtime.tracking import AppliedMethod, refresh_trainable, state_of

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Family:
    """Where the parts of one architecture live, as attribute paths from the `...ForConditionalGeneration` class."""

    decoder: str
    vision: str
    projector: tuple[str, ...]
    # PaliGemma's processor places the image tokens itself and takes the answers as `suffix=` (its prefix-LM attends
    # bidirectionally to the prompt, causally to the answer, told apart by the token_type_ids it returns)
    suffix_answers: bool = False
    # several images and several turns per sample, placed where the conversation's `<image>` placeholders are
    conversations: bool = True
    # image inputs whose sizes after the first dimension vary from sample to sample, which its own processor pads with
    # zeros to the batch's largest and the model reads back unpadded (LLaVA-NeXT's patches per image through
    # image_sizes, Idefics3's images per sample, all-zero images being padding)
    padded_inputs: tuple[str, ...] = ()
    # its processor takes a batch's images as one list per text (Gemma 3's counts them per text), not one flat list
    images_per_text: bool = False
    # why its forward cannot take packed rows (several samples per row, `train.packing`), None when it can: its
    # decoder then gets the per-sample positions and block-diagonal mask of `peft_vlm.runtime.packing` as they are
    packing_refusal: str | None = None


_MROPE = "its forward computes its own M-RoPE positions from a 2D attention mask, one sample per row"
_OWN_MASK = ("its forward builds its own attention mask from token_type_ids (bidirectional over the image or the "
             "prompt), one sample per row")

FAMILIES = {
    "llava": Family("model.language_model", "model.vision_tower", ("model.multi_modal_projector",)),
    "llava_next": Family("model.language_model", "model.vision_tower",
                         ("model.multi_modal_projector", "model.image_newline"), padded_inputs=("pixel_values",)),
    "qwen2_vl": Family("model.language_model", "model.visual", ("model.visual.merger",), packing_refusal=_MROPE),
    "qwen2_5_vl": Family("model.language_model", "model.visual", ("model.visual.merger",), packing_refusal=_MROPE),
    "idefics3": Family("model.text_model", "model.vision_model", ("model.connector",),
                       padded_inputs=("pixel_values", "pixel_attention_mask")),
    "paligemma": Family("model.language_model", "model.vision_tower", ("model.multi_modal_projector",),
                        suffix_answers=True, conversations=False, packing_refusal=_OWN_MASK),
    "gemma3": Family("model.language_model", "model.vision_tower", ("model.multi_modal_projector",),
                     images_per_text=True, packing_refusal=_OWN_MASK),
}

# Methods that need what only a model built here has, and why (the check runs before the model is touched).
REFUSED = {
    "early_fusion": "early fusion reads the connector's visual tokens as a separate input, but {arch} splices its "
                    "image features into the sequence inside its own forward",
    "visual_query_prompt": "the visual query reads the patch tokens of a peft_vlm vision tower, which {arch} keeps "
                           "inside its own forward",
    "gated_cross_attention": "gated cross-attention reads the connector's visual tokens as a separate input, which "
                             "{arch} keeps inside its own forward",
}


def transformers_vlm_type(path: str | Path) -> str | None:
    """The model type of the transformers VLM in a local folder or hub id, or None when it holds none."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        return None
    return config.model_type if config.model_type in FAMILIES and hasattr(config, "vision_config") else None


def _part(root: nn.Module, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def _parameters(part) -> list[nn.Parameter]:
    return [part] if isinstance(part, nn.Parameter) else list(part.parameters())


class TransformersVLM(VisionLanguageModule):
    """A transformers `...ForConditionalGeneration` VLM and its processor, ready for `pv.apply`."""

    def __init__(self, model: nn.Module, processor, train_projector: bool = False, use_chat_template: bool = True):
        super().__init__()
        model_type = model.config.model_type
        if model_type not in FAMILIES:
            raise ConfigError(
                f"transformers VLM type '{model_type}' is not supported; supported: {', '.join(FAMILIES)}"
            )
        self.model = model
        self.family = FAMILIES[model_type]
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from peft_vlm.data.prompting import special_token_strings, token_pattern

        # what typed text must not spell: the tokenizer's special tokens and the processor's own (its image token,
        # which it expands in the text before tokenizing)
        self.typed_specials = special_token_strings(self.tokenizer) | {
            value for key, value in vars(processor).items() if key.endswith("_token") and isinstance(value, str)}
        self._typed_pattern = token_pattern(self.typed_specials)
        self.use_chat_template = use_chat_template
        self.image_token_id = int(model.config.image_token_id)
        self.connector_name = f"transformers:{model_type}"
        # What the adapter fingerprint records about the vision side: the architecture and its vision config.
        self.vision_tower.description = {"transformers": model_type,
                                         "vision_config": model.config.vision_config.to_diff_dict()}
        state = state_of(self)
        if train_projector:
            projector = [p for path in self.family.projector for p in _parameters(_part(model, path))]
            state.add(AppliedMethod("projector", {"projector": model_type}, None, {"vision": projector}))
        token_context.install(self, self.language_model)
        refresh_trainable(self)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = None, train_projector: bool = False,
                        use_chat_template: bool = True, load_in_4bit: bool = False, **kwargs) -> "TransformersVLM":
        """The model with `AutoModelForImageTextToText` and its processor with `AutoProcessor` from one folder/id."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if load_in_4bit:
            raise ConfigError(f"load_in_4bit=True is not supported for a wrapped transformers VLM ('{path}') yet; "
                              "load it in full precision or bf16 (dtype=torch.bfloat16)")

        try:
            model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype or "auto", use_safetensors=True,
                                                                **kwargs)
            processor = AutoProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"could not load a transformers VLM and its processor from '{path}': {error}"
            ) from None
        return cls(model.eval(), processor, train_projector=train_projector, use_chat_template=use_chat_template)

    # -- structure -------------------------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The decoder (embeddings, decoder layers, final norm) the text methods attach to."""
        return _part(self.model, self.family.decoder)

    @property
    def vision_tower(self) -> nn.Module:
        return _part(self.model, self.family.vision)

    @property
    def config(self):
        return self.language_model.config

    @property
    def architecture(self) -> str:
        return self.model.config.model_type

    def refusal(self, method) -> str | None:
        """Why `method` cannot work on this model, or None when it can (asked by `pv.apply` before attaching)."""
        arch = self.architecture
        if method.name in REFUSED:
            return (
                f"method '{method.name}' cannot be applied to a wrapped {arch} model: "
                + REFUSED[method.name].format(arch=arch)
            )
        if method.name == "adaption_prompt" and method.config.multimodal:
            return (f"method 'adaption_prompt' with multimodal=True cannot be applied to a wrapped {arch} model: it "
                    "reads the patch tokens of a peft_vlm vision tower; use multimodal=False")
        if method.name == "visual_expert" and method.config.shared_image_position:
            return (f"method 'visual_expert' with shared_image_position=True cannot be applied to a wrapped {arch} "
                    "model: its positions are the model's own; use shared_image_position=False")
        return None

    def base_spec(self) -> dict[str, Any]:
        """How to rebuild this base: `pv.VisionLanguageModel.from_pretrained(language_model)` wraps it again."""
        spec = {"language_model": getattr(self.model, "name_or_path", None) or None}
        if "projector" in state_of(self).names():
            spec["train_projector"] = True
        return spec

    # -- text and images -------------------------------------------------------------------------------------------
    def prompt_text(self, prompt: str, images: int, chat: bool) -> str:
        image_token = (
            getattr(self.processor, "image_token", None) or self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        )
        if self.family.suffix_answers:
            return prompt
        if chat and getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        return image_token * images + prompt

    def as_typed(self, text: str) -> str:
        """A user's text for the processor: `<image>` placeholders dropped (the processor lays out the images) and
        special-token strings typed in it broken by an invisible word joiner, so that they stay text: they cannot
        add image slots, end the turn or open a new one."""
        from peft_vlm.data.prompting import IMAGE_PLACEHOLDER, joined_inside

        return joined_inside(text.replace(IMAGE_PLACEHOLDER, ""), self._typed_pattern)

    def tokenize(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None = None,
        answers: Sequence[str] | None = None,
        chat: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch inputs through the model's own processor. `images[i]` is None, one image or a list for prompt i;
        with `answers`, labels cover the answers (and the end-of-sequence token) only."""
        chat = self.use_chat_template if chat is None else chat
        prompts = [self.as_typed(prompt) for prompt in prompts]
        per_prompt = [_as_list(images[i] if images is not None else None) for i in range(len(prompts))]
        texts = [self.prompt_text(p, len(own), chat) for p, own in zip(prompts, per_prompt)]
        batch_images = per_prompt if self.family.images_per_text else [image for own in per_prompt for image in own]
        if answers is None:
            return dict(self._process(texts, batch_images))
        if self.family.suffix_answers:
            return dict(self._process(texts, batch_images, suffix=list(answers)))
        eos = self.tokenizer.eos_token or ""
        full = self._process([t + a + eos for t, a in zip(texts, answers)], batch_images)
        labels = full["input_ids"].clone()
        # The prompt's length, row by row: the prompt is a prefix of the full text, padded on the left.
        prompt_lengths = self._process(texts, batch_images)["attention_mask"].sum(1)
        full_lengths = full["attention_mask"].sum(1)
        width = labels.shape[1]
        for row in range(len(texts)):
            labels[row, : width - int(full_lengths[row]) + int(prompt_lengths[row])] = IGNORE_INDEX
        full["labels"] = labels
        return dict(full)

    def tokenize_conversation(self, messages: list[dict], images: list) -> dict[str, torch.Tensor] | None:
        """One conversation (user / assistant turns, `<image>` placeholders where its images go) through the
        processor's chat template; labels cover every assistant turn and the template's end of that turn. None
        when a turn's tokens are not a prefix of the whole conversation's (the labels would be misplaced)."""
        from peft_vlm.data.prompting import IMAGE_PLACEHOLDER

        def content(text: str, typed: bool) -> list[dict]:
            parts = []
            for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
                piece = self.as_typed(piece).strip() if typed else piece.strip()
                parts += [{"type": "image"}] * bool(index) + ([{"type": "text", "text": piece}] if piece else [])
            return parts

        chat = [{"role": m["role"], "content": content(m["content"], m["role"] == "user")} for m in messages]
        counts = [sum(part["type"] == "image" for m in chat[:end] for part in m["content"]) for end in
                  range(len(chat) + 1)]

        def ids(end: int, generation: bool) -> torch.Tensor:
            text = self.processor.apply_chat_template(chat[:end], add_generation_prompt=generation)
            return self._process([text], images[: counts[end]])["input_ids"][0]

        full = dict(self._process([self.processor.apply_chat_template(chat)], images))
        whole = full["input_ids"][0]
        labels = torch.full_like(full["input_ids"], IGNORE_INDEX)
        for turn, message in enumerate(chat):
            if message["role"] == "assistant":
                start, end = ids(turn, True), ids(turn + 1, False)
                if not (torch.equal(whole[: len(start)], start) and torch.equal(whole[: len(end)], end)):
                    return None
                labels[0, len(start): len(end)] = whole[len(start): len(end)]
        full["labels"] = labels
        return full

    def _process(self, texts: list[str], images: list, **options) -> dict:
        from peft_vlm.data.images import load_image

        # paths (a data file's, an evaluation's) open here; a missing file is a DataError naming it
        if [image for image in images if not isinstance(image, list) or image]:
            options["images"] = [[load_image(i, "image") for i in image] if isinstance(image, list)
                                 else load_image(image, "image") for image in images]
        try:
            return self.processor(text=texts, padding=True, return_tensors="pt", **options)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"the {self.architecture} processor refused the inputs: {error}") from None

    def sample_encoder(self, resize: str = "resize", max_length: int | None = None, **options):
        """The training-data encoder (`SampleEncoder.for_model` asks for it): samples through the processor, whose
        own image transform replaces `resize`."""
        return ProcessorSampleEncoder(self, max_length)

    def collator(self, packing: bool = False):
        """The batch collator (`Collator.for_model` asks for it); `packing=True` is refused, naming the reason, for
        an architecture whose forward cannot take packed rows."""
        if packing and self.family.packing_refusal:
            raise ConfigError(f"train.packing: a wrapped {self.architecture} model cannot train on packed rows: "
                              f"{self.family.packing_refusal}; set packing: false")
        return ProcessorCollator(self.tokenizer.pad_token_id, self.family.padded_inputs, self.architecture, packing)

    # -- running ---------------------------------------------------------------------------------------------------
    def _on_device(self, inputs: dict) -> dict:
        device = self._lm_device()
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **inputs):
        """The wrapped model's forward (`labels=` gives the loss), with the image positions announced to the methods.
        A packed batch (`sequence_ids`) gives its decoder per-sample positions and a mask keeping samples apart."""
        inputs = self._on_device({"input_ids": input_ids, "attention_mask": attention_mask, **inputs})
        sequence_ids = inputs.pop("sequence_ids", None)
        if sequence_ids is not None:
            if self.family.packing_refusal:
                raise ConfigError(f"train.packing: a wrapped {self.architecture} model cannot train on packed rows: "
                                  f"{self.family.packing_refusal}")
            dtype = self.language_model.get_input_embeddings().weight.dtype
            inputs.update(packing.packed_inputs(self, sequence_ids, dtype))
        with token_context.token_types(self, (inputs["input_ids"] == self.image_token_id).long()):
            return self.model(**inputs)

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **inputs):
        """New token ids for a batch from `tokenize`, with the wrapped model's `generate` (greedy, KV cache on)."""
        inputs = self._on_device({"input_ids": input_ids, "attention_mask": attention_mask, **inputs})
        inputs.setdefault("do_sample", False)
        inputs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        inputs.pop("labels", None)
        with token_context.token_types(self, (inputs["input_ids"] == self.image_token_id).long()):
            output = self.model.generate(**inputs)
        return output[:, input_ids.shape[1]:]


def _as_list(images: Any) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


# -- training data through the model's processor ---------------------------------------------------------------------
# Per-position inputs a processor may return besides input_ids / attention_mask / labels, and their padding value.
TOKEN_INPUTS = {"mm_token_type_ids": 0, "token_type_ids": 0}


class ProcessorSampleEncoder:
    """Samples `{"messages", "images", "source"}` -> one example of the wrapped model's processor outputs.

    A sample is one question and its answer (a user turn, then an assistant turn), or, where the architecture takes
    them (not PaliGemma), a conversation of several turns and images through the processor's chat template, the
    labels on every assistant turn. Bad rows are `DataError`s naming their file and row, as with models built here."""

    def __init__(self, model: TransformersVLM, max_length: int | None = None):
        self.model = model
        self.max_length = max_length

    def encode_text(self, sample: dict) -> dict:
        from peft_vlm.data.encoding import _checked_messages
        from peft_vlm.data.prompting import IMAGE_PLACEHOLDER
        from peft_vlm.data.report import WRONG_SCHEMA
        from peft_vlm.errors import DataError

        source = str(sample.get("source", "sample"))
        messages = [m for m in _checked_messages(sample, source) if m["role"] != "system"]
        roles = [m["role"] for m in messages]
        images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if not self.model.family.conversations and images == 0:
            raise ConfigError(f"{source}: {self.model.architecture} takes one image per sample (its processor needs "
                              "one); this sample has none")
        if roles != ["user", "assistant"] or images > 1:
            if not self.model.family.conversations:
                raise ConfigError(
                    f"{source}: {self.model.architecture} takes one image and one user turn with its answer per "
                    f"sample (its processor puts the image tokens before a single prompt); this sample has "
                    f"{images} images and turns {roles}")
            if roles != ["user", "assistant"] * (len(roles) // 2) or not roles:
                raise DataError(source, WRONG_SCHEMA, "a conversation alternates user and assistant turns, starting "
                                                      f"with the user and ending with an answer; this one has {roles}")
            if not (self.model.use_chat_template and getattr(self.model.processor, "chat_template", None)):
                raise DataError(source, WRONG_SCHEMA, "several turns or images need the processor's chat template "
                                                      "(use_chat_template is off or the processor has none)")
            return {"messages": messages, "images": images, "source": source}
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise DataError(source, WRONG_SCHEMA, "a wrapped transformers VLM trains on one user turn and one answer "
                                                  f"per sample; this one has turns {[m['role'] for m in messages]}")
        prompt, answer = messages[0]["content"], messages[1]["content"]
        images = prompt.count(IMAGE_PLACEHOLDER)
        return {"prompt": prompt.replace(IMAGE_PLACEHOLDER, "").strip(), "answer": answer, "images": images,
                "source": source}

    def __call__(self, sample: dict) -> dict:
        from peft_vlm.data.images import load_image
        from peft_vlm.data.report import MISALIGNED, TOO_LONG
        from peft_vlm.errors import DataError

        text = self.encode_text(sample)
        source = text["source"]
        images = [load_image(image, source) for image in list(sample.get("images") or [])[: text["images"]]]
        try:
            if "messages" in text:
                example = self.model.tokenize_conversation(text["messages"], images)
            else:
                example = self.model.tokenize([text["prompt"]], images=[images], answers=[text["answer"]])
        except ConfigError as error:  # the processor's refusal, with the row it refused
            raise ConfigError(f"{source}: {error}") from None
        if "messages" in text:
            if example is None:
                raise DataError(source, MISALIGNED, "a turn's tokens are not a prefix of the whole conversation's")
        else:
            labelled = example["labels"][0]
            decoded = self.model.tokenizer.decode(labelled[labelled != IGNORE_INDEX], skip_special_tokens=True)
            if " ".join(text["answer"].split()) not in " ".join(decoded.split()):
                raise DataError(source, MISALIGNED,
                                f"labelled tokens decode to {decoded!r}, expected {text['answer']!r}")
        if self.max_length is not None and example["input_ids"].shape[1] > self.max_length:
            raise DataError(source, TOO_LONG, f"{example['input_ids'].shape[1]} tokens, max_length={self.max_length}")
        return {**example, "source": source, "truncated": False}


class ProcessorCollator:
    """Examples of a `ProcessorSampleEncoder` -> one left-padded batch for `TransformersVLM.forward(**batch)`.

    Samples may hold different numbers of images (none included): each image input is concatenated over the samples
    that have images, in example order, which is the order of their image tokens in the batch. An input the model
    reads back unpadded (`padded_inputs`) is padded with zeros to the batch's largest, as its processor pads it;
    any other input whose shape differs between samples cannot be batched, and the error names the samples."""

    def __init__(self, pad_token_id: int, padded_inputs: tuple[str, ...] = (), architecture: str = "model",
                 packing: bool = False):
        self.pad_token_id = pad_token_id
        self.padded_inputs = padded_inputs
        self.architecture = architecture
        self.packing = packing

    def __call__(self, items: list):
        from peft_vlm.data.collate import start_batch

        examples, batch = start_batch(items)
        if not examples:
            return batch
        if self.packing:
            examples = self._packed_rows(examples, batch)
        width = max(e["input_ids"].shape[1] for e in examples)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, **TOKEN_INPUTS,
                "sequence_ids": -1}
        keys = list(dict.fromkeys(key for e in examples for key in e if key not in ("source", "truncated")))
        for key in keys:
            if key in pads:
                rows = [e.get(key, torch.full_like(e["input_ids"], pads[key])) for e in examples]
                batch[key] = torch.cat(
                    [torch.nn.functional.pad(v, (width - v.shape[1], 0), value=pads[key]) for v in rows]
                )
            else:
                batch[key] = self._image_input(key, [e for e in examples if key in e])
        return batch

    def _packed_rows(self, examples: list[dict], batch) -> list[dict]:
        """Whole examples packed into rows as `Collator(packing=True)` packs them (`sequence_ids` set on `batch`);
        each row as one example whose image inputs are its examples', in its reading order."""
        from peft_vlm.data.collate import pack_rows

        rows = pack_rows([e["input_ids"].shape[1] for e in examples])
        packed = []
        for row in rows:
            members = [examples[i] for i in row]
            merged = {"source": members[0]["source"]}
            for key in dict.fromkeys(k for e in members for k in e if k not in ("source", "truncated")):
                if key in ("input_ids", "attention_mask", "labels", *TOKEN_INPUTS):
                    pad = {"labels": IGNORE_INDEX, "attention_mask": 1}.get(key, TOKEN_INPUTS.get(key, 0))
                    parts = [e.get(key, torch.full_like(e["input_ids"], pad)) for e in members]
                    if key == "labels":  # nothing precedes an example's first token: never a target, as unpacked
                        parts = [torch.cat([torch.full_like(p[:, :1], IGNORE_INDEX), p[:, 1:]], 1) for p in parts]
                    merged[key] = torch.cat(parts, 1)
                else:
                    merged[key] = self._image_input(key, [e for e in members if key in e])
            merged["sequence_ids"] = torch.cat([torch.full_like(examples[i]["input_ids"], i) for i in row], 1)
            packed.append(merged)
        return packed

    def _image_input(self, key: str, examples: list[dict]) -> torch.Tensor:
        values = [e[key] for e in examples]
        shapes = {tuple(v.shape[1:]) for v in values}
        if len(shapes) == 1:
            return torch.cat(values)
        if key not in self.padded_inputs or len({v.dim() for v in values}) > 1:
            first = next(e for e in examples if tuple(e[key].shape[1:]) != tuple(values[0].shape[1:]))
            raise ConfigError(
                f"{first['source']}: {self.architecture} cannot batch its {key} of shape {tuple(first[key].shape)} "
                f"with {examples[0]['source']}'s {tuple(values[0].shape)}; train it with batch size 1 or give every "
                f"sample images of one size")
        largest = [max(sizes) for sizes in zip(*shapes)]
        padded = []
        for value in values:
            grow = [size - have for size, have in zip(largest, value.shape[1:])]
            padded.append(torch.nn.functional.pad(value, [p for g in reversed(grow) for p in (0, g)]))
        return torch.cat(padded)
