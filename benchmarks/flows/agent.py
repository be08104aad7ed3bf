"""Agent-capability benchmark: tool selection, planning and timing on MetaTool- and BFCL-format
data, per method, as a Prefect flow logged to MLflow (experiment ``agent``).

Data: ``data_dir`` is a folder holding ``metatool/`` and/or ``bfcl/`` (as ``../shared/data/agent``),
or a MetaTool or BFCL folder itself; the default is the small sample the project ships
(``sage_prefect/examples/agent_sample``). The rules of ``../shared/data/README.md`` hold:
only ``*_dev`` files are fitted on; every other file is an evaluation set scored in full; when a
folder has only the dev file of a kind, the fixed-seed held-out fraction ``holdout_fraction`` of
it is scored and the rest fitted on — each result names the file it was scored on
(`sage_prefect.benchmark.agent`).

Tasks and methods:

- ``selection`` (MetaTool ``selection_*.csv`` over ``tools.json``): top-1/3/5 accuracy,
  recall@k, MRR per selector of ``selectors`` (`SELECTORS`);
- ``bfcl_selection`` (BFCL ``multiple``/``live_multiple``: the right function among each item's
  candidates): top-1/3 accuracy and MRR per selector (nothing to fit on: no BFCL dev data);
- ``planning`` (MetaTool ``multi_tool_*.json`` over ``tools_multi.json``): precision, recall, F1
  and exact-set accuracy of the predicted tool set per planner method;
- ``timing`` (MetaTool ``timing_*.json``, BFCL ``irrelevance``/``relevance``): accuracy,
  precision, recall, F1 of "call a tool?" per method;
- ``bfcl_calls`` (BFCL's own metric, `evaluate_bfcl_calls`): the chat model gets each BFCL case
  with its functions as OpenAI ``tools`` and ``tool_choice`` ``bfcl_tool_choice`` (``"auto"``,
  ``"required"`` or both as a list); its ``tool_calls`` are checked by BFCL's AST rules on
  ``multiple``/``live_multiple`` (right function, required/optional arguments, types, an
  acceptable value each) and must be absent on ``irrelevance``/``live_irrelevance`` (skipped under
  ``"required"``). Per file: accuracy, the share of answers with no call / unparsable arguments /
  the wrong function / wrong arguments, BFCL's error-type counts, and ``fallback_fraction``
  (requests refused, e.g. prompts longer than the model's context). ``bfcl_calls_limit`` cases
  per file (a fixed-seed subset, named in the row; ``0`` = all): long function docs make these
  prompts expensive on a CPU.

Methods that ask the chat model (``llm`` rows, ``bfcl_calls``) use ``llm_model`` (default: the
settings' ``llm_model``, the real SmolLM2-135M-Instruct on the embedded control plane) and report
``fallback_fraction`` (the share of items where the model's reply was unusable or refused and the
method fell back). Each asks the model once per item, so the ``llm`` rows score at most
``llm_limit`` items per file (``0``: as many as ``limit``).

Endpoint: the embedded control plane (or ``SAGE_CONTROLPLANE_URL``), or ``base_url``: any
OpenAI-compatible server (a vLLM server: ``-p base_url=http://gpu:8000/v1 -p llm_model=<its
model> -p 'tasks=["bfcl_calls"]'``; the selection/timing embedding methods also need an
embedding model there); the key is ``api_key`` or ``SAGE_CONTROLPLANE_API_KEY``.

Logged: one MLflow run with the parameters (data, methods, selector configs, holdout, seed,
models, git commit, machine), every metric as ``task.dataset.eval_file.method.metric``, the rows
as JSON (``results.json``; the per-case BFCL calls in ``bfcl_calls_cases.json``), bar plots per
task and file; the rows also become a Prefect table artifact.

Run::

    sage-prefect bench run agent                                          # shipped sample
    sage-prefect bench run agent -p data_dir=../shared/data/agent
    sage-prefect bench run agent -p data_dir=../shared/data/agent -p 'tasks=["selection"]' -p limit=500
    sage-prefect bench run agent -p data_dir=../shared/data/agent -p 'tasks=["bfcl_calls"]' \
        -p bfcl_calls_limit=60 -p 'bfcl_tool_choice=["auto","required"]'
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from prefect import flow

from sage_prefect.benchmark.agent import (
    BFCL_TOOL_CHOICES,
    evaluate_bfcl_calls,
    evaluate_bfcl_selection,
    evaluate_planning,
    evaluate_selection,
    evaluate_timing,
    row_metrics,
)
from sage_prefect.benchmark.plots import grouped_bars
from sage_prefect.benchmark.tracking import benchmark_run, publish_table
from sage_prefect.common.errors import ConfigError
from sage_prefect.common.settings import command_line_defaults, load_settings
from sage_prefect.controlplane.server import connect_or_start
from sage_prefect.examples import AGENT_SAMPLE_DIR
from sage_prefect.tasks.agent.data import agent_data_folders

TASKS = ("selection", "bfcl_selection", "planning", "timing", "bfcl_calls")

#: Selector label -> `ToolSelector` config. MetaTool selection fits the exemplar-based ones on
#: the ``selection_*_dev.csv`` of the folder (never on the file it scores).
SELECTORS: dict[str, dict[str, Any]] = {
    "keyword": {"method": "keyword"},
    "embedding": {"method": "embedding"},
    "hybrid": {"method": "hybrid"},
    "llm": {"method": "llm"},
    # softmax regression on embeddings + TF-IDF, fused with a kNN vote (selection.py); best on MetaTool
    "classifier": {"method": "embedding", "exemplar_mode": "classifier", "knn_k": 50},
}
PLANNERS = ("retrieval", "llm")
TIMING = ("rule", "embedding", "llm")
PLOTTED = {
    "selection": ("top1_accuracy", "top3_accuracy", "top5_accuracy", "mrr"),
    "planning": ("precision", "recall", "f1", "exact_set_accuracy"),
    "timing": ("accuracy", "precision", "recall", "f1"),
    "bfcl_calls": (
        "accuracy",
        "no_call_fraction",
        "unparsable_fraction",
        "wrong_function_fraction",
        "wrong_arguments_fraction",
        "fallback_fraction",
    ),
}


def data_folders(data_dir: str | None) -> tuple[Path | None, Path | None]:
    """(MetaTool folder, BFCL folder) under ``data_dir`` (default: the shipped sample)."""
    root = Path(data_dir).expanduser().resolve() if data_dir else AGENT_SAMPLE_DIR
    return agent_data_folders(root, "agent benchmark")


def _choose(kind: str, asked: list[str] | None, known: Any) -> list[str]:
    chosen = list(asked) if asked is not None else list(known)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise ConfigError(f"unknown {kind} {unknown[0]!r} ({kind}s: {', '.join(known)})", field=f"{kind}s")
    return chosen


def _limit(value: int | None) -> int | None:
    """A limit parameter: ``0``/``None`` mean no limit."""
    if value is not None and value < 0:
        raise ConfigError(f"a limit must be >= 0 (0: no limit), got {value}", field="limit")
    return value or None


def _llm_limit(limit: int | None, llm_limit: int | None) -> int | None:
    return min(x for x in (limit, llm_limit) if x is not None) if (limit or llm_limit) else None


def _with_model(methods: dict[str, dict[str, Any]], llm_model: str) -> dict[str, dict[str, Any]]:
    """Method configs with ``llm_model`` set on those that ask the chat model."""
    return {
        label: {**cfg, "llm_model": llm_model} if cfg.get("method") == "llm" else dict(cfg)
        for label, cfg in methods.items()
    }


def _split(methods: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(methods that do not ask the chat model, those that do)."""
    plain = {k: v for k, v in methods.items() if v.get("method") != "llm"}
    return plain, {k: v for k, v in methods.items() if v.get("method") == "llm"}


def _tool_choices(value: str | list[str]) -> list[str]:
    chosen = [value] if isinstance(value, str) else list(value)
    bad = [c for c in chosen if c not in BFCL_TOOL_CHOICES]
    if bad or not chosen:
        raise ConfigError(
            f"bfcl_tool_choice must be one or more of {', '.join(BFCL_TOOL_CHOICES)}, got {value!r}",
            field="bfcl_tool_choice",
        )
    return list(dict.fromkeys(chosen))


def _progress(label: str, done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        print(f"bfcl_calls {label}: {done}/{total}")


def _parts(
    methods: dict[str, dict[str, Any]], limit: int | None, llm_limit: int | None
) -> list[tuple[dict[str, dict[str, Any]], int | None]]:
    """The methods to evaluate with ``limit`` and those (the ``llm`` ones) with ``llm_limit``:
    one part when the limits agree."""
    if limit == llm_limit:
        return [(methods, limit)] if methods else []
    plain, llm = _split(methods)
    return [(part, lim) for part, lim in ((plain, limit), (llm, llm_limit)) if part]


def _bars(rows: list[dict[str, Any]], task: str) -> dict[str, dict[str, dict[str, float]]]:
    """{eval_file: {method: {metric: value}}} of one task's rows."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        if row["task"] == task:
            out.setdefault(f"{row['dataset']}/{row['eval_file']}", {})[row["method"]] = {
                m: float(row[m]) for m in PLOTTED[task] if isinstance(row.get(m), int | float)
            }
    return out


@flow(name="bench-agent", log_prints=True)
def agent_bench(
    data_dir: str | None = None,
    tasks: list[str] | None = None,
    selectors: list[str] | None = None,
    planners: list[str] | None = None,
    timing_methods: list[str] | None = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    llm_limit: int | None = 40,
    bfcl_calls_limit: int | None = 40,
    bfcl_tool_choice: str | list[str] = "auto",
    bfcl_max_tokens: int = 128,
    llm_model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    experiment: str = "agent",
    run_name: str | None = None,
) -> dict[str, Any]:
    """Tool selection, planning, timing and BFCL function-call accuracy per method on
    MetaTool/BFCL-format data."""
    chosen_tasks = _choose("task", tasks, TASKS)
    chosen_selectors = _choose("selector", selectors, SELECTORS)
    chosen_planners = _choose("planner", planners, PLANNERS)
    chosen_timing = _choose("timing method", timing_methods, TIMING)
    tool_choices = _tool_choices(bfcl_tool_choice)
    limit, llm_limit, bfcl_calls_limit = _limit(limit), _limit(llm_limit), _limit(bfcl_calls_limit)
    llm_lim = _llm_limit(limit, llm_limit)
    metatool, bfcl = data_folders(data_dir)
    settings = load_settings()
    model = llm_model or settings.llm_model
    methods = _with_model({label: SELECTORS[label] for label in chosen_selectors}, model)
    planner_methods = _with_model({p: {"method": p} for p in chosen_planners}, model)
    timing_methods_cfg = _with_model({t: {"method": t} for t in chosen_timing}, model)
    rows: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    with connect_or_start(base_url) as url:
        for task in chosen_tasks:
            started = time.perf_counter()
            new: list[dict[str, Any]] = []
            if task == "selection" and metatool is not None:
                for part, lim in _parts(methods, limit, llm_lim):
                    new += evaluate_selection(
                        metatool,
                        part,
                        url,
                        api_key,
                        holdout_fraction=holdout_fraction,
                        seed=seed,
                        limit=lim,
                    )
            elif task == "bfcl_selection" and bfcl is not None:
                for part, lim in _parts(methods, limit, llm_lim):
                    new += evaluate_bfcl_selection(bfcl, part, url, api_key, limit=lim, seed=seed)
            elif task == "planning" and metatool is not None:
                for i, (part, lim) in enumerate(_parts(planner_methods, limit, llm_lim)):
                    new += evaluate_planning(
                        metatool,
                        part,
                        url,
                        api_key,
                        top_k=None if i == 0 else 0,  # one selector_top row, from the first part
                        holdout_fraction=holdout_fraction,
                        seed=seed,
                        limit=lim,
                    )
            elif task == "timing":
                for part, lim in _parts(timing_methods_cfg, limit, llm_lim):
                    new += evaluate_timing(
                        metatool,
                        bfcl,
                        part,
                        url,
                        api_key,
                        holdout_fraction=holdout_fraction,
                        seed=seed,
                        limit=lim,
                    )
            elif task == "bfcl_calls" and bfcl is not None:
                for choice in tool_choices:
                    found, records = evaluate_bfcl_calls(
                        bfcl,
                        base_url=url,
                        api_key=api_key,
                        model=model,
                        tool_choice=choice,
                        limit=bfcl_calls_limit,
                        seed=seed,
                        max_tokens=bfcl_max_tokens,
                        progress=_progress,
                    )
                    new += found
                    cases += records
            seconds[task] = time.perf_counter() - started
            print(f"{task}: {len(new)} results in {seconds[task]:.1f} s")
            rows += new
    if not rows:
        raise ConfigError(
            f"agent benchmark: no data for tasks {', '.join(chosen_tasks)} in {data_dir or AGENT_SAMPLE_DIR}",
            field="tasks",
        )
    params = {
        "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir else str(AGENT_SAMPLE_DIR),
        "metatool_dir": str(metatool) if metatool else "none",
        "bfcl_dir": str(bfcl) if bfcl else "none",
        "tasks": chosen_tasks,
        "selectors": {label: json.dumps(cfg, sort_keys=True) for label, cfg in methods.items()},
        "planners": chosen_planners,
        "timing_methods": chosen_timing,
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "limit": limit,
        "llm_limit": llm_lim,
        "bfcl_calls_limit": bfcl_calls_limit,
        "bfcl_tool_choice": tool_choices,
        "bfcl_max_tokens": bfcl_max_tokens,
        "endpoint": base_url or "embedded control plane",
        "embedding_model": settings.embedding_model,
        "llm_model": model,
    }
    metrics: dict[str, float] = {f"seconds.{task}": s for task, s in seconds.items()}
    for row in rows:
        metrics |= row_metrics(row)
    headline = [
        k
        for k in metrics
        if (k.startswith("selection.") and k.endswith(("top1_accuracy", "top5_accuracy")))
        or (k.startswith("planning.") and k.endswith(".f1"))
        or (k.startswith("timing.") and k.endswith(".accuracy"))  # F1 is undefined on one-class files
        or (k.startswith("bfcl_calls.") and k.endswith((".accuracy", ".fallback_fraction")))
    ]
    with benchmark_run(experiment, params, run_name=run_name) as run:
        run.log_metrics(metrics)
        run.set_headline(headline)
        run.log_json(rows, "results.json")
        if cases:
            run.log_json(cases, "bfcl_calls_cases.json")
        for task in sorted({row["task"] for row in rows}):  # BFCL selection rows are task "selection"
            for name, groups in _bars(rows, task).items():
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
                run.log_figure(
                    grouped_bars(groups, f"{task}: {name}", ylim=(0, 1.08)), f"plots/{task}-{safe}.png"
                )
        run_id, artifact_uri = run.run_id, run.artifact_uri
    import pandas as pd

    shown = [
        "task",
        "dataset",
        "eval_file",
        "method",
        "n",
        *sorted({m for t in PLOTTED.values() for m in t} | {"fallback_fraction"}),
    ]
    table = pd.DataFrame([{k: row.get(k, math.nan) for k in shown} for row in rows])
    publish_table(table, f"bench-{experiment}-results", f"agent benchmark on {params['data_dir']}")
    for row in rows:
        values = ", ".join(
            f"{m} {row[m]:.3f}"
            for m in dict.fromkeys([*PLOTTED[row["task"]], "fallback_fraction"])
            if isinstance(row.get(m), int | float)
        )
        print(f"{row['task']:<15} {row['eval_file']:<45} {row['method']:<12} n={row['n']:<6} {values}")
    return {"experiment": experiment, "mlflow_run_id": run_id, "artifact_uri": artifact_uri, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    command_line_defaults()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tasks", nargs="+", default=None, choices=TASKS)
    parser.add_argument("--selectors", nargs="+", default=None, choices=list(SELECTORS))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--bfcl-calls-limit", type=int, default=40)
    parser.add_argument("--bfcl-tool-choice", nargs="+", default=["auto"], choices=BFCL_TOOL_CHOICES)
    parser.add_argument("--llm-model", default=None)
    parser.add_argument("--base-url", default=None)
    args = parser.parse_args(argv)
    out = agent_bench(
        data_dir=args.data_dir,
        tasks=args.tasks,
        selectors=args.selectors,
        limit=args.limit,
        bfcl_calls_limit=args.bfcl_calls_limit,
        bfcl_tool_choice=args.bfcl_tool_choice,
        llm_model=args.llm_model,
        base_url=args.base_url,
    )
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
