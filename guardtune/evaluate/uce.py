"""UCE baseline (Gandikota et al., Unified Concept Editing): a closed-form cross-attention edit.

Every cross-attention key and value projection W is replaced by the least-squares solution of

    min  sum_e |W' c_e - W c_g|^2  +  sum_p |W' c_p - W c_p|^2  +  lam |W' - W|_F^2

    W' = (lam W + sum_e W c_g c_e^T + sum_p W c_p c_p^T)
         (lam I + sum_e c_e c_e^T + sum_p c_p c_p^T)^-1

so the text tokens of an erased concept produce the keys and values of a neutral guide concept,
while preserved concepts keep theirs. As in the authors' code, a prompt contributes its token
embeddings from its last word onwards (that word, the end token and the padding after it, which
carry the prompt's meaning in CLIP's causal encoder), aligned with the guide's from the end.
Nothing else in the model changes.
"""

from __future__ import annotations

import torch

from guardtune.errors import DataError

UCE_LAMBDA = 0.5


@torch.no_grad()
def _token_embeddings(pipeline, prompt: str) -> tuple[torch.Tensor, int]:
    """(max_length, dim) text-encoder states and the index of the prompt's last word token."""
    tokens = pipeline.tokenizer(
        prompt,
        padding="max_length",
        truncation=True,
        max_length=pipeline.tokenizer.model_max_length,
        return_tensors="pt",
    )
    device = pipeline.text_encoder.device
    states = pipeline.text_encoder(tokens.input_ids.to(device))[0][0].float().cpu()
    return states, int(tokens.attention_mask[0].sum()) - 2


def _aligned(pipeline, erase: str, guide: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Erased and guide token vectors from each prompt's last word onwards, of equal length."""
    old, old_last = _token_embeddings(pipeline, erase)
    new, new_last = _token_embeddings(pipeline, guide)
    farthest = max(old_last, new_last)
    length = old.shape[0] - farthest
    return old[old_last : old_last + length], new[new_last : new_last + length]


def cross_attention_projections(unet) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in unet.named_modules()
        if name.endswith(("attn2.to_k", "attn2.to_v")) and isinstance(module, torch.nn.Linear)
    }


@torch.no_grad()
def uce_edit(
    pipeline,
    erase: list[str],
    guide: str = "",
    preserve: tuple[str, ...] = (),
    lam: float = UCE_LAMBDA,
) -> dict[str, torch.Tensor]:
    """Edited weights of every cross-attention to_k and to_v, keyed by parameter name."""
    if getattr(pipeline, "text_encoder_2", None) is not None:
        # SDXL's keys and values read both encoders' states side by side; this edit knows one.
        raise DataError("the UCE baseline is implemented for SD 1.x and 2.x models, not SDXL")
    pairs = [_aligned(pipeline, concept, guide) for concept in erase]
    kept = [_token_embeddings(pipeline, p) for p in (*preserve, "")]
    kept_tokens = [states[last:] for states, last in kept]
    edited = {}
    for name, linear in cross_attention_projections(pipeline.unet).items():
        weight = linear.weight.float().cpu()
        dim = weight.shape[1]
        left = lam * weight
        right = lam * torch.eye(dim)
        for concept, guide_tokens in pairs:
            left += (guide_tokens @ weight.T).T @ concept
            right += concept.T @ concept
        for tokens in kept_tokens:
            left += (tokens @ weight.T).T @ tokens
            right += tokens.T @ tokens
        # W' = left @ right^-1, right symmetric: solve instead of inverting.
        solved = torch.linalg.solve(right.double(), left.double().T).T
        edited[f"{name}.weight"] = solved.to(linear.weight.dtype)
    return edited
