"""Predict (`softprompt predict`): batch inference with one or many published prompts on one model.

A `PromptTable` holds several tuned prompts for the same frozen base model. Rows name their prompt;
a batch may mix prompts, each row gathering its own soft prompt from the table (prompts of
different lengths are left-aligned and masked). Results equal running each prompt alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from softprompt.config import JobConfig, recorded_config
from softprompt.engine import (
    Prefix,
    body_and_head,
    greedy_generate,
    input_hidden,
    label_scores,
    make_batch,
    per_label_scores,
    to_device,
)
from softprompt.errors import ConfigError, DataError, ModelError
from softprompt.modeling import LoadedModel
from softprompt.prompts import load_prompt_embeddings, read_adapter_config, resolve_prompt_dir
from softprompt.scoring import to_probs
from softprompt.tasks import Verbalizer, build_verbalizer, encode_input


@dataclass
class TunedPrompt:
    """One published prompt: its embeddings and the task it was trained for."""

    name: str
    embeds: torch.Tensor  # [n, d]
    cfg: JobConfig
    verbalizer: Verbalizer | None
    source: str
    members: list[torch.Tensor] = field(default_factory=list)
    """A prompt ensemble's members (label log-probabilities are averaged); empty for one prompt."""

    @property
    def all_embeds(self) -> list[torch.Tensor]:
        """Every prompt this entry runs: its ensemble members, or itself."""
        return self.members or [self.embeds]


@dataclass(frozen=True)
class Prediction:
    """One row's result: a label with per-label probabilities, or generated text."""

    prompt: str
    text: str
    label: str | None = None
    scores: dict[str, float] | None = None
    generated: str | None = None

    @property
    def output(self) -> str | None:
        """The answer: the label, or the generated text of a generation prompt (what the prediction log records)."""
        return self.label if self.label is not None else self.generated

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {"prompt": self.prompt, "text": self.text}
        if self.label is not None:
            out["label"] = self.label
            out["scores"] = self.scores
        if self.generated is not None:
            out["generated"] = self.generated
        return out


class PromptTable:
    """Named prompts for one frozen base model."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.prompts: dict[str, TunedPrompt] = {}

    def add(self, name: str, artifact: str | Path, cache_dir: Path | None = None) -> TunedPrompt:
        """Load a prompt from an artifact folder (or registry URI) and register it under `name`.

        Raises:
            ModelError: when the prompt was trained for a model of another width.
            IntegrityError: a registry version folder (one holding MANIFEST.json) fails verification.
        """
        folder = resolve_prompt_dir(artifact)
        if (folder / "MANIFEST.json").is_file():  # checked where it is read, however it was named
            from softprompt.registry import verify_folder

            verify_folder(folder)
        read_adapter_config(folder)
        embeds = load_prompt_embeddings(folder)
        width = int(self.loaded.model.get_input_embeddings().weight.shape[1])
        if embeds.shape[1] != width:
            raise ModelError(f"prompt {name!r} ({artifact}) has width {embeds.shape[1]}; the loaded base model has {width}")
        cfg = artifact_config(folder)
        verbalizer = build_verbalizer(cfg.task, self.loaded.tokenizer) if cfg.task.kind == "classification" else None
        members = [m.to(self.loaded.device) for m in _ensemble_members(folder)]
        prompt = TunedPrompt(name, embeds.to(self.loaded.device), cfg, verbalizer, str(artifact), members)
        self.prompts[name] = prompt
        return prompt

    def prefix_for(self, names: Sequence[str]) -> Prefix:
        """Per-row prompts gathered from the table: `[B, n_max, d]` plus a mask for shorter ones."""
        return gather_prompts([self.prompts[n].embeds for n in names])


def gather_prompts(rows: Sequence[torch.Tensor]) -> Prefix:
    """Stack per-row prompts of any lengths, left-aligned, with a mask marking each row's real tokens."""
    sizes = tuple(int(r.shape[0]) for r in rows)
    n_max, d = max(sizes), rows[0].shape[1]
    embeds = torch.zeros(len(rows), n_max, d, dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros(len(rows), n_max, dtype=torch.long)  # built on the host, copied once
    for i, r in enumerate(rows):
        embeds[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return Prefix(embeds=embeds, mask=to_device(mask, rows[0].device), sizes=sizes)


CPU_PADDING_SLACK = 1.25
"""On a CPU a forward pass costs its padded positions, so a batch is split where padding would
exceed a quarter of the real positions (a GPU runs the whole batch: an extra pass costs more there)."""


def forward_chunks(sizes: Sequence[int], batch_size: int, padding_slack: float | None = None) -> list[list[int]]:
    """Row indices in forward passes: sorted by size (prompt plus input tokens), `batch_size` at most
    each, and with `padding_slack` a pass ends where its padded positions (rows x the longest) would
    pass `padding_slack` x its real ones."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    real = 0
    for i in sorted(range(len(sizes)), key=lambda i: sizes[i]):
        grown = (len(chunk) + 1) * sizes[i]  # sorted: row i is the longest so far
        if chunk and (len(chunk) == batch_size or (padding_slack is not None and grown > padding_slack * (real + sizes[i]))):
            chunks.append(chunk)
            chunk, real = [], 0
        chunk.append(i)
        real += sizes[i]
    return chunks + ([chunk] if chunk else [])


def predict_rows(table: PromptTable, rows: Sequence[tuple[str, str]], batch_size: int = 32) -> list[Prediction]:
    """Predict `(prompt name, text)` rows, batching rows of different prompts together.

    Classification rows whose label words are single tokens share one forward pass per batch,
    whatever their prompt; each row then reads its own task's label words at its last position.
    """
    unknown = sorted({name for name, _ in rows} - set(table.prompts))
    if unknown:
        raise DataError(f"rows name prompts {unknown} that are not loaded; loaded: {sorted(table.prompts)}")
    tok = table.loaded.tokenizer
    seqs = [encode_input(tok, table.prompts[name].cfg.task.template, text) for name, text in rows]
    sizes = [len(seqs[i]) + int(table.prompts[name].embeds.shape[0]) for i, (name, _) in enumerate(rows)]
    out: list[Prediction | None] = [None] * len(rows)
    with torch.inference_mode():
        for idx in forward_chunks(sizes, batch_size, padding_slack=CPU_PADDING_SLACK if table.loaded.device.type == "cpu" else None):
            names = [rows[i][0] for i in idx]
            for i, pred in zip(idx, _predict_batch(table, names, [seqs[i] for i in idx], [rows[i][1] for i in idx]), strict=True):
                out[i] = pred
    return [p for p in out if p is not None]


@dataclass(frozen=True)
class PromptRef:
    """One `[NAME=]DIR_OR_URI` reference resolved to a local, verified folder."""

    name: str
    """What rows and requests call it (default: its task's name)."""
    ref: str
    """The reference as given (reported back by serve's /v1/prompts)."""
    folder: Path
    """The local folder holding it (a run's artifact folder, or a verified registry version)."""
    cfg: JobConfig
    """The configuration it was trained with (from its run manifest)."""


def split_spec(spec: str) -> tuple[str, str]:
    """`[NAME=]DIR_OR_URI` as (name, reference); the name is "" when not given (an `s3://` URI may hold "=")."""
    name, _, ref = spec.partition("=") if "=" in spec and not spec.startswith("s3://") else ("", "", spec)
    return name, ref


def resolve_prompts(specs: Sequence[str], *, s3_endpoint: str | None = None) -> list[PromptRef]:
    """Resolve `[NAME=]DIR_OR_URI` specs (artifact folders, registry versions, `.../champion` aliases,
    `s3://` URIs, downloaded and verified into the artifact cache) without loading any model.

    Every reference goes through `registry.resolve_artifact`, so a registry version is verified
    (files against MANIFEST.json, the id re-derived from them) whatever form its reference takes:
    a local registry folder, a pulled folder, the `champion` alias or an `s3://` URI.

    Raises:
        ConfigError: when two prompts get the same name.
        StoreError, ModelError: a reference that cannot be resolved, verified or read.
    """
    from softprompt.registry import resolve_artifact
    from softprompt.uris import artifact_cache

    refs = []
    for spec in specs:
        name, ref = split_spec(spec)
        folder = resolve_artifact(ref, artifact_cache(), endpoint_url=s3_endpoint)
        cfg = artifact_config(folder)
        refs.append(PromptRef(name or cfg.task.name, ref, folder, cfg))
    names = [r.name for r in refs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"prompt names {duplicates} are given twice; name each prompt with --artifact NAME=DIR_OR_URI")
    return refs


def load_prompts(refs: Sequence[PromptRef], *, model: str | None = None, s3_endpoint: str | None = None) -> PromptTable:
    """Load the base model the prompts were trained on (or `model`) and add every prompt to one table.

    Every prompt must come from the same base model (compared by the weights SHA-256 in each run
    manifest), since they all run on one.

    Raises:
        ConfigError: prompts trained on different base models.
    """
    from softprompt.modeling import load_model

    bases = {r.name: _base_model(r.folder) for r in refs}
    first = refs[0].name
    others = [n for n in bases if bases[n]["sha"] and bases[first]["sha"] and bases[n]["sha"] != bases[first]["sha"]]
    if others:
        raise ConfigError(
            f"prompts {others} were trained on another base model than {first!r} ({bases[first]['name']}): "
            + ", ".join(f"{n}: {bases[n]['name']}" for n in others)
            + "; one model runs them all, so load each base model's prompts separately"
        )
    model_cfg = dataclasses.replace(refs[0].cfg.model, name=model) if model else refs[0].cfg.model
    table = PromptTable(load_model(model_cfg, s3=dataclasses.replace(refs[0].cfg.s3, endpoint=s3_endpoint or refs[0].cfg.s3.endpoint)))
    for r in refs:
        table.add(r.name, r.folder)
    return table


# --------------------------------------------------------------------------------------------------


def _predict_batch(table: PromptTable, names: list[str], seqs: list[list[int]], texts: list[str]) -> list[Prediction]:
    model, tok = table.loaded.model, table.loaded.tokenizer
    prompts = [table.prompts[n] for n in names]
    results: list[Prediction | None] = [None] * len(names)
    cls_rows = [i for i, p in enumerate(prompts) if p.verbalizer is not None and p.verbalizer.single_token]
    if cls_rows:
        # One virtual row per (row, prompt member): an ensemble's members ride in the same batch.
        virtual = [(i, e) for i in cls_rows for e in prompts[i].all_embeds]
        batch = make_batch([seqs[i] for i, _ in virtual], tok.pad_token_id, table.loaded.device)
        h = input_hidden(model, gather_prompts([e for _, e in virtual]), batch)
        last = h[torch.arange(len(virtual), device=h.device), batch.lengths - 1]
        _, head = body_and_head(model)
        logp = F.log_softmax(head(last).float(), -1)
        per_row: dict[int, list[np.ndarray]] = {}
        # One gather and one copy to the host per task in the batch, not one per row.
        for task_rows in _group([j for j in range(len(virtual))], key=lambda j: _words(prompts[virtual[j][0]])).values():
            vb = prompts[virtual[task_rows[0]][0]].verbalizer
            assert vb is not None
            scores = per_label_scores(logp[to_device(torch.as_tensor(task_rows), logp.device)], vb).double().cpu().numpy()
            for j, s in zip(task_rows, scores, strict=True):
                per_row.setdefault(virtual[j][0], []).append(s)
        for i, member_scores in per_row.items():
            results[i] = _classified(prompts[i], texts[i], _mean_log_probs(member_scores))
    # The other rows, a batch per prompt: multi-token label words (teacher forcing) or generation.
    # Rows of similar length go together, at most FORWARD_ROWS sequences a forward pass (a row of a
    # multi-token task is one sequence per candidate word): one long row must not pad a whole batch.
    rest = _group([i for i in range(len(prompts)) if results[i] is None], key=lambda i: names[i])
    chunks = [chunk for idx in rest.values() for chunk in _by_length(idx, seqs, _rows_per_forward(prompts[idx[0]]))]
    for idx in chunks:
        p = prompts[idx[0]]
        if p.verbalizer is not None:
            members = [label_scores(model, Prefix(embeds=e), [seqs[i] for i in idx], p.verbalizer, tok.pad_token_id).double().cpu().numpy() for e in p.all_embeds]
            for k, i in enumerate(idx):
                results[i] = _classified(p, texts[i], _mean_log_probs([m[k] for m in members]))
        else:
            outs = greedy_generate(model, p.embeds, [seqs[i] for i in idx], max_new_tokens=p.cfg.task.max_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
            for i, out in zip(idx, outs, strict=True):
                results[i] = Prediction(p.name, texts[i], generated=tok.decode(out, skip_special_tokens=True))
    return [r for r in results if r is not None]


FORWARD_ROWS = 32
"""Sequences per forward pass for multi-token scoring and generation in `predict`."""


def _rows_per_forward(p: TunedPrompt) -> int:
    candidates = len(p.verbalizer.candidates) if p.verbalizer is not None else 1
    return max(1, FORWARD_ROWS // candidates)


def _by_length(idx: list[int], seqs: list[list[int]], size: int) -> list[list[int]]:
    ordered = sorted(idx, key=lambda i: len(seqs[i]))
    return [ordered[k : k + size] for k in range(0, len(ordered), size)]


def _group(items: list[int], key: Any) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for i in items:
        groups.setdefault(key(i), []).append(i)
    return groups


def _classified(p: TunedPrompt, text: str, scores: np.ndarray) -> Prediction:
    assert p.verbalizer is not None
    probs = to_probs(scores[None, :])[0]
    labels = list(p.verbalizer.labels)
    return Prediction(p.name, text, label=labels[int(probs.argmax())], scores={lab: round(float(v), 6) for lab, v in zip(labels, probs, strict=True)})


def _mean_log_probs(member_scores: list[np.ndarray]) -> np.ndarray:
    if len(member_scores) == 1:
        return member_scores[0]
    result: np.ndarray = np.mean([np.log(to_probs(s[None, :])[0] + 1e-12) for s in member_scores], axis=0)
    return result


def _ensemble_members(folder: Path) -> list[torch.Tensor]:
    """The members of a published prompt ensemble, when the artifact's winner is the ensemble."""
    path = folder / "ensemble.safetensors"
    metrics_path = folder / "metrics.json"
    if not path.is_file() or not metrics_path.is_file():
        return []
    if json.loads(metrics_path.read_text(encoding="utf-8")).get("winner") != "ensemble":
        return []
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return [tensors[f"member_{i}"] for i in range(len(tensors))]


def artifact_config(folder: Path) -> JobConfig:
    """The configuration an artifact folder's prompt was trained with (its run manifest's)."""
    for candidate in (folder / "run_manifest.json", folder.parent / "run_manifest.json"):
        if candidate.is_file():
            manifest = json.loads(candidate.read_text(encoding="utf-8"))
            return recorded_config(manifest["config"])
    raise ModelError(f"{folder} has no run_manifest.json with the task's config; predict needs a published artifact folder")


def _base_model(folder: Path) -> dict[str, Any]:
    for candidate in (folder / "run_manifest.json", folder.parent / "run_manifest.json"):
        try:
            base = json.loads(candidate.read_text(encoding="utf-8")).get("base_model")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(base, dict):
            return {"name": base.get("name"), "sha": base.get("weights_sha256")}
    return {"name": None, "sha": None}


def _words(p: TunedPrompt) -> Any:
    assert p.verbalizer is not None
    return p.verbalizer.words
