"""Run several decoding methods on the same prompts, interleaved, and collect comparable numbers.

Methods: `ar` (our loop, plain decoding, same fast kernels as every speculative method), `hf` (stock
`transformers` `generate`, stock kernels: what a user gets out of the box), `hf-assisted` (stock
`generate(assistant_model=draft)`), and any tree policy spec (`chain:gamma=4`, `static`, `eagle2:total_tokens=16`).
Methods run one after the other on each prompt, so slow drift of the machine hits all of them alike.
"""

from __future__ import annotations

import platform
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from castspec.bench.datasets import Prompt
from castspec.cost.profiler import load_or_profile
from castspec.cost.table import OnlineCosts
from castspec.engine import SpeculativeGenerator
from castspec.errors import CastspecError
from castspec.policies import make_policy

HF_METHODS = ("hf", "hf-assisted")


@dataclass
class BenchConfig:
    target: str
    draft: str | None
    methods: list[str]
    max_new_tokens: int = 128
    device: str = "cpu"
    draft_quant: str = "int8"
    warmup: bool = True
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    cost_table: str | None = None


class MethodRunner:
    """Holds the loaded models once and runs any method on a prompt."""

    def __init__(self, config: BenchConfig):
        from castspec.api import load_generator
        from castspec.models.load import load_model

        self.config = config
        for method in config.methods:
            if method not in HF_METHODS:
                make_policy(method)  # fail early on a bad method name or parameter
        needs_draft = any(m == "hf-assisted" or (m not in HF_METHODS and make_policy(m).uses_draft)
                          for m in config.methods)
        base = load_generator(config.target, config.draft if needs_draft else None,
                              "chain" if needs_draft else "ar", device=config.device, draft_quant=config.draft_quant)
        self.tokenizer = base.tokenizer
        self.target_model = base.target.model
        self.draft_model = base.drafter.runner.model if base.drafter else None
        policies = {m: make_policy(m) for m in config.methods if m not in HF_METHODS}
        table = None
        if any(getattr(p, "needs_costs", False) for p in policies.values()):
            table = load_or_profile({"target": self.target_model, "draft": self.draft_model},
                                    path=config.cost_table)
        self.generators = {m: SpeculativeGenerator(self.target_model, self.tokenizer, self.draft_model, p,
                                                   costs=OnlineCosts(table) if table else None)
                           for m, p in policies.items()}
        self.stock_target = self.stock_draft = None
        if any(m in HF_METHODS for m in config.methods):
            self.stock_target, _ = load_model(config.target, device=config.device)
        if "hf-assisted" in config.methods:
            self.stock_draft, _ = load_model(config.draft, device=config.device)

    def encode(self, prompt: Prompt, history: list[dict[str, str]] | None = None) -> torch.Tensor:
        """Token ids of a prompt's first turn, or of the whole conversation so far plus the next user turn."""
        if not prompt.chat:
            ids = self.tokenizer(prompt.turns[0])["input_ids"]
        else:
            messages = (history or []) + [{"role": "user", "content": prompt.turns[len(history or []) // 2]}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids if isinstance(ids, list) else ids["input_ids"]
        return torch.tensor([ids], dtype=torch.long)

    def run_prompt(self, method: str, prompt: Prompt, max_new_tokens: int) -> dict[str, Any]:
        """All turns of a prompt as one conversation (each turn sees this method's own earlier answers)."""
        history: list[dict[str, str]] = []
        total: dict[str, Any] = {}
        for _ in prompt.turns if prompt.chat else prompt.turns[:1]:
            input_ids = self.encode(prompt, history)
            rec = self.run(method, input_ids, max_new_tokens)
            for key, value in rec.items():
                total[key] = total.get(key, 0.0 if isinstance(value, float) else type(value)()) + value
            total.setdefault("prompt_tokens", []).append(int(input_ids.shape[1]))
            total.setdefault("turn_tokens", []).append(len(rec["token_ids"]))
            answer = self.tokenizer.decode(rec["token_ids"], skip_special_tokens=True)
            history += [{"role": "user", "content": prompt.turns[len(history) // 2]},
                        {"role": "assistant", "content": answer}]
        return total

    def run(self, method: str, input_ids: torch.Tensor, max_new_tokens: int) -> dict[str, Any]:
        if method in HF_METHODS:
            return self._run_hf(method, input_ids, max_new_tokens)
        c = self.config
        result = self.generators[method].generate(input_ids, max_new_tokens=max_new_tokens, temperature=c.temperature,
                                                  top_k=c.top_k, top_p=c.top_p, seed=c.seed)
        stats = result.stats
        return {"token_ids": result.token_ids, "wall_s": stats.wall_s, "new_tokens": stats.new_tokens,
                "steps": stats.steps, "accepted": stats.accepted, "depths": stats.depths,
                "verified": stats.verified, "draft_s": stats.draft_s, "verify_s": stats.verify_s}

    @torch.inference_mode()
    def _run_hf(self, method: str, input_ids: torch.Tensor, max_new_tokens: int) -> dict[str, Any]:
        c = self.config
        sampling = dict(do_sample=True, temperature=c.temperature, top_k=c.top_k or None, top_p=c.top_p)
        if c.temperature > 0:
            torch.manual_seed(c.seed)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, **(sampling if c.temperature > 0 else
                                                                         {"do_sample": False}),
                                      attention_mask=torch.ones_like(input_ids),
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if method == "hf-assisted":
            kwargs["assistant_model"] = self.stock_draft
        start = time.perf_counter()
        out = self.stock_target.generate(input_ids, **kwargs)
        wall = time.perf_counter() - start
        new = out[0, input_ids.shape[1]:].tolist()
        return {"token_ids": new, "wall_s": wall, "new_tokens": len(new)}

    def divergence(self, input_ids: torch.Tensor, reference: list[int], other: list[int],
                   first_turn_tokens: int) -> dict[str, Any] | None:
        """Where `other` first differs from `reference` (plain decoding), and how close the target's call was."""
        index = next((i for i, (a, b) in enumerate(zip(reference, other, strict=False)) if a != b), None)
        if index is None:
            return None
        if index >= first_turn_tokens:  # in a later turn: the prompt differs too, report the position only
            return {"index": index, "ar_token": reference[index], "other_token": other[index], "logit_gap": None}
        prefix = torch.cat([input_ids[0], torch.tensor(reference[:index], dtype=torch.long)])[None]
        with torch.inference_mode():
            logits = self.target_model(prefix.to(self.target_model.device), logits_to_keep=1).logits[0, -1].float()
        gap = float(logits[reference[index]] - logits[other[index]])
        return {"index": index, "ar_token": reference[index], "other_token": other[index], "logit_gap": round(gap, 5)}


def run_bench(config: BenchConfig, prompts: list[Prompt]) -> dict[str, Any]:
    if not prompts:
        raise CastspecError("no prompts selected")
    runner = MethodRunner(config)
    if config.warmup:
        warm = runner.encode(prompts[0])
        for method in config.methods:
            try:
                runner.run(method, warm, 4)
            except Exception:  # reported properly in the real run
                pass
        if any(p.chat for p in prompts) and not getattr(runner.tokenizer, "chat_template", None):
            raise CastspecError("these prompts need a chat template, and the target's tokenizer has none")
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(prompts) * len(config.methods), desc="bench", unit="run")
    for prompt in prompts:
        input_ids = runner.encode(prompt)
        per_method: dict[str, dict[str, Any]] = {}
        for method in config.methods:
            bar.set_postfix_str(f"{prompt.id} {method}")
            try:
                per_method[method] = runner.run_prompt(method, prompt, config.max_new_tokens)
            except Exception as err:  # one failing method must not lose the whole run
                per_method[method] = {"error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc(limit=3)}
            bar.update(1)
        reference = per_method.get("ar", {}).get("token_ids") if config.temperature == 0 else None
        for method, rec in per_method.items():
            if reference is not None and "token_ids" in rec and method != "ar":
                rec["identical_to_ar"] = rec["token_ids"] == reference
                if not rec["identical_to_ar"]:
                    first_turn = per_method["ar"]["turn_tokens"][0]
                    rec["divergence"] = runner.divergence(input_ids, reference, rec["token_ids"], first_turn)
        records.append({"prompt": prompt.id, "task": prompt.task, "prompt_tokens": int(input_ids.shape[1]),
                        "methods": per_method})
    bar.close()
    return {"config": vars(config), "environment": environment(runner), "summary": summarize(records, config.methods),
            "prompts": records}


def summarize(records: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for method in methods:
        ok = [r["methods"][method] for r in records if "error" not in r["methods"][method]]
        failed = [r["prompt"] for r in records if "error" in r["methods"][method]]
        tokens = sum(rec["new_tokens"] for rec in ok)
        wall = sum(rec["wall_s"] for rec in ok)
        entry: dict[str, Any] = {"prompts": len(ok), "failed": failed, "new_tokens": tokens,
                                 "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 4) if wall else 0.0}
        steps = sum(rec.get("steps", 0) for rec in ok)
        if steps:
            accepted = [a for rec in ok for a in rec["accepted"]]
            entry["mean_accept_len"] = round((sum(accepted) + len(accepted)) / len(accepted), 4)
            depths = [d for rec in ok for d in rec["depths"]]
            entry["acceptance_by_position"] = [
                round(sum(a >= k for a, d in zip(accepted, depths, strict=True) if d >= k)
                      / max(sum(d >= k for d in depths), 1), 4)
                for k in range(1, max(depths, default=0) + 1)]
            entry["accept_len_histogram"] = {str(n): accepted.count(n) for n in sorted(set(accepted))}
            entry["draft_s"] = round(sum(rec["draft_s"] for rec in ok), 3)
            entry["verify_s"] = round(sum(rec["verify_s"] for rec in ok), 3)
        identical = [rec["identical_to_ar"] for rec in ok if "identical_to_ar" in rec]
        if identical:
            entry["identical_to_ar"] = round(sum(identical) / len(identical), 4)
            entry["divergences"] = [{"prompt": r["prompt"], **r["methods"][method]["divergence"]}
                                    for r in records if r["methods"][method].get("divergence")]
        summary[method] = entry
    for base in ("ar", "hf"):
        if base in summary and summary[base]["tokens_per_s"]:
            for entry in summary.values():
                entry[f"speedup_vs_{base}"] = round(entry["tokens_per_s"] / summary[base]["tokens_per_s"], 4)
    return summary


def environment(runner: MethodRunner) -> dict[str, Any]:
    import transformers

    from castspec.models.kernels import describe_kernels
    from castspec.models.load import model_identity

    config = runner.config
    env = {"device": config.device, "cpu": _cpu_name(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "target": model_identity(config.target), "target_kernels": describe_kernels(runner.target_model),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if runner.draft_model is not None:
        env["draft"] = model_identity(config.draft)
        env["draft_kernels"] = describe_kernels(runner.draft_model)
    return env


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
