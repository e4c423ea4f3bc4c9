"""Typed schemas of every recipe. Defaults are the paper's real-scale values (../shared/RECIPE.md);
the demo configs shrink sizes, never the method.

Each schema is a pydantic model with ``extra="forbid"``: a misspelt key is an error that suggests the
right one. ``check()`` holds the cross-field rules.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from l2c_llava.config.core import RecipeConfig, Section

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]

MixedPrecision = Literal["auto", "no", "bf16", "fp16"]  # auto: bf16 where the device supports it, else no
TorchDtype = Literal["auto", "float32", "bfloat16", "float16"]
AttnImpl = Literal["eager", "sdpa", "flash_attention_2"]
OnBadRow = Literal["error", "skip"]  # stop with the list of bad rows, or drop them and say how many
ImageCheck = Literal["none", "exists", "header", "decode"]  # how hard images are checked before training
Schedule = Literal["cosine", "linear", "constant"]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# shared sections
# ---------------------------------------------------------------------------------------------


class RunSection(Section):
    output_dir: str = Field(description="run folder: checkpoints, metrics, resolved config")
    seed: int = 42
    resume: bool = Field(True, description="pick up from the last checkpoint in output_dir if there is one")
    root: str | None = Field(
        None,
        description="folder the command runs in: the config's relative paths "
        "(output_dir, data, ...) are taken from there; default: the current folder",
    )


class LLMSection(Section):
    name_or_path: str = Field(
        description="a transformers model folder, a Hub id (lmsys/vicuna-7b-v1.5), a .gguf file, or "
        "'embedded:smollm2-135m-instruct'"
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path, if it is a folder")
    torch_dtype: TorchDtype = "auto"
    attn_implementation: AttnImpl = "sdpa"
    trust_remote_code: bool = Field(False, description="never on unless you trust the checkpoint's code")
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: NF4 4-bit base weights through bitsandbytes (CUDA only), LoRA trained on top",
    )


class LoraSection(Section):
    r: PositiveInt = 16
    alpha: PositiveFloat = 32
    dropout: Probability = 0.05
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)


class DataChecks(Section):
    on_bad_row: OnBadRow = "error"
    # decode: every image is decoded once before training (threads), so a truncated JPEG is reported
    # with its row before any model loads, not at its batch hours in; header is faster on huge sets
    image_check: ImageCheck = "decode"


class TrainSection(Section):
    """What every training loop shares; each stage sets its own defaults from the recipe."""

    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps")
    warmup_steps: NonNegInt | None = None
    warmup_ratio: Probability | None = None
    schedule: Schedule = "cosine"
    weight_decay: NonNegFloat = 0.0
    grad_clip: PositiveFloat | None = 1.0
    mixed_precision: MixedPrecision = "auto"
    log_every: PositiveInt = 10
    save_every: PositiveInt = 500
    keep_checkpoints: PositiveInt = 2
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw_8bit: bitsandbytes' 8-bit AdamW (CUDA only), ~75% less optimizer memory"
    )
    report_to: list[
        Literal[
            "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"
        ]
    ] = Field(
        default_factory=list,
        description="experiment trackers (accelerate's): loss, lr, throughput and eval metrics, the resolved "
        "config as hyper-parameters; TensorBoard files in <run>/logs. Empty: train_log.jsonl only",
    )

    @field_validator("mixed_precision", mode="before", check_fields=False)
    @classmethod
    def _yaml_no(cls, v):
        """YAML reads a bare `no` as false: `train.mixed_precision=no` means "no"."""
        return "no" if v is False else v

    def schedule_problems(self, prefix: str = "train") -> list[tuple[str, Any, str]]:
        out = []
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            out.append(
                (
                    f"{prefix}.warmup_ratio",
                    self.warmup_ratio,
                    f"set either {prefix}.warmup_steps or {prefix}.warmup_ratio, not both",
                )
            )
        return out


# ---------------------------------------------------------------------------------------------
# stage 1: caption-contrastive fine-tuning of the LLM (LLM2Vec method)
# ---------------------------------------------------------------------------------------------


class Stage1Model(LLMSection):
    adapters: list[str] = Field(
        default_factory=list,
        description="LoRA adapter folders merged in turn on top of the base (llm2vec / LLM2CLIP checkpoints)",
    )
    pooling: Literal["mean", "weighted_mean", "eos_token", "last_token", "bos_token"] = "mean"
    max_length: PositiveInt = 512
    bidirectional: bool = True
    gradient_checkpointing: bool = True


class Instructions(Section):
    """Prepended to the query only; attended to, not pooled (public LLM2CLIP code's wording)."""

    short_to_long: str = "Given a sentence, retrieve a detailed relevant sentence"
    long_to_short: str = "Given a detailed sentence, retrieve a short relevant sentence"


class Stage1Data(DataChecks):
    train: str = Field(description="caption pairs (JSONL or CSV with image, short, long)")
    eval: str | None = Field(
        None, description="CRA test set: Karpathy-style JSON (first two captions per image)"
    )
    eval_pairs: str | None = Field(
        None, description="held-out caption pairs for short->long / long->short top-1"
    )
    eval_split: str = "test"
    short_key: str = "short"
    long_key: str = "long"
    hard_negatives: bool = True
    general_text: str | None = Field(None, description="JSONL of general (query, positive[, negative]) pairs")
    general_text_share: Probability = 0.0
    instructions: Instructions = Field(default_factory=Instructions)
    max_samples: PositiveInt | None = None
    image_check: ImageCheck = "none"  # stage 1 reads captions only


class MNTPSection(Section):
    enabled: bool = False
    mask_probability: Probability = 0.2
    mask_token: str = "_"
    lr: PositiveFloat = 5e-5
    batch_size: PositiveInt = 32
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    text: str | None = Field(
        None, description="extra text file (one paragraph per line); captions are always used"
    )


class Stage1Train(TrainSection):
    lr: PositiveFloat = 2e-4
    batch_size: PositiveInt = Field(64, description="per device")
    grad_accum: PositiveInt = 1
    contrastive_accum: bool = Field(
        False, description="GradCache-style accumulation that keeps all negatives"
    )
    epochs: PositiveInt = 1
    warmup_steps: NonNegInt | None = 300
    schedule: Schedule = "linear"  # llm2vec trains with the HF Trainer's default linear schedule
    loss_scale: PositiveFloat = Field(50.0, description="cosine similarity x scale (temperature 1/scale)")
    gather_across_processes: bool = True
    length_buckets: PositiveInt = Field(
        4, description="forward a batch in this many groups of similar length"
    )


class Stage1Eval(Section):
    cra: bool = True
    causal_baseline: bool = Field(True, description="also measure the untuned LLM with causal attention")
    batch_size: PositiveInt = 64
    max_images: PositiveInt | None = None


class Stage1Output(Section):
    merge_weights: bool = Field(False, description="also write the LoRA-merged full weights")


class Stage1Config(RecipeConfig):
    RECIPE: ClassVar[str] = "stage1"
    recipe: Literal["stage1"]
    run: RunSection
    model: Stage1Model
    lora: LoraSection = Field(default_factory=LoraSection)
    mntp: MNTPSection = Field(default_factory=MNTPSection)
    data: Stage1Data
    train: Stage1Train = Field(default_factory=Stage1Train)
    eval: Stage1Eval = Field(default_factory=Stage1Eval)
    output: Stage1Output = Field(default_factory=Stage1Output)

    def check(self) -> list[tuple[str, Any, str]]:
        out = self.train.schedule_problems()
        if self.data.general_text_share > 0 and not self.data.general_text:
            out.append(
                ("data.general_text", None, "data.general_text_share > 0 needs a data.general_text file")
            )
        if self.data.short_key == self.data.long_key:
            out.append(("data.long_key", self.data.long_key, "must differ from data.short_key"))
        if self.model.load_in_4bit and self.output.merge_weights:
            out.append(
                (
                    "output.merge_weights",
                    True,
                    "with model.load_in_4bit the adapter would be merged into "
                    "4-bit-rounded weights; keep the adapter (merge_weights=false) and merge it into the "
                    "full-precision base later",
                )
            )
        if self.eval.cra and not self.data.eval:
            out.append(
                ("data.eval", None, "eval.cra is on: give a test set (data.eval) or set eval.cra=false")
            )
        return out


# ---------------------------------------------------------------------------------------------
# stage 2: LLM2CLIP (frozen LLM features, fine-tuned CLIP vision encoder)
# ---------------------------------------------------------------------------------------------


class TextEncoderRef(Section):
    path: str = Field(
        description="stage-1 output folder, or any folder or Hub id TextEncoder.from_pretrained loads"
    )
    instruction: str | None = None
    batch_size: PositiveInt = 64
    max_length: PositiveInt | None = Field(None, description="default: the encoder's own")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="the frozen encoder's compute dtype while caching (auto: bf16 weights on a GPU, "
        "float32 on the CPU; bfloat16 on a CPU with native bf16, e.g. AVX512-BF16 or AMX, is about 1.8x faster)",
    )


class CacheSection(Section):
    dir: str = Field(description="text feature cache folder (shards + manifest)")
    shard_size: PositiveInt = 8192
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class VisionSection(Section):
    name_or_path: str = Field(
        description="a transformers CLIP / CLIPVision folder or Hub id (openai/clip-vit-large-patch14-336 at real scale)"
    )
    image_size: PositiveInt = 336
    trainable: Literal["all", "none", "last_n"] = "all"
    trainable_last_n: NonNegInt = 0
    layer_decay: Annotated[float, Field(gt=0, le=1)] = 0.85
    gradient_checkpointing: bool = True
    attn_implementation: AttnImpl = "sdpa"


class AdapterSection(Section):
    """Text side on the cached LLM feature: L2 norm -> blocks x (x + W2 GELU(W1 LN(x))) -> LN -> Linear."""

    num_blocks: PositiveInt = 4
    expansion: PositiveInt = 2
    projection_dim: PositiveInt = 1280
    center_features: bool = Field(
        False,
        description="not in the paper: subtract the mean training caption feature before the L2 norm. For "
        "anisotropic LLM features (all captions at cosine ~0.96, as after a short stage 1) the adapter "
        "otherwise collapses to one point",
    )


class LogitScaleSection(Section):
    init: PositiveFloat = Field(1 / 0.07, description="initial scale (logit = log of it)")
    max: PositiveFloat = 100.0
    learnable: bool = True


class Stage2Data(DataChecks):
    format: Literal["jsonl", "webdataset"] = "jsonl"
    train: str = Field(
        description="caption-pair JSONL/CSV, or a webdataset shard pattern like data/{00000..00099}.tar"
    )
    image_root: str | None = None
    short_key: str = "short"
    long_key: str = "long"
    dense_share: Probability = Field(0.5, description="per-sample chance of the dense caption")
    max_train_rows: PositiveInt | None = Field(
        None,
        description="the first N rows of data.train only (JSONL/CSV caption pairs): stage 2, and its text "
        "cache, on part of a dataset",
    )
    rrc_scale: tuple[Probability, Probability] = (0.9, 1.0)
    num_workers: NonNegInt = 4
    eval_short: str | None = Field(None, description="Karpathy-style JSON, several short captions per image")
    eval_long: str | None = Field(
        None, description="long-caption test set (Karpathy-style JSON or Urban-1K folder)"
    )
    eval_long_hard: str | None = Field(
        None,
        description="hard long-caption set (the embedded data's retrieval/long_hard.json): families of images "
        "whose captions share their first 77 CLIP tokens and differ after; scored like eval_long, and within "
        "each family",
    )
    eval_image_root: str | None = None
    eval_split: str = "test"


class Stage2Train(TrainSection):
    lr: PositiveFloat = 1e-5
    adapter_lr: PositiveFloat | None = Field(
        None, description="lr of the new parts (adapter, logit scale); default: train.lr as in the paper"
    )
    weight_decay: NonNegFloat = 0.05
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    warmup_steps: NonNegInt | None = 0
    grad_clip: PositiveFloat | None = 5.0
    batch_size: PositiveInt = Field(512, description="per device; 512 x 8 GPUs = 4096 in the paper")
    grad_accum: PositiveInt = 1
    contrastive_accum: bool = Field(
        False,
        description="with grad_accum > 1: the loss over the whole accumulated batch (GradCache), all negatives kept",
    )
    epochs: PositiveInt = 4
    mixed_precision: MixedPrecision = "fp16"
    local_loss: bool = True
    gather_with_grad: bool = True
    save_every: PositiveInt = 1000


class Stage2Eval(Section):
    baseline: str | None = Field(
        None,
        description="the CLIP compared against (a CLIPModel folder with its own text tower and tokenizer); "
        "default: vision.name_or_path, the CLIP stage 2 started from",
    )
    batch_size: PositiveInt = 256
    recall_at: list[PositiveInt] = Field(default_factory=lambda: [1, 5, 10], min_length=1)


class Stage2Export(Section):
    dir: str | None = Field(
        None,
        description="where `l2c export vision|llm2clip --run RUN` write (vision/, "
        "llm2clip/) and where a stage-2 run given as a vision tower is read; default: "
        "<run.output_dir>/export",
    )


class Stage2Config(RecipeConfig):
    RECIPE: ClassVar[str] = "stage2"
    recipe: Literal["stage2"]
    run: RunSection
    text_encoder: TextEncoderRef
    cache: CacheSection
    vision: VisionSection
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    logit_scale: LogitScaleSection = Field(default_factory=LogitScaleSection)
    data: Stage2Data
    train: Stage2Train = Field(default_factory=Stage2Train)
    eval: Stage2Eval = Field(default_factory=Stage2Eval)
    export: Stage2Export = Field(default_factory=Stage2Export)

    def check(self) -> list[tuple[str, Any, str]]:
        out = self.train.schedule_problems()
        lo, hi = self.data.rrc_scale
        if not 0 < lo <= hi:
            out.append(("data.rrc_scale", [lo, hi], "needs 0 < min <= max <= 1"))
        if self.data.format == "jsonl" and not self.data.image_root:
            out.append(
                (
                    "data.image_root",
                    None,
                    "data.format=jsonl needs the folder the `image` paths are relative to",
                )
            )
        if self.vision.trainable == "last_n" and self.vision.trainable_last_n == 0:
            out.append(("vision.trainable_last_n", 0, "vision.trainable=last_n needs a number of blocks > 0"))
        if self.logit_scale.init > self.logit_scale.max:
            out.append(
                (
                    "logit_scale.init",
                    self.logit_scale.init,
                    f"must be <= logit_scale.max ({self.logit_scale.max})",
                )
            )
        if (
            self.data.eval_short or self.data.eval_long or self.data.eval_long_hard
        ) and not self.data.eval_image_root:
            out.append(("data.eval_image_root", None, "the retrieval test sets need their image folder"))
        return out


# ---------------------------------------------------------------------------------------------
# mllm: LLaVA-1.5 with a swapped-in vision encoder
# ---------------------------------------------------------------------------------------------


class ConnectorSection(Section):
    """Shape of a qformer / perceiver connector (ignored by the MLP ones)."""

    num_queries: PositiveInt = Field(64, description="vision tokens per image (576 for the MLP at 336 px)")
    hidden_size: PositiveInt | None = Field(None, description="connector width (default: the vision width)")
    depth: PositiveInt = 2
    heads: PositiveInt = 8
    mlp_ratio: PositiveInt = 4


class MllmModel(Section):
    vision_tower: str = Field(
        description="a transformers CLIPVisionModel/CLIPModel folder, a Hub id (openai/clip-vit-large-patch14-336), "
        "embedded:demo-clip, or a stage-2 run folder (its tower exported by `l2c export vision --run RUN`)"
    )
    llm: LLMSection
    projector_type: Literal["mlp2x_gelu", "linear", "qformer", "perceiver"] = Field(
        "mlp2x_gelu",
        description="qformer / perceiver: l2c's own connectors (not loadable by transformers' LLaVA)",
    )
    connector: ConnectorSection = Field(default_factory=ConnectorSection)
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"  # default drops CLS
    image_aspect_ratio: Literal["pad", "crop"] = "pad"  # pad: to square with the mean colour, like LLaVA
    init_from: str | None = Field(
        None, description="a pretrain run folder whose projector starts the finetune"
    )


class MllmData(DataChecks):
    path: str = Field(description="LLaVA JSON (blip_laion_cc_sbu_558k / llava_v1_5_mix665k style)")
    image_root: str | None = None
    template: Literal["plain", "vicuna_v1"] = "vicuna_v1"
    max_length: PositiveInt = 2048
    group_by_modality_length: bool = True
    packing: bool = Field(
        False,
        description="padding-free batches: each micro-batch's samples packed end to end into rows of at most "
        "data.max_length tokens, attention kept inside each sample by position_ids (sdpa/eager/flash-attention; "
        "the loss is the padded batch's); LLaVA-1.5 pads",
    )
    num_workers: NonNegInt = 4


class MllmLora(LoraSection):
    r: PositiveInt = 128
    alpha: PositiveFloat = 256


class MllmTrain(TrainSection):
    stage: Literal["pretrain", "finetune"]
    tune: Literal["projector", "full", "lora"]
    lr: PositiveFloat
    projector_lr: PositiveFloat | None = Field(
        None,
        description="separate projector lr in the finetune, full or LoRA (LLaVA's mm_projector_lr; LoRA recipe: 2e-5)",
    )
    global_batch_size: PositiveInt = Field(description="kept constant whatever the number of devices")
    per_device_batch_size: PositiveInt = 16
    epochs: PositiveInt = 1
    warmup_ratio: Probability | None = 0.03
    mixed_precision: MixedPrecision = "bf16"
    gradient_checkpointing: bool = True
    freeze_vision_tower: bool = True
    vision_lr: PositiveFloat | None = Field(
        None,
        description="lr of the vision tower when it trains (freeze_vision_tower: false); default train.lr",
    )
    lora: MllmLora = Field(default_factory=MllmLora)
    log_every: PositiveInt = 1
    save_full_model: bool | None = Field(
        None,
        description="save the whole LLaVA at the end; default: finetune yes, pretrain no (the projector only, "
        "as LLaVA's mm_projector: the LLM and tower are unchanged)",
    )


class MllmConfig(RecipeConfig):
    RECIPE: ClassVar[str] = "mllm"
    recipe: Literal["mllm"]
    run: RunSection
    model: MllmModel
    data: MllmData
    train: MllmTrain

    def check(self) -> list[tuple[str, Any, str]]:
        t = self.train
        out = t.schedule_problems()
        if t.stage == "pretrain" and t.tune != "projector":
            out.append(
                ("train.tune", t.tune, "the pretrain stage trains the projector only: use tune=projector")
            )
        if t.stage == "finetune" and t.tune == "projector":
            out.append(
                (
                    "train.tune",
                    t.tune,
                    "the finetune stage trains projector + LLM: use tune=full or tune=lora",
                )
            )
        if t.global_batch_size % t.per_device_batch_size:
            out.append(
                (
                    "train.global_batch_size",
                    t.global_batch_size,
                    f"must be a multiple of train.per_device_batch_size ({t.per_device_batch_size})",
                )
            )
        if t.projector_lr is not None and t.tune == "projector":
            out.append(
                (
                    "train.projector_lr",
                    t.projector_lr,
                    "not used with tune=projector (the projector is all that trains): set train.lr",
                )
            )
        if t.vision_lr is not None and t.freeze_vision_tower:
            out.append(
                ("train.vision_lr", t.vision_lr, "the tower is frozen: set train.freeze_vision_tower=false")
            )
        if self.data.template == "plain" and t.stage == "finetune":
            out.append(("data.template", "plain", "the finetune stage uses a chat template: vicuna_v1"))
        if self.model.llm.load_in_4bit and t.tune != "lora":
            out.append(
                (
                    "model.llm.load_in_4bit",
                    True,
                    "QLoRA trains LoRA adapters on the 4-bit LLM: use "
                    "train.tune=lora (a 4-bit LLM cannot be trained in full, nor is it needed to pretrain the "
                    "projector)",
                )
            )
        return out


# ---------------------------------------------------------------------------------------------
# demo CLIP baseline: a small transformers CLIPModel trained from scratch (no pretrained CLIP here)
# ---------------------------------------------------------------------------------------------


class ClipModelSection(Section):
    """A transformers CLIPModel: ViT image tower + causal text tower over OpenAI's CLIP BPE (77 tokens)."""

    image_size: PositiveInt = 224
    patch_size: PositiveInt = 32
    vision_width: PositiveInt = 256
    vision_layers: PositiveInt = 6
    vision_heads: PositiveInt = 4
    text_width: PositiveInt = 256
    text_layers: PositiveInt = 4
    text_heads: PositiveInt = 4
    context_length: Annotated[int, Field(gt=2, le=77)] = 77
    mlp_ratio: PositiveInt = 4
    projection_dim: PositiveInt = 256
    attn_implementation: AttnImpl = "sdpa"


class ClipData(DataChecks):
    format: Literal["karpathy", "jsonl"] = Field(
        "karpathy",
        description="karpathy: several short captions per image, one drawn per epoch (alt-text-like, as "
        "OpenAI CLIP saw); jsonl: caption pairs, the dense caption with probability dense_share",
    )
    train: str = Field(description="Karpathy-style JSON or caption-pair JSONL")
    image_root: str = Field(description="the folder image paths are relative to")
    split: str = Field("train", description="Karpathy split to train on")
    dense: str | None = Field(
        None,
        description="with format karpathy: a caption-pair JSONL whose long (dense) caption of each image is "
        "drawn with probability dense_share instead of a short one (truncated at the context length); "
        "images without one keep their short captions",
    )
    short_key: str = "short"
    long_key: str = "long"
    dense_share: Probability = 0.0
    rrc_scale: tuple[Probability, Probability] = (0.9, 1.0)
    num_workers: NonNegInt = 2


class ClipTrain(TrainSection):
    lr: PositiveFloat = 5e-4
    weight_decay: NonNegFloat = 0.2
    betas: tuple[Probability, Probability] = (0.9, 0.98)
    eps: PositiveFloat = 1e-6
    warmup_ratio: Probability | None = 0.05
    batch_size: PositiveInt = 64
    grad_accum: PositiveInt = 1
    contrastive_accum: bool = Field(
        False,
        description="with grad_accum > 1: the loss over the whole accumulated batch (GradCache), all negatives kept",
    )
    epochs: PositiveInt = 30
    local_loss: bool = True
    gather_with_grad: bool = True
    logit_scale_max: PositiveFloat = 100.0
    save_every: PositiveInt = 200


class ClipConfig(RecipeConfig):
    RECIPE: ClassVar[str] = "clip"
    recipe: Literal["clip"]
    run: RunSection
    model: ClipModelSection = Field(default_factory=ClipModelSection)
    data: ClipData
    train: ClipTrain = Field(default_factory=ClipTrain)

    def check(self) -> list[tuple[str, Any, str]]:
        out = self.train.schedule_problems()
        m = self.model
        if m.image_size % m.patch_size:
            out.append(("model.patch_size", m.patch_size, f"must divide model.image_size ({m.image_size})"))
        for tower in ("vision", "text"):
            width, heads = getattr(m, f"{tower}_width"), getattr(m, f"{tower}_heads")
            if width % heads:
                out.append((f"model.{tower}_heads", heads, f"must divide model.{tower}_width ({width})"))
        lo, hi = self.data.rrc_scale
        if not 0 < lo <= hi:
            out.append(("data.rrc_scale", [lo, hi], "needs 0 < min <= max <= 1"))
        if self.data.dense is not None and self.data.format != "karpathy":
            out.append(
                (
                    "data.dense",
                    self.data.dense,
                    "only with data.format=karpathy (jsonl pairs carry their own long captions)",
                )
            )
        if self.data.format == "karpathy" and self.data.dense_share > 0 and self.data.dense is None:
            out.append(
                (
                    "data.dense_share",
                    self.data.dense_share,
                    "needs data.dense (the file of dense captions) with format karpathy",
                )
            )
        return out


# ---------------------------------------------------------------------------------------------
# pipeline: every step for both encoders, then the report (l2c pipeline)
# ---------------------------------------------------------------------------------------------


class PipelineData(Section):
    synth_images: PositiveInt | None = Field(
        None, description="generate the embedded dataset with this many images into OUTPUT/data"
    )
    synth_seed: int = 0
    synth_size: PositiveInt = 336
    synth_val_fraction: Probability = 0.1
    synth_test_fraction: Probability = Field(
        0.1, description="share of test images (retrieval, held-out questions, the patch probe's scoring)"
    )
    dir: str | None = Field(None, description="an existing data folder in the embedded dataset's layout")


class PipelineHealth(Section):
    """Encoder health (l2c health): image-embedding collapse and a patch probe on both towers."""

    probe_train: PositiveInt = Field(2000, description="train-split scenes the patch probe learns from")
    test_scenes: PositiveInt = Field(
        500, description="test-split scenes it is scored on (and the collapse figures)"
    )
    probe_steps: PositiveInt = 2000


class PipelineStep(Section):
    config: str = Field(description="the step's recipe config (a shipped YAML or your own)")
    overrides: list[str] = Field(
        default_factory=list, description="dotted KEY=VALUE overrides of that config"
    )
    launch: list[str] | None = Field(
        None,
        description="launcher words run before `-m l2c_llava.cli` (accelerate launch --num_processes 8 ...)",
    )


class PipelineBaseline(Section):
    clip: PipelineStep | None = Field(None, description="train a CLIP from scratch (demo / quick scale)")
    vision: str | None = Field(None, description="an existing CLIP folder or hub id used as is (real scale)")


class PipelineMllm(Section):
    pretrain: PipelineStep
    finetune: PipelineStep


class PipelineEval(Section):
    tasks: list[str] = Field(min_length=1, description="lmms-eval task names, local (l2c_*) or from the hub")
    limit: PositiveInt | None = None
    task_limits: dict[str, PositiveInt] = Field(
        default_factory=dict, description="rows of one local task, e.g. {l2c_caption: 40}"
    )
    device: str = "cpu"
    model: Literal["l2c_llava", "llava_hf"] = Field(
        "l2c_llava",
        description="the lmms-eval model: l2c_llava (this project's, batched) or lmms-eval's llava_hf "
        "(batch_size 1 only)",
    )
    batch_size: PositiveInt = Field(8, description="questions per forward (llava_hf: 1)")
    data: str | None = Field(
        None, description="data folder of the local tasks (default: the pipeline's data)"
    )


class PipelineConfig(RecipeConfig):
    RECIPE: ClassVar[str] = "pipeline"
    recipe: Literal["pipeline"]
    run: RunSection
    scale: str = Field("demo", description="what the report says this run is (demo, quick, paper)")
    data: PipelineData = Field(default_factory=PipelineData)
    stage1: PipelineStep
    baseline: PipelineBaseline
    stage2: PipelineStep
    mllm: PipelineMllm
    eval: PipelineEval
    health: PipelineHealth = Field(default_factory=PipelineHealth)
    estimates: dict[str, NonNegFloat] = Field(
        default_factory=dict, description="seconds per step for the first run's time estimate"
    )
    parallel: PositiveInt = Field(
        1,
        description="steps run at once: a step starts when the steps it reads from have finished; with "
        "more than 1, each step's output goes to pipeline/logs/<step>.log and each gets its share of the "
        "CPU threads (a CPU machine: the two LLaVAs beside stage 1 and 2; on GPUs keep 1, each step "
        "takes every GPU)",
    )

    def check(self) -> list[tuple[str, Any, str]]:
        out = []
        if self.eval.model == "llava_hf" and self.eval.batch_size != 1:
            out.append(
                (
                    "eval.batch_size",
                    self.eval.batch_size,
                    "eval.model llava_hf answers one question at a time: use 1, or eval.model l2c_llava",
                )
            )
        b = self.baseline
        if (b.clip is None) == (b.vision is None):
            out.append(
                (
                    "baseline",
                    b.model_dump(),
                    "give exactly one of baseline.clip (train one) and baseline.vision (use one as is)",
                )
            )
        if self.data.synth_images is not None and self.data.dir is not None:
            out.append(("data.dir", self.data.dir, "give data.synth_images or data.dir, not both"))
        local = [t for t in self.eval.tasks if t.startswith("l2c_") or t == "local"]
        if local and self.data.synth_images is None and self.data.dir is None and self.eval.data is None:
            out.append(("eval.data", None, f"the local tasks {local} need a data folder (eval.data)"))
        return out


RECIPES: dict[str, type[RecipeConfig]] = {
    cls.RECIPE: cls for cls in (Stage1Config, Stage2Config, MllmConfig, ClipConfig, PipelineConfig)
}
