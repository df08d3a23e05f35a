"""`VisionLanguageModel`: a frozen vision tower, a trainable connector and a frozen LLaMA-class causal LM.

Images become runs of visual tokens spliced into the prompt's embeddings at image placeholders (LLaVA's design).
The model records, per position, whether a token is an image token; methods that route image tokens differently
(early fusion, visual expert) read that, and the images' patch and visual tokens, as one typed value
(`peft_vlm.runtime.token_context.VisualInputs`).

Inference takes the training path: `tokenize` and `generate` encode prompts with the training `SampleEncoder`,
batch them with its `Collator` and preprocess images with the model's `ImageProcessor`, so the prompt template and
the resize mode (`model.resize`, recorded in adapter files) are the same at evaluation as in training.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from peft_vlm.runtime import packing, token_context
from peft_vlm.runtime.attention import kernel_under
from peft_vlm.runtime.four_bit import keep_4bit_layers_differentiable
from peft_vlm.model.connectors import build_connector
from peft_vlm.model.module_base import VisionLanguageModule
from peft_vlm.errors import ConfigError, ModelLoadError
from peft_vlm.data.collate import Collator
from peft_vlm.data.encoding import SampleEncoder
from peft_vlm.data.images import RESIZE_MODES, ImageProcessor
from peft_vlm.data.prompting import (IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, supervised_span,
                                     with_placeholders)
from peft_vlm.runtime.token_context import VisualInputs
from peft_vlm.runtime.tracking import AppliedMethod, refresh_trainable, state_of
from peft_vlm.model.vision_towers import VisionTower, build_vision_tower, check_vision_options
from peft_vlm.model.vision_feature_cache import VisionFeatureCache, preprocessing_of

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: functions spec -> spec that give `VisionLanguageModel.base_spec` portable names for machine-specific paths
BASE_NAMES: list[Callable[[dict], dict]] = []
#: functions spec -> spec that resolve portable names in a base description (language_model, vision,
#: vision_pretrained, vision_options) to what can be loaded: the reverse of `BASE_NAMES` (the embedded default
#: registers "embedded" and "embedded_contrastive")
NAMED_BASES: list[Callable[[dict], dict]] = []
DEFAULT_TOWER = "ViT-L-14"
#: portable language model name -> the hub id of the model it is (a model card's `base_model`)
HUB_IDS: dict[str, str] = {}


def resolve_base_names(spec: dict) -> dict:
    """`spec` with every portable name resolved by the functions in `NAMED_BASES`."""
    for resolve in NAMED_BASES:
        spec = resolve(spec)
    return spec


def load_language_model(path: str, load_in_4bit: bool = False, dtype: Any = None, **kwargs) -> PreTrainedModel:
    """A causal LM from a local folder or hub id; `load_in_4bit` quantizes it to NF4 with double quantisation."""
    if load_in_4bit:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs.setdefault("device_map", {"": 0} if torch.cuda.is_available() else "cpu")
        dtype = dtype or compute_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", use_safetensors=True, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load a causal language model from '{path}': {error}") from None
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layers_differentiable(model)
    return model


def _row_of_each_image(image_positions: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """The batch row of each image whose visual tokens fill the sequence's image slots: images are spliced in
    reading order, so image i belongs to the row holding its first slot."""
    return image_positions.nonzero()[:, 0][::tokens_per_image]


class VisionLanguageModel(VisionLanguageModule):
    # the frozen tower's patch tokens by image, asked before the tower runs (`train.cache_vision_features`)
    vision_feature_cache: VisionFeatureCache | None = None

    def __init__(
        self,
        language_model: PreTrainedModel,
        tokenizer,
        vision_tower: VisionTower,
        connector: str = "mlp2x_gelu",
        train_connector: bool = True,
        use_chat_template: bool = True,
        image_boundaries: tuple[str, str] | None = None,
        train_vision_tower: bool = False,
        resize: str = "resize",
    ):
        """`image_boundaries` (open, close) wraps each image's visual tokens in those strings as text (KOSMOS-1);
        `train_vision_tower` unfreezes the tower as a built-in part, group "vision" (off, as Prismatic advises);
        `resize` is how images of any shape reach the tower's square input ("resize", "letterbox" or "crop", see
        `peft_vlm.data.images`), at training and at inference alike."""
        super().__init__()
        model_type = getattr(language_model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            warnings.warn(
                f"language model type '{model_type}' is untested; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self.image_boundaries = tuple(image_boundaries) if image_boundaries else None
        self._image_processor: ImageProcessor | None = None
        self.resize = resize
        self.connector_name = connector
        hidden_size = language_model.get_input_embeddings().embedding_dim
        self.connector = build_connector(connector, vision_tower.width, hidden_size)
        self.connector.to(self._lm_device())
        self.connector.bind_language_model(language_model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        state = state_of(self)
        if train_connector:
            state.add(AppliedMethod("connector", {"connector": connector}, None,
                                    {"vision": list(self.connector.parameters())}))
        if train_vision_tower:
            state.add(AppliedMethod("vision_tower", {}, None, {"vision": list(vision_tower.parameters())}))
        token_context.install(self, language_model)
        refresh_trainable(self)

    @classmethod
    def from_pretrained(
        cls,
        language_model: str | None = None,
        *,
        llm: PreTrainedModel | None = None,
        tokenizer=None,
        vision: str | list | nn.Module | None = None,
        vision_pretrained: str | None = None,
        vision_options: dict | None = None,
        connector: str = "mlp2x_gelu",
        load_in_4bit: bool = False,
        dtype: Any = None,
        image_boundaries: tuple[str, str] | None = None,
        train_vision_tower: bool = False,
        use_chat_template: bool = True,
        **kwargs,
    ) -> "VisionLanguageModel":
        """Build from a language model (local folder, hub id, `"embedded"` for the embedded default, or `llm=`
        instance with `tokenizer=`) and a vision tower (an open_clip model name with optional `vision_pretrained` tag,
        `"embedded_contrastive"`, or any module giving patch tokens; ViT-L-14 by default, the embedded default's own
        tower for `"embedded"`). `~` at the start of a path is the home folder."""
        if (language_model is None) == (llm is None):
            raise ConfigError("pass exactly one of a language model path/hub id or llm=<PreTrainedModel>")
        language_model = language_model and os.path.expanduser(language_model)
        names = resolve_base_names({"language_model": language_model, "vision": vision,
                                    "vision_pretrained": vision_pretrained, "vision_options": vision_options})
        language_model, vision = names["language_model"], names["vision"] or DEFAULT_TOWER
        vision_pretrained, vision_options = names["vision_pretrained"], names["vision_options"]
        if vision_options and llm is None and not isinstance(vision, nn.Module):  # before the LM loads
            check_vision_options(vision, vision_options or {})
        from peft_vlm.model import transformers_vlm  # a VLM that transformers ships as a class is wrapped whole

        if llm is None and transformers_vlm.transformers_vlm_type(language_model):
            return transformers_vlm.TransformersVLM.from_pretrained(
                language_model, dtype=dtype, load_in_4bit=load_in_4bit, use_chat_template=use_chat_template, **kwargs)
        if llm is None:
            llm = load_language_model(language_model, load_in_4bit=load_in_4bit, dtype=dtype, **kwargs)
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(language_model)
                except (OSError, ValueError) as error:
                    raise ModelLoadError(f"could not load a tokenizer from '{language_model}': {error}") from None
        elif load_in_4bit:
            raise ConfigError("load_in_4bit=True needs a path to load from, not an llm= instance")
        if tokenizer is None:
            raise ConfigError("llm=<PreTrainedModel> needs tokenizer= too")
        tower = build_vision_tower(vision, pretrained=vision_pretrained, **(vision_options or {}))
        tower.to(next(llm.parameters()).device)
        return cls(llm, tokenizer, tower, connector=connector, image_boundaries=image_boundaries,
                   train_vision_tower=train_vision_tower, use_chat_template=use_chat_template)

    def base_spec(self) -> dict[str, Any]:
        """How to rebuild this base (the `model` section of a recipe); stored in adapter files for `peft-vlm generate`.
        Each function in `BASE_NAMES` may then rename machine-specific paths portably (the embedded default registers
        one that names its cached model and tower "embedded" / "embedded_contrastive")."""
        tower = self.vision_tower
        spec = {
            "language_model": getattr(self.language_model, "name_or_path", None),
            "vision": getattr(tower, "source", None) or tower.description.get("open_clip"),
            "vision_pretrained": getattr(tower, "pretrained", None),
            "connector": self.connector_name,
            "load_in_4bit": bool(getattr(self.language_model, "is_loaded_in_4bit", False)),
        }
        # options off by default are written only when on: older specs stay the same
        if getattr(tower, "rebuild_options", None):
            spec["vision_options"] = dict(tower.rebuild_options)
        if self.image_boundaries:
            spec["image_boundaries"] = list(self.image_boundaries)
        if "vision_tower" in state_of(self).names():
            spec["train_vision_tower"] = True
        if not self.use_chat_template:
            spec["use_chat_template"] = False
        if self.resize != "resize":
            spec["resize"] = self.resize
        # numerics differ by attention kernel (a greedy answer can flip), so a rebuilt base uses the trained one's
        attention = kernel_under(getattr(self.language_model.config, "_attn_implementation", None))
        if attention not in (None, "sdpa"):
            spec["attn_implementation"] = attention
        for rename in BASE_NAMES:
            spec = rename(spec)
        return spec

    # -- structure -------------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.language_model.config

    @property
    def images_in_sequence(self) -> bool:
        """LLaVA's layout (True): visual tokens are spliced into the sequence. False when an applied method declares
        that it feeds the images to the language model itself (`Method.images_in_sequence`, e.g. LLaMA-Adapter V2's
        early fusion); the images then reach it through the call's `VisualInputs` only."""
        return all(getattr(entry.method, "images_in_sequence", True) for entry in state_of(self).methods())

    @property
    def tokens_per_image(self) -> int:
        """Sequence positions one image takes: its visual tokens, or none when the images are not in the sequence."""
        return self.connector.num_output_tokens(self.vision_tower.num_tokens) if self.images_in_sequence else 0

    @property
    def resize(self) -> str:
        """How images reach the tower's input size: "resize" (squash), "letterbox" or "crop". `SampleEncoder.
        for_model(model, resize=...)` sets it, adapter files record it and `pv.load_adapter` restores it, so
        `generate` preprocesses as the model was trained."""
        return self._resize

    @resize.setter
    def resize(self, mode: str) -> None:
        if mode not in RESIZE_MODES:
            raise ConfigError(f"resize={mode!r} is not a resize mode; use one of {', '.join(RESIZE_MODES)}")
        self._resize = mode

    @property
    def image_processor(self) -> ImageProcessor:
        """Path or PIL image -> the tower's (3, H, W) input, in the model's resize mode (training and inference)."""
        if self._image_processor is None or self._image_processor.mode != self.resize:
            self._image_processor = ImageProcessor.for_tower(self.vision_tower, self.resize)
        return self._image_processor

    # -- images ----------------------------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """Stack images (paths, PIL images, HWC uint8 arrays, or preprocessed (3, H, W) tensors) into one batch,
        preprocessed as in training (`image_processor`)."""
        encoder = SampleEncoder(self.tokenizer, self.tokens_per_image, self.image_processor)
        return torch.stack([encoder.pixels(image, f"image #{index}") for index, image in enumerate(images)])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, tokens_per_image, hidden) visual tokens in the LM's embedding space."""
        return self._encode(pixel_values)[1]

    def _encode(self, pixel_values: torch.Tensor, question: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens from the tower, visual tokens from the connector). `question`: (embeddings, mask) of each
        image's prompt, for a connector that reads it (`Connector.reads_question`)."""
        tower_parameter = next(self.vision_tower.parameters())
        trains = any(p.requires_grad for p in self.vision_tower.parameters())  # unfrozen, or LoRA inside
        pixel_values = pixel_values.to(tower_parameter.device, tower_parameter.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            if self.vision_feature_cache is None:
                patches = self.vision_tower(pixel_values)
            else:
                patches = self.vision_feature_cache.patches(
                    self.vision_tower, pixel_values, preprocessing_of(self.vision_tower, self.resize))
        patches_in = patches.to(next(self.connector.parameters()).dtype)
        if question is not None and self.connector.reads_question:
            return patches, self.connector(patches_in, *question)
        return patches, self.connector(patches_in)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, image_rows=None) -> torch.Tensor:
        """Token embeddings with the visual tokens spliced in at the IMAGE_TOKEN_ID positions."""
        return self._embed(input_ids, pixel_values, image_rows)[0]

    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_rows=None,
               prompt_mask: torch.Tensor | None = None, sequences=None) -> tuple[torch.Tensor, VisualInputs]:
        """(embeddings, the call's visual inputs): the token types, the images' patch and visual tokens and the
        batch row of each image (`image_rows`, needed when the images take no positions in the sequence).

        `prompt_mask` (True on the prompt's text: not padding, not the answer being trained on; every text token
        when not given) and, in a packed batch, `sequences` = (sequence_ids, image_sequences) say which text each
        image's prompt is, for a connector that reads it."""
        image_positions = input_ids == IMAGE_TOKEN_ID
        token_types = image_positions.long()
        embeddings = self.language_model.get_input_embeddings()(input_ids.masked_fill(image_positions, 0))
        num_slots = int(image_positions.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if num_slots:
                raise ConfigError(f"the input has {num_slots} image token slots but no pixel_values were given")
            return embeddings, VisualInputs(token_types=token_types)
        question = None
        if self.connector.reads_question:
            question = self._question_of_each_image(embeddings, image_positions, image_rows, prompt_mask, sequences)
        patches, visual = self._encode(pixel_values, question)
        if not num_slots and not self.images_in_sequence:
            if image_rows is None or len(image_rows) != len(visual):
                raise ConfigError("images outside the sequence need image_rows: the batch row of each image")
            return embeddings, VisualInputs(patches, visual, image_rows.to(visual.device), token_types)
        if visual.shape[0] * visual.shape[1] != num_slots:
            raise ConfigError(
                f"{visual.shape[0]} image(s) give {visual.shape[0] * visual.shape[1]} visual tokens "
                f"but the input has {num_slots} image token slots"
            )
        image_owner = _row_of_each_image(image_positions, visual.shape[1])
        flat = visual.to(embeddings.dtype).reshape(-1, embeddings.shape[-1])
        spliced = embeddings.masked_scatter(image_positions.unsqueeze(-1), flat)
        return spliced, VisualInputs(patches, visual, image_owner, token_types)

    def _question_of_each_image(self, embeddings, image_positions, image_rows, prompt_mask, sequences):
        """(embeddings, mask) of the prompt text in each image's row (in a packed row: of the image's own example)."""
        if image_positions.any():
            image_rows = _row_of_each_image(image_positions,
                                            self.connector.num_output_tokens(self.vision_tower.num_tokens))
        elif image_rows is None:
            return None  # the error about missing image_rows comes with the images' own check
        mask = ~image_positions if prompt_mask is None else prompt_mask.bool() & ~image_positions
        image_rows = image_rows.to(embeddings.device)
        mask = mask[image_rows]
        if sequences is not None:
            sequence_ids, image_sequences = sequences
            mask = mask & (sequence_ids[image_rows] == image_sequences.to(embeddings.device)[:, None])
        return embeddings[image_rows], mask

    # -- text ------------------------------------------------------------------------------------------------------
    def tokenize(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None = None,
        answers: Sequence[str] | None = None,
        chat: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch inputs for `forward`/`generate`, encoded and collated exactly as training data (`SampleEncoder`,
        `Collator`). `images[i]` is None, one image or a list of images (paths, PIL images, arrays or tensors) for
        prompt i; prompts without a placeholder get theirs in front. Without `answers` each row ends with the
        assistant's generation prompt; with them, labels cover the answers only."""
        chat = self.use_chat_template if chat is None else chat
        encoder = SampleEncoder.for_model(self, use_chat_template=chat)
        examples = []
        for index, prompt in enumerate(prompts):
            own_images = self._as_list(images[index] if images is not None else None)
            placeholders = with_placeholders(prompt, len(own_images)).count(IMAGE_PLACEHOLDER)
            if placeholders != len(own_images):
                raise ConfigError(f"prompt #{index} has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                                  f"but {len(own_images)} image(s)")
            messages = [{"role": "user", "content": prompt}]
            if answers is not None:
                messages.append({"role": "assistant", "content": answers[index]})
            sample = {"messages": messages, "images": own_images, "source": f"prompt #{index}"}
            examples.append(encoder(sample, generation=answers is None))
        batch = dict(Collator.for_model(self)(examples))
        if answers is None:
            del batch["labels"]
        return batch

    @staticmethod
    def _as_list(images: Any) -> list:
        if images is None:
            return []
        return list(images) if isinstance(images, (list, tuple)) else [images]

    # -- running ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
        sequence_ids: torch.Tensor | None = None,
        image_sequences: torch.Tensor | None = None,
        **kwargs,
    ):
        """Causal-LM forward over text with spliced visual tokens; with `labels`, the output carries the loss.

        With `labels`, the LM head runs only from the position before the first supervised token to the end (the
        logits then cover that span): in a left-padded batch of short answers almost no position has a label, and
        the head is a fifth of a small model's FLOPs. The loss is the same; `logits_to_keep=0` keeps every logit.

        `sequence_ids` (a packed batch, `Collator(packing=True)`): the example of each position, -1 on padding;
        every example then gets its own positions and attends to itself only (`peft_vlm.runtime.packing`).
        `image_sequences` (the example of each image) comes with it; methods that read the images find both in the
        call's `VisualInputs`."""
        device = self._lm_device()
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        if sequence_ids is not None:
            sequence_ids = sequence_ids.to(device)
        prompt_mask = sequences = None
        if self.connector.reads_question:
            prompt_mask = attention_mask.bool()
            if labels is not None:  # the answer a batch trains on is not the question the connector may read
                prompt_mask = prompt_mask & (labels.to(device) == IGNORE_INDEX)
            if sequence_ids is not None and image_sequences is not None:
                sequences = (sequence_ids, image_sequences)
        embeddings, visual = self._embed(input_ids, pixel_values, image_rows, prompt_mask, sequences)
        if sequence_ids is not None:
            visual = packing.with_sequences(visual, sequence_ids, image_sequences, input_ids == IMAGE_TOKEN_ID)
            packed = packing.packed_inputs(self, sequence_ids, embeddings.dtype)
            position_ids, attention_mask = packed.pop("position_ids"), packed.pop("attention_mask")
            kwargs.update(packed)
        else:  # left padding: positions count real tokens only, as during generation
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if labels is not None:
            labels = labels.to(device)
            if "logits_to_keep" not in kwargs:
                labels, kwargs["logits_to_keep"] = supervised_span(labels)
        with token_context.token_types(self, visual):
            return self.language_model(
                inputs_embeds=embeddings,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                **kwargs,
            )

    @torch.no_grad()
    def generate_ids(self, input_ids, attention_mask=None, pixel_values=None, image_rows=None, **generation_options):
        """New token ids for a batch from `tokenize` (greedy unless sampling options are given)."""
        device = self._lm_device()
        input_ids = input_ids.to(device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        embeddings, visual = self._embed(input_ids, pixel_values, image_rows, attention_mask)
        generation_options.setdefault("do_sample", False)
        generation_options.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with token_context.token_types(self, visual):
            return self.language_model.generate(
                inputs_embeds=embeddings, attention_mask=attention_mask, **generation_options
            )
