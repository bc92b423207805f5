"""The config schema: types and allowed values of every key in conf/, checked before any model loads.

The values themselves live in conf/ (one place); this module only says what is allowed. `validate`
turns any problem into a ConfigError with one line naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from .errors import ConfigError

Check = Callable[[Any], Optional[str]]  # returns what is allowed when the value is not


def one_of(*choices: Any) -> Check:
    return lambda v: None if v in choices else "one of " + ", ".join(str(c) for c in choices)


def above(low: float) -> Check:
    return lambda v: None if v > low else f"a number > {low}"


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"a number >= {low}"


def in_range(low: float, high: float) -> Check:
    """low <= v < high."""
    return lambda v: None if low <= v < high else f"a number in [{low}, {high})"


def closed(low: float, high: float) -> Check:
    """low <= v <= high."""
    return lambda v: None if low <= v <= high else f"a number in [{low}, {high}]"


def key(check: Check | None = None, default: Any = MISSING) -> Any:
    """A schema field; `check` only runs on values that are not None."""
    return field(default=default, metadata={"check": check})


def target_modules(v: Any) -> Optional[str]:
    ok = v == "all-linear" or (isinstance(v, (list, tuple)) or OmegaConf.is_list(v)) and len(v) > 0 and all(
        isinstance(m, str) and m for m in v)
    return None if ok else "all-linear or a non-empty list of module names, e.g. [q_proj,v_proj]"


def window_setting(v: Any) -> Optional[str]:
    ok = v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0)
    return None if ok else "a whole number > 0 or auto"


def cache_setting(v: Any) -> Optional[str]:
    # YAML reads an unquoted off as false, which reaches a string key as "False"
    ok = v.strip() and v not in ("False", "True")
    return None if ok else 'off, auto, or a directory (in a YAML file write "off" in quotes)'


@dataclass
class LoraConfig:
    enabled: bool = key()
    r: int = key(above(0))
    alpha: float = key(above(0))
    dropout: float = key(in_range(0.0, 1.0))
    target_modules: Any = key(target_modules)


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = key()
    tokenizer: Optional[str] = key()
    config: Optional[Dict[str, Any]] = key()
    dtype: str = key(one_of("float32", "bfloat16", "float16"))
    attn_implementation: str = key(one_of("eager", "sdpa", "flex_attention", "flash_attention_2"))
    trust_remote_code: bool = key()
    reference: Optional[str] = key()
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SyntheticConfig:
    num_train: int = key(above(0))
    min_items: int = key(above(1))
    max_items: int = key(above(1))
    max_changed: int = key(above(0))


@dataclass
class DataConfig:
    format: str = key(one_of("auto", "hh_rlhf", "prompt_chosen_rejected", "conversational", "unpaired",
                                       "synthetic"))
    path: Optional[str] = key()
    split: Optional[str] = key()
    eval_path: Optional[str] = key()
    eval_split: Optional[str] = key()
    eval_size: int = key(at_least(0))
    max_length: int = key(above(1))
    max_prompt_length: int = key(above(0))
    max_rows: Optional[int] = key(above(0))
    on_bad_row: str = key(one_of("skip", "error"))
    flip_labels: float = key(closed(0.0, 1.0))
    shuffle: bool = key()
    group_by_length: int = key(at_least(0))
    synthetic: Optional[SyntheticConfig] = key()
    template_mismatch: str = key(one_of("common_prefix", "error"))
    chat_template: Optional[str] = key()
    chat_template_kwargs: Optional[Dict[str, Any]] = key()
    system_prompt: Optional[str] = key()


@dataclass
class ImportanceConfig:
    mode: str = key(one_of("none", "gradient", "uniform", "random"))
    span: str = key(one_of("response", "prompt_response"))
    prior: str = key(one_of("gaussian", "none"))
    normalize: str = key(one_of("sum", "softmax"))
    lam: float = key(closed(0.0, 1.0))
    sigma_div: float = key(above(0))
    grad_pass: str = key(one_of("auto", "separate", "fused"))
    target: str = key(one_of("last_max_logit", "sequence_logp", "margin"))  # importance.TARGETS
    attribution: str = key(one_of("grad_l1", "grad_x_input"))  # importance.ATTRIBUTIONS
    exclude_last: bool = key()


@dataclass
class TripletConfig:
    margin: float = key(at_least(0))


@dataclass
class AnchorConfig:
    source: str = key(one_of("prompt", "chosen_prefix"))
    max_new_tokens: int = key(above(0))
    temperature: float = key(above(0))
    top_k: int = key(at_least(0))
    top_p: float = key(closed(0.0, 1.0))
    prefix_fraction: float = key(in_range(0.0, 1.0))
    refresh_every: Any = key(window_setting)
    max_age: int = key(at_least(0))
    zero3_weights: str = key(one_of("auto", "gathered", "per_layer"))
    compile: Any = key(one_of("auto", True, False))


def loss_types(v: Any) -> Optional[str]:
    from .losses import PAIR_LOSSES

    names = list(v) if isinstance(v, (list, tuple, ListConfig)) else [v]
    bad = [n for n in names if n not in PAIR_LOSSES]
    if bad or not names:
        return "a name or a list of names from " + ", ".join(PAIR_LOSSES)
    return None


def weight_list(v: Any) -> Optional[str]:
    ok = isinstance(v, (list, tuple, ListConfig)) and all(isinstance(w, (int, float)) and w >= 0 for w in v)
    return None if ok else "a list of non-negative numbers, one per loss.type (or null: all 1)"


@dataclass
class SimpoConfig:
    gamma: float = key(at_least(0))


@dataclass
class CpoConfig:
    alpha: float = key(at_least(0))


@dataclass
class TpoConfig:
    alpha: float = key(at_least(0))


@dataclass
class KtoConfig:
    desirable_weight: float = key(above(0))
    undesirable_weight: float = key(above(0))


@dataclass
class TisConfig:
    positive_model: Optional[str] = key()
    negative_model: Optional[str] = key()
    transform: str = key(one_of("rank_based", "threshold_and_scale", "threshold", "binary", "random", "origin"))
    min_scale: float = key()
    max_scale: float = key()
    batch_size: int = key(above(0))
    cache: Optional[str] = key()


@dataclass
class LossConfig:
    name: str = key(one_of("sft", "dpo", "ipo", "tdpo", "tidpo", "tis_dpo", "simpo", "cpo", "orpo", "tpo", "kto"))
    beta: float = key(above(0))
    type: Any = key(loss_types)
    weights: Optional[Any] = key(weight_list)
    reference_free: bool = key()
    label_smoothing: float = key(in_range(0.0, 0.5))
    discopop_tau: float = key(above(0))
    alpha: float = key(at_least(0))
    gamma: float = key(at_least(0))
    simpo: SimpoConfig = field(default_factory=SimpoConfig)
    cpo: CpoConfig = field(default_factory=CpoConfig)
    tpo: TpoConfig = field(default_factory=TpoConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)
    tis: TisConfig = field(default_factory=TisConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    triplet: TripletConfig = field(default_factory=TripletConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)


@dataclass
class TrainerConfig:
    max_steps: Optional[int] = key(above(0))
    epochs: float = key(above(0))
    micro_batch_size: int = key(above(0))
    grad_accum: int = key(above(0))
    optimizer: str = key(one_of("adamw", "rmsprop"))
    lr: float = key(above(0))
    weight_decay: float = key(at_least(0))
    schedule: str = key(one_of("constant", "linear", "cosine"))
    warmup_steps: int = key(at_least(0))
    max_grad_norm: Optional[float] = key(above(0))
    precision: str = key(one_of("fp32", "bf16"))
    gradient_checkpointing: bool = key()
    share_prompt: Any = key(one_of("auto", True, False))
    eval_every: int = key(at_least(0))
    eval_before: bool = key()
    eval_batch_size: int = key(above(0))
    device: str = key(one_of("auto", "cpu", "cuda"))
    save_final: bool = key()
    save_every: int = key(at_least(0))
    keep_last: Optional[int] = key(above(0))
    resume: str = key(lambda v: None if v.strip() else "auto, never, or a checkpoint directory")
    max_bad_steps: int = key(above(0))
    reference_cache: str = key(cache_setting)


@dataclass
class WandbConfig:
    mode: str = key(one_of("online", "offline", "disabled"))
    project: str = key()
    entity: Optional[str] = key()
    name: Optional[str] = key()
    group: Optional[str] = key()
    tags: List[str] = key()


@dataclass
class LoggerConfig:
    progress: str = key(one_of("auto", "bar", "plain", "off"))
    print_every: int = key(above(0))
    log_every: int = key(above(0))
    wandb: Optional[WandbConfig] = key()


@dataclass
class DeepSpeedConfig:
    enabled: bool = key()
    zero_optimization: Dict[str, Any] = key()  # passed to DeepSpeed as written
    reference_offload: bool = key()


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    seed: int = key(at_least(0))
    experiment: Optional[Dict[str, Any]] = key(default=None)  # set by +experiment=NAME; no keys of its own


def validate(cfg: DictConfig) -> DictConfig:
    """Merge the composed config onto the schema and check every value; return the typed, resolved config.

    Raises ConfigError with one line: the key, the bad value and what is allowed.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        OmegaConf.resolve(merged)
        _check(merged, TrainConfig, "")
        _check_relations(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(describe_omegaconf_error(e)) from None
    return merged


def _check(node: DictConfig, schema: type, prefix: str) -> None:
    for f in dataclasses.fields(schema):
        value = node[f.name]
        name = prefix + f.name
        if value is None:
            continue
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            _check(value, f.type, name + ".")
            continue
        nested = _nested_schema(f)
        if nested is not None:
            _check(value, nested, name + ".")
            continue
        check = f.metadata.get("check")
        allowed = check(value) if check else None
        if allowed:
            raise ConfigError(f"{name}={value!r} is not allowed: expected {allowed}")


def _nested_schema(f: dataclasses.Field) -> type | None:
    # With postponed annotations f.type is a string: look the dataclass up by name.
    name = str(f.type).removeprefix("Optional[").removesuffix("]")
    candidate = globals().get(name)
    return candidate if dataclasses.is_dataclass(candidate) else None


def _check_relations(cfg: DictConfig) -> None:
    _check_loss(cfg.loss)
    d = cfg.data
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"data.max_prompt_length={d.max_prompt_length} must be smaller than data.max_length={d.max_length}"
        )
    if d.format == "synthetic":
        s = d.synthetic
        if s is None:
            raise ConfigError("data.format=synthetic needs data.synthetic settings (use data=synthetic)")
        if s.min_items > s.max_items:
            raise ConfigError(f"data.synthetic.min_items={s.min_items} must be <= max_items={s.max_items}")
        if s.max_changed >= s.min_items:
            raise ConfigError(f"data.synthetic.max_changed={s.max_changed} must be < min_items={s.min_items}")
    elif d.path is None:
        raise ConfigError(f"data.path is required for data.format={d.format}: a file, a directory or a hub name")
    ds = cfg.deepspeed
    if ds.enabled and ds.zero_optimization.get("stage") not in (1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage={ds.zero_optimization.get('stage')} is not allowed: "
                          "expected 1, 2 or 3 (deepspeed=zero1, zero2, zero3; deepspeed=none runs without DeepSpeed)")
    if ds.enabled and ds.zero_optimization.get("stage") == 3 and cfg.model.lora.enabled:
        raise ConfigError("model.lora with deepspeed=zero3 is not supported yet: use deepspeed=zero2 (LoRA's "
                          "trainable weights are small, and ZeRO-2 partitions their optimizer state and gradients)")
    if cfg.model.name_or_path is None and cfg.model.config is None:
        raise ConfigError("model.name_or_path or model.config must be set (a model to load or one to build)")
    if cfg.model.name_or_path is None and cfg.model.tokenizer is None:
        raise ConfigError("model.tokenizer is required when the model is built from model.config (e.g. byte)")


def _check_loss(loss: DictConfig) -> None:
    """The loss keys that only some losses read (loss_specs.py says which loss reads what)."""
    from .loss_specs import DPO_FAMILY, types_of
    from .losses import SMOOTHED

    family = loss.name in DPO_FAMILY
    types = types_of(loss)
    if loss.name == "sft":
        for key_name, value, default in (("alpha", loss.alpha, 0), ("gamma", loss.gamma, 0),
                                         ("label_smoothing", loss.label_smoothing, 0),
                                         ("importance.mode", loss.importance.mode, "none")):
            if value != default:
                raise ConfigError(f"loss.{key_name}={value} does not apply to loss=sft (it trains on the chosen "
                                  f"responses alone): set loss.{key_name}={default} or pick a preference loss")
    if loss.name == "tis_dpo":
        missing = [k for k in ("positive_model", "negative_model") if not loss.tis[k]]
        if missing:
            raise ConfigError(f"loss=tis_dpo needs loss.tis.{missing[0]}: the {missing[0].split('_')[0]} contrastive "
                              "model (README: TIS-DPO recipe, e.g. RUN/final of loss=dpo on the data and of loss=dpo "
                              "data.flip_labels=1.0)")
        if loss.importance.mode != "none":
            raise ConfigError("loss=tis_dpo takes its token weights from its contrastive models: set "
                              "loss.importance.mode=none")
    if not family and (types != ["sigmoid"] or loss.weights is not None):
        raise ConfigError(f"loss.type / loss.weights (TRL's DPO loss family) apply to loss=dpo, ipo, tdpo or "
                          f"tidpo, not loss={loss.name}: leave them at their defaults")
    if loss.weights is not None and len(loss.weights) != len(types):
        raise ConfigError(f"loss.weights has {len(loss.weights)} values for {len(types)} loss.type entries "
                          f"({', '.join(types)}): give one weight per type")
    if loss.alpha and not (family and types == ["sigmoid"]):
        raise ConfigError(f"loss.alpha={loss.alpha} (TDPO's KL weight) applies to the sigmoid loss of dpo, tdpo or "
                          f"tidpo, not loss={loss.name} loss.type={types}: set loss.alpha=0")
    if loss.alpha and loss.reference_free:
        raise ConfigError("loss.alpha (TDPO's KL to the reference) needs a reference: set loss.reference_free=false")
    if loss.reference_free and not family:
        raise ConfigError(f"loss.reference_free applies to the DPO family (dpo, ipo, tdpo, tidpo); loss={loss.name} "
                          "is reference-free or needs its reference by definition")
    if loss.label_smoothing and family and not set(types) & set(SMOOTHED):
        raise ConfigError(f"loss.label_smoothing is read by loss.type {', '.join(SMOOTHED)} only, not {types}")
    if loss.label_smoothing and loss.name in ("orpo", "kto"):
        raise ConfigError(f"loss.label_smoothing does not apply to loss={loss.name}: set it to 0")
    if family and "exo_pair" in types and not loss.label_smoothing:
        raise ConfigError("loss.type=exo_pair needs loss.label_smoothing > 0 (its target is [1 - eps, eps]; EXO's "
                          "authors use 1e-3)")
    if family and "robust" in types and loss.label_smoothing >= 0.5:
        raise ConfigError("loss.type=robust needs loss.label_smoothing < 0.5")


def describe_omegaconf_error(e: OmegaConfBaseException) -> str:
    """One line for an OmegaConf error: the full key, the value and what the schema allows there."""
    full_key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    if isinstance(e, ConfigKeyError):
        parent, _, leaf = str(full_key).rpartition(".")
        known = _schema_keys(parent)
        hint = f"; {parent or 'the top level'} has: {', '.join(known)}" if known else ""
        return f"unknown key '{full_key}'{hint}"
    if isinstance(e, MissingMandatoryValue):
        return f"{full_key} has no value: set it, e.g. {full_key}=..."
    if isinstance(e, ValidationError):
        expected = _schema_type(str(full_key))
        return f"{full_key}={getattr(e, 'value', '?')!r} is not allowed: expected {expected}"
    return f"{full_key}: {getattr(e, 'msg', str(e))}".splitlines()[0]


def _schema_field(path: str) -> dataclasses.Field | None:
    schema: Any = TrainConfig
    found = None
    for part in path.split("."):
        fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
        found = fields.get(part)
        if found is None:
            return None
        schema = _nested_schema(found) or found.type
    return found


def _schema_keys(path: str) -> List[str]:
    if not path:
        return [f.name for f in dataclasses.fields(TrainConfig)]
    f = _schema_field(path)
    nested = _nested_schema(f) if f else None
    return [g.name for g in dataclasses.fields(nested)] if nested else []


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _schema_type(path: str) -> str:
    f = _schema_field(path)
    if f is None:
        return "a value of the right type"
    text = str(f.type)
    optional = text.startswith("Optional[")
    base = text.removeprefix("Optional[").removesuffix("]")
    word = _TYPE_WORDS.get(base, base)
    return word + (" or null" if optional else "")


def config_changes(old: DictConfig, new: DictConfig, ignore: tuple[str, ...] = ("trainer.resume",)) -> List[str]:
    """'key: old -> new' for every leaf that differs between two configs (keys in `ignore` skipped)."""
    def flat(node: Any, prefix: str = "") -> Dict[str, Any]:
        if isinstance(node, dict):
            out: Dict[str, Any] = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    a = flat(OmegaConf.to_container(old, resolve=True))
    b = flat(OmegaConf.to_container(new, resolve=True))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k not in ignore and a.get(k) != b.get(k)]
