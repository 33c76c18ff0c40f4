"""IVLP deep prompts (PromptSRC / PromptKD placement) around open_clip's frozen towers.

The encoders here wrap open_clip 3.x modules rather than forking them: they reuse the CLIP model's own
submodules (the same tensors, frozen) and re-run its forward step by step so that prompts can be put in
between. With ``n_ctx == 0`` or ``depth == 0`` they are exactly open_clip's forward (bit-identical
outputs), so zero-shot CLIP, the prompted teacher and the students all share one code path.

Placement (PROTOCOL.md section 2), which PromptSRC/PromptKD checkpoints need to mean the same thing here:

* vision: ``VPT`` (n_ctx x width) is appended after the patch tokens, after the positional embedding has been
  added (prompts get none) and before ``ln_pre``; blocks 1..depth-1 replace the *last* n_ctx tokens of their
  input with their own prompt. Pooling stays at the class token.
* text: the class prompt is ``"<ctx words> <class name>."``; the learned ``ctx`` replaces token positions
  1..n_ctx (right after start-of-text) of the token embeddings; blocks 1..depth-1 replace positions 1..n_ctx of
  their input. Pooling stays at end-of-text.

Internal parameter names are ``VPT`` / ``ctx`` and ``VPT_shallow.<block>``; :func:`ivlp_state_dict` and
:func:`load_ivlp_state_dict` give and take them under PromptSRC's checkpoint keys, which
:mod:`clipkd.models.state` defines (with what else a PromptSRC / PromptKD file holds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from clipkd.errors import ConfigError, ModelError
from clipkd.models.state import (
    KEY_TEXT_CTX,
    KEY_TEXT_SHALLOW,
    KEY_VISION_SHALLOW,
    KEY_VISION_VPT,
    copy_state_strict,
    prompt_keys,
)

PROMPT_INIT_STD = 0.02  # PromptSRC / MaPLe / VPT initialise every prompt with N(0, 0.02^2)


def _check_prompt_size(n_ctx: int, depth: int, layers: int, tower: str) -> tuple[int, int]:
    key = "VISION" if tower == "vision" else "TEXT"
    if n_ctx < 0 or depth < 0:
        raise ConfigError(
            f"{tower} prompts need n_ctx >= 0 and depth >= 0 (got n_ctx={n_ctx}, depth={depth}); "
            f"check MODEL.PROMPT.N_CTX_{key} and MODEL.PROMPT.DEPTH_{key}"
        )
    if n_ctx == 0 or depth == 0:
        return 0, 0
    if depth > layers:
        raise ConfigError(
            f"{tower} prompt depth {depth} exceeds the {layers} blocks of this model's {tower} transformer; "
            f"set MODEL.PROMPT.DEPTH_{key} to at most {layers}"
        )
    return n_ctx, depth


def _new_prompt(n_ctx: int, width: int, like: torch.Tensor) -> nn.Parameter:
    p = torch.empty(n_ctx, width, dtype=like.dtype, device=like.device)
    nn.init.normal_(p, std=PROMPT_INIT_STD)
    return nn.Parameter(p)


def _freeze(parts: Sequence[nn.Module | nn.Parameter | None]) -> None:
    for part in parts:
        if part is not None:
            part.requires_grad_(False)


class _PromptedEncoder(nn.Module):
    """Shared mechanics: frozen wrapped parts stay in eval mode, prompts run through the blocks."""

    n_ctx: int
    depth: int

    def _frozen_modules(self) -> list[nn.Module]:
        return [m for m in self.children() if not isinstance(m, nn.ParameterDict)]

    def train(self, mode: bool = True) -> _PromptedEncoder:
        """Switch mode for the prompts but keep the frozen CLIP parts in eval mode.

        The wrapped CLIP is never trained: leaving it in train mode would only enable patch dropout and
        change nothing else, but a trainer calling ``model.train()`` must not be able to alter it.
        """
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    def _run_blocks(
        self,
        x: torch.Tensor,
        blocks: nn.ModuleList,
        replace: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        attn_mask: torch.Tensor | None,
        deep: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        deep = self.VPT_shallow if deep is None else deep
        for i, block in enumerate(blocks):
            key = str(i)
            if key in deep:
                x = replace(x, deep[key].to(x.dtype))
            x = block(x, attn_mask=attn_mask)
        return x

    def prompt_parameters(self) -> dict[str, nn.Parameter]:
        """The learnable prompt tensors under their PromptSRC checkpoint names."""
        raise NotImplementedError

    @property
    def has_prompts(self) -> bool:
        return self.n_ctx > 0


class PromptedVisionEncoder(_PromptedEncoder):
    """open_clip ``VisionTransformer`` with IVLP deep visual prompts; returns unnormalised features."""

    def __init__(self, visual: nn.Module, n_ctx: int = 0, depth: int = 0) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise ModelError(
                f"deep visual prompts need an open_clip VisionTransformer image tower, but this model's is a "
                f"{type(visual).__name__}; choose a ViT model (e.g. ViT-B-16) for MODEL.*.NAME"
            )
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise ModelError(
                "deep visual prompts support class-token or average pooling ViTs only; this image tower uses "
                "attentional pooling or no pooling"
            )
        if not visual.transformer.batch_first:
            raise ModelError("the image transformer is not batch-first; open_clip >= 3 is required")
        blocks = visual.transformer.resblocks
        self.n_ctx, self.depth = _check_prompt_size(n_ctx, depth, len(blocks), "vision")
        self.visual = visual
        _freeze([visual])
        width = visual.class_embedding.shape[-1]
        self.width = width
        self.VPT: nn.Parameter | None = (
            _new_prompt(self.n_ctx, width, visual.class_embedding) if self.n_ctx else None
        )
        self.VPT_shallow = nn.ParameterDict(
            {str(i): _new_prompt(self.n_ctx, width, visual.class_embedding) for i in range(1, self.depth)}
        )
        self.train(self.training)

    @property
    def output_dim(self) -> int:
        return int(self.visual.output_dim)

    def prompt_parameters(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        if self.VPT is not None:
            out[KEY_VISION_VPT] = self.VPT
        for i, p in self.VPT_shallow.items():
            out[KEY_VISION_SHALLOW.format(i)] = p
        return out

    def _prompts(self, prompts: Sequence[torch.Tensor] | None
                 ) -> tuple[torch.Tensor | None, Mapping[str, torch.Tensor]]:
        """The first block's prompt and the deeper blocks' (by block index): this encoder's own, or those of
        blocks 0..len-1 that the caller passes (MaPLe's vision prompts, projections of its text prompts)."""
        if prompts is None:
            return self.VPT, self.VPT_shallow
        return (prompts[0] if len(prompts) else None), {str(i): p for i, p in enumerate(prompts) if i}

    def tokens(self, images: torch.Tensor, prompts: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Transformer output tokens ``[B, 1 + patches + n_ctx, width]`` (before ``ln_post``); ``prompts``: see
        :meth:`forward`."""
        first, deep = self._prompts(prompts)
        v = self.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, patches, width]
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        n = 0 if first is None else first.shape[0]
        if n:
            x = torch.cat([x, first.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        x = v.ln_pre(x)

        def replace_last(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[:, :-n], p.unsqueeze(0).expand(t.shape[0], -1, -1)], dim=1)

        return self._run_blocks(x, v.transformer.resblocks, replace_last, None, deep)

    def forward(self, images: torch.Tensor, prompts: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Image features; ``prompts`` (each n x width), when given, are the prompts of blocks 0..len-1 instead
        of this encoder's own (placed as its own are)."""
        v = self.visual
        x = self.tokens(images, prompts)
        first = self._prompts(prompts)[0]
        n = 0 if first is None else first.shape[0]
        if n:
            x = x[:, : x.shape[1] - n]  # prompts never take part in pooling
        if v.final_ln_after_pool:
            pooled = x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(dim=1)
            pooled = v.ln_post(pooled)
        else:
            x = v.ln_post(x)
            pooled = x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(dim=1)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled


def _text_tower_parts(model: nn.Module) -> dict[str, object]:
    """The text-tower pieces of an open_clip CLIP (flattened on the model) or CustomTextCLIP (``.text``), or of
    another PromptedTextEncoder (the same frozen tower, e.g. for a prompt-free view of a student's)."""
    from open_clip.model import CLIP
    from open_clip.transformer import TextTransformer

    text = getattr(model, "text", None)
    if isinstance(model, PromptedTextEncoder):
        src, pool, eos = model, model.pool_type, model.eos_id
    elif isinstance(text, TextTransformer):
        if text.cls_emb is not None or text.use_pad_mask:
            raise ModelError(
                "text prompts support CLIP-style causal text towers only (no class token / padding mask); "
                "choose a CLIP ViT model for MODEL.*.NAME"
            )
        src, pool, eos = text, text.pool_type, text.eos_id
    elif isinstance(model, CLIP):
        src, pool, eos = model, model.text_pool_type, model.text_eos_id
    else:
        raise ModelError(
            f"text prompts need an open_clip CLIP text transformer, but this model's text tower is "
            f"{type(text if text is not None else model).__name__}; choose a CLIP ViT model for MODEL.*.NAME"
        )
    return {
        "token_embedding": src.token_embedding,
        "positional_embedding": src.positional_embedding,
        "transformer": src.transformer,
        "ln_final": src.ln_final,
        "text_projection": src.text_projection,
        "attn_mask": src.attn_mask,
        "pool_type": pool,
        "eos_id": eos,
    }


class PromptedTextEncoder(_PromptedEncoder):
    """open_clip text transformer with IVLP deep text prompts; returns unnormalised features.

    With prompts, every class prompt is ``"<ctx words> <class name>."`` and the ctx words' embeddings are
    replaced by the learned ``ctx``. The words are ``ctx_init`` (the embeddings of its first ``n_ctx`` tokens
    initialise ``ctx`` and any later words stay fixed, as IVLP, PromptSRC and MaPLe do: 2 tokens from "a photo of
    a" give ``"[ctx0] [ctx1] of a <name>."``) or, when ``ctx_init`` is empty, ``"X X ... X"`` with ``ctx`` drawn
    from N(0, 0.02^2). Without prompts, texts are whatever the caller formats (zero-shot templates).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        n_ctx: int = 0,
        depth: int = 0,
        ctx_init: str = "",
    ) -> None:
        super().__init__()
        parts = _text_tower_parts(clip_model)
        transformer = parts["transformer"]
        if not transformer.batch_first:
            raise ModelError("the text transformer is not batch-first; open_clip >= 3 is required")
        self.n_ctx, self.depth = _check_prompt_size(n_ctx, depth, len(transformer.resblocks), "text")
        self.tokenizer = tokenizer
        self.token_embedding = parts["token_embedding"]
        self.positional_embedding = parts["positional_embedding"]
        self.transformer = transformer
        self.ln_final = parts["ln_final"]
        self.text_projection = parts["text_projection"]
        self.register_buffer("attn_mask", parts["attn_mask"], persistent=False)
        self.pool_type = parts["pool_type"]
        self.eos_id = parts["eos_id"]
        _freeze([self.token_embedding, self.positional_embedding, self.transformer, self.ln_final,
                 self.text_projection])
        width = self.positional_embedding.shape[-1]
        self.width = width
        like = self.positional_embedding

        self.ctx: nn.Parameter | None = None
        self.prompt_prefix = ""
        if self.n_ctx:
            ctx_init = ctx_init.replace("_", " ").strip()
            if ctx_init:
                ids = tokenizer([ctx_init]).to(like.device)
                n_words = int(ids[0].argmax()) - 1  # tokens between start- and end-of-text
                if n_words < self.n_ctx:
                    raise ConfigError(
                        f"MODEL.PROMPT.CTX_INIT '{ctx_init}' is {n_words} tokens long, fewer than "
                        f"MODEL.PROMPT.N_CTX_TEXT {self.n_ctx} (ctx starts from its first words); lengthen it, "
                        "lower N_CTX_TEXT, or set CTX_INIT to \"\" for randomly initialised context"
                    )
                with torch.no_grad():
                    init = self.token_embedding(ids)[0, 1 : 1 + self.n_ctx].to(like.dtype)
                self.ctx = nn.Parameter(init.clone())
                self.prompt_prefix = ctx_init
            else:
                self.ctx = _new_prompt(self.n_ctx, width, like)
                self.prompt_prefix = " ".join(["X"] * self.n_ctx)
        self.VPT_shallow = nn.ParameterDict(
            {str(i): _new_prompt(self.n_ctx, width, like) for i in range(1, self.depth)}
        )
        self.train(self.training)

    @property
    def output_dim(self) -> int:
        proj = self.text_projection
        if proj is None:
            return self.width
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @property
    def device(self) -> torch.device:
        return self.positional_embedding.device

    def prompt_parameters(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        if self.ctx is not None:
            out[KEY_TEXT_CTX] = self.ctx
        for i, p in self.VPT_shallow.items():
            out[KEY_TEXT_SHALLOW.format(i)] = p
        return out

    def class_prompts(self, classnames: Sequence[str], template: str | Callable[[str], str] = "{}") -> list[str]:
        """The texts to tokenize: ``"<ctx words> <name>."`` with prompts, else the template filled in."""
        if self.n_ctx:
            return [f"{self.prompt_prefix} {name}." for name in classnames]
        if callable(template):
            return [template(name) for name in classnames]
        return [template.format(name) for name in classnames]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Features of raw texts (tokenized here), unnormalised."""
        return self(self.tokenize(texts))

    def forward(self, tokens: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Features of token ids; ``ctx`` (``[N, n_ctx, width]``, one row per token row) replaces the learned
        context, for prompts whose context depends on the input (CoCoOp's image-conditioned ctx)."""
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast_dtype)
        n = self.n_ctx
        if n:
            ctx = self.ctx.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1) if ctx is None else ctx.to(x.dtype)
            x = torch.cat([x[:, :1], ctx, x[:, 1 + n :]], dim=1)
        x = x + self.positional_embedding.to(cast_dtype)

        def replace_after_sot(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[:, :1], p.unsqueeze(0).expand(t.shape[0], -1, -1), t[:, 1 + n :]], dim=1)

        x = self._run_blocks(x, self.transformer.resblocks, replace_after_sot, self.attn_mask)
        x = self.ln_final(x)
        from open_clip.transformer import text_global_pool

        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        proj = self.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x


# ------------------------------------------------------------------------------------------------ checkpoints


def _prompted_encoders(model: nn.Module) -> tuple[PromptedVisionEncoder | None, PromptedTextEncoder | None]:
    vision = [m for m in model.modules() if isinstance(m, PromptedVisionEncoder)]
    text = [m for m in model.modules() if isinstance(m, PromptedTextEncoder)]
    if len(vision) > 1 or len(text) > 1:
        raise ModelError(
            "ivlp state dicts describe one model; this module holds several prompted encoders "
            "(pass the teacher or the student, not a module containing both)"
        )
    return (vision[0] if vision else None), (text[0] if text else None)


def ivlp_prompt_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's prompt parameters under PromptSRC's checkpoint names (live parameters, not copies)."""
    vision, text = _prompted_encoders(model)
    out: dict[str, nn.Parameter] = {}
    if text is not None:
        out.update(text.prompt_parameters())
    if vision is not None:
        out.update(vision.prompt_parameters())
    return out


def ivlp_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The prompts as a PromptSRC-compatible state dict (detached, like ``nn.Module.state_dict``)."""
    return {k: p.detach() for k, p in ivlp_prompt_parameters(model).items()}


def load_ivlp_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "the prompt state dict",
    ignore_frozen_clip_weights: bool = True,
) -> None:
    """Load PromptSRC-named prompts into ``model``, strictly.

    Missing or unexpected prompt keys and shape mismatches raise ModelError (all listed at once).
    ``prompt_learner.token_prefix/suffix`` (and PromptKD's ``token_prefix2/suffix2``) are dropped silently
    (class-dependent, rebuilt from class names).
    With ``ignore_frozen_clip_weights`` (default), the frozen CLIP weights that Dassl checkpoints carry along
    (see :func:`clipkd.models.state.is_frozen_clip_key`) are skipped; every prompt key is still checked strictly.
    """
    sd = prompt_keys(state_dict, ignore_frozen_clip_weights=ignore_frozen_clip_weights)
    targets = ivlp_prompt_parameters(model)
    copy_state_strict(
        targets,
        sd,
        source=source,
        hint="The prompt sizes (MODEL.PROMPT.N_CTX_* / DEPTH_*) or the model (MODEL.*.NAME) differ from "
        "those the checkpoint was trained with",
    )
