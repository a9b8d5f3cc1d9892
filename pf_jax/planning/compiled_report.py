"""The compiled plan as a table, a verdict and JSON (`--dry-run --topology NAME [--json PATH]`).

    programs    per device: XLA's argument / output / temporary / generated-code / alias bytes, FLOPs and
                bytes accessed (XLA's cost analysis, per device), compile seconds, the program's peak
    resident    what lives across programs, per device, beside the analytic planner's row (a difference
                over 20% gets its one-line reason)
    verdict     the largest peak against the chip's HBM; when it does not fit, the program, its bytes and
                the settings that bring it down
    FLOPs       the train step's matmul FLOPs per update against 6·N·tokens (what remat and the chunked
                log-probs cost)
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from pf_jax.config.recipe import TrainConfig
from pf_jax.planning.compiled_plan import CompiledPlan, ProgramPlan

ANALYTIC_ROWS = {"parameters": "policy parameters", "optimizer state": "optimizer state",
                 "reference": "reference model", "sampler policy copy": "sampler policy copy", "KV cache": "KV cache",
                 "async parameter versions": "async parameter versions"}


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


def _count(x: float | None) -> str:
    if x is None:
        return "—"
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= size:
            return f"{x / size:,.2f} {unit}"
    return f"{x:,.0f}"


def advice(plan: CompiledPlan, cfg: TrainConfig) -> list[str]:
    """Settings that lower the peak program's bytes, most direct first (empty when the plan fits)."""
    if plan.fits or _broken(plan):  # a program that does not build is not a memory problem
        return []
    p, resident = plan.peak_program, plan.peak_bytes - plan.peak_program.transient_bytes
    out = []
    if resident > plan.topology.hbm_bytes or p.transient_bytes < resident:
        out.append(f"mesh.fsdp / a larger slice: {human_bytes(resident)} per device is resident before "
                   f"{p.name} runs (parameters, optimizer state, copies)")
    if p.name == "train step":
        m, o = cfg.model, cfg.optimizer
        if not m.remat:
            out.append("model.remat=true: recompute each layer's activations in the backward pass")
        out.append(f"optimizer.grad_accum_steps={2 * o.grad_accum_steps}: half the rows per micro-batch")
        if m.logprob_chunk > 32:
            out.append(f"model.logprob_chunk={m.logprob_chunk // 2}: half the [chunk, vocab] logits")
    elif p.name.startswith("sampler"):
        out.append(f"rollout.max_new_tokens (now {cfg.rollout.max_new_tokens}): the KV cache and the decode "
                   f"buffers grow with it")
        out.append("rollout.prompts_per_step / samples_per_prompt: fewer rows per sampler call")
    else:
        out.append(f"model.logprob_chunk={cfg.model.logprob_chunk // 2}: half the [chunk, vocab] logits")
    return out


def _difference(name: str, plan: CompiledPlan, cfg: TrainConfig) -> str:
    """Why the compiled figure of row `name` differs from the analytic planner's."""
    s = plan.sizes
    if name == "KV cache":
        return (f"analytic: {cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens} slots in bfloat16; the "
                f"sampler's cache: prompt bucket {s.prompt_len} + {cfg.rollout.max_new_tokens} slots in model.dtype "
                f"({cfg.model.dtype}), rows padded to the row shards")
    if name == "sampler policy copy":
        return ("analytic: the whole policy in model.dtype; the trainer casts only the matrices and only under "
                "mixed precision, and on one device reads the training arrays (no copy)")
    if name == "parameters":
        return "compiled: the trained heads (log Z / value / classifier) beside the policy; analytic: the policy"
    if name == "optimizer state":
        return "compiled: the heads' optimizer state too; analytic: the policy's"
    if name == "total":
        p = plan.peak_program
        extra = [f"{k} {human_bytes(plan.resident[k])}" for k in p.alive
                 if plan.resident.get(k) and k not in ANALYTIC_ROWS]
        beside = f", beside {', '.join(extra)} that the analytic rows leave out" if extra else ""
        return (f"analytic: every row at once plus one fp32 gradient copy or the NLL step's temporaries; compiled: "
                f"{p.name} alive with its {human_bytes(p.transient_bytes)} of temporaries, code and buffers{beside}")
    return "layouts differ"


def comparison(plan: CompiledPlan, cfg: TrainConfig) -> list[tuple[str, int, int | None, str]]:
    """(row, compiled per-device bytes, analytic per-device bytes or None, reason when they differ by >20%)."""
    analytic = {r.name: r.per_device_bytes for r in plan.analytic.rows}
    alive = {name for p in plan.programs if p.runs for name in p.alive}  # e.g. no sampler copy for SFT's step
    rows = [(name, plan.resident.get(name, 0), analytic.get(ANALYTIC_ROWS.get(name, "")))
            for name in plan.resident if name in alive]
    rows.append(("total", plan.peak_bytes, plan.analytic.per_device_bytes))
    out = []
    for name, compiled, planned in rows:
        if not compiled and not planned:
            continue
        differs = planned is not None and abs(compiled - planned) > 0.2 * max(compiled, planned, 1)
        out.append((name, compiled, planned, _difference(name, plan, cfg) if differs else ""))
    return out


def _broken(plan: CompiledPlan) -> list[ProgramPlan]:
    return [p for p in plan.programs if p.runs and p.error and not p.out_of_memory]


def verdict(plan: CompiledPlan) -> str:
    """'fits: ...', 'does NOT fit: <program> needs <bytes> ...' or 'does NOT compile: <program>: <error>'."""
    t, p = plan.topology, plan.peak_program
    if broken := _broken(plan):
        return f"does NOT compile for {t.name}: " + "; ".join(f"{q.name}: {q.error}" for q in broken)
    hbm, peak = t.hbm_bytes, plan.peak_bytes
    where = f"{t.device_kind} ({human_bytes(hbm)} HBM), {t.name}"
    if plan.fits:
        return f"fits: peak {human_bytes(peak)} per device in {p.name}, headroom {human_bytes(hbm - peak)} on {where}"
    failed = [q.name for q in plan.programs if q.runs and q.out_of_memory]
    reason = f"; the compiler ran out of HBM in {', '.join(failed)}" if failed else ""
    return (f"does NOT fit: {p.name} needs {human_bytes(peak)} per device ({human_bytes(p.transient_bytes)} of its own "
            f"+ {human_bytes(peak - p.transient_bytes)} resident), {human_bytes(peak - hbm)} over {where}{reason}")


def flops_line(plan: CompiledPlan) -> str:
    """The train step's matmul FLOPs against 6·N·tokens, and what XLA's cost analysis reports."""
    train = next(p for p in plan.programs if p.name == "train step")
    analytic = 6.0 * plan.num_params * plan.tokens_per_update
    xla = "—" if train.flops is None else f"{_count(train.flops)} per device x {plan.topology.size}"
    ratio = f"{plan.train_matmul_flops / analytic:.2f}" if plan.train_matmul_flops else "—"
    return (f"train step FLOPs per update: {_count(plan.train_matmul_flops)} (matmuls of the traced step, loops "
            f"times their trip count) = {ratio} x 6·N·tokens (N = {plan.num_params:,} policy parameters, "
            f"{plan.tokens_per_update:,} tokens); XLA's cost analysis: {xla} (it counts a loop body once: the "
            f"layer scan and the log-prob chunks)")


def _program_table(plan: CompiledPlan) -> Any:
    from rich.table import Table

    mesh = ", ".join(f"{k}={v}" for k, v in plan.mesh.items())
    t = plan.topology
    table = Table(title=f"{plan.recipe}: compiled for {t.name} ({t.size} x {t.device_kind}), mesh ({mesh}); per device")
    for column in ("program", "arguments", "outputs", "temp", "code", "alias", "peak", "XLA FLOPs", "bytes accessed",
                   "compile s"):
        table.add_column(column, justify="left" if column == "program" else "right")
    for p in plan.programs:
        table.add_row(p.name if p.runs else f"{p.name} (not run)", *(human_bytes(x) for x in (p.argument_bytes, p.output_bytes, p.temp_bytes, p.code_bytes,
                                                         p.alias_bytes, p.peak_bytes(plan.resident))),
                      _count(p.flops), human_bytes(p.bytes_accessed), f"{p.compile_s:.1f}")
    return table


def _resident_table(plan: CompiledPlan, cfg: TrainConfig) -> Any:
    from rich.table import Table

    table = Table(title="resident per device (compiled layout) beside the analytic planner")
    for column in ("item", "compiled", "analytic", "why they differ (> 20%)"):
        table.add_column(column, justify="right" if column in ("compiled", "analytic") else "left")
    for name, compiled, planned, why in comparison(plan, cfg):
        table.add_row(name, human_bytes(compiled), human_bytes(planned), why)
    return table


def format_compiled_plan(plan: CompiledPlan, cfg: TrainConfig) -> str:
    """The two tables, the programs' notes, the FLOPs line, the verdict and its advice."""
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=150, force_terminal=False, color_system=None, markup=False)
    console.print(_program_table(plan))
    console.print("  peak: resident items alive while the program runs + its own bytes; XLA FLOPs and bytes accessed "
                  "count each loop body once (layer scan, log-prob chunks, decode steps)")
    for p in plan.programs:
        kernels = f"; {p.kernels} Pallas kernel call(s) (splash or paged attention)" if p.kernels else ""
        console.print(f"  {p.name}: {p.note}{kernels}" + (f"  [failed: {p.error}]" if p.error else ""))
    console.print(_resident_table(plan, cfg))
    console.print(flops_line(plan))
    console.print(plan.assumed)
    console.print(verdict(plan))
    for line in advice(plan, cfg):
        console.print(f"  try {line}")
    return buf.getvalue()


def _program_json(p: ProgramPlan, resident: dict[str, int]) -> dict[str, Any]:
    return {"name": p.name, "note": p.note, "argument_bytes": p.argument_bytes, "output_bytes": p.output_bytes,
            "temp_bytes": p.temp_bytes, "generated_code_bytes": p.code_bytes, "alias_bytes": p.alias_bytes,
            "flops_per_device": p.flops, "bytes_accessed_per_device": p.bytes_accessed, "compile_s": p.compile_s,
            "alive": list(p.alive), "transient_bytes": p.transient_bytes, "peak_bytes": p.peak_bytes(resident),
            "error": p.error, "out_of_memory": p.out_of_memory, "runs": p.runs, "pallas_kernels": p.kernels}


def plan_json(plan: CompiledPlan, cfg: TrainConfig) -> dict[str, Any]:
    """Everything the tables show, bytes per device: peak_bytes and fits at the top level."""
    t = plan.topology
    return {
        "recipe": plan.recipe, "topology": t.name, "device_kind": t.device_kind, "devices": t.size,
        "mesh": plan.mesh, "hbm_bytes": t.hbm_bytes, "peak_bytes": plan.peak_bytes,
        "peak_program": plan.peak_program.name, "headroom_bytes": t.hbm_bytes - plan.peak_bytes, "fits": plan.fits,
        "compiles": not _broken(plan),
        "verdict": verdict(plan), "advice": advice(plan, cfg),
        "programs": [_program_json(p, plan.resident) for p in plan.programs], "resident_bytes": plan.resident,
        "analytic": {"per_device_bytes": plan.analytic.per_device_bytes,
                     "rows": {r.name: r.per_device_bytes for r in plan.analytic.rows}, "assumed": plan.assumed},
        "comparison": [{"item": n, "compiled": c, "analytic": a, "why": w} for n, c, a, w in comparison(plan, cfg)],
        "train_flops": {"matmul_flops_per_update": plan.train_matmul_flops, "policy_params": plan.num_params,
                        "tokens_per_update": plan.tokens_per_update,
                        "ratio_to_6NT": (plan.train_matmul_flops or 0.0) / (6.0 * plan.num_params * plan.tokens_per_update)},
    }


def write_json(plan: CompiledPlan, cfg: TrainConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan_json(plan, cfg), indent=2))
    return path
