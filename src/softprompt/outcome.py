"""The training outcome: what every trainer returns and evaluate takes.

A trainer (in this process, Ray Train workers, or a Ray Tune sweep; see `softprompt.job.Trainer`)
leaves its prompts in its output folder and describes them in `train_result.json` there: the
winners (adapter folders, best first; a sweep's top trials, one prompt otherwise), the configuration
the best prompt trained with, its training history and the facts the run manifest records. Paths
are stored relative to the folder, so a copied folder (a pipeline artifact) still reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.config import JobConfig, config_from_dict, to_dict
from softprompt.errors import DataError

RESULT_FILE = "train_result.json"
FORMAT = "softprompt.train_result/1"


@dataclass(frozen=True)
class TrainOutcome:
    """The contract between training and evaluation."""

    trainer: str
    """Who trained: `in-process`, `ray-train` or `ray-tune`."""
    output_dir: Path
    """The folder holding the winners and `train_result.json`."""
    winners: tuple[Path, ...]
    """PEFT adapter folders, best first: one prompt, or a sweep's top `tune.top_k_ensemble` trials."""
    config: JobConfig
    """The configuration the best prompt trained with (a sweep's best trial's values applied)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """The best prompt's training records (loss, learning rate, eval metrics by step)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Training facts for the run manifest: steps, best step and eval metric, seconds, tokens/s,
    peak memory, workers; a sweep adds `tune` (trials, states, total steps, the best's values)."""

    def line(self) -> str:
        """One line for people."""
        s = self.summary
        parts = [f"trained {s.get('steps')} steps"]
        if s.get("seconds") is not None:
            parts.append(f"in {s['seconds']:.0f}s")
        detail = []
        if s.get("tokens_per_second"):
            detail.append(f"{s['tokens_per_second']:.0f} tokens/s")
        if s.get("workers"):
            detail.append(f"{s['workers']} worker{'s' if s['workers'] != 1 else ''}")
        if s.get("peak_rss_mb"):
            detail.append(f"peak RSS {s['peak_rss_mb']:.0f} MiB")
        if s.get("peak_gpu_mb"):
            detail.append(f"peak GPU {s['peak_gpu_mb']:.0f} MiB")
        text = " ".join(parts) + (f" ({', '.join(detail)})" if detail else "")
        if s.get("best_eval_metric") is not None:
            text += f", best eval {s['best_eval_metric']:.4f} at step {s.get('best_step', s.get('steps'))}"
        if s.get("stopped_early"):
            text += " [stopped early]"
        if len(self.winners) > 1:
            text += f"; {len(self.winners)} winners ranked (the best and the top-{len(self.winners)} ensemble are evaluated)"
        return text

    def write(self) -> Path:
        """Write `train_result.json` into `output_dir`; returns its path."""
        root = self.output_dir.resolve()
        body = {
            "format": FORMAT,
            "trainer": self.trainer,
            "winners": [_relative(w, root) for w in self.winners],
            "config": to_dict(self.config),
            "history": self.history,
            "summary": self.summary,
        }
        path = self.output_dir / RESULT_FILE
        path.write_text(json.dumps(body, indent=1, default=str), encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> TrainOutcome:
        """The outcome a trainer wrote into `folder`.

        Raises:
            DataError: when `folder` holds no (readable) `train_result.json`; says which stage writes it.
        """
        root = Path(folder)
        path = root / RESULT_FILE
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(
                f"{path} does not exist; pass the folder a trainer wrote (`softprompt train` or `tune` leave "
                "<run folder>/train; a pipeline's Tune step leaves its `winners` artifact)"
            ) from None
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path}: {exc}; train again to rewrite it") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise DataError(f"{path} is not a {FORMAT} file; train again to rewrite it")
        winners = tuple(root / w for w in body["winners"])
        missing = [str(w) for w in winners if not (w / "adapter_config.json").is_file()]
        if missing:
            raise DataError(f"{path} names adapter folders that are missing or incomplete: {missing}")
        return cls(
            trainer=str(body["trainer"]), output_dir=root, winners=winners, config=config_from_dict(body["config"]),
            history=list(body.get("history") or []), summary=dict(body.get("summary") or {}),
        )


def _relative(path: Path, root: Path) -> str:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise DataError(f"winner {path} lies outside the trainer's output folder {root}; trainers write their prompts inside it")
    return resolved.relative_to(root).as_posix()
