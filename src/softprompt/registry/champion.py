"""The champion pointer: which version serves, moved only by gated promotion or rollback.

`<task>/<base_model>/champion.json` names the champion; every move is a compare-and-swap on the
pointer's etag (create-only for the first champion), so two racing promotions cannot both win,
and each move appends a record under `history/`. Reading the pointer (and the `champion` alias)
is `versions.py`'s, since listing, showing and pulling versions need it too.

Both moves check what they point at first: the version's stored files are downloaded and hashed,
and a damaged version is refused. They are also the two ways to replace a damaged pointer:
`promote --force` and `rollback --to` overwrite one (by compare-and-swap on its etag) instead of
failing on it; every other reader refuses it with the same advice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from softprompt.errors import ConfigError, ConflictError, IntegrityError, StoreError
from softprompt.metrics import SIGNIFICANCE_LEVEL, SIGNIFICANCE_TEST
from softprompt.registry.integrity import MANIFEST, METRICS, parse_history, repair_command, stored_damage
from softprompt.registry.store import ArtifactStore, NotFoundError
from softprompt.registry.versions import CHAMPION, check_version, load_manifest, pointer_state, slug


@dataclass(frozen=True)
class Gate:
    """When a challenger may replace the champion."""

    metric: str = "accuracy"
    """Metric compared (from the tuned metrics in metrics.json); higher is better."""
    min_delta: float = 0.0
    """The challenger must beat the champion by strictly more than this (same eval set only)."""
    require_significance: bool = False
    """Also refuse a challenger that is not significantly better than every baseline it was scored
    against (McNemar's exact test, p < 0.05, as its metrics.json records), even as the first
    champion: a higher score within the noise is not a win. On the CLI: `softprompt promote
    --require-significance`. The pipeline checks `publish.require_significance` (on by default)
    before its Promote step runs at all."""

    def __post_init__(self) -> None:
        if not self.metric:
            raise ConfigError("gate metric is empty; pass --metric accuracy (or another tuned metric)")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ConfigError(f"gate min_delta={self.min_delta}; use a number >= 0 (e.g. --min-delta 0.005)")


@dataclass(frozen=True)
class PromotionResult:
    """What `promote` or `rollback` did to the champion pointer."""

    action: str
    """'promote' or 'rollback'."""
    status: str
    """'promoted' or 'rolled_back' (pointer moved), 'refused' (gate said no), 'unchanged' (already champion)."""
    task: str
    base_model: str
    version: str
    """The version asked for."""
    promoted: bool
    """True when the pointer now names `version` because of this call."""
    previous: str | None
    """The champion before this call (None when there was none)."""
    forced: bool
    """True when --force overrode a gate refusal."""
    metric: str
    value: float | None
    """The version's value of `metric`."""
    champion_value: float | None
    """The previous champion's value of `metric`, when there was one."""
    message: str


def promote(
    store: ArtifactStore,
    task: str,
    base_model: str,
    version: str,
    *,
    gate: Gate = Gate(),  # a frozen dataclass, so a shared default is safe
    force: bool = False,
    reason: str = "",
) -> PromotionResult:
    """Make `version` the champion if it beats the current one on the same eval set.

    Args:
        store: where the registry lives.
        task: task name (sanitized like at publish).
        base_model: base-model name, e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct' or its key segment.
        version: a published version id.
        gate: the metric and the margin the challenger must beat the champion by.
        force: promote even when the gate refuses (recorded as forced in the pointer and history).
        reason: free text recorded with the promotion.

    Returns:
        `promoted=False` with a message saying why when the gate refused.

    Raises:
        ConflictError: another promotion moved the pointer meanwhile; re-run to compare again.
        IntegrityError: the version's stored files are damaged, or the pointer is unreadable and
            `force` is not set (with `force`, an unreadable pointer is replaced).
        StoreError: unknown version or metric, or the store fails.
    """
    task, model = slug(task, "task"), slug(base_model, "base model")
    challenger = load_manifest(store, task, model, check_version(version))
    value = _metric_value(challenger, gate.metric, store.uri(f"{task}/{model}/{version}/{MANIFEST}"))
    state = pointer_state(store, task, model)
    if state.damage and not force:
        raise IntegrityError(state.damage)
    pointer, etag = state.record, state.etag
    current = pointer["version"] if pointer else None

    def result(status: str, forced: bool, champion_value: float | None, message: str) -> PromotionResult:
        return PromotionResult(
            action="promote",
            status=status,
            task=task,
            base_model=model,
            version=version,
            promoted=status == "promoted",
            previous=current,
            forced=forced,
            metric=gate.metric,
            value=value,
            champion_value=champion_value,
            message=message,
        )

    if current == version:
        return result(
            "unchanged", False, value, f"{version} is already the champion of {task}/{model}; nothing to do"
        )
    refusals: list[str] = []
    champion_value = None
    if gate.require_significance and (weak := _significance_refusal(store, f"{task}/{model}/{version}", version)):
        if not force:
            return result("refused", False, None, f"not promoted: {weak}")
        refusals.append(weak)
    if current is not None:
        refusal, champion_value = _gate_refusal(store, task, model, current, challenger, value, gate)
        if refusal and not force:
            return result("refused", False, champion_value, f"not promoted: {refusal}")
        refusals += [refusal] if refusal else []
    elif state.damage:
        refusals.append(f"the unreadable {store.uri(f'{task}/{model}/{CHAMPION}')} was replaced; nothing was compared")
    refusal = "; ".join(refusals) or None
    forced = refusal is not None
    _refuse_damaged(store, task, model, challenger, "promote")
    # Over an unreadable pointer, the last champion the history records is what rollback goes back to.
    previous = current if not state.damage else _last_champion(store, task, model)
    record = _pointer_record(task, model, challenger, gate.metric, value, "promote", forced, reason, previous)
    _move_pointer(store, task, model, record, etag, current)
    how = f" (forced past: {refusal})" if refusal else ""
    beaten = f" over {current} ({champion_value})" if current else " (first champion)"
    message = f"promoted {version} to champion of {task}/{model}: {gate.metric}={value:.4f}{beaten}{how}"
    return result("promoted", forced, champion_value, message)


def rollback(
    store: ArtifactStore, task: str, base_model: str, to_version: str | None = None, *, reason: str = ""
) -> PromotionResult:
    """Move the champion pointer back, without a gate, and record it in the history.

    Args:
        store: where the registry lives.
        task: task name.
        base_model: base-model name or key segment.
        to_version: the version to serve again; None means the champion before the current one
            (repeated rollbacks walk further back, like an undo stack).
        reason: free text recorded with the rollback.

    Raises:
        ConflictError: another promotion moved the pointer meanwhile.
        IntegrityError: the target's stored files are damaged, or, without `to_version`, the pointer
            or a history record is unreadable (with `to_version`, an unreadable pointer is replaced
            and unreadable history records are skipped).
        StoreError: no champion, no previous champion, or unknown version.
    """
    task, model = slug(task, "task"), slug(base_model, "base model")
    state = pointer_state(store, task, model)
    if state.damage and not to_version:
        raise IntegrityError(state.damage)
    pointer, etag = state.record, state.etag
    if pointer is None and not state.damage:
        raise StoreError(f"{task}/{model} has no champion in {store.uri()}; nothing to roll back")
    current = str(pointer["version"]) if pointer else None
    target = to_version or (pointer or {}).get("previous")
    if not target:
        raise StoreError(
            f"champion {current} of {task}/{model} has no previous champion; pass --to VERSION "
            "(see `softprompt registry list`)"
        )
    manifest = load_manifest(store, task, model, check_version(str(target)))
    metric = str(manifest["metric"]["name"])
    value = float(manifest["metric"]["value"])
    moved = target != current
    if moved:
        _refuse_damaged(store, task, model, manifest, "roll back to")
        previous = _previous_of(store, task, model, target, skip_damaged=bool(to_version))
        record = _pointer_record(task, model, manifest, metric, value, "rollback", False, reason, previous)
        _move_pointer(store, task, model, record, etag, current)
    message = (
        f"rolled back champion of {task}/{model} from {current or 'an unreadable pointer'} to {target}"
        if moved
        else f"{target} is already the champion of {task}/{model}; nothing to do"
    )
    return PromotionResult(
        action="rollback",
        status="rolled_back" if moved else "unchanged",
        task=task,
        base_model=model,
        version=target,
        promoted=moved,
        previous=current,
        forced=False,
        metric=metric,
        value=value,
        champion_value=None,
        message=message,
    )


# ------------------------------------------------------------------------------------------- helpers


def _significance_refusal(store: ArtifactStore, prefix: str, version: str) -> str | None:
    """Why `version` is not significantly better than its baselines, or None when it is."""
    key = f"{prefix}/{METRICS}"
    try:
        metrics = json.loads(store.get_bytes(key))
    except (NotFoundError, ValueError) as exc:
        return f"{store.uri(key)} cannot be read ({exc}), so its significance is unknown; pass --force --reason '...'"
    if not isinstance(metrics, dict):
        return f"{store.uri(key)} is not a JSON object, so its significance is unknown; pass --force --reason '...'"
    comparisons = metrics.get("comparisons") or {}
    baselines = [k for k in ("zero_shot", "few_shot") if k in metrics]  # none scored: nothing to beat
    if not isinstance(comparisons, dict) or set(baselines) - set(comparisons):
        return (f"{version}'s metrics.json records no significance test against {baselines}; re-evaluate it with this "
                "release, or pass --force --reason '...'")
    alpha = float((metrics.get("significance") or {}).get("alpha", SIGNIFICANCE_LEVEL))
    weak = []
    for name, c in comparisons.items():
        delta, p = float(c.get("delta_points", 0.0)), float(c.get("mcnemar_p", 1.0))
        outcome = c.get("outcome") or ("better" if p < alpha and delta > 0 else "not_significant")
        if outcome != "better":
            word = "significantly worse than" if outcome == "worse" else "not significantly better than"
            weak.append(f"{word} {name.replace('_', '-')} ({delta:+.1f} points, p={p:.2g})")
    if not weak:
        return None
    return (f"{version} is " + " and ".join(weak) + f" ({SIGNIFICANCE_TEST}; the gate requires p < {alpha:g} against every "
            "baseline); pass --force --reason '...' to promote it anyway")


def _metric_value(manifest: dict[str, Any], metric: str, where: str) -> float:
    value = manifest.get("metrics", {}).get(metric)
    if value is None:
        raise StoreError(
            f"{where} has no tuned metric {metric!r}; choose one of {sorted(manifest.get('metrics', {}))}"
        )
    return float(value)


def _gate_refusal(
    store: ArtifactStore,
    task: str,
    model: str,
    current: str,
    challenger: dict[str, Any],
    value: float,
    gate: Gate,
) -> tuple[str | None, float | None]:
    try:
        champion = load_manifest(store, task, model, current)
    except NotFoundError:
        return f"the current champion {current} has no {MANIFEST}; nothing to compare against", None
    champion_value = champion.get("metrics", {}).get(gate.metric)
    if champion_value is None:
        return f"champion {current} has no {gate.metric!r} to compare against", None
    if champion["eval_fingerprint"] != challenger["eval_fingerprint"]:
        return (
            f"champion {current} was evaluated on eval set {champion['eval_fingerprint']!r} but "
            f"{challenger['version']} on {challenger['eval_fingerprint']!r}; scores on different eval sets are "
            "not comparable — evaluate both on the same split, or pass --force --reason '...'",
            float(champion_value),
        )
    delta = value - float(champion_value)
    if delta <= gate.min_delta:
        return (
            f"{challenger['version']} {gate.metric}={value:.4f} does not beat champion {current} "
            f"({float(champion_value):.4f}) by more than {gate.min_delta} (delta {delta:+.4f})",
            float(champion_value),
        )
    return None, float(champion_value)


def _pointer_record(
    task: str,
    model: str,
    manifest: dict[str, Any],
    metric: str,
    value: float,
    action: str,
    forced: bool,
    reason: str,
    previous: str | None,
) -> dict[str, Any]:
    return {
        "task": task,
        "base_model": model,
        "version": manifest["version"],
        "metric": {"name": metric, "value": value},
        "eval_fingerprint": manifest["eval_fingerprint"],
        "promoted_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "action": action,
        "forced": forced,
        "reason": reason,
        "previous": previous,
    }


def _move_pointer(
    store: ArtifactStore, task: str, model: str, record: dict[str, Any], etag: str | None, current: str | None
) -> None:
    key = f"{task}/{model}/{CHAMPION}"
    body = json.dumps(record, indent=2, sort_keys=True).encode()
    try:
        if etag is None:
            store.put_bytes(key, body, if_none_match=True)
        else:
            store.put_bytes(key, body, if_match=etag)
    except ConflictError:
        now = pointer_state(store, task, model)
        raise ConflictError(
            f"another promotion moved champion of {task}/{model} from {current or 'none'} to "
            f"{now.record['version'] if now.record else 'an unreadable pointer' if now.damage else 'none'} "
            f"while you were promoting {record['version']}; "
            "re-run to compare against the new champion"
        ) from None
    # History goes after the pointer: a crash in between loses a log line but never records a
    # move that did not happen; rollback reads `previous` from the pointer itself.
    history = {**record, "from_version": current}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    for attempt in range(3):  # only collides if two moves share a microsecond
        try:
            store.put_bytes(
                f"{task}/{model}/history/{stamp}{'-' * attempt}-{record['version']}.json",
                json.dumps(history, indent=2, sort_keys=True).encode(),
                if_none_match=True,
            )
            return
        except ConflictError:
            continue


def _refuse_damaged(store: ArtifactStore, task: str, model: str, manifest: dict[str, Any], verb: str) -> None:
    """Refuse to point the champion at a version whose stored files are not the ones it lists."""
    version = manifest["version"]
    damage = stored_damage(store, f"{task}/{model}/{version}", manifest["files"], manifest)
    if damage:
        raise IntegrityError(
            f"refusing to {verb} {version} of {task}/{model}: its stored files are damaged ("
            + "; ".join(damage.values())
            + f"); the champion is unchanged. Repair the version first: `{repair_command(task, model, version)}`"
        )


def _history(store: ArtifactStore, task: str, model: str, suffix: str = ".json") -> list[tuple[str, str]]:
    """(key, human address) of history records ending in `suffix`, newest first."""
    keys = sorted((k for k in store.list(f"{task}/{model}/history/") if k.endswith(suffix)), reverse=True)
    return [(k, store.uri(k)) for k in keys]


def _previous_of(store: ArtifactStore, task: str, model: str, version: str, *, skip_damaged: bool) -> str | None:
    """What a rollback from `version` should go to: its `previous` when it last became champion.

    An unreadable record raises, naming it, unless `skip_damaged` (a rollback with --to, which is
    how a damaged history is worked around): then the newest readable record for `version` counts.
    """
    fix = (
        "restore that record from a backup or delete it (the history is an audit log; rollback reads "
        f"`previous` from it), or choose the version yourself: `softprompt rollback {task} {model} --to VERSION`"
    )
    for key, where in _history(store, task, model, f"-{version}.json"):
        try:
            record = parse_history(store.get_bytes(key), where, fix)
        except IntegrityError:
            if skip_damaged:
                continue
            raise
        return str(record["previous"]) if record["previous"] else None
    return None


def _last_champion(store: ArtifactStore, task: str, model: str) -> str | None:
    """The version the newest readable history record made champion (to recover from a lost pointer)."""
    for key, where in _history(store, task, model):
        try:
            return str(parse_history(store.get_bytes(key), where, "")["version"])
        except (IntegrityError, NotFoundError):
            continue
    return None
