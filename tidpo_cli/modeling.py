"""Tokenizer, policy and reference loading: a tiny Llama built from config, or any HF causal LM."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .errors import UserError
from .tokenizer import build_byte_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str, key: str = "trainer.device") -> torch.device:
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N; a GPU asked for where there is none is the
    user's mistake, named by `key`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={name} asks for a GPU but CUDA is not available here: use {key}=cpu or auto")
    return device


def load_tokenizer(model_cfg: DictConfig):
    """The byte-level tokenizer (`tokenizer: byte`) or a pretrained one; always with a pad token."""
    source = model_cfg.tokenizer or model_cfg.name_or_path
    if source == "byte":
        return build_byte_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(_load_failure("tokenizer", source, e)) from None
    if tokenizer.pad_token_id is None:
        # Padding is masked out everywhere; reusing EOS is safe and avoids resizing the embeddings.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(model_cfg: DictConfig, tokenizer) -> PreTrainedModel:
    """The trainable policy: built from `model.config` (random init, seeded by the caller) or loaded."""
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.name_or_path is None:
        return build_tiny_llama(OmegaConf.to_container(model_cfg.config), tokenizer, dtype,
                                model_cfg.attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.name_or_path, dtype=dtype, attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise UserError(_load_failure("model", model_cfg.name_or_path, e)) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_llama(config: dict, tokenizer, dtype: torch.dtype = torch.float32,
                     attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A randomly initialised Llama sized by `config` (LlamaConfig fields), its vocab matched to `tokenizer`."""
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **config,
    )
    llama_config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(llama_config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The reference model: the starting policy, frozen, in eval mode."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def add_lora(model: PreTrainedModel, lora_cfg: DictConfig):
    """Wrap `model` in PEFT LoRA adapters (`model.lora`); only the adapter weights stay trainable.

    Returns the PeftModel. Its `get_base_model()` is `model` itself with the adapter layers injected:
    that is what the loop trains and calls, so the importance pass and generation see a plain HF model.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # PEFT asks transformers 5 about checkpointing by its deprecated name
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name the model does not have
        first = str(e).strip().splitlines()[0]
        raise UserError(f"model.lora.target_modules={targets}: {first}") from None


class AdapterOff:
    """The reference under LoRA: the policy's own weights with the adapter switched off for each call, so no
    second copy of the model exists. Called like a model; dropout is off during the call."""

    def __init__(self, peft_model) -> None:
        self.peft_model = peft_model

    def modules(self):  # what packing.model_inputs reads: the attention kernel and the weights' dtype
        return self.peft_model.modules()

    def parameters(self):
        return self.peft_model.parameters()

    @property
    def module(self):  # the model a call runs, named as a DeepSpeed engine names it (objective.keeps_masked_logits)
        return self.peft_model.get_base_model()

    def __call__(self, **inputs):
        model = self.peft_model.get_base_model()
        was_training = model.training
        model.eval()
        try:
            with self.peft_model.disable_adapter():
                return model(**inputs)
        finally:
            model.train(was_training)


def with_reference(policy: PreTrainedModel, model_cfg: DictConfig, *, reference: bool = True, other=None):
    """(policy, reference, peft_model or None) for a loaded `policy`: under `model.lora` the adapters are added
    and the reference is the policy with its adapter off; otherwise the reference is a frozen copy. `other`: the
    reference given by `model.reference` (load_reference), used instead of either.
    The reference is None when `reference` is False (SFT needs none)."""
    if not model_cfg.lora.enabled:
        return policy, (other if other is not None else frozen_copy(policy)) if reference else None, None
    peft_model = add_lora(policy, model_cfg.lora)
    if not reference:
        return peft_model.get_base_model(), None, peft_model
    return peft_model.get_base_model(), other if other is not None else AdapterOff(peft_model), peft_model


def check_reference_tokenizer(model_cfg: DictConfig, tokenizer) -> None:
    """`model.reference` must score the policy's token ids: where it has a tokenizer of its own, that tokenizer's
    vocabulary must be the policy's, token for token. Checked before any weights load."""
    source = model_cfg.reference
    try:
        theirs = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, TypeError):
        return  # no tokenizer saved with it (weights only): its vocabulary size is checked when it loads
    ours, other = tokenizer.get_vocab(), theirs.get_vocab()
    if ours == other:
        return
    differing = sorted(set(ours.items()) ^ set(other.items()), key=lambda item: item[1])
    token, index = differing[0]
    side = "policy's" if ours.get(token) == index else "reference's"
    raise UserError(f"model.reference={source}: its tokenizer is not the policy's ({len(ours)} vs {len(other)} "
                    f"tokens; {len(differing)} (token, id) entries differ, the first {token!r} = {index} in the "
                    f"{side} only): a reference must share the policy's tokenizer (model.tokenizer or "
                    "model.name_or_path), or its log-probs score other tokens")


def load_reference(model_cfg: DictConfig, tokenizer) -> PreTrainedModel:
    """The model `model.reference` names, loaded as the policy is (model.dtype, model.attn_implementation),
    frozen and in eval mode; its embeddings must cover the policy's tokenizer."""
    source = model_cfg.reference
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[model_cfg.dtype], attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(_load_failure("reference model", source, e, key="model.reference")) from None
    size = model.get_input_embeddings().num_embeddings
    if size < len(tokenizer):
        raise UserError(f"model.reference={source}: its embeddings have {size} rows, fewer than the policy's "
                        f"tokenizer's {len(tokenizer)} tokens: a reference must share the policy's tokenizer")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    model.requires_grad_(False)
    return model


def _load_failure(what: str, source: str, e: Exception, key: str = "model.name_or_path (or model.tokenizer)") -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped local path.
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") > 1
    if looks_local and not Path(source).exists():
        return f"{what} path '{source}' does not exist: check {key}"
    return (f"cannot load {what} '{source}': {first} (offline machines need a local copy: "
            f"{key.split()[0]}=/path/to/model)")
