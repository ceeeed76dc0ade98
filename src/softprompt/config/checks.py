"""Cross-field checks of a job configuration: every problem at once, each naming the key and the fix.

Includes the search space: every value a trial can draw must give a valid job, so a bad choice fails
now, not as a failed trial an hour into a sweep.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

from softprompt.config.schema import SEARCH_SPACE_TYPES, TUNABLE_SECTIONS, JobConfig, RayConfig
from softprompt.config.typed import (
    coerce,
    describe,
    is_non_finite,
    non_finite_problem,
    shown,
    takes_float,
    type_hints,
)


def validate(cfg: JobConfig, *, inference_only: bool = False) -> list[str]:
    """Cross-field checks; returns every problem (empty when the configuration is usable).

    Args:
        cfg: The configuration.
        inference_only: The configuration is a finished run's, read back to predict with its
            prompt (`recorded_config`): the checks that only matter for training are skipped.
    """
    problems: list[str] = _non_finite_problems(cfg)
    t, d, p, tr, ev = cfg.task, cfg.data, cfg.prompt, cfg.train, cfg.evaluate
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", t.name):
        problems.append(f"task.name={shown(t.name)}: use lowercase letters, digits, '.', '_' or '-' (it becomes a folder and registry key)")
    if "{text}" not in t.template:
        problems.append(f"task.template={shown(t.template)} has no {{text}} placeholder; add one where the input goes")
    if t.kind == "classification":
        if len(t.labels) < 2:
            problems.append(f"task.labels={shown(t.labels)}: a classification task needs at least 2 labels")
        if len(set(t.labels)) != len(t.labels):
            problems.append(f"task.labels={shown(t.labels)} has duplicates")
        missing = [label for label in t.labels if not t.verbalizer.get(label)]
        if missing:
            problems.append(f"task.verbalizer has no label words for {shown(missing)}; add e.g. `{_short(missing[0])}: [' {_short(missing[0])}']`")
        extra = sorted(set(t.verbalizer) - set(t.labels))
        if extra:
            problems.append(f"task.verbalizer names labels {shown(extra)} that are not in task.labels {shown(t.labels)}")
        for label, words in t.verbalizer.items():
            for w in words:
                if not w.strip():
                    problems.append(f"task.verbalizer.{_short(label)} has an empty label word")
        unknown_targets = sorted({v for v in d.label_map.values()} - set(t.labels))
        if unknown_targets:
            problems.append(f"data.label_map maps to {shown(unknown_targets)}, which are not in task.labels {shown(t.labels)}")
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
    if cfg.model.dtype == "float16" and not inference_only:
        # The prompt trains in float32 through float16 activations with no loss scaling: small
        # gradients flush to zero and large ones overflow, and the run "trains" without learning.
        problems.append(
            "model.dtype=float16 cannot train (there is no loss scaling, so its gradients underflow); use "
            "model.dtype=auto (bfloat16 where the GPU supports it, else float32), bfloat16 or float32"
        )
    problems.extend(_ray_problems(cfg.ray))
    problems.extend(_tune_problems(cfg))
    return problems


def _short(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:40]}..."


def _non_finite_problems(cfg: JobConfig) -> list[str]:
    """NaN or infinity in any float field of any section: NaN passes every range check below, so
    it is caught first, by type, for fields added later too. (The typed builder refuses them from
    YAML; this catches a configuration built in code.)"""
    problems: list[str] = []
    for section, section_type in type_hints(JobConfig).items():
        if not dataclasses.is_dataclass(section_type):
            continue
        values, hints = getattr(cfg, section), type_hints(typing.cast(type, section_type))
        for field in dataclasses.fields(values):
            value = getattr(values, field.name)
            if takes_float(hints[field.name]) and isinstance(value, float) and not math.isfinite(value):
                problems.append(non_finite_problem(f"{section}.{field.name}", value, field.default))
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
    if r.use_gpu and r.gpus_per_worker is not None and 0 < r.gpus_per_worker < 1 and r.num_workers > 1:
        # Ray may pack a run's ranks onto one GPU; each then takes cuda:0 and NCCL fails with
        # "Duplicate GPU detected" when the process group starts.
        problems.append(
            f"ray.gpus_per_worker={r.gpus_per_worker:g} with ray.num_workers={r.num_workers}: a fraction lets Ray put two "
            "ranks of one run on the same GPU, which NCCL refuses; set ray.gpus_per_worker: 1, or ray.num_workers: 1 "
            "(a fraction then packs whole trials onto one GPU)"
        )
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
        problems.append(f"ray.storage_path={shown(r.storage_path)}: use a local folder or an s3://bucket/prefix URI")
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
            ok, coerced = coerce(value, hints[section][name])
            if not ok:
                finite = " (a finite number, not NaN or infinity)" if is_non_finite(value) else ""
                problems.append(f"{where}: value {shown(value)} must be {describe(hints[section][name])}{finite}")
                continue
            trial = dataclasses.replace(
                cfg,
                tune=dataclasses.replace(t, search_space={}),
                **{section: dataclasses.replace(getattr(cfg, section), **{name: coerced})},
            )
            problems.extend(f"{where}: value {shown(value)} gives {p}" for p in validate(trial) if p not in base)
    return problems


def _spec_problems(where: str, spec: Any) -> list[str]:
    if not isinstance(spec, dict) or spec.get("type") not in SEARCH_SPACE_TYPES:
        return [f"{where}={shown(spec)}: needs type: one of {', '.join(SEARCH_SPACE_TYPES)} (e.g. {{type: loguniform, low: 0.001, high: 0.3}})"]
    kind = spec["type"]
    keys = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    problems = [f"{where}: unknown field {shown(k)} for type {kind}; fields: {', '.join(sorted(keys))}" for k in sorted(set(spec) - keys)]
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            problems.append(f"{where}: type choice needs a non-empty list `values`")
        return problems
    low, high = spec.get("low"), spec.get("high")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers:
        return [*problems, f"{where}: type {kind} needs numbers `low` and `high`, got low={shown(low)} high={shown(high)}"]
    assert isinstance(low, (int, float)) and isinstance(high, (int, float))
    if any(isinstance(v, float) and not math.isfinite(v) for v in (low, high)):
        return [*problems, f"{where}: low={low} high={high}: both must be finite numbers, not NaN or infinity"]
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        problems.append(f"{where}: type int needs integer low and high")
    if low >= high:
        problems.append(f"{where}: low={low} must be below high={high}")
    if kind == "loguniform" and low <= 0:
        problems.append(f"{where}: type loguniform needs low > 0, got {low}")
    return problems
