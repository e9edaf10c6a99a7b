"""Typed, frozen configuration. YAML files hold overrides of these defaults; the CLI adds
``section.key=value`` overrides on top. Unknown keys and wrong types are errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from itemgen.core.io import printable

# the values of ``model``: models/registry.py maps each name to its class (a test keeps the two equal)
MODEL_NAMES = ("itemlm", "sasrec", "bert4rec", "gru4rec", "title", "semantic_id", "text_knn")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # prepared dataset directory (itemgen data prepare), or "synthetic"
    max_history: int = 50  # most recent items kept in a prompt
    synthetic_users: int = 2000  # only for path: synthetic
    synthetic_items: int = 200


@dataclass(frozen=True)
class ItemLMConfig:
    backbone: str = "tiny"  # tiny | smollm2-135m | local HF folder | hub id
    n_layers: int | None = None  # keep only the first N transformer layers (CPU profile)
    pretrained: bool = True  # false: the backbone's architecture with random weights (does pretraining help?)
    item_dim: int = 64  # item embedding table width, independent of the backbone's
    fields: tuple[str, ...] = ("title", "brand", "price", "category")  # used when present
    id_only_share: float = 0.25  # share of training examples that keep item ids only
    field_keep_prob: float = 0.5  # otherwise each item keeps each field with this probability
    max_field_tokens: int = 16  # per field value
    supervise: str = "all"  # all: every item slot predicts its item (SASRec-style); last: final label only
    head: str = "full"  # full softmax over text tokens and items | two_level: over clusters, then members (heads/)
    clusters: str = ""  # two_level: cluster file; "" = DATA/clusters/<cluster_method>.json (built if missing)
    cluster_method: str = "kmeans"  # kmeans | frequency | random (clusters.py)
    n_clusters: int | None = None  # None: about sqrt(|I|)
    # two_level: width of an MLP g(h) added to level 1's logits, fitted after training to estimate
    # each cluster's log-normaliser (heads/softmax.ClusterCorrection, training/level1_fit.py), kept
    # if validation gains; 0: the paper's linear level 1
    cluster_correction: int = 0
    # two_level with a correction: at inference, level 1's this many highest clusters take their
    # exact log-normaliser instead of g's estimate (TwoLevelHead.refine; chosen by validation:
    # training/level1_fit.refine_checkpoint); 0: off
    cluster_refine: int = 0
    text_vocab_in_softmax: bool = True  # normalise over V u I as in the paper (False: items only)
    prompt: str = "default"  # default: the paper's wording; compact: ids and separators only; ids: no question either
    freeze_backbone: bool = False  # only the item representation, its projection and the head train
    lora_r: int = 0  # > 0: LoRA adapters of this rank on the frozen backbone (needs freeze_backbone)
    freeze_text_embeddings: bool = False  # the backbone's token table stays as pretrained (ID-only prompts barely use it)
    # how items become vectors (input/output views, text view, initialisation): the `items` section
    hidden_dropout: float = 0.0  # dropout on hidden states at label positions, before the head
    backbone_dropout: float = 0.0  # dropout inside the backbone: attention probabilities and sublayer outputs


# items.input / items.output / items.init: models/item_repr.py says what each one is
ITEM_INPUTS = ("id", "text", "text+id", "dual", "nullspace")
ITEM_OUTPUTS = ("auto", "untied", "tied", "text+id")
ITEM_INITS = ("random", "text", "ials", "sasrec")


@dataclass(frozen=True)
class ItemsConfig:
    """How a catalog item becomes the vectors a model reads and scores (models/item_repr.py), for
    itemlm and sasrec. The text view is computed once at build with ``text_encoder`` from
    ``text_fields`` and kept in the checkpoint; items with no training interaction get no ID part."""
    input: str = "id"  # id | text | text+id | dual | nullspace
    output: str = "auto"  # auto (itemlm: untied, sasrec: tied) | untied | tied | text+id
    # where the ID vectors start (training/item_init.py): random | text (PCA of the text view) |
    # ials (implicit ALS factors of the training split) | sasrec (a trained SASRec's item vectors,
    # E4SRec style: init_from names its checkpoint; for output text+id the ID residual starts there too)
    init: str = "random"
    init_from: str = ""  # init=sasrec: the SASRec checkpoint directory
    # the frozen text encoder (models/text_view.py): minilm | a backbone name (loaded whole, e.g.
    # smollm2-135m) | a local HF folder | "" (itemlm only: its own backbone as built, n_layers cut)
    text_encoder: str = "minilm"
    text_fields: tuple[str, ...] = ("title", "brand", "category")  # an item's text, those present
    null_dim: int = 16  # input nullspace: ID width, the lowest-variance directions of the text view
    tie_projection: str = "input"  # output tied (itemlm): input = scale * the input projection | linear: a linear map
    dropout: float = 0.0  # dropout on (projected) item input vectors, training only (sasrec adds its own)
    id_dropout: float = 0.0  # training: share of items per step whose ID part is zeroed on input and output
    freeze_id: bool = False  # the ID table stays as initialised (E4SRec freezes its SASRec embeddings)
    # the text-match path (models/text_match.py): score(i) = h . v_i + (M q) . t_i, q = the mean text
    # view of the last text_match history items, M (F, F) starts at text_match_scale * Identity,
    # so the model starts as text-kNN's ranking on top of its ID scores; 0 = off
    text_match: int = 0
    text_match_scale: float = 8.0
    # the item-side gate on the text-match part (models/text_match.py TextGate): item i's text part
    # is weighed g(b_i) and gets a bias c(b_i), both learned per bucket b_i: "ID closed" (a new
    # item, one id_dropout hides this step, one added by `items add`) or the item's training-count
    # bucket, cut at these counts ([5, 20]: 1-4, 5-19, 20+); () = off (one weight for every item)
    text_gate: tuple[int, ...] = ()
    # whether the open (count) buckets learn their g and c too; false: only the closed bucket learns
    # (the training loss shrinks the text part of items whose ID vectors memorised it: office
    # validation NDCG@10 0.0767 learning all buckets vs 0.0796 ungated after 3 epochs, measured)
    text_gate_open: bool = True
    # with text_gate: items with fewer training interactions than this have their ID gate closed for
    # good (training and scoring), as a new item: an ID vector trained on 1-4 examples ranks its item
    # worse than its text does (tail targets, measured); 1 = every trained item keeps its ID part
    id_min_count: int = 1
    # with text_match: a logit added to the score of every ID-closed item (a new item, one added by
    # `items add`) when scoring, never in training: the training loss leaves new items far below
    # where their text would rank them well (docs/text_notes.md)
    closed_prior: float = 0.0
    # > 0: at every validation, closed_prior is chosen from 0, 0.25, ..., this by validation NDCG@10
    # (as the run evaluates: train.eval_exclude_history), and the best checkpoint keeps its value.
    # Validation has no new items (a cold split keeps them out of it), so the search closes the ID
    # part of a random closed_prior_probe share of the trained items (drawn once with train.seed):
    # the validation targets among them stand in for new items, at the rate that share is bought
    # (evaluation/closed_prior.py)
    closed_prior_search: float = 0.0
    closed_prior_probe: float = 0.1
    # how the search chooses, with items.lexical (evaluation/score_search.py): "all" = the best
    # NDCG@10 over all validation users; "warm_floor" = the best on the probe's stand-ins for new-item
    # buyers while every other validation user keeps NDCG@10 >= closed_prior_warm_floor times its
    # figure with no closed item in the ranking (new items may cost the others at most that much)
    closed_prior_rule: str = "all"
    closed_prior_warm_floor: float = 0.98
    # warm_floor's reference for the other users: "self" = this model with no closed item in the
    # ranking; "init" = the ID model items.init_from names (the recipe's SASRec: new items may bring
    # the others down to 98% of what the ID model gives them, not of what text added); or a checkpoint
    closed_prior_floor_from: str = "self"
    # with text_match: the lexical view's width k (models/lexical.py): each item's TF-IDF words on a
    # k-dim LSA basis, scored against the user's last text_match items with a weight per item
    # bucket (ID closed / 1-4 / 5+ training interactions) chosen at every validation with the
    # closed-item prior (evaluation/score_search.py); never trained; 0 = off
    lexical: int = 0
    lexical_min_df: int = 2  # the vocabulary: words in at least this many items' text
    # how the search sets the tail bucket: "all" = all validation users' best; "tail_floor" = the
    # best of the settings whose tail targets (0-4 training interactions) rank at least as well as
    # by the lexical view alone, the model's text part (evaluation/score_search.py)
    lexical_rule: str = "all"


# ItemLMConfig's item fields before the `items` section existed, translated when a config is read
# (old checkpoints' config.json, old YAML, old overrides): itemlm.KEY -> items.NEW_KEY
LEGACY_ITEM_KEYS = {"item_encoder": "input", "text_backbone": "text_encoder", "init": "init",
                    "init_from": "init_from", "freeze_items": "freeze_id", "tie_items": "output",
                    "tie_projection": "tie_projection", "item_dropout": "dropout"}


def translate_legacy(values: dict) -> dict:
    """``values`` with itemlm's old item keys moved into ``items`` (not in place). A legacy key wins
    over the new one (only an old config or an explicit old-style override holds it). Legacy text
    features were the titles through the model's own backbone (or text_backbone): kept so."""
    lm = values.get("itemlm")
    if not isinstance(lm, dict) or not set(lm) & set(LEGACY_ITEM_KEYS):
        return values
    items = values.get("items")
    items = dict(items) if isinstance(items, dict) else {} if items is None else items
    if not isinstance(items, dict):
        return values  # _build names the bad section
    lm = dict(lm)
    old = {k: lm.pop(k) for k in list(lm) if k in LEGACY_ITEM_KEYS}
    if values.get("model", "itemlm") != "itemlm":  # they only ever described ItemLM (configs dump every section)
        return {**values, "itemlm": lm}
    for key, value in old.items():
        if key == "item_encoder":
            value = "id" if value == "none" else value
        elif key == "tie_items":
            value = "tied" if value is True else "untied" if value is False else value
        items[LEGACY_ITEM_KEYS[key]] = value
    if old.get("item_encoder", "none") != "none" or old.get("init") == "text" or "text_backbone" in old:
        items.setdefault("text_encoder", "")
        items.setdefault("text_fields", ["title"])
    return {**values, "itemlm": lm, "items": items}


@dataclass(frozen=True)
class SASRecConfig:
    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    ffn: int | None = None  # feed-forward width (None: = hidden, as before; RecBole uses 256 with hidden 64)
    # pre_ln: scaled embeddings, pre-norm blocks, final norm (Kang & McAuley's code) | post_ln:
    # embeddings + positions layer-normed, post-norm blocks (RecBole, BERT)
    layout: str = "pre_ln"


@dataclass(frozen=True)
class BERT4RecConfig:
    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    mask_prob: float = 0.2  # each training sequence masks max(1, ceil(mask_prob * len)) random positions
    mask_last_prob: float = 0.5  # share of training sequences whose masks include the last item


@dataclass(frozen=True)
class GRU4RecConfig:
    hidden: int = 64  # GRU state width; item embeddings are this wide too
    n_layers: int = 1
    dropout: float = 0.2


@dataclass(frozen=True)
class LossConfig:
    """Training loss over the catalog (losses.py). ``full``: cross-entropy over every item; the
    sampled kinds see ``negatives`` items drawn per batch (shared by every label in it)."""
    kind: str = "full"  # full | sampled_softmax | warp | lambdarank
    negatives: int = 256
    sampler: str = "uniform"  # uniform | popularity (training-split counts + 1) | all (exact reference)
    correction: bool = True  # logQ (softmax); catalog-scaled, importance-weighted rank (warp, lambdarank)
    margin: float = 1.0  # WARP hinge margin
    # full only: each label's softmax leaves out the items that came before it in its sequence. For
    # catalogs where users never take an item twice and recommendations leave the history out (as
    # `itemgen serve` and `--exclude-history` evaluation do): the model spends nothing on ranking
    # items it will never be asked to rank
    exclude_history: bool = False


@dataclass(frozen=True)
class RepeatConfig:
    """A learned awareness of repeats (models/repeat_bias.py): a learned bias added to the scores of
    the items already in the user's history, in the training softmax and wherever the model ranks
    the catalog. On data where users never take an item twice it learns a large negative value (the
    model stops spending its top-k on the history); where they do, whatever fits.
    ``bias``: none | scalar (one value) | recency (one value per recency bucket: the last item,
    the one before, 3-4, 5-8, ... items back)."""
    bias: str = "none"


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (training/distill.py): the student also matches a trained teacher's
    distribution over items at every label: (1 - weight) * CE + weight * T^2 * KL(teacher || student)
    at temperature T. The teacher is any checkpoint of the same catalog that scores next items at
    the same labels (SASRec, GRU4Rec, ItemLM); only training reads it."""
    # checkpoint directory, or several separated by commas (their ensemble: the mean of their
    # log-probabilities); "" = no distillation
    teacher: str = ""
    weight: float = 0.5
    temperature: float = 1.0


@dataclass(frozen=True)
class TitleLMConfig:
    """Title baseline, items written as text (title_lm.py)."""
    backbone: str = "tiny"
    n_layers: int | None = None
    prompt: str = "default"  # default | compact | ids: one learned token per history item (generative.py)
    max_title_tokens: int = 32  # per title, in the history and as the label (then an end token)
    max_field_tokens: int = 16  # brand and category in the history


@dataclass(frozen=True)
class SemanticIDConfig:
    """Semantic-ID baseline, items written as code tuples (semantic_ids.py)."""
    backbone: str = "tiny"
    n_layers: int | None = None
    prompt: str = "default"  # default | compact | ids: one learned token per history item (generative.py)
    levels: int = 3  # residual k-means levels; one collision code follows
    codebook_size: int = 256  # codes per level (capped at the number of items)
    embeddings: str = "auto"  # auto | text | ials: what the codes are clustered from
    codes: str = ""  # a semantic_ids.json (from a checkpoint) to reuse instead of clustering anew
    seed: int = 0


@dataclass(frozen=True)
class TextKNNConfig:
    """Text-similarity baseline, nothing trained (text_knn.py): a candidate's score is its mean
    cosine with the text vectors of the user's last ``last_n`` items."""
    encoder: str = "tfidf"  # tfidf | minilm | a backbone name (smollm2-135m, tiny) | a local HF folder
    last_n: int = 3  # history items compared with each candidate, most recent first
    fields: tuple[str, ...] = ("title", "brand", "category")  # an item's text (text_view.item_text)


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/default"
    seed: int = 0
    batch_size: int = 64  # examples per optimizer step, over all processes
    lr: float = 1e-3
    backbone_lr: float | None = None  # defaults to lr; pretrained weights often want less
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_steps: int = 1000
    max_epochs: float | None = None  # also stop after this many passes over the training users (first one wins)
    lr_schedule: str = "cosine"  # cosine: decay to 0 at the step budget | constant: flat after warmup (epochs + patience)
    max_minutes: float | None = None  # stop (and keep the best checkpoint) after this long
    stop_at: int | None = None  # pause after this step (schedule unchanged); continue with --resume
    grad_clip: float = 1.0
    eval_every: int = 200  # steps between validations (and checkpoints)
    eval_every_epochs: float | None = None  # validate every this many epochs instead (overrides eval_every)
    eval_users: int | None = 2000  # validation users per evaluation (None: all), fixed subset
    patience: int = 5  # evaluations without NDCG@10 improvement before stopping
    eval_batch_size: int = 128
    eval_exclude_history: bool = False  # validation ranks without the user's history items (as `itemgen serve`;
    # RecBole and the published tables keep them for sequential models: false is their protocol)
    mixed_precision: str = "auto"  # auto: bf16 on GPU, none on CPU
    progress: bool = True  # false: no bar and no progress lines (errors and the result only)
    log_every: int = 50  # steps between progress lines (when the output is not a terminal) and history.jsonl rows
    log_format: str = "text"  # text | json: one JSON object per progress event (schedulers)


@dataclass(frozen=True)
class Config:
    model: str = "itemlm"  # itemlm | sasrec | bert4rec | gru4rec | title | semantic_id | text_knn
    data: DataConfig = field(default_factory=DataConfig)
    itemlm: ItemLMConfig = field(default_factory=ItemLMConfig)
    items: ItemsConfig = field(default_factory=ItemsConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    bert4rec: BERT4RecConfig = field(default_factory=BERT4RecConfig)
    gru4rec: GRU4RecConfig = field(default_factory=GRU4RecConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    repeat: RepeatConfig = field(default_factory=RepeatConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    title: TitleLMConfig = field(default_factory=TitleLMConfig)
    semantic_ids: SemanticIDConfig = field(default_factory=SemanticIDConfig)
    text_knn: TextKNNConfig = field(default_factory=TextKNNConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _coerce(value, tp, key: str):
    """Check/convert a YAML value to the annotated type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if is_dataclass(tp):
        return _build(tp, value, key)
    return value


def _build(cls, values, prefix: str = ""):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''}{where}: "
                          f"{', '.join(unknown)} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (plain YAML keeps the last silently)."""

    def __init__(self, key, node, first_line: int):
        self.key, self.line = key, node.start_mark.line + 1
        super().__init__(None, None, f"key {key!r} appears twice (lines {first_line} and {self.line}): "
                         "remove one", node.start_mark)


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so ``train.mixed_precision=no`` is the
    string "no" (YAML 1.1 reads no/yes/on/off as booleans); a key repeated in one mapping is an
    error (the later value would silently win, hiding the edit the user meant)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}  # key -> line of its first use
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # << merges: their keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, key_node, seen[key])
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: SafeLoader's own check reports it
                    continue
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {raw!r}: {e}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(values: dict) -> Config:
    cfg = _build(Config, translate_legacy(values))
    validate(cfg)
    return cfg


def with_values(cfg: Config, values: dict[str, object]) -> Config:
    """``cfg`` with dotted keys set to values (already typed, e.g. {"sasrec.dropout": 0.1})."""
    tree: dict = {}
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return from_dict(_merge(cfg.to_dict(), tree))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            values = load_yaml(p.read_text()) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not a YAML text file (byte {e.object[e.start]:#04x} at offset {e.start} "
                              "is not UTF-8)") from None
        except DuplicateKeyError as e:
            raise ConfigError(f"{p}: line {e.line}: {e.problem}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {printable(' '.join(str(e).split()), 300)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    values = _merge(values, parse_overrides(overrides or []))
    return from_dict(values)


def validate(cfg: Config) -> None:
    if cfg.model not in MODEL_NAMES:
        raise ConfigError(f"model: {cfg.model!r} is not one of {', '.join(MODEL_NAMES)}")
    t, m, it = cfg.train, cfg.itemlm, cfg.items
    checks = [
        (cfg.data.max_history >= 1, "data.max_history must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.lr > 0, "train.lr must be > 0"),
        (t.max_steps >= 1, "train.max_steps must be >= 1"),
        (t.eval_every >= 1, "train.eval_every must be >= 1"),
        (t.max_epochs is None or t.max_epochs > 0, "train.max_epochs must be > 0"),
        (t.eval_every_epochs is None or t.eval_every_epochs > 0, "train.eval_every_epochs must be > 0"),
        (t.lr_schedule in ("cosine", "constant"), "train.lr_schedule: cosine|constant"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (t.log_format in ("text", "json"), "train.log_format: text|json"),
        (t.mixed_precision in ("auto", "no", "bf16", "fp16"), "train.mixed_precision: auto|no|bf16|fp16"),
        (0.0 <= m.id_only_share <= 1.0, "itemlm.id_only_share must be in [0, 1]"),
        (0.0 <= m.field_keep_prob <= 1.0, "itemlm.field_keep_prob must be in [0, 1]"),
        (m.supervise in ("all", "last"), "itemlm.supervise: all|last"),
        (m.prompt in ("default", "compact", "ids"), "itemlm.prompt: default|compact|ids"),
        (m.item_dim >= 1, "itemlm.item_dim must be >= 1"),
        (m.n_layers is None or m.n_layers >= 1, "itemlm.n_layers must be >= 1"),
        (m.head in ("full", "two_level"), "itemlm.head: full|two_level"),
        (m.cluster_method in ("kmeans", "frequency", "random"), "itemlm.cluster_method: kmeans|frequency|random"),
        (m.n_clusters is None or m.n_clusters >= 1, "itemlm.n_clusters must be >= 1"),
        (m.cluster_correction >= 0, "itemlm.cluster_correction must be >= 0 (0: off)"),
        (m.cluster_refine >= 0, "itemlm.cluster_refine must be >= 0 (0: off)"),
        (m.cluster_refine == 0 or (m.head == "two_level" and m.cluster_correction > 0),
         "itemlm.cluster_refine needs itemlm.head=two_level and itemlm.cluster_correction > 0"),
        (m.lora_r >= 0, "itemlm.lora_r must be >= 0"),
        (0.0 <= m.hidden_dropout < 1.0 and 0.0 <= m.backbone_dropout < 1.0,
         "itemlm.hidden_dropout and itemlm.backbone_dropout must be in [0, 1)"),
        (it.input in ITEM_INPUTS, f"items.input: {'|'.join(ITEM_INPUTS)}"),
        (it.output in ITEM_OUTPUTS, f"items.output: {'|'.join(ITEM_OUTPUTS)}"),
        (it.init in ITEM_INITS, f"items.init: {'|'.join(ITEM_INITS)}"),
        (it.init != "sasrec" or bool(it.init_from), "items.init=sasrec needs items.init_from=SASREC_CHECKPOINT"),
        (it.init == "random" or it.input != "text", f"items.init={it.init} needs an ID table (items.input=text has none)"),
        (it.tie_projection in ("input", "linear"), "items.tie_projection: input|linear"),
        (0.0 <= it.dropout < 1.0 and 0.0 <= it.id_dropout < 1.0, "items.dropout and items.id_dropout must be in [0, 1)"),
        (it.id_dropout == 0 or it.input not in ("id", "text") or it.text_match > 0,
         "items.id_dropout needs an input view with both parts (text+id, dual or nullspace) or items.text_match"),
        (it.text_match >= 0, "items.text_match must be >= 0 (0 = off)"),
        (it.text_match_scale > 0, "items.text_match_scale must be > 0"),
        (not it.text_gate or it.text_match > 0, "items.text_gate needs items.text_match (it gates the text-match part)"),
        # the closed bucket learns only from items id_dropout hides (unknown items are out of the
        # softmax): without it, it stays at its start while the open buckets' biases move away
        (not it.text_gate or it.id_dropout > 0, "items.text_gate needs items.id_dropout > 0 (its closed bucket, "
                                                "a new item's, is learned from the items id_dropout hides)"),
        (it.id_min_count >= 1, "items.id_min_count must be >= 1"),
        (it.text_match > 0 or it.closed_prior == 0 and it.closed_prior_search == 0,
         "items.closed_prior / items.closed_prior_search need items.text_match (new items are scored by it)"),
        (math.isfinite(it.closed_prior), "items.closed_prior must be a finite number of logits"),
        (0 <= it.closed_prior_search <= 100, "items.closed_prior_search must be in [0, 100] logits (0 = off)"),
        (0 < it.closed_prior_probe < 1, "items.closed_prior_probe must be in (0, 1) (a share of the trained items)"),
        (it.closed_prior_rule in ("all", "warm_floor"), "items.closed_prior_rule: all or warm_floor"),
        (it.closed_prior_rule == "all" or it.lexical > 0 and it.closed_prior_search > 0,
         "items.closed_prior_rule=warm_floor needs items.lexical and items.closed_prior_search (it chooses the "
         "closed bucket's weight and prior on the probe)"),
        (0 < it.closed_prior_warm_floor <= 1, "items.closed_prior_warm_floor must be in (0, 1]"),
        (it.closed_prior_floor_from != "init" or bool(it.init_from),
         "items.closed_prior_floor_from=init needs items.init_from (the checkpoint the ID vectors start from)"),
        (it.closed_prior_floor_from == "self" or it.closed_prior_rule == "warm_floor",
         "items.closed_prior_floor_from is the warm_floor rule's reference: set items.closed_prior_rule=warm_floor"),
        (it.lexical >= 0, "items.lexical must be >= 0 (the lexical view's width; 0 = off)"),
        (it.lexical == 0 or it.text_match > 0,
         "items.lexical needs items.text_match (its query is the mean over the same last history items)"),
        (it.lexical_min_df >= 1, "items.lexical_min_df must be >= 1"),
        (it.lexical_rule in ("all", "tail_floor"), "items.lexical_rule: all or tail_floor"),
        (it.lexical_rule == "all" or it.lexical > 0, "items.lexical_rule=tail_floor needs items.lexical"),
        (it.id_min_count == 1 or bool(it.text_gate), "items.id_min_count > 1 needs items.text_gate (the closed "
                                                     "bucket that scores those items)"),
        (all(isinstance(e, int) and e >= 2 for e in it.text_gate) and list(it.text_gate) == sorted(set(it.text_gate)),
         "items.text_gate must be increasing training counts >= 2 (e.g. [5, 20]: buckets 1-4, 5-19, 20+)"),
        (it.text_match == 0 or cfg.model in ("itemlm", "sasrec"), "items.text_match: itemlm or sasrec"),
        (it.text_match == 0 or bool(it.text_encoder.strip()),
         "items.text_match needs a named items.text_encoder (e.g. minilm): it matches a history's text with "
         "each item's as text-kNN does, and new items must be encoded the same way"),
        (it.text_match == 0 or cfg.model != "itemlm" or (m.head == "full" and not m.text_vocab_in_softmax),
         "items.text_match needs itemlm.head=full and itemlm.text_vocab_in_softmax=false (its text part is "
         "scored against items only: text tokens have no text view)"),
        (it.null_dim >= 1, "items.null_dim must be >= 1"),
        (it.input == "id" and it.output in ("auto", "untied", "tied") or cfg.model in ("itemlm", "sasrec"),
         "items.input and items.output=text+id: itemlm or sasrec"),
        (cfg.model != "itemlm" or it.output in ("auto", "untied") or m.head == "full",
         f"items.output={it.output} needs itemlm.head=full (the two-level head keeps its own item vectors)"),
        (cfg.model != "sasrec" or it.output in ("auto", "tied", "text+id"),
         "sasrec scores with its input vectors: items.output auto|tied|text+id"),
        (cfg.model != "sasrec" or bool(it.text_encoder) or (it.input == "id" and it.output != "text+id"
                                                           and it.init != "text"),
         "sasrec has no backbone to encode item text with: set items.text_encoder (minilm, a backbone name or a folder)"),
        (m.lora_r == 0 or m.freeze_backbone, "itemlm.lora_r > 0 needs itemlm.freeze_backbone=true "
                                             "(LoRA trains adapters on a frozen backbone)"),
        (cfg.sasrec.layout in ("pre_ln", "post_ln"), "sasrec.layout: pre_ln|post_ln"),
        (cfg.sasrec.hidden % cfg.sasrec.n_heads == 0, "sasrec.hidden must be divisible by sasrec.n_heads"),
        (cfg.title.prompt in ("default", "compact", "ids"), "title.prompt: default|compact|ids"),
        (cfg.title.max_title_tokens >= 1, "title.max_title_tokens must be >= 1"),
        (cfg.semantic_ids.prompt in ("default", "compact", "ids"),
         "semantic_ids.prompt: default|compact|ids"),
        (cfg.semantic_ids.levels >= 1, "semantic_ids.levels must be >= 1"),
        (cfg.semantic_ids.codebook_size >= 2, "semantic_ids.codebook_size must be >= 2"),
        (cfg.semantic_ids.embeddings in ("auto", "text", "ials"), "semantic_ids.embeddings: auto|text|ials"),
        (cfg.bert4rec.hidden % cfg.bert4rec.n_heads == 0, "bert4rec.hidden must be divisible by bert4rec.n_heads"),
        (0.0 < cfg.bert4rec.mask_prob <= 1.0, "bert4rec.mask_prob must be in (0, 1]"),
        (0.0 <= cfg.bert4rec.mask_last_prob <= 1.0, "bert4rec.mask_last_prob must be in [0, 1]"),
        (cfg.gru4rec.hidden >= 1 and cfg.gru4rec.n_layers >= 1, "gru4rec.hidden and gru4rec.n_layers must be >= 1"),
        (cfg.text_knn.last_n >= 1, "text_knn.last_n must be >= 1"),
        (bool(cfg.text_knn.encoder.strip()), "text_knn.encoder: tfidf, minilm, a backbone name or a folder"),
        (len(cfg.text_knn.fields) >= 1, "text_knn.fields: at least one item field"),
        (cfg.loss.kind in ("full", "sampled_softmax", "warp", "lambdarank"),
         "loss.kind: full|sampled_softmax|warp|lambdarank"),
        (cfg.loss.negatives >= 1, "loss.negatives must be >= 1"),
        (cfg.loss.sampler in ("uniform", "popularity", "all"), "loss.sampler: uniform|popularity|all"),
        (cfg.loss.margin >= 0, "loss.margin must be >= 0"),
        (not cfg.loss.exclude_history or cfg.loss.kind == "full", "loss.exclude_history needs loss.kind=full"),
        (not cfg.loss.exclude_history or cfg.model in ("itemlm", "sasrec", "gru4rec"),
         "loss.exclude_history: itemlm, sasrec or gru4rec (next-item labels)"),
        (not cfg.loss.exclude_history or cfg.model != "itemlm" or cfg.itemlm.head == "full",
         "loss.exclude_history needs itemlm.head=full"),
        (cfg.repeat.bias in ("none", "scalar", "recency"), "repeat.bias: none|scalar|recency"),
        (cfg.repeat.bias == "none" or cfg.model in ("itemlm", "sasrec", "gru4rec"),
         "repeat.bias: itemlm, sasrec or gru4rec (next-item labels)"),
        (cfg.repeat.bias == "none" or cfg.loss.kind == "full",
         "repeat.bias needs loss.kind=full (the bias is learned in the full-catalog softmax)"),
        (0.0 <= cfg.distill.weight <= 1.0, "distill.weight must be in [0, 1]"),
        (cfg.distill.temperature > 0, "distill.temperature must be > 0"),
        (not cfg.distill.teacher or cfg.loss.kind == "full", "distill.teacher needs loss.kind=full "
                                                              "(it matches the teacher over the whole catalog)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
