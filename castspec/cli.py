"""`castspec` command line: a thin layer over the Python API. Every number it prints is also in `--json`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from castspec.errors import CastspecError
from castspec.models import DRAFT_QUANTS, TARGET_DTYPES

DEFAULT_PROMPT = ("Write a Python function `fibonacci(n)` that returns the n-th Fibonacci number iteratively, "
                  "with a docstring and a few doctests.")


def _whole_number(text: str, minimum: int, bound: str) -> int:
    """An argparse value: a whole number >= `minimum` (`bound` says so in the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1, "at least 1")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are `CastspecError`s: one `castspec: error:` line and exit code 2, like every
    other bad input, instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        raise CastspecError(f"{message} (see `{self.prog} --help`)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something: not for on/off flags or unset options, nor twice where the
    help text already explains the default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from castspec.api import DEFAULT_DRAFT, DEFAULT_POLICY, DEFAULT_TARGET
    from castspec.models.packaged import BUILTIN_MODELS
    from castspec.policies import policy_names

    names = ", ".join(BUILTIN_MODELS)
    parser = _Parser(
        prog="castspec",
        description="Lossless speculative decoding with cost-aware draft trees for Hugging Face causal LMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="generate text with a target model sped up by a draft",
        description="Generate from a prompt, greedily (the default: token for token what the target alone would "
                    "produce) or by sampling with --temperature > 0 (exactly the target's own distribution). The "
                    "draft and the tree policy only change the speed. Models are a local Hugging Face directory or "
                    f"a built-in name ({names}).",
        formatter_class=_HelpFormatter)
    _model_arguments(gen, DEFAULT_TARGET, DEFAULT_DRAFT)
    gen.add_argument("--policy", default=DEFAULT_POLICY,
                     help=f"tree policy: {', '.join(policy_names())}, optionally with parameters, e.g. "
                          "'chain:gamma=4', 'eagle2:total_tokens=16,depth=4,top_k=4', 'cast:mode=paper,C1=4'")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt text (default: a built-in coding prompt)")
    source.add_argument("--prompt-file", type=Path,
                        help="read the prompt from this UTF-8 file (with --batch-size: one prompt per line)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens to generate at most")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--stop", action="append", default=None, metavar="TEXT",
                     help="end the output before this text (repeatable; \\n and \\t are read as newline and tab)")
    _sampling_arguments(gen)
    gen.add_argument("--batch-size", type=_positive_int, default=1,
                     help="with --prompt-file: decode this many lines' prompts at once as one batch (cast's "
                          "cost table is profiled for batch sizes up to this)")
    _decoder_arguments(gen, "the batch sizes used")
    gen.add_argument("--compare", action="store_true",
                     help="then run plain decoding (policy ar: the target alone, the draft model never runs) on "
                          "the same prompt and report the speedup over it and whether the output is identical")
    gen.add_argument("--verbose", action="store_true",
                     help="print each step's decisions (widths, depth, verify count, predicted vs actual)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat", help="talk with the target in the terminal; each turn prefills only the new message",
        description="An interactive conversation in the model's chat template, each answer streamed as its tokens "
                    "are accepted. One message per line; /reset starts the conversation over, /exit (or the end of "
                    "the input) quits. The models keep the conversation's cache between turns, so a turn prefills "
                    "only the new message (and the last answer's final token), as llama.cpp's conversation mode "
                    "does. Greedy by default: every answer is token for token the target's own. After each answer "
                    "a line on stderr gives its tokens, tokens/s, tokens per target step and the prompt tokens "
                    "reused from the cache.",
        formatter_class=_HelpFormatter)
    _model_arguments(chat, DEFAULT_TARGET, DEFAULT_DRAFT)
    chat.add_argument("--policy", default=DEFAULT_POLICY,
                      help=f"tree policy: {', '.join(policy_names())}, optionally with parameters (as for generate)")
    chat.add_argument("--system", default=None, help="a system message that opens the conversation")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=512, help="tokens per answer at most")
    _sampling_arguments(chat)
    _decoder_arguments(chat, "batch size 1")
    chat.set_defaults(func=cmd_chat)

    srv = sub.add_parser(
        "serve", help="serve an OpenAI-compatible HTTP API with continuous batching",
        description="Serve the target (sped up by the draft) over HTTP: POST /v1/completions and "
                    "/v1/chat/completions (OpenAI's request and response format, streaming with \"stream\": true), "
                    "GET /v1/models, /health and /metrics (Prometheus). Requests join and leave one live batch "
                    "between decoding steps (continuous batching); a greedy request (\"temperature\": 0) returns "
                    "exactly the target's own greedy output whatever else is in the batch, and a seeded sampled one "
                    "the same tokens as alone. The model name clients send is --target's value. SIGINT/SIGTERM stop "
                    "admitting requests and let running ones finish (up to --shutdown-timeout).",
        formatter_class=_HelpFormatter)
    _model_arguments(srv, DEFAULT_TARGET, DEFAULT_DRAFT)
    srv.add_argument("--policy", default=DEFAULT_POLICY,
                     help=f"tree policy: {', '.join(policy_names())}, optionally with parameters (as for generate)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    srv.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port, printed at start)")
    srv.add_argument("--max-batch-size", type=_positive_int, default=8,
                     help="most requests decoded at once (cast's cost table is profiled for batch sizes up to this)")
    srv.add_argument("--max-queue", type=_non_negative_int, default=64,
                     help="most requests waiting for a batch slot; more are refused with 503 and Retry-After")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds running requests get to finish at shutdown before they are cancelled")
    _decoder_arguments(srv, "batch sizes up to --max-batch-size")
    srv.set_defaults(func=cmd_serve)

    load = sub.add_parser(
        "bench-serve", help="measure `castspec serve` under load: Poisson arrivals, several modes and rates",
        description="For each arrival rate and each serving mode (a --policy), start `castspec serve`, send the same "
                    "requests (HumanEval completions and MT-bench chat turns, greedy, streamed) on the same seeded "
                    "Poisson schedule, and stop it; rate 'low' sends one request at a time. Reports throughput, time "
                    "to first token, latency per token and time per output token (p50/p99), how many requests were "
                    "answered and how many outputs equal the request alone. Writes records.jsonl (resumable), "
                    "results.json, results.md and load.png to --out. Run it on a quiet machine: it measures time.",
        formatter_class=_HelpFormatter)
    load.add_argument("--target", default=DEFAULT_TARGET, help="target model: directory or built-in name")
    load.add_argument("--draft", default=DEFAULT_DRAFT, help="draft model for the speculative modes")
    load.add_argument("--methods", default="ar,eagle2,cast", help="serving modes (policies), comma-separated")
    load.add_argument("--rates", default="low,0.05,0.1,0.2",
                      help="arrival rates in requests/s, comma-separated; 'low' = one request at a time")
    load.add_argument("--num-requests", type=_positive_int, default=8,
                      help="requests per block: half HumanEval, half MT-bench first turns")
    load.add_argument("--max-tokens", type=_positive_int, default=128, help="max_tokens of every request")
    load.add_argument("--max-batch-size", type=_positive_int, default=8, help="the server's --max-batch-size")
    load.add_argument("--threads", type=_positive_int, default=None, help="the server's CPU threads")
    load.add_argument("--target-dtype", choices=list(TARGET_DTYPES), default="auto", help="the server's --target-dtype")
    load.add_argument("--seed", type=int, default=0, help="seed of the prompt choice and the arrival schedule")
    load.add_argument("--spec-bench", default="../shared/data/spec_bench/question.jsonl",
                      help="Spec-Bench question.jsonl (for the MT-bench prompts)")
    load.add_argument("--out", type=Path, default=Path("runs/bench-serve"), help="output directory")
    load.add_argument("--resume", action="store_true", help="keep the blocks already in --out/records.jsonl")
    load.set_defaults(func=cmd_bench_serve)

    prof = sub.add_parser(
        "profile", help="measure forward costs f(B, c, n) of the target and draft on this device",
        description="Time one forward over n new tokens for B sequences with a c-token cache, for the target and "
                    "the draft as `generate` runs them (same kernels), on a grid. Writes a JSON cost table that the "
                    "cast policy uses; by default into the cache where `generate` finds it.",
        formatter_class=_HelpFormatter)
    _model_arguments(prof, DEFAULT_TARGET, DEFAULT_DRAFT)
    prof.add_argument("--batch-sizes", default="1,2,4,8", help="comma-separated batch sizes")
    prof.add_argument("--contexts", default="256,1024", help="comma-separated context lengths (cache sizes)")
    prof.add_argument("--tokens", default="1,2,3,4,6,8,12,16,24,32,48,64", help="comma-separated new-token counts")
    prof.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per shape (the fastest is kept)")
    prof.add_argument("--no-fast-kernels", action="store_true", help="keep stock nn.Linear kernels on CPU")
    prof.add_argument("--out", type=Path, default=None, help="where to write the table (default: the cache)")
    prof.set_defaults(func=cmd_profile)

    bench = sub.add_parser(
        "bench", help="compare decoding methods on standard prompts (speed, acceptance, identical output)",
        description="Run every method on the same prompts, interleaved per prompt, after a warm-up. Writes "
                    "results.json, results.md and plots to --out. Methods: ar (plain decoding, our loop), hf (stock "
                    "transformers generate), hf-assisted (stock generate with assistant_model), llama.cpp (plain "
                    "greedy decoding of the target's GGUF by llama.cpp through llama-cpp-python, an optional "
                    "dependency: pip install 'castspec[llamacpp]'; batch 1, greedy only; its output may differ "
                    "from ar's, different arithmetic), llama.cpp-spec:n=N (llama.cpp's own speculative decoding "
                    "with the draft's GGUF, N draft tokens per step, by its llama-speculative-simple binary; "
                    "llama.cpp-spec:n=N/type=ngram-simple (or ngram-map-k, ngram-map-k4v; /key=K: look up the "
                    "last K tokens): its draft-free speculation instead, no draft model), "
                    "hf-pld (stock generate with prompt lookup, prompt_lookup_num_tokens=10; batch 1), suffix or "
                    "suffix:POLICY (castspec without a draft model: cast, or POLICY, over trees of repeats found in "
                    "the prompt and output), or any --policy spec.",
        formatter_class=_HelpFormatter)
    _model_arguments(bench, DEFAULT_TARGET, DEFAULT_DRAFT)
    bench.add_argument("--dataset", action="append", default=None,
                       help="humaneval, or spec-bench:PATH[:TASK,...] with tasks mt-bench, gsm8k, cnn-dm, "
                            "natural-questions, translation, rag; repeat to run several in one table "
                            "(default: humaneval)")
    bench.add_argument("--num-prompts", type=_positive_int, default=8, help="prompts per task (seeded choice)")
    bench.add_argument("--max-new-tokens", type=_positive_int, default=128,
                       help="tokens to generate at most per prompt (per turn, for multi-turn prompts)")
    bench.add_argument("--methods", default=f"ar,hf,{DEFAULT_POLICY}",
                       help="comma-separated; separate a method's own parameters with '/' instead of ',' "
                            "(e.g. eagle2:total_tokens=16/depth=4); ar, hf, hf-assisted, hf-pld, llama.cpp, "
                            "llama.cpp-spec:n=N[/type=T[/key=K]], suffix[:POLICY], POLICY+suffix or a policy spec")
    bench.add_argument("--gguf", default=None,
                       help="GGUF file the llama.cpp method decodes (default: the built-in target's own GGUF, "
                            "assembled once into the cache from its packages)")
    bench.add_argument("--draft-gguf", default=None,
                       help="draft GGUF file for llama.cpp-spec (default: the built-in draft's own GGUF)")
    bench.add_argument("--llama-speculative", default=None,
                       help="llama.cpp's llama-speculative-simple binary for llama.cpp-spec (default: "
                            "$CASTSPEC_LLAMA_SPECULATIVE, else the one on PATH)")
    _sampling_arguments(bench, seed=0, seed_help="prompt choice and sampling seed")
    bench.add_argument("--cost-table", default=None,
                       help="cost table for cast methods (default: the cached one, else a quick profile for the "
                            "batch sizes of --batch-size)")
    bench.add_argument("--batch-size", default="1",
                       help="comma-separated batch sizes, e.g. 1,2,4,8: prompts are decoded B at a time by every "
                            "method (hf-assisted and llama.cpp: batch 1 only)")
    bench.add_argument("--resume", action="store_true",
                       help="continue an interrupted run in --out (same settings): measured prompts are kept")
    bench.add_argument("--no-prefix-reuse", dest="reuse_prefix", action="store_false",
                       help="prefill every turn of a conversation whole; by default a later turn (MT-bench) runs only "
                            "what it adds to the caches of the turns before, in castspec's methods and llama.cpp's, "
                            "as their servers do. Different prompts and methods never share a prefix either way")
    bench.add_argument("--report-only", action="store_true",
                       help="re-render results.json/.md and plots in --out from its records.jsonl (same settings "
                            "as the run), without loading models or measuring; works on a run still in progress")
    bench.add_argument("--quick", action="store_true",
                       help="a small run (2 prompts, 16 tokens, ar,hf,chain,eagle2,cast) to check the setup")
    bench.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory")
    bench.set_defaults(func=cmd_bench)
    return parser


def _model_arguments(parser: argparse.ArgumentParser, target: str, draft: str) -> None:
    parser.add_argument("--target", default=target, help="target model: directory or built-in name")
    parser.add_argument("--draft", default="auto",
                        help=f"draft model with the target's tokenizer; 'none': speculate without one (candidates "
                             f"from repeats of the prompt and output, free to propose; the target still decides); "
                             f"'auto': {draft} if it shares the target's tokenizer, else none")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--draft-quant", choices=list(DRAFT_QUANTS), default="auto",
                        help="the draft's format on CPU: int8 linears, q4k (Q4_K blocks quantized at load, each "
                             "decoder layer one native call; AVX2), none (fp32), or auto: q4k beside a q4k target, "
                             "else int8. Lossless whichever: the target decides every token")
    parser.add_argument("--draft-vocab", type=_draft_vocab, default=None, metavar="N",
                        help=DRAFT_VOCAB_HELP)
    parser.add_argument("--suffix", action="store_true",
                        help="with a draft model: also propose repeats of the prompt and output as candidates, "
                             "merged into the same tree (lossless; helps copy-heavy text)")
    parser.add_argument("--lazy-draft", action=argparse.BooleanOptionalAction, default=None,
                        help="speculate from repeats of the prompt and output first; prefill the draft model only "
                             "once the steps it could have shortened have cost as much as its prefill (long prompts "
                             "with short or copy-heavy answers skip it); lossless. Default: on for --policy cast "
                             "unless --suffix or --draft-window is given; --no-lazy-draft prefills it up front")
    parser.add_argument("--suffix-cache", type=_non_negative_int, default=0, metavar="N",
                        help="with --suffix, --lazy-draft or --draft none: also copy repeats from the outputs of "
                             "the last N finished sequences (requests that resemble each other; 0: off)")
    parser.add_argument("--draft-window", type=_non_negative_int, default=0, metavar="N",
                        help="prefill the draft model on each prompt's last N tokens only (0: the whole prompt); "
                             "long prompts then cost the draft far less; lossless")
    parser.add_argument("--target-dtype", choices=list(TARGET_DTYPES), default="auto",
                        help="the target's format: fp32 (the packaged weights, dequantized); int8 (CPU: per-channel "
                             "weights, per-row activations); q4k (CPU with AVX2: the GGUF's own Q4_K/Q6_K blocks, "
                             "int8 activations per row, each layer one native call); auto (default): the fastest "
                             "format measured on this machine among those whose quality passed the check against "
                             "fp32 for this model (fp32 for models without a check). Output is exactly that "
                             "format's own plain decoding")


DRAFT_VOCAB_HELP = (
    "the draft proposes only token ids below N, plus the EOS ids (0: the whole vocabulary); lossless, the target "
    "still decides every token. Default: $CASTSPEC_DRAFT_VOCAB if set, else 65536: its output head then costs 2.9 "
    "instead of 6.9 ms of a ~50 ms draft forward (AVX2 host, benchmarks/draft_cost), while only 1.6-9.3%% of the "
    "target's tokens on HumanEval and Spec-Bench have larger ids (4.7-15.7%% for 32768)")


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0, "0 or more")


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0 .. 65535, got {value}")
    return value


def _draft_vocab(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (the whole vocabulary) or more, got {value}")
    return value


def _check_writable(directory: Path, flag: str) -> None:
    """Fail at once, not after minutes or hours of measuring, when `directory` (made if missing) takes no files."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".castspec-write-test-"):
            pass
    except OSError as err:
        raise CastspecError(f"cannot write to {flag} {directory}: {err.strerror or err}") from None


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise CastspecError(f"{flag} must be comma-separated whole numbers, got '{text}'") from None
    if not values or values[0] < 1:
        raise CastspecError(f"{flag} needs positive whole numbers, got '{text}'")
    return values


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from castspec.api import load_generator
    from castspec.cost.profiler import Grid, expected_meta, measured_under_load, profile, table_path
    from castspec.models.packaged import castspec_home

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is not None:
        _check_writable(args.out.parent, "--out")
    grid = Grid(batch_sizes=_int_list(args.batch_sizes, "--batch-sizes"),
                contexts=_int_list(args.contexts, "--contexts"), tokens=_int_list(args.tokens, "--tokens"),
                repeats=args.repeats)
    gen = load_generator(args.target, args.draft, "chain", device=args.device, fast_kernels=not args.no_fast_kernels,
                         draft_quant=args.draft_quant, target_dtype=args.target_dtype, draft_vocab=args.draft_vocab)
    runtimes = gen.runtimes  # the target, and the draft model unless --draft none: the runners the engine drives
    table = profile(runtimes, grid)
    out = args.out or table_path(expected_meta(runtimes), castspec_home())
    table.save(out)
    busy = measured_under_load(table)
    if busy is not None:
        print(f"castspec: warning: other processes kept {busy} cores busy during the profile: its times include "
              f"that load (saved as asked; measure again on an idle machine)", file=sys.stderr)
    print(_cost_summary(table))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cost_summary(table) -> str:
    lines = []
    for role in table.ms:
        for bi, batch in enumerate(table.batch_sizes):
            for ci, context in enumerate(table.contexts):
                row = table.ms[role][bi][ci]
                one = row[0]
                cells = " ".join(f"{n}:{t:.0f}" + (f"({t / one:.1f}x)" if one else "")
                                 for n, t in zip(table.tokens, row, strict=True) if t is not None)
                lines.append(f"{role:6s} B={batch:<2d} c={context:<5d} ms by n: {cells}")
    ratios = table.draft_ratios()
    if ratios is not None:
        lines.append("draft / target at n = 1 (one draft level over n tokens against one plain decoding step):")
        for bi, batch in enumerate(table.batch_sizes):
            for ci, context in enumerate(table.contexts):
                cells = " ".join(f"{n}:{r:.3f}" for n, r in zip(table.tokens, ratios[bi][ci], strict=True)
                                 if r is not None)
                lines.append(f"ratio  B={batch:<2d} c={context:<5d} by n: {cells}")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from castspec.bench.datasets import load_prompts
    from castspec.bench.report import write_report
    from castspec.bench.runner import BenchConfig, report_from_records, run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.draft_vocab is not None:  # the bench loads its models through load_generator, which reads this
        from castspec.api import DRAFT_VOCAB_ENV

        os.environ[DRAFT_VOCAB_ENV] = str(args.draft_vocab)
    if args.quick:
        args.num_prompts, args.max_new_tokens = 2, 16
        args.methods = "ar,hf,chain:gamma=4,eagle2:total_tokens=16/depth=4/top_k=4,cast"
    if args.suffix:
        raise CastspecError("bench: name the methods that should merge suffix candidates POLICY+suffix "
                            "(e.g. --methods ar,cast,cast+suffix) instead of --suffix")
    if args.lazy_draft is not None:
        raise CastspecError("bench: name the methods that should buy the draft lazily POLICY+lazy "
                            "(e.g. --methods ar,cast,cast+lazy) instead of --lazy-draft")
    if args.suffix_cache:
        raise CastspecError("bench: --suffix-cache is for generate and serve (a bench compares methods on prompts "
                            "measured independently)")
    if args.draft_window:
        raise CastspecError("bench: name the methods that should read a window of the prompt METHOD@window=N "
                            "(e.g. --methods ar,cast,cast@window=256) instead of --draft-window")
    methods = _bench_methods(args.methods)
    batch_sizes = _int_list(args.batch_size, "--batch-size")
    _sampling(args)  # validate before loading prompts or models
    _check_writable(args.out, "--out")
    if not args.report_only:
        _check_llamacpp(args, methods)
    from castspec.api import resolve_draft

    draft = resolve_draft(args.target, args.draft)  # "auto" -> a model or "none", recorded as such
    if not args.report_only:
        _check_llamacpp_draft(args, methods, draft)
    datasets = args.dataset or ["humaneval"]
    prompts = [p for dataset in datasets for p in load_prompts(dataset, args.num_prompts, args.seed)]
    config = BenchConfig(target=args.target, draft=draft, methods=methods, max_new_tokens=args.max_new_tokens,
                         device=args.device, draft_quant=args.draft_quant, target_dtype=args.target_dtype,
                         cost_table=args.cost_table,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         batch_sizes=batch_sizes, datasets=datasets, num_prompts=args.num_prompts, gguf=args.gguf,
                         draft_gguf=args.draft_gguf, llama_speculative=args.llama_speculative,
                         reuse_prefix=args.reuse_prefix)
    command = "castspec " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--report-only")
    if args.report_only:
        previous = args.out / "results.json"
        try:  # keep the command that measured the records, not this re-rendering one
            command = json.loads(previous.read_text()).get("command", command)
        except (OSError, ValueError, AttributeError):
            pass
        results = report_from_records(config, prompts, args.out)
    else:
        results = run_bench(config, prompts, out_dir=args.out, resume=args.resume,
                            on_group=lambda partial: write_report(partial, args.out, command))
    paths = write_report(results, args.out, command)
    if not args.report_only:
        print(paths[1].read_text())
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def _bench_methods(text: str) -> list[str]:
    """The --methods list, each policy spec checked now (a typo should not wait for the models to load)."""
    from castspec.bench.runner import is_policy, policy_spec
    from castspec.policies import make_policy

    methods = [m.strip().replace("/", ",") for m in text.split(",") if m.strip()]
    if not methods:
        raise CastspecError("--methods is empty; e.g. --methods ar,hf,cast")
    for method in methods:
        if is_policy(method):
            make_policy(policy_spec(method))
    return methods


def _check_llamacpp(args: argparse.Namespace, methods: list[str]) -> None:
    """The llama.cpp methods' needs, checked before anything loads: llama-cpp-python, greedy, a GGUF to decode, and
    for llama.cpp-spec its binary."""
    from castspec.bench.llamacpp import (
        PLAIN,
        check_llamacpp_settings,
        find_spec_binary,
        gguf_for,
        is_llamacpp_method,
        require_llamacpp,
    )

    wanted = [m for m in methods if is_llamacpp_method(m)]
    if not wanted:
        if args.gguf or args.draft_gguf or args.llama_speculative:
            raise CastspecError("--gguf, --draft-gguf and --llama-speculative are for the llama.cpp methods, which "
                                "--methods does not include")
        return
    check_llamacpp_settings(methods, args.temperature)
    require_llamacpp(methods)
    gguf_for(args.target, args.gguf, assemble=False)
    if any(m != PLAIN for m in wanted):
        find_spec_binary(args.llama_speculative)


def _check_llamacpp_draft(args: argparse.Namespace, methods: list[str], draft: str | None) -> None:
    """llama.cpp-spec with a draft model needs one, and its GGUF: `draft` is --draft with "auto" decided."""
    from castspec.api import NO_DRAFT
    from castspec.bench.llamacpp import PLAIN, gguf_for, is_llamacpp_method, spec_needs_draft

    drafting = [m for m in methods if is_llamacpp_method(m) and m != PLAIN and spec_needs_draft(m)]
    if not drafting:
        return
    if draft is None or draft == NO_DRAFT:
        raise CastspecError(f"{drafting[0]} drafts with a draft model, and this run has none (--draft {args.draft}); "
                            "give --draft MODEL")
    gguf_for(draft, args.draft_gguf, assemble=False, role="draft", flag="--draft-gguf")


def _decoder_arguments(parser: argparse.ArgumentParser, profiled_for: str) -> None:
    """The kernel and cost-table options of the commands that decode (generate, chat, serve)."""
    parser.add_argument("--no-fast-kernels", action="store_true", help="keep stock nn.Linear kernels on CPU")
    parser.add_argument("--cost-table", default=None,
                        help="cost table for cast (default: the one cached for this device and pair, else a quick "
                             f"profile for {profiled_for})")


def _load_decoder(args: argparse.Namespace, policy, max_batch_size: int = 1):
    """The generator `generate`, `chat` and `serve` decode with, from their shared options."""
    from castspec.api import load_generator

    return load_generator(args.target, args.draft if policy.uses_draft else None, policy, device=args.device,
                          fast_kernels=not args.no_fast_kernels, draft_quant=args.draft_quant,
                          target_dtype=args.target_dtype, cost_table=args.cost_table, max_batch_size=max_batch_size,
                          draft_vocab=args.draft_vocab, suffix=args.suffix, draft_window=args.draft_window,
                          suffix_cache=args.suffix_cache, lazy_draft=args.lazy_draft)


def _sampling_arguments(parser: argparse.ArgumentParser, seed: int | None = None,
                        seed_help: str = "random seed: the same seed repeats the output (default: a fresh one)",
                        ) -> None:
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (output identical to the target's); > 0 samples exactly the target's "
                             "distribution")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--seed", type=int, default=seed, help=seed_help)


def _sampling(args: argparse.Namespace) -> dict:
    from castspec.verify import SamplingConfig

    SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)  # validates, with a clear error
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from castspec.policies import make_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = _read_prompt(args)
    prompts = [line for line in prompt.splitlines() if line.strip()] if args.batch_size > 1 else [prompt]
    if args.compare and args.batch_size > 1:
        raise CastspecError("--compare measures one prompt; drop --batch-size (use `castspec bench` for batches)")
    sampling = {**_sampling(args), "stop": _stops(args)}
    policy = make_policy(args.policy)
    gen = _load_decoder(args, policy, max_batch_size=min(args.batch_size, len(prompts)))
    if args.batch_size > 1:
        return _generate_batches(args, gen, prompts, sampling)
    gen.generate(prompt, max_new_tokens=2, chat=args.chat)  # warm-up: first-call allocations are not speed
    gen.forget_prefix()  # the measured call prefills its prompt whole, as a first request would
    streamer = None if args.json else _streamer(gen.tokenizer, sampling["stop"])
    result = gen.generate(prompt, max_new_tokens=args.max_new_tokens, chat=args.chat, on_tokens=streamer, **sampling)
    if streamer is not None:
        print()
    out = {"text": result.text, "token_ids": result.token_ids, "new_tokens": len(result.token_ids),
           "prompt_tokens": result.prompt_tokens, "policy": policy.describe(), "stats": result.stats.as_dict()}
    baseline = _compare_with_ar(args, gen, prompt, result, sampling, out) if args.compare else None
    if args.json:
        print(json.dumps(out))
        return 0
    if args.verbose:
        for number, plan in enumerate(result.stats.plans or [], start=1):
            print(f"step {number}: " + ", ".join(f"{k}={v}" for k, v in plan.items()), file=sys.stderr)
    s = result.stats
    label = " ".join([policy.name] + [f"{k}={v}" for k, v in policy.describe().items() if k != "policy"])
    print(f"\n[{label}] {s.new_tokens} tokens in {s.wall_s:.2f} s = {s.tokens_per_s:.2f} tok/s; "
          f"{s.steps} target steps, {s.mean_accept_len:.2f} tokens per step "
          f"(draft {s.draft_s:.2f} s, verify {s.verify_s:.2f} s)", file=sys.stderr)
    if baseline is not None:
        _print_comparison(args, baseline, out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from castspec.policies import make_policy
    from castspec.server.app import listen, serve

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.shutdown_timeout >= 0:
        raise CastspecError(f"--shutdown-timeout must be 0 or more seconds, got {args.shutdown_timeout}")
    listen(args.host, args.port).close()  # a bad address or a busy port fails now, not after loading the models
    policy = make_policy(args.policy)
    gen = _load_decoder(args, policy, max_batch_size=args.max_batch_size)
    gen.generate(gen.encode("Hello"), max_new_tokens=2)  # warm-up: first-call allocations are not a request's time
    gen.forget_prefix()
    serve(gen, args.target, args.host, args.port, args.max_batch_size, args.max_queue, args.shutdown_timeout)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from castspec.bench.serve_load import LoadConfig, parse_rates, run

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise CastspecError("--methods is empty")
    if not Path(args.spec_bench).is_file():
        raise CastspecError(f"Spec-Bench file not found: {args.spec_bench} (give --spec-bench PATH)")
    _check_writable(args.out, "--out")
    config = LoadConfig(target=args.target, draft=args.draft, methods=methods, rates=parse_rates(args.rates),
                        num_requests=args.num_requests, max_tokens=args.max_tokens, seed=args.seed,
                        max_batch_size=args.max_batch_size, threads=args.threads, spec_bench=args.spec_bench,
                        server_args=["--target-dtype", args.target_dtype])
    results = run(config, args.out, resume=args.resume)
    print((args.out / "results.md").read_text())
    return 0 if results["by_rate"] else 1


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt text from --prompt, --prompt-file or the built-in default; an empty one is refused."""
    if args.prompt_file is None:
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
        if not prompt.strip():
            raise CastspecError("the prompt is empty")
    else:
        try:
            prompt = args.prompt_file.read_text(encoding="utf-8")
        except OSError as err:
            raise CastspecError(f"cannot read --prompt-file: {err.strerror}: {args.prompt_file}") from None
        except UnicodeDecodeError:
            raise CastspecError(f"cannot read --prompt-file: not UTF-8 text: {args.prompt_file}") from None
        if not prompt.strip():
            raise CastspecError(f"--prompt-file {args.prompt_file} is empty (only whitespace); put the prompt in it")
    if args.batch_size > 1 and args.prompt_file is None:
        raise CastspecError("--batch-size needs --prompt-file with one prompt per line")
    return prompt


def _compare_with_ar(args: argparse.Namespace, gen, prompt: str, result, sampling: dict, out: dict):
    """Plain decoding of the same prompt as the baseline, recorded in `out`; returns its result.

    The baseline is policy `ar`: the target alone, one token per forward. A policy that does not use the draft
    never runs the draft model (the engine neither prefills nor feeds it), so the baseline pays nothing for it.
    """
    from castspec.policies import make_policy

    gen.policy = make_policy("ar")
    gen.forget_prefix()  # the baseline prefills the prompt whole too
    baseline = gen.generate(prompt, max_new_tokens=args.max_new_tokens, chat=args.chat, **sampling)
    out["ar"] = {"stats": baseline.stats.as_dict(per_step=False), "identical": baseline.token_ids == result.token_ids}
    out["speedup_vs_ar"] = round(baseline.stats.wall_s / result.stats.wall_s, 3)
    return baseline


def _print_comparison(args: argparse.Namespace, baseline, out: dict) -> None:
    b = baseline.stats
    if args.temperature > 0:
        same = "sampled: outputs differ by chance, the distribution is the same"
    else:
        same = "identical output" if out["ar"]["identical"] else "OUTPUT DIFFERS from ar (fp32 near-tie, see README)"
    print(f"[ar: plain decoding, target only, no draft] {b.new_tokens} tokens in {b.wall_s:.2f} s = "
          f"{b.tokens_per_s:.2f} tok/s\n"
          f"speedup over plain decoding (ar): {out['speedup_vs_ar']:.2f}x, {same}", file=sys.stderr)


def _generate_batches(args: argparse.Namespace, gen, prompts: list[str], sampling: dict) -> int:
    """Generate `args.batch_size` prompts at a time; print each result (or one JSON list)."""
    outputs = []
    for first in range(0, len(prompts), args.batch_size):
        chunk = prompts[first:first + args.batch_size]
        results = gen.generate_batch(chunk, max_new_tokens=args.max_new_tokens, chat=args.chat, **sampling)
        batch = results[0].batch_stats  # the whole call (each row's `stats.wall_s` is its own latency)
        for offset, result in enumerate(results):
            s = result.stats
            outputs.append({"index": first + offset, "text": result.text, "token_ids": result.token_ids,
                            "new_tokens": len(result.token_ids), "prompt_tokens": result.prompt_tokens,
                            "stats": s.as_dict(per_step=args.verbose), "batch": batch.as_dict()})
            if not args.json:
                print(f"=== prompt {first + offset + 1} ({s.new_tokens} tokens in {s.wall_s:.2f} s, "
                      f"{s.mean_accept_len:.2f} per step; batch of {len(chunk)}: {batch.new_tokens} tokens in "
                      f"{batch.wall_s:.2f} s = {batch.tokens_per_s:.2f} tok/s)\n{result.text}")
    if args.json:
        print(json.dumps(outputs))
    return 0


def _stops(args: argparse.Namespace) -> list[str]:
    """--stop values with \\n and \\t read as newline and tab (what a shell cannot type inline)."""
    stops = [text.replace("\\n", "\n").replace("\\t", "\t") for text in args.stop or []]
    if any(not text for text in stops):
        raise CastspecError("--stop needs a non-empty text")
    return stops


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from castspec.policies import make_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    sampling = _sampling(args)
    policy = make_policy(args.policy)
    gen = _load_decoder(args, policy)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    gen.generate(gen.encode_conversation(opening + [{"role": "user", "content": "Hello"}]), max_new_tokens=2)
    gen.forget_prefix()  # warm-up done (and the template checked before the first line is typed)
    history = list(opening)
    for line in _chat_lines():
        message = line.strip()
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            history = list(opening)
            continue
        if message:
            history = _chat_turn(args, gen, history, message, sampling)
    return 0


def _chat_lines():
    """The user's messages: prompted lines on a terminal, else the lines of the input as they come."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()
            return


def _chat_turn(args: argparse.Namespace, gen, history: list[dict[str, str]], message: str,
               sampling: dict) -> list[dict[str, str]]:
    """Answer one message (streamed); the conversation with it and its answer. A turn that fails (e.g. the
    conversation no longer fits in the context) is reported on one line and left out."""
    messages = history + [{"role": "user", "content": message}]
    try:
        ids = gen.encode_conversation(messages)
        result = gen.generate(ids, max_new_tokens=args.max_new_tokens, on_tokens=_streamer(gen.tokenizer, []),
                              **sampling)
    except CastspecError as err:
        print(f"castspec: error: {err} (/reset starts over)", file=sys.stderr)
        return history
    print()
    s = result.stats
    print(f"[{len(result.token_ids)} tokens, {s.tokens_per_s:.1f} tok/s, {s.mean_accept_len:.2f} tokens/step; prompt "
          f"{result.prompt_tokens} tokens, {s.cached_tokens} reused, prefill {s.prefill_s:.2f} s]", file=sys.stderr)
    return messages + [{"role": "assistant", "content": result.text}]


def _streamer(tokenizer, stop: list[str]):
    """Print accepted text as it comes; text that may begin a stop string waits until the next tokens decide."""
    from castspec.text import IncrementalText

    text = IncrementalText(tokenizer, stop)

    def on_tokens(tokens: list[int]) -> None:
        if not text.stopped:
            sys.stdout.write(text.feed(tokens)[0])
            sys.stdout.flush()

    return on_tokens


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CastspecError as err:
        print(f"castspec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
