"""`python -m pf_jax.eval`: sample or score responses and write a run dir (table, JSON, plots, Markdown).

Generating mode: sample from one or more models with one or more methods, then score:

    python -m pf_jax.eval --problems arithmetic --model base=arith-base \\
        --model powerflow=runs/powerflow-arith/export --methods base:T=1 lowtemp:alpha=4 \\
        power:alpha=4,block=3,steps=4 --n 16 --max-new-tokens 6 --run-dir runs/eval-arith

--model takes anything `model.name` of a training recipe takes (a run's export dir, arith-base, tiny,
gemma3-270m, a .gguf file, a hub name), optionally as label=spec; methods are described in
``evaluation.generation``. --problems: a .jsonl file, `arithmetic` (the default run's synthetic test
split; `arithmetic:train` for the other), or a benchmark name (math500, gsm8k, ...; needs the hub).

Scoring mode: score existing response files:

    python -m pf_jax.eval --problems problems.jsonl --responses base.jsonl powerflow.jsonl \\
        --checker math --semantic --run-dir runs/eval

Each responses file holds one JSON object per problem:
    {"problem_id": "...", "responses": ["...", ...], "method": "power", "settings": {"alpha": 4}}
("method" defaults to the file's stem; "settings" is optional). Rows are matched to problems by
problem_id.

A mistake in the arguments, files or models is one line on stderr and exit code 2 (`cli`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pf_jax.config.errors import ConfigError, exit_code_of
from pf_jax.data.rows import DataFileError
from pf_jax.evaluation.answer_checkers import CHECKERS, AnswerChecker, checker_by_name
from pf_jax.evaluation.problems import jsonl_lines, load_problems
from pf_jax.evaluation.report import write_report
from pf_jax.evaluation.scoring import MethodResult, Problem, score_responses


def read_response_file(path: str | Path, problems: Sequence[Problem]) -> dict[str, tuple[dict, list[list[str]]]]:
    """{method: (settings, responses [P][n] in problem order)} from one responses jsonl."""
    path = Path(path)
    by_method: dict[str, tuple[dict[str, Any], dict[str, list[str]]]] = {}
    for line_number, row in jsonl_lines(path, "responses file"):
        if not isinstance(row, dict) or "problem_id" not in row or not isinstance(row.get("responses"), list):
            raise DataFileError(f"{path}:{line_number}: expected {{'problem_id': str, 'responses': [str, ...]}}")
        settings, rows = by_method.setdefault(str(row.get("method", path.stem)), (row.get("settings", {}), {}))
        rows[str(row["problem_id"])] = [str(text) for text in row["responses"]]
    out = {}
    for method, (settings, rows) in by_method.items():
        missing = [p.problem_id for p in problems if p.problem_id not in rows]
        if missing:
            raise DataFileError(f"{path}: method {method!r} has no responses for problem ids {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        out[method] = (settings, [rows[p.problem_id] for p in problems])
    return out


SYNTHETIC_PROBLEMS = ("arithmetic", "arithmetic:test", "arithmetic:train")


def load_eval_problems(source: str, limit: int | None, prompt_field: str, answer_field: str) -> list[Problem]:
    """Problems from a .jsonl file, the synthetic arithmetic task, or a benchmark name."""
    if source in SYNTHETIC_PROBLEMS:
        from pf_jax.tasks.arithmetic import arithmetic_task_rows

        split = source.partition(":")[2] or "test"
        rows = arithmetic_task_rows(split)[:limit]
        return [Problem(str(r["prompt"]), r["answer"], f"{split}-{i}") for i, r in enumerate(rows)]
    if Path(source).suffix == ".jsonl":
        return load_problems(source, limit=limit, prompt_field=prompt_field, reference_field=answer_field)
    return load_problems(source, limit=limit)


def _checker(name: str, problems_source: str) -> AnswerChecker:
    if name == "auto":
        name = "arithmetic" if problems_source in SYNTHETIC_PROBLEMS else "math"
    if name == "arithmetic":
        from pf_jax.tasks.arithmetic import ARITHMETIC_CHECKER

        return ARITHMETIC_CHECKER
    return checker_by_name(name)


def parse_model_entry(entry: str) -> tuple[str, str]:
    """``label=spec`` or ``spec`` -> (label, spec); the default label of ``runs/NAME/export`` is NAME."""
    label, eq, spec = entry.partition("=")
    if eq and label and "/" not in label:
        return label, spec
    path = Path(entry.rstrip("/"))
    return (path.parent.name if path.name == "export" and path.parent.name else path.name or entry), entry


def _template(text: str | None) -> str:
    if text is None:
        return "{prompt}"
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise ConfigError(f"prompt template file {path} does not exist")
        text = path.read_text().rstrip("\n")  # an editor's final newline is not part of the prompt
    if "{prompt}" not in text:
        raise ConfigError(f"prompt template must contain '{{prompt}}', got {text[:80]!r}")
    return text


def _method_names(methods: Sequence[Any]) -> list[str]:
    """kind, or kind-b{block}s{steps} / kind-{i} where two methods would share kind, alpha and temperature
    (the report labels results by name, alpha and temperature)."""
    keys = [(m.kind, m.alpha, m.temperature) for m in methods]
    names = []
    for i, m in enumerate(methods):
        if keys.count(keys[i]) == 1:
            names.append(m.kind)
        elif m.kind == "power":
            names.append(f"power-b{m.block_size}s{m.mcmc_steps}")
        else:
            names.append(f"{m.kind}-{i}")
    return names


def generate_results(args: argparse.Namespace, problems: Sequence[Problem], checker: AnswerChecker,
                     embedder: Any, ks: Sequence[int] | None) -> list[MethodResult]:
    """Sample every (model, method) pair on the problems and score it (a rich progress bar per pair)."""
    import jax
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pf_jax.config.recipe import ModelSection
    from pf_jax.evaluation.generation import (
        GenerationStats,
        model_generate_fn,
        parse_sampling_method,
        stop_token_ids_for,
    )
    from pf_jax.evaluation.scoring import evaluate_method
    from pf_jax.models.decoder import with_layer_layout
    from pf_jax.training.bases import prepare_model
    from pf_jax.training.model_source import load_policy

    methods = [parse_sampling_method(m) for m in args.methods]
    entries = [parse_model_entry(m) for m in args.model]
    labels = [label for label, _ in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--model labels must be distinct, got {labels}; name them as label=spec")
    template = _template(args.template)
    prompts = [Problem(template.replace("{prompt}", p.prompt), p.reference, p.problem_id) for p in problems]
    results = []
    key = jax.random.key(args.seed)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        for label, spec in entries:
            section = ModelSection(name=spec, dtype=args.dtype, chat_template=args.chat_template)
            prepare_model(section, args.runs_dir)
            model, codec = load_policy(section, runs_dir=args.runs_dir)
            if jax.default_backend() == "cpu" and model.scan_layers and model.cfg.num_layers > 1:
                model = with_layer_layout(model, scan_layers=False)  # faster CPU decode (see models.decoder)
            stops = stop_token_ids_for(codec, args.stop or [])
            for index, (method, method_name) in enumerate(zip(methods, _method_names(methods))):
                name = method_name if len(entries) == 1 else f"{label}/{method_name}"
                task = bar.add_task(f"{name} {method.settings()}", total=len(prompts))
                stats = GenerationStats()
                fn = model_generate_fn(model, codec, method, max_new_tokens=args.max_new_tokens,
                                       stop_token_ids=stops, prompts_per_call=args.prompts_per_call,
                                       on_progress=lambda k, task=task: bar.advance(task, k), stats=stats)
                settings = {"model": spec, **method.settings()}
                result = evaluate_method(name, prompts, fn, args.n, jax.random.fold_in(key, index), checker,
                                         settings, embedder, ks)
                result.metrics["gen_seconds"] = stats.seconds
                result.metrics["tokens_per_response"] = stats.tokens / (len(prompts) * args.n)
                if stats.acceptance:
                    result.metrics["acceptance"] = float(sum(stats.acceptance) / len(stats.acceptance))
                results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> list[MethodResult]:
    parser = argparse.ArgumentParser(prog="python -m pf_jax.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--problems", required=True,
                        help="a .jsonl file, 'arithmetic' (synthetic test split) or a benchmark name (math500, ...)")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--limit", type=int, default=None, help="first N problems only")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--responses", nargs="+", help="responses jsonl files (scoring mode, see module doc)")
    source.add_argument("--model", action="append", help="[label=]model spec to sample from (repeatable)")
    parser.add_argument("--methods", nargs="+", default=["base:T=1"],
                        help="sampling methods: base:T=1 lowtemp:alpha=4 power:alpha=4,block=8,steps=4")
    parser.add_argument("--n", type=int, default=8, help="samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--stop", action="append", help="stop string of one token, e.g. '\\n' (repeatable)")
    parser.add_argument("--template", default=None, help="prompt template with {prompt}, or @file holding one")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--prompts-per-call", type=int, default=16, help="prompts per compiled sampler call")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--runs-dir", default="runs", help="where arith-base is found (or built)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checker", default="auto", choices=["auto", "arithmetic", *sorted(CHECKERS)])
    parser.add_argument("--semantic", action="store_true", help="semantic diversity with all-MiniLM-L6-v2")
    parser.add_argument("--ks", default=None, help="comma-separated k for pass@k (default powers of two)")
    parser.add_argument("--quality-metric", default=None, help="y axis of the Pareto plot (default avg@n)")
    parser.add_argument("--diversity-metric", default=None,
                        help="x axis of the Pareto plot (default: the first measure that differs across methods; short "
                             "answers: distinct_answers, answer_entropy; long text: distinct_2, distinct_1)")
    parser.add_argument("--run-dir", default="runs/eval")
    parser.add_argument("--title", default="evaluation")
    args = parser.parse_args(argv)
    if args.n < 1 or args.max_new_tokens < 1 or args.prompts_per_call < 1:
        parser.error("--n, --max-new-tokens and --prompts-per-call must be >= 1")

    problems = load_eval_problems(args.problems, args.limit, args.prompt_field, args.answer_field)
    checker = _checker(args.checker, args.problems)
    embedder = None
    if args.semantic:
        from pf_jax.evaluation.sentence_encoder import SentenceEmbedder

        embedder = SentenceEmbedder.from_package()
    ks = [int(k) for k in args.ks.split(",")] if args.ks else None
    results = []
    began = time.perf_counter()
    if args.model:
        results = generate_results(args, problems, checker, embedder, ks)
    else:
        for path in args.responses:
            for method, (settings, responses) in read_response_file(path, problems).items():
                results.append(score_responses(method, problems, responses, checker, settings, embedder, ks))
    paths = write_report(args.run_dir, results, title=args.title, quality_metric=args.quality_metric,
                         diversity_metric=args.diversity_metric)
    if args.model:
        (Path(args.run_dir) / "command.json").write_text(json.dumps(
            {"argv": list(argv) if argv is not None else None, **{k: v for k, v in vars(args).items()},
             "seconds": time.perf_counter() - began}, indent=1, default=str))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` as a command: exit code 0, or 2 with one line on stderr for a user's mistake."""
    def run() -> int:
        main(argv)
        return 0

    return exit_code_of("pf_jax.eval", run)


if __name__ == "__main__":
    raise SystemExit(cli())
