"""Schemas of the encoder and boundary groups' options (fastclip.models builds them). Their types are
checked here; their ranges where they depend on the model (a pre-layer count against the tower's
depth) by the tower constructors, which name the key."""
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional

from fastclip.schema.errors import ConfigError
from fastclip.schema.fields import choice, frozen

TEXT_TOKENS = ("bpe", "bytes")  # what a DTP text tower pools (boundary.text_tokens)
TOWERS = ("image", "text")  # what boundary.apply_to may name
IMAGE_ORDERS = ("raster", "hilbert")  # the patch scan order a DTP image tower pools along
IMAGE_STARTS = ("prior", "stride")
IMAGE_POOLS = ("mean", "cls")
TEXT_LAYOUTS = ("packed", "padded")
IMAGE_LAYOUTS = ("packed", "padded", "auto")
TOKENIZERS = ("bpe", "char")  # encoder.tokenizer: open_clip's BPE, or the byte-level DTP text tower's
# the placement keys a DTP option reads where its towers pool (Boundary.READS): all but learned boundaries'
# image_token_budget and gumbel's image_row_breaks and image_start (fixed reads image_layout: with
# random_offset its rows differ by one segment, and a block the packed path cannot run needs padded). Where a job does not
# read one the model builder runs it as PLACEMENT_OFF (their defaults in conf/_shared/boundary_placement.yaml)
PLACEMENT_OFF = {"image_token_budget": None, "image_row_breaks": False, "image_start": "prior", "image_buckets": "auto"}
DTP_PLACEMENT = frozenset({"apply_to", "image_pre_layers", "text_pre_layers", "image_pool", "image_order",
                           "image_layout", "image_buckets", "text_layout", "text_tokens"})


@dataclass
class ClipEncoder:
    name: str = frozen()
    open_clip_name: Optional[str] = frozen()
    embed_dim: Optional[int] = frozen()
    vision: Dict[str, Any] = frozen()  # open_clip vision_cfg keys over the named model's
    text: Dict[str, Any] = frozen()    # open_clip text_cfg keys over the named model's
    tokenizer: str = frozen()
    char_context_length: int = frozen()

    def __post_init__(self):
        choice("encoder.tokenizer", self.tokenizer, TOKENIZERS)


@dataclass
class CharLMEncoder:
    name: str = frozen()
    width: int = frozen()
    heads: int = frozen()
    mlp_ratio: float = frozen()
    pre_layers: int = frozen()
    short_layers: int = frozen()
    post_layers: int = frozen()
    dropout: float = frozen()
    # whether dropout also reaches the blocks (attention weights, residual branches). Runs written before
    # commit 9e98074 had it on the embeddings and the predictor only (the legacy false); those written
    # from it until the key came (943ddb7) had it in the blocks too: resume them with block_dropout=true
    block_dropout: bool = frozen(legacy=False, guessed=True)


@dataclass
class Boundary:
    """conf/_shared/boundary_placement.yaml: where and how every option pools (none included)."""
    name: str = frozen()
    apply_to: List[str] = frozen()
    image_pre_layers: int = frozen()
    text_pre_layers: int = frozen()
    image_pool: str = frozen()
    image_row_breaks: bool = frozen()
    image_order: str = frozen()
    image_start: str = frozen()
    image_layout: str = frozen()
    text_layout: str = frozen()
    image_buckets: Any = frozen()  # auto or an integer >= 1
    # null, a fraction in (0, 1] of the patch tokens, or a count of segments per image (models/budget.py);
    # None for runs written before the key: they sized the pooled tensors from each step's boundaries
    image_token_budget: Any = frozen(legacy=None)
    # a run written before the key existed pooled bytes: its checkpoint keeps meaning that
    text_tokens: str = frozen(legacy="bytes")
    # a boundary predictor's loss, which boundary.loss_weight weighs. Every option but none declares the
    # key, so that a multirun across options sets it; the command-line check (override_checks._check_key) refuses
    # a nonzero weight where no job has such a loss (here it would also refuse resuming older runs)
    AUXILIARY_LOSS: ClassVar[bool] = False
    # The placement keys this option reads under task=clip, an image_ key where the image tower pools and a
    # text_ key where the text tower does (placement_unread). Every option declares them all so that a
    # multirun across options sets them; a job whose option does not read one ignores it, and the
    # command-line check refuses one set where no job reads it. none pools nothing.
    READS: ClassVar[frozenset] = frozenset()

    def __post_init__(self):
        # checked whatever boundary= is (a typo under boundary=none would otherwise pass unseen)
        for tower in self.apply_to:
            choice("boundary.apply_to", tower, TOWERS)
        if len(set(self.apply_to)) != len(self.apply_to):
            raise ConfigError(f"boundary.apply_to={list(self.apply_to)}: a tower is named twice")
        choice("boundary.image_order", self.image_order, IMAGE_ORDERS)
        choice("boundary.image_start", self.image_start, IMAGE_STARTS)
        choice("boundary.image_pool", self.image_pool, IMAGE_POOLS)
        choice("boundary.text_tokens", self.text_tokens, TEXT_TOKENS)
        choice("boundary.text_layout", self.text_layout, TEXT_LAYOUTS)
        choice("boundary.image_layout", self.image_layout, IMAGE_LAYOUTS)
        buckets = self.image_buckets
        if not (buckets == "auto" or (isinstance(buckets, int) and not isinstance(buckets, bool) and buckets >= 1)):
            raise ConfigError(f"boundary.image_buckets={buckets!r}: expected auto or an integer >= 1")
        budget = self.image_token_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0
                                   or (isinstance(budget, float) and budget > 1 and budget != int(budget))):
            raise ConfigError(f"boundary.image_token_budget={budget!r}: expected null, a fraction in (0, 1] of the "
                              f"patch tokens or a count >= 1 of segments per image")


@dataclass
class Fixed(Boundary):
    k: int = frozen()
    random_offset: bool = frozen(legacy=False)
    loss_weight: float = frozen()
    READS: ClassVar[frozenset] = DTP_PLACEMENT

    def __post_init__(self):
        super().__post_init__()
        if self.random_offset and self.k == 1:
            raise ConfigError("boundary.random_offset=true with boundary.k=1: every token is its own segment, "
                              "there is no grid to shift (use k >= 2)")


def check_predictor_ratio(value: Any, auto: bool = False) -> None:
    """boundary.predictor_ratio: the predictor MLP's hidden width over the model width, an integer >= 1
    (gumbel also takes auto: fastclip.models.boundaries.predictor_ratio decides per task)."""
    if auto and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"boundary.predictor_ratio={value!r}: expected {'auto or ' if auto else ''}an integer >= 1 "
                          "(the predictor MLP d -> ratio*d -> 1)")


@dataclass
class LearnedPredictor(Boundary):
    """A boundary method with a predictor MLP (d -> predictor_ratio*d -> 1); a run written before the key
    (2026-11-27) had the paper's 4. AUTO_RATIO: the option also takes auto."""
    predictor_ratio: Any = frozen(legacy=4)
    AUTO_RATIO: ClassVar[bool] = False
    AUXILIARY_LOSS: ClassVar[bool] = True
    READS: ClassVar[frozenset] = DTP_PLACEMENT | {"image_token_budget"}  # learned: a variable segment count

    def __post_init__(self):
        super().__post_init__()
        check_predictor_ratio(self.predictor_ratio, auto=self.AUTO_RATIO)


@dataclass
class Gumbel(LearnedPredictor):
    prior: float = frozen()
    temperature: float = frozen()
    loss_weight: float = frozen()
    confidence: float = frozen()
    pooling_grad: str = frozen()
    eval_rule: str = frozen()
    random_offset: bool = frozen(legacy=False)
    AUTO_RATIO: ClassVar[bool] = True
    READS: ClassVar[frozenset] = LearnedPredictor.READS | {"image_row_breaks", "image_start"}
    # random_offset shifts the image tower's stride start: read where it starts on a stride and pools
    # (a grid across image_start or apply_to sets it for the jobs that do; fixed reads it always)
    READ_WHEN: ClassVar[dict] = {"random_offset": (("image_start", "stride"), ("apply_to", "image"))}


@dataclass
class EntropySpike(LearnedPredictor):
    window: int = frozen()
    loss_weight: float = frozen()


@dataclass
class Unigram(LearnedPredictor):
    vocab_size: int = frozen()
    loss_weight: float = frozen()


@dataclass
class Whitespace(Boundary):
    loss_weight: float = frozen()
    READS: ClassVar[frozenset] = DTP_PLACEMENT


@dataclass
class Tome(Boundary):
    r: int = frozen()
    loss_weight: float = frozen()
    READS: ClassVar[frozenset] = frozenset({"apply_to"})  # a peer runs its own method on the whole ViT


@dataclass
class PatchDropout(Boundary):
    keep: float = frozen()
    eval_keep: bool = frozen()
    mask_only: bool = frozen(legacy=False)
    loss_weight: float = frozen()
    READS: ClassVar[frozenset] = Tome.READS


@dataclass
class Evit(Boundary):
    keep: float = frozen()
    layers: List[int] = frozen()
    loss_weight: float = frozen()
    READS: ClassVar[frozenset] = Tome.READS


@dataclass
class Lowres(Boundary):
    scale: float = frozen()
    loss_weight: float = frozen()
    READS: ClassVar[frozenset] = Tome.READS

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.scale <= 1:
            raise ConfigError(f"boundary.scale={self.scale}: expected a share of the image side in (0, 1]")



PEERS = ("tome", "patch_dropout", "evit", "lowres")
PLACEMENT_CONDITIONS = ("apply_to", "image_layout", "image_order")  # what placement_unread reads of a job


def placement_unread(option: str, schema: type, key: str, task: str, placement) -> str | None:
    """Why boundary=`option` (typed by `schema`) ignores the placement key `key` under task=`task`, or None
    where it reads it (conf/_shared/boundary_placement.yaml). placement: the job's other placement values
    (a mapping: apply_to, image_layout, image_order; one that is missing or None is not known, so taken
    as reading). One rule for the model builder (which runs an unread key off: PLACEMENT_OFF), the
    command-line check and a run's unread keys (fastclip.schema.unread)."""
    if key not in schema.READS:
        if option == "none":
            return "boundary=none pools nothing"
        if option in PEERS:
            return f"boundary={option} runs its own method on the whole ViT and reads only boundary.apply_to"
        return f"only {'boundary=gumbel reads' if key in ('image_row_breaks', 'image_start') else 'learned boundaries read'}" \
               f" it, not boundary={option}"
    if task != "clip":
        return f"task={task} reads no placement key: the char LM's depth is encoder.pre_layers"
    towers, tower = placement.get("apply_to"), key.split("_")[0]
    if towers is not None and tower in ("image", "text") and tower not in towers:
        return f"boundary={option} with apply_to=[{','.join(map(str, towers))}] leaves the {tower} tower unpooled"
    layout, order = placement.get("image_layout"), placement.get("image_order")
    if key == "image_buckets" and layout == "packed":
        return "boundary.image_layout=packed: packed rows have no padding to bucket"
    if key == "image_token_budget" and layout == "padded":
        return "boundary.image_layout=padded: the budget sizes the packed layout"
    if key == "image_row_breaks" and order not in (None, "raster"):
        return f"boundary.image_order={order}: its runs never wrap across rows"
    return None
