"""Typed configuration: the schema, dataclasses with a one-line doc per field and their checks.

(Over 400 lines on purpose: the whole schema, one dataclass per section with its checks, in one place.)
Reading a recipe file into a :class:`StageConfig`, and the checks across sections, are
:mod:`mllm_kd.recipe`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mllm_kd.errors import ConfigError
from mllm_kd.lora import LoraConfig

TRAINABLE_MODES = ("frozen", "full")
# loss weights of terms that need a teacher
DISTILL_WEIGHTS = ("w_resp", "w_vis", "w_rel", "w_emb", "w_hidden")
STAGE_NAMES = ("teacher_pt", "teacher_sft", "stage1", "stage2", "stage3")


def check(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise a :class:`ConfigError` ``"<key> must be <rule>, got <value>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def finite(x: float) -> bool:
    """A real number that is neither NaN nor infinite (``nan < 0`` is False: ranges alone let NaN through)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_fraction(x: float, key: str) -> None:
    """:func:`check` that ``x`` is a real number in [0, 1]."""
    check(finite(x) and 0 <= x <= 1, key, "in [0, 1]", x)


@dataclass
class VisionConfig:
    """The vision tower. Exactly one of ``path``, ``config`` or ``checkpoint`` gives its weights."""

    backend: str = (
        "hf"  # "hf" (transformers CLIP / SigLIP), "open_clip" or "torchvision" (a classification CNN)
    )
    path: str | None = (
        None  # local weights: an HF model directory, an open_clip or torchvision checkpoint file
    )
    config: dict[str, Any] | None = (
        None  # random init from this architecture (HF config kwargs incl. model_type, or open_clip CLIPVisionCfg kwargs)
    )
    open_clip_model: str | None = (
        None  # open_clip architecture name (e.g. "ViT-B-16") when not given by `config`
    )
    checkpoint: str | None = (
        None  # take the vision tower (architecture + weights) of this mllm_kd checkpoint directory
    )
    # torchvision classification model name (e.g. "mobilenet_v2"), or efficientnet_lite0..4 (efficientnet-lite-pytorch)
    torchvision_model: str | None = None
    weights: str | None = (
        None  # torchvision weights enum name (e.g. "IMAGENET1K_V1"; torchvision downloads it)
    )
    feature_node: str | None = (
        None  # torchvision: the feature map that becomes the visual tokens (e.g. "features.16")
    )
    feature_layer: int = (
        -2
    )  # hidden state fed to the projector: 0 embeddings, k after block k, -2 second to last
    drop_cls: bool = True  # drop the class token from the features (CLIP has one, SigLIP does not)
    image_size: int | None = None  # input resolution; taken from the architecture when None
    image_mean: list[float] = field(
        default_factory=lambda: [0.48145466, 0.4578275, 0.40821073]
    )  # per-channel normalisation
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    def __post_init__(self) -> None:
        given = [k for k in ("path", "config", "checkpoint") if getattr(self, k)]
        if len(given) > 1:
            raise ConfigError(
                f"model.vision: give one of path, config or checkpoint, not {' and '.join(given)}"
            )
        check(
            self.image_size is None or self.image_size >= 1,
            "model.vision.image_size",
            ">= 1 or null",
            self.image_size,
        )
        for key in ("image_mean", "image_std"):
            values = list(getattr(self, key))
            check(
                len(values) == 3 and all(finite(v) for v in values),
                f"model.vision.{key}",
                "3 numbers (R, G, B)",
                values,
            )
        check(
            all(v > 0 for v in self.image_std),
            "model.vision.image_std",
            "> 0 per channel",
            list(self.image_std),
        )
        if self.backend not in ("hf", "open_clip", "torchvision"):
            raise ConfigError(
                f"model.vision.backend must be 'hf', 'open_clip' or 'torchvision', got {self.backend!r}"
            )
        if self.backend == "torchvision" and not self.checkpoint:
            if not self.torchvision_model or not self.feature_node:
                raise ConfigError(
                    "model.vision (torchvision): set torchvision_model (e.g. mobilenet_v2) and feature_node "
                    "(the feature map that becomes the visual tokens, e.g. features.16)"
                )
            if self.path and self.weights:
                raise ConfigError("model.vision: give `path` (a local weights file) or `weights`, not both")
        elif (self.weights or self.feature_node or self.torchvision_model) and not self.checkpoint:
            raise ConfigError(
                "model.vision.torchvision_model / weights / feature_node apply to backend: torchvision only"
            )


@dataclass
class ProjectorConfig:
    """Maps vision features to the LLM's embedding space."""

    type: str = "mlp2x_gelu"  # "linear" or "mlp{N}x_gelu" (N linear layers with GELU between)
    checkpoint: str | None = (
        None  # start from the projector weights of this mllm_kd checkpoint (e.g. the teacher's; same shapes)
    )

    def __post_init__(self) -> None:
        m = re.fullmatch(r"mlp(\d+)x_gelu", self.type)
        if self.type != "linear" and not (m and int(m.group(1)) >= 1):
            raise ConfigError(
                f"model.projector.type must be 'linear' or 'mlp{{N}}x_gelu' with N >= 1, got {self.type!r}"
            )


# transformers' local attention kernels (a hub kernel name would be downloaded at run time)
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class LLMConfig:
    """The causal language model: any transformers ``AutoModelForCausalLM``."""

    path: str | None = None  # local model directory (or a directory holding `gguf_file`)
    gguf_file: str | None = None  # a GGUF file inside `path` to load with transformers' gguf support
    config: dict[str, Any] | None = (
        None  # random init: AutoConfig kwargs including `model_type` (e.g. qwen2, llama)
    )
    attn_implementation: str = (
        "auto"  # "auto": flash_attention_2 on CUDA when flash-attn is installed, else sdpa
    )
    keep_layers: list[int] | None = (
        None  # keep only these decoder layers (a student derived from a bigger LLM)
    )
    # start from the LLM weights of this mllm_kd checkpoint (e.g. the trained teacher's), its decoder layers
    # keep_layers where set: a student pruned from the trained teacher (Minitron) rather than from its base
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        check(
            self.attn_implementation in ATTN_IMPLEMENTATIONS,
            "model.llm.attn_implementation",
            f"one of {ATTN_IMPLEMENTATIONS}",
            self.attn_implementation,
        )
        if self.path and self.config:
            raise ConfigError("model.llm: give path (local weights) or config (random init), not both")
        if self.gguf_file and not self.path:
            raise ConfigError("model.llm.gguf_file needs model.llm.path (the directory holding the file)")
        if self.keep_layers is not None:
            keep = list(self.keep_layers)
            check(
                bool(keep) and all(i >= 0 for i in keep) and len(set(keep)) == len(keep),
                "model.llm.keep_layers",
                "a non-empty list of distinct layer indices >= 0",
                keep,
            )


@dataclass
class ModelConfig:
    """A multimodal LLM: vision tower -> projector -> LLM, with its tokenizer."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: str | None = None  # tokenizer directory; defaults to llm.path


@dataclass
class TeacherConfig:
    """The frozen teacher of the distillation stages."""

    checkpoint: str | None = None  # an mllm_kd checkpoint directory (e.g. the teacher_sft stage's output)
    model: ModelConfig = field(
        default_factory=ModelConfig
    )  # the teacher's architecture, for training it (teacher_pt/teacher_sft)
    cache: str | None = None  # a cached teacher (python -m mllm_kd.cache_teacher): used instead of running it
    cache_topk: int = (
        32  # teacher log-probabilities kept per distilled position in the cache (+ a leftover bucket)
    )
    cache_relation_rank: int = 0  # RDist in the cache: 0 the exact relation matrix, r > 0 a rank-r factor
    # also keep the teacher's projected images (loss.w_emb reads them; always kept when the stage's
    # loss.w_emb > 0): float16, num_visual_tokens x LLM width per image
    cache_projected_images: bool = False
    quantize: str | None = None  # load the teacher's LLM in "8bit" or "4bit" (bitsandbytes); None: as saved

    def __post_init__(self) -> None:
        if self.quantize in ("none", ""):
            self.quantize = None
        if self.quantize not in (None, "8bit", "4bit"):
            raise ConfigError(f"teacher.quantize must be 8bit, 4bit or none, got {self.quantize!r}")
        if self.cache_topk < 1:
            raise ConfigError(f"teacher.cache_topk must be >= 1, got {self.cache_topk}")
        if self.cache_relation_rank < 0:
            raise ConfigError(f"teacher.cache_relation_rank must be >= 0, got {self.cache_relation_rank}")


@dataclass
class TrainableConfig:
    """Which parts train in a stage: "frozen" or "full" (the LLM also "lora"). Applied by `apply_trainable`."""

    vision: str = "frozen"
    projector: str = "full"
    llm: str = "frozen"

    def __post_init__(self) -> None:
        for part in ("vision", "projector", "llm"):
            modes = (*TRAINABLE_MODES, "lora") if part == "llm" else TRAINABLE_MODES  # lora: mllm_kd/lora.py
            if getattr(self, part) not in modes:
                raise ConfigError(f"trainable.{part} must be one of {modes}, got {getattr(self, part)!r}")


@dataclass
class DataConfig:
    """Training data: LLaVA JSON + image folder, or WebDataset shards."""

    format: str = "llava_json"  # "llava_json" or "wds"
    path: str | None = (
        None  # the LLaVA JSON file, or a shard pattern/list (e.g. "dir/instruct-{00000..00009}.tar")
    )
    image_folder: str | None = None  # root of the `image` paths in the JSON
    template: str = (
        "auto"  # "auto" (the tokenizer's chat template, else "plain"), "chat", "plain" or "caption"
    )
    system_prompt: str | None = (
        None  # system message for chat templates; "" an empty one (no template default)
    )
    max_length: int = 2048  # longest sequence in tokens, visual tokens included
    on_overflow: str = "skip"  # a sample longer than max_length: "skip" (reported) or "raise"
    on_error: str = "raise"  # an unreadable sample met during training: "raise" or "skip" (logged)
    max_skip_fraction: float = (
        0.01  # with on_error=skip: stop when more than this fraction of samples was skipped
    )
    verify_images: bool = (
        True  # preflight decodes every image (set false for very large sets: existence is still checked)
    )
    num_workers: int = 0  # data-loader worker processes
    max_samples: int | None = None  # use only the first N samples (quick trials)
    group_by_length: bool = (
        False  # batches of similar length, one modality each (LLaVA's group_by_modality_length)
    )

    def __post_init__(self) -> None:
        if self.format not in ("llava_json", "wds"):
            raise ConfigError(f"data.format must be 'llava_json' or 'wds', got {self.format!r}")
        if self.template not in ("auto", "chat", "plain", "caption"):
            raise ConfigError(f"data.template must be auto/chat/plain/caption, got {self.template!r}")
        if self.on_overflow not in ("skip", "raise"):
            raise ConfigError(f"data.on_overflow must be 'skip' or 'raise', got {self.on_overflow!r}")
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"data.on_error must be 'skip' or 'raise', got {self.on_error!r}")
        check(self.max_length >= 1, "data.max_length", ">= 1", self.max_length)
        check_fraction(self.max_skip_fraction, "data.max_skip_fraction")
        check(self.num_workers >= 0, "data.num_workers", ">= 0", self.num_workers)
        check(
            self.max_samples is None or self.max_samples >= 1,
            "data.max_samples",
            ">= 1 or null",
            self.max_samples,
        )
        if self.group_by_length and self.format == "wds":
            raise ConfigError(
                "data.group_by_length needs data.format=llava_json: WebDataset shards are read as a stream, in order"
            )


@dataclass
class LossConfig:
    """L = w_ce * CE + w_resp * MDist_resp + w_vis * MDist_vis + w_rel * RDist."""

    w_ce: float = 1.0  # next-token cross-entropy on the labels
    w_resp: float = 1.0  # MDist at response positions (shifted)
    w_vis: float = 1.0  # MDist at visual positions (not shifted)
    w_rel: float = 1.0  # RDist on the visual logits' relation matrix
    # the student's projected images against the teacher's (relative squared error; off in LLaVA-KD): needs
    # one embedding space, e.g. a student cut from the teacher's LLM (losses.reference.visual_embedding_distill)
    w_emb: float = 0.0
    # intermediate-layer distillation (off in LLaVA-KD): each student layer's input hidden state against the
    # teacher's at the matching depth (model.llm.keep_layers' map, else uniform), every real token, relative
    # squared error per token; online teacher of the same width (losses.reference.hidden_state_distill)
    w_hidden: float = 0.0
    # MDist_resp only at the answer tokens the teacher gets right (its most likely next token is the label);
    # where it is wrong CE alone teaches the student (online teacher, one tokenizer)
    resp_where_teacher_right: bool = False
    kind: str = "fkl"  # fkl | rkl | jsd | skl | srkl
    temperature: float = 1.0  # tau; divergences are scaled by tau^2
    beta: float = 0.5  # jsd: generalised JSD's teacher weight (GKD's beta; 0: forward KL, 1: reverse KL)
    alpha: float = 0.1  # skew of skl / srkl
    fused: bool = True  # losses from hidden states + LM-head weights, chunked (false: the logits reference)
    chunk_size: int = 256  # positions per chunk of the fused losses (~5 x chunk_size x V floats at a time)
    # a teacher with another tokenizer: each model reads its own encoding, MDist across vocabularies on the
    # aligned answer positions, visual grids pooled to the smaller one (docs/cross-tokenizer.md)
    cross_tokenizer: bool = False
    on_nonfinite: str = (
        "raise"  # a NaN/inf loss: "raise" (stop, keep last checkpoint) or "skip" (drop the step, count it)
    )
    # share of micro-batches whose response the student samples (GKD's lambda; mllm_kd/train/on_policy.py)
    on_policy_fraction: float = 0.0
    sequence_kd: bool = False  # train on the teacher's generated responses instead of the data's (seq_kd)

    def __post_init__(self) -> None:
        if self.kind not in ("fkl", "rkl", "jsd", "skl", "srkl"):
            raise ConfigError(f"loss.kind must be fkl/rkl/jsd/skl/srkl, got {self.kind!r}")
        for key in ("w_ce", *DISTILL_WEIGHTS):
            w = getattr(self, key)
            check(finite(w) and w >= 0, f"loss.{key}", "a finite weight >= 0", w)
        check(finite(self.temperature) and self.temperature > 0, "loss.temperature", "> 0", self.temperature)
        check_fraction(self.beta, "loss.beta")
        check_fraction(self.alpha, "loss.alpha")
        check(self.chunk_size >= 1, "loss.chunk_size", ">= 1", self.chunk_size)
        check_fraction(self.on_policy_fraction, "loss.on_policy_fraction")
        if self.on_nonfinite not in ("raise", "skip"):
            raise ConfigError(f"loss.on_nonfinite must be 'raise' or 'skip', got {self.on_nonfinite!r}")

    @property
    def distills(self) -> bool:
        return any(getattr(self, k) > 0 for k in DISTILL_WEIGHTS)


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule and linear warm-up."""

    lr: float = 2e-5  # peak learning rate of the LLM (and vision tower when trained)
    projector_lr: float | None = None  # the projector's own peak learning rate (defaults to lr)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03  # fraction of the optimizer steps spent warming up
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    name: str = "adamw"  # "adamw" (torch) or "adamw8bit" (bitsandbytes' 8-bit AdamW: 1/4 of the state memory)
    # torch's fused AdamW kernel (one kernel per step instead of one per parameter and operation); null: on
    # CUDA and on a CPU (not for an FSDP2-sharded student); false: torch's default implementation.
    fused: bool | None = None

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "adamw8bit"):
            raise ConfigError(f"optim.name must be adamw or adamw8bit, got {self.name!r}")
        check(finite(self.lr) and self.lr > 0, "optim.lr", "> 0", self.lr)
        check(
            self.projector_lr is None or (finite(self.projector_lr) and self.projector_lr > 0),
            "optim.projector_lr",
            "> 0 or null",
            self.projector_lr,
        )
        check(
            finite(self.weight_decay) and self.weight_decay >= 0,
            "optim.weight_decay",
            ">= 0",
            self.weight_decay,
        )
        betas = list(self.betas)
        check(
            len(betas) == 2 and all(finite(b) and 0 <= b < 1 for b in betas),
            "optim.betas",
            "two numbers in [0, 1)",
            betas,
        )
        for key in ("warmup_ratio", "min_lr_ratio"):
            x = getattr(self, key)
            check_fraction(x, f"optim.{key}")
        check(
            finite(self.max_grad_norm) and self.max_grad_norm >= 0,
            "optim.max_grad_norm",
            ">= 0 (0 disables)",
            self.max_grad_norm,
        )
        if self.fused and self.name != "adamw":
            raise ConfigError(
                f"optim.fused=true is torch's AdamW kernel; it does not apply to optim.name={self.name}"
            )


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: float = 1.0  # passes over the data (fractions allowed)
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 4  # samples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    save_every: int = 0  # write a resumable checkpoint every N optimizer steps (0: only at the end)
    keep_checkpoints: int = 2  # step checkpoints kept (an older one goes once a newer one is complete)
    check_disk_space: bool = True  # refuse to start unless keep_checkpoints + 1 checkpoints + final fit
    log_every: int = 1  # metrics.jsonl line every N optimizer steps
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32"
    device: str = "auto"  # "auto", "cpu", "cuda"
    seed: int = 0
    strategy: str = (
        "ddp"  # with several processes (torchrun): "ddp" (replicate) or "fsdp2" (shard the student)
    )
    teacher_strategy: str = "replicate"  # with several processes: "replicate" the teacher or "fsdp2" shard it
    deterministic: bool = False  # torch.use_deterministic_algorithms for bit-exact resumes
    compile: bool = False  # torch.compile each decoder layer of student and teacher (see docs/performance.md)
    # recompute each student decoder layer's activations in the backward pass; null: on when training on a
    # CPU (a third less step memory for ~2% time), off on a GPU (docs/performance.md)
    gradient_checkpointing: bool | None = None
    # the student LLM's RMSNorms and SwiGLU MLPs keep less for the backward, recomputing pointwise parts
    # (mllm_kd/model/lean.py; same loss and gradients, see docs/performance.md)
    lean_activations: bool = True
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        check(finite(self.epochs) and self.epochs > 0, "train.epochs", "> 0", self.epochs)
        check(
            self.max_steps is None or self.max_steps >= 1, "train.max_steps", ">= 1 or null", self.max_steps
        )
        check(self.batch_size >= 1, "train.batch_size", ">= 1", self.batch_size)
        check(self.grad_accum >= 1, "train.grad_accum", ">= 1", self.grad_accum)
        check(self.save_every >= 0, "train.save_every", ">= 0 (0: only at the end)", self.save_every)
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", self.keep_checkpoints)
        check(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)
        check(0 <= self.seed < 2**32, "train.seed", "in [0, 2**32) (numpy's seed range)", self.seed)
        check(
            self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device) is not None,
            "train.device",
            "auto, cpu, cuda or cuda:N",
            self.device,
        )
        if self.strategy not in ("ddp", "fsdp2"):
            raise ConfigError(f"train.strategy must be ddp or fsdp2, got {self.strategy!r}")
        if self.teacher_strategy not in ("replicate", "fsdp2"):
            raise ConfigError(
                f"train.teacher_strategy must be replicate or fsdp2, got {self.teacher_strategy!r}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto/bf16/fp32, got {self.precision!r}")
        check(
            self.gradient_checkpointing is None or isinstance(self.gradient_checkpointing, bool),
            "train.gradient_checkpointing",
            "true, false or null (on a CPU, off on a GPU)",
            self.gradient_checkpointing,
        )
        check(
            isinstance(self.lean_activations, bool),
            "train.lean_activations",
            "true or false",
            self.lean_activations,
        )


@dataclass
class GenerationConfig:
    """Responses generated during training (``loss.on_policy_fraction``, ``loss.sequence_kd``)."""

    max_new_tokens: int = 64  # longest generated response
    temperature: float = 1.0  # sampling temperature of the student (and of the teacher unless teacher_greedy)
    teacher_greedy: bool = False  # loss.sequence_kd: the teacher answers greedily instead of sampling

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"generation.temperature must be > 0, got {self.temperature}")


WANDB_MODES = ("offline", "online")


@dataclass
class LogConfig:
    """Experiment trackers of a stage (``metrics.jsonl`` is always written)."""

    tensorboard: bool = False  # TensorBoard event files in <dir>/tensorboard
    wandb: str | None = None  # Weights & Biases: "offline" (no network) or "online"; null: off
    project: str = "mllm-kd"  # the W&B project
    run_name: str | None = None  # the run's name in W&B / TensorBoard text; null: "<run_dir name>-<stage>"
    entity: str | None = None  # the W&B entity (team or user); null: the account's default
    dir: str | None = None  # where the trackers write; null: the stage's output_dir

    def __post_init__(self) -> None:
        if self.wandb in ("", "none", "disabled", False):
            self.wandb = None
        if self.wandb not in (None, *WANDB_MODES):
            raise ConfigError(f"log.wandb must be offline, online or null, got {self.wandb!r}")

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.wandb is not None


@dataclass
class StageConfig:
    """Everything one stage needs. A recipe file sets these at the top level and per stage."""

    run_dir: str = (
        "runs/default"  # where every stage of the run writes (stage outputs are ${run_dir}/<stage>)
    )
    data_dir: str | None = None  # root of the prepared data set, for `${data_dir}` interpolation in paths
    teacher_dir: str | None = None  # the teacher's run directory, for `${teacher_dir}` interpolation
    models_dir: str | None = (
        None  # root of local pretrained weights, for `${models_dir}` interpolation in model paths
    )
    stage: str = ""  # this stage's name (set by the entry point)
    output_dir: str = ""  # this stage's directory; defaults to ${run_dir}/<stage>
    init_from: str | None = (
        None  # the previous stage's directory (stage 2: ${run_dir}/stage1, ...); None: build fresh
    )
    overwrite: bool = False  # redo a stage that already finished (otherwise it is skipped)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)  # experiment trackers (mllm_kd/tracking.py)
    # the adapters of trainable.llm=lora (mllm_kd/lora.py)
    lora: LoraConfig = field(default_factory=LoraConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # mllm_kd/train/on_policy.py

    def __post_init__(self) -> None:
        check(bool(self.run_dir), "run_dir", "a directory", self.run_dir)
        if self.loss.cross_tokenizer and (self.loss.on_policy_fraction > 0 or self.loss.sequence_kd):
            raise ConfigError(
                "loss.cross_tokenizer cannot be combined with loss.on_policy_fraction > 0 or loss.sequence_kd "
                "(generated responses are not re-encoded with the teacher's tokenizer)"
            )
        if self.teacher.cache and (self.loss.on_policy_fraction > 0 or self.loss.sequence_kd):
            raise ConfigError(
                "teacher.cache stores the teacher's outputs for the data set's responses only; "
                "loss.on_policy_fraction > 0 and loss.sequence_kd need the teacher model (teacher.checkpoint)"
            )


def config_to_yaml(cfg: StageConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def model_config_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from a plain dict (e.g. read back from a checkpoint's config.yaml)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), d)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid model config: {e}") from e
