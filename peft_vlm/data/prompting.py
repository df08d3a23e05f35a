"""Prompt text and token ids: chat formatting, image placeholders, answer-only labels, left padding.

Images enter a prompt at a placeholder string (`<image>`). The text around each placeholder is tokenized on its own
and the placeholder becomes a run of `IMAGE_TOKEN_ID` sentinels, one per visual token, so no token is added to the
vocabulary of the frozen language model.

Special-token text a user types (`</s>`, `<|im_start|>`, ...) stays text: `marked_as_typed` marks it in user and system
turns before the chat template renders them, and `tokenize_with_images` tokenizes what is marked with the tokenizer's
`split_special_tokens`, so a prompt cannot end its turn early or open a new one. A wrapped transformers VLM's
processor tokenizes the whole text itself, so there `joined_inside` breaks such strings with an invisible character.
"""
from __future__ import annotations

import re

import torch

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_ID = -200  # never a real token id; replaced by visual tokens before the language model runs
IGNORE_INDEX = -100  # label of positions that carry no loss
TYPED_OPEN, TYPED_CLOSE = "\ue000", "\ue001"  # private-use characters around special-token text a user typed
_TYPED = re.compile(f"[{TYPED_OPEN}{TYPED_CLOSE}]")
WORD_JOINER = "\u2060"

# Used when the tokenizer has no chat template of its own (documented in the README).
BUILTIN_TEMPLATE = "USER: {prompt}\nASSISTANT:"


def format_chat(tokenizer, prompt: str, use_chat_template: bool = True) -> str:
    """The user turn plus the generation prompt of the assistant turn, as text."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return BUILTIN_TEMPLATE.format(prompt=prompt)


def with_placeholders(prompt: str, num_images: int) -> str:
    """Put one placeholder per image in front of a prompt that has none (LLaVA's layout)."""
    if num_images and IMAGE_PLACEHOLDER not in prompt:
        return IMAGE_PLACEHOLDER * num_images + "\n" + prompt
    return prompt


def special_token_strings(tokenizer) -> set[str]:
    """The strings the tokenizer reads as one special token wherever they stand in a text."""
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return specials | set(tokenizer.all_special_tokens)


def token_pattern(tokens: set[str], min_length: int = 2) -> re.Pattern | None:
    """One pattern matching any of `tokens` of `min_length` characters or more, longest first (None when there are
    none): built once per model or encoder, since a tokenizer may hold thousands of special tokens."""
    tokens = {token for token in tokens if len(token) >= min_length}
    if not tokens:
        return None
    return re.compile("|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)))


def joined_inside(text: str, pattern: re.Pattern | None) -> str:
    """`text` with a word joiner (U+2060, invisible) after the first character of each match of `pattern`
    (`token_pattern`), for a wrapped model's processor: it expands its image token in the text before its tokenizer
    reads special tokens, so what a user typed must not spell either; the text reads the same."""
    if pattern is None:
        return text
    return pattern.sub(lambda match: match.group()[0] + WORD_JOINER + match.group()[1:], text)


def typed_pattern(tokenizer) -> re.Pattern | None:
    """The pattern of every special token string of `tokenizer`, for `marked_as_typed`."""
    return token_pattern(special_token_strings(tokenizer), min_length=1)


def marked_as_typed(text: str, pattern: re.Pattern | None) -> str:
    """`text` (a user's) with each match of `pattern` (`typed_pattern`) marked, to be tokenized as the characters
    it is."""
    text = _TYPED.sub("", text)
    if pattern is None:
        return text
    return pattern.sub(lambda match: TYPED_OPEN + match.group() + TYPED_CLOSE, text)


def _tokenize_text(tokenizer, text: str) -> list[int]:
    """Token ids of template text, where what `marked_as_typed` marked is tokenized as plain text."""
    ids = []
    for index, part in enumerate(_TYPED.split(text)):  # marked parts are the odd ones
        if part:
            ids.extend(tokenizer(part, add_special_tokens=False, split_special_tokens=index % 2 == 1)["input_ids"])
    return ids


def leading_special_ids(tokenizer) -> list[int]:
    """Ids the tokenizer puts before any text (e.g. LLaMA's BOS); empty for tokenizers that add none."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [i for i in ids if i in tokenizer.all_special_ids]


def tokenize_with_images(
    tokenizer, text: str, tokens_per_image: int, add_special_tokens: bool = True,
    boundaries: tuple[str, str] | None = None,
) -> list[int]:
    """Token ids of `text`, each placeholder expanded to `tokens_per_image` IMAGE_TOKEN_ID sentinels.

    `boundaries` (open, close), e.g. ("<img>", "</img>"), wraps every image's run in those strings tokenized as
    ordinary text (KOSMOS-1's image boundaries, arXiv 2302.14045 sec 2.1, without adding tokens to the vocabulary),
    so images anywhere in a prompt stay apart from the text and from each other."""
    ids = list(leading_special_ids(tokenizer)) if add_special_tokens else []
    open_ids, close_ids = ([tokenizer(b, add_special_tokens=False)["input_ids"] for b in boundaries]
                           if boundaries else ([], []))
    chunks = text.split(IMAGE_PLACEHOLDER)
    for index, chunk in enumerate(chunks):
        if index:
            ids.extend([*open_ids, *[IMAGE_TOKEN_ID] * tokens_per_image, *close_ids])
        if chunk:
            ids.extend(_tokenize_text(tokenizer, chunk))
    return ids


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to one length (generation continues at the right edge); returns ids and attention mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, length - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
            mask[row, length - len(sequence):] = 1
    return ids, mask


def conversation_segments(
    tokenizer, messages: list[dict], use_chat_template: bool = True, generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """A whole conversation as consecutive text pieces; `True` marks an assistant answer, the text that carries loss.

    With a chat template, each answer is what the template adds when the turn is appended to the conversation up to
    its generation prompt, so answer spans come from the template itself rather than from searching the text. Its
    trailing whitespace is template glue and stays unlabelled. A template that renders earlier turns differently
    once later turns exist cannot be split this way and raises ValueError.

    Without one, BUILTIN_TEMPLATE formats each user turn, answers follow it directly (as `format_chat` prompts for
    at generation time), a system message goes first followed by a blank line, and turns are separated by newlines;
    the caller ends each answer with EOS.

    `generation_prompt`: turns after the last answer end the text with the assistant's generation prompt, as
    `format_chat` renders it (a prompt to generate from); otherwise they are left out.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return _template_segments(tokenizer, messages, generation_prompt)
    segments, pending = [], ""
    for message in messages:
        if message["role"] == "system":
            pending += message["content"] + "\n\n"
        elif message["role"] == "user":
            pending += ("\n" if segments else "") + BUILTIN_TEMPLATE.format(prompt=message["content"])
        else:
            segments += [(pending, False), (message["content"], True)]
            pending = ""
    return segments + [(pending, False)] if generation_prompt and pending else segments


def _template_segments(tokenizer, messages: list[dict], generation_prompt: bool) -> list[tuple[str, bool]]:
    def render(turns, generation_prompt):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    segments, rendered = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:index], True), render(messages[: index + 1], False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ValueError(f"the chat template renders turn {index + 1} differently once later turns follow")
        answer = full[len(prompt):].rstrip()
        segments += [(prompt[len(rendered):], False), (answer, True)]
        rendered = prompt + answer
    if generation_prompt and messages and messages[-1]["role"] != "assistant":
        prompt = render(messages, True)
        if not prompt.startswith(rendered):
            raise ValueError("the chat template renders the earlier turns differently once the prompt follows")
        segments.append((prompt[len(rendered):], False))
    return segments


def supervised_span(labels: "torch.Tensor") -> tuple["torch.Tensor", int]:
    """(labels cropped, the number of last positions whose logits the loss needs): from the position before the
    first supervised token of any row to the end. transformers' causal-LM loss shifts the cropped labels itself."""
    supervised = (labels != IGNORE_INDEX).any(dim=0)
    first = int(supervised.float().argmax()) if bool(supervised.any()) else labels.shape[1] - 1
    start = max(first - 1, 0)
    return labels[:, start:], labels.shape[1] - start

