"""Prompts → token ids → text embeddings: the one place text becomes the UNet's conditioning.

The pipeline (prompts, negative prompts, the empty prompt of classifier-free guidance) and training (captions,
caption dropout to "") both go through these functions, so a model is sampled with exactly the conditioning it
was trained on.
"""

import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], warn_if_cut: bool = True, max_length: int | None = None
) -> torch.LongTensor:
    r"""Token ids of each prompt, padded and truncated to `max_length`, by default the tokenizer's
    `model_max_length` (77 for CLIP).

    Prompts longer than that lose their end, as in Stable Diffusion; one warning per call says how many did.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): The pipeline's tokenizer (a `CLIPTokenizer` for SD).
        prompts (`list[str]`): The prompts; `""` is the unconditional prompt.
        warn_if_cut (`bool`, *optional*, defaults to `True`): `False` when the caller has warned already (training
            counts its captions once, `data.warn_long_captions`): spares tokenizing every batch twice.
        max_length (`int`, *optional*): Another length, e.g. that of given prompt embeddings that negative prompts
            must match (as diffusers pads them).

    Returns:
        `torch.LongTensor` of shape `(len(prompts), max_length)`.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {prompts!r}.")
    max_length = max_length or tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    cut = too_long(tokenizer, prompts, max_length) if warn_if_cut else []
    if cut:
        first = tokenizer(prompts[cut[0]], verbose=False).input_ids[max_length - 1 : -1]
        logger.warning(
            f"{len(cut)} of {len(prompts)} prompts are longer than {max_length} tokens and were cut, "
            f"e.g. prompt {cut[0]} lost: {tokenizer.decode(first)!r}"
        )
    return ids.input_ids


def too_long(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int | None = None, chunk: int = 1024
) -> list[int]:
    """Indices of the texts longer than `max_length` tokens (the tokenizer's `model_max_length`): those it will cut."""
    max_length = max_length or tokenizer.model_max_length
    long = []
    for start in range(0, len(texts), chunk):
        ids = tokenizer(texts[start : start + chunk], truncation=False, verbose=False).input_ids
        long += [start + i for i, tokens in enumerate(ids) if len(tokens) > max_length]
    return long


def encode_prompts(
    text_encoder: PreTrainedModel, input_ids: torch.Tensor, clip_skip: int | None = None
) -> torch.Tensor:
    r"""The text encoder's last hidden state for token ids: the UNet's `encoder_hidden_states`.

    SD-1.x/2.x condition on every token's final hidden state (no pooling, no attention mask); gradients flow
    unless the caller wraps this in `torch.no_grad()`, so training may fine-tune the encoder.

    Args:
        text_encoder (`PreTrainedModel`): A `CLIPTextModel` (or any encoder whose first output is `(B, L, D)`).
        input_ids (`torch.Tensor`): `(B, L)` ids from `tokenize_prompts`; moved to the encoder's device.
        clip_skip (`int`, *optional*): Condition on the hidden state `clip_skip` layers before the last instead,
            through the final layer norm, as diffusers' pipelines do (models tuned on it, e.g. many anime ones,
            want 1 or 2). 0 is the last layer.

    Returns:
        `torch.Tensor` of shape `(B, L, D)`, in the encoder's dtype.
    """
    input_ids = input_ids.to(text_encoder.device, non_blocking=True)  # from pageable memory: staged, no host sync
    if clip_skip is None:
        return text_encoder(input_ids)[0]
    layers = text_encoder.config.num_hidden_layers
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
        raise ValueError(f"clip_skip must be an integer from 0 to {layers - 1} (the encoder has {layers} layers), "
                         f"got {clip_skip!r}.")  # fmt: skip
    hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers <= 5.0 nest it
    return final_norm(hidden)


def embed_prompts(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: PreTrainedModel,
    prompts: list[str],
    clip_skip: int | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """`encode_prompts(text_encoder, tokenize_prompts(tokenizer, prompts, max_length=...), clip_skip)`: prompts to
    `(B, L, D)`."""
    return encode_prompts(text_encoder, tokenize_prompts(tokenizer, prompts, max_length=max_length), clip_skip)
