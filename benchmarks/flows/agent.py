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
  precision, recall, F1 of "call a tool?" per method.

Methods that ask the chat model (``llm``) report ``fallback_fraction``; with the embedded
defaults the LLM is a tiny random-weight model, so those rows measure the fallback path.

Logged: one MLflow run with the parameters (data, methods, selector configs, holdout, seed,
models, git commit, machine), every metric as ``task.dataset.eval_file.method.metric``, the rows
as JSON, accuracy bar plots per task; the rows also become a Prefect table artifact.

Run::

    sage-prefect bench run agent                                          # shipped sample
    sage-prefect bench run agent -p data_dir=../shared/data/agent
    sage-prefect bench run agent -p data_dir=../shared/data/agent -p 'tasks=["selection"]' -p limit=500
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

TASKS = ("selection", "bfcl_selection", "planning", "timing")

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
    experiment: str = "agent",
    run_name: str | None = None,
) -> dict[str, Any]:
    """Tool selection, planning and timing accuracy per method on MetaTool/BFCL-format data."""
    chosen_tasks = _choose("task", tasks, TASKS)
    chosen_selectors = _choose("selector", selectors, SELECTORS)
    chosen_planners = _choose("planner", planners, PLANNERS)
    chosen_timing = _choose("timing method", timing_methods, TIMING)
    metatool, bfcl = data_folders(data_dir)
    settings = load_settings()
    methods = {label: SELECTORS[label] for label in chosen_selectors}
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    with connect_or_start() as base_url:
        for task in chosen_tasks:
            started = time.perf_counter()
            if task == "selection" and metatool is not None:
                new = evaluate_selection(
                    metatool, methods, base_url, holdout_fraction=holdout_fraction, seed=seed, limit=limit
                )
            elif task == "bfcl_selection" and bfcl is not None:
                new = evaluate_bfcl_selection(bfcl, methods, base_url, limit=limit, seed=seed)
            elif task == "planning" and metatool is not None:
                new = evaluate_planning(
                    metatool,
                    chosen_planners,
                    base_url,
                    holdout_fraction=holdout_fraction,
                    seed=seed,
                    limit=limit,
                )
            elif task == "timing":
                new = evaluate_timing(
                    metatool,
                    bfcl,
                    chosen_timing,
                    base_url,
                    holdout_fraction=holdout_fraction,
                    seed=seed,
                    limit=limit,
                )
            else:
                new = []
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
        "embedding_model": settings.embedding_model,
        "llm_model": settings.llm_model,
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
    ]
    with benchmark_run(experiment, params, run_name=run_name) as run:
        run.log_metrics(metrics)
        run.set_headline(headline)
        run.log_json(rows, "results.json")
        for task in sorted({row["task"] for row in rows}):  # BFCL selection rows are task "selection"
            for name, groups in _bars(rows, task).items():
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
                run.log_figure(
                    grouped_bars(groups, f"{task}: {name}", ylim=(0, 1.08)), f"plots/{task}-{safe}.png"
                )
        run_id, artifact_uri = run.run_id, run.artifact_uri
    import pandas as pd

    shown = ["task", "dataset", "eval_file", "method", "n", *sorted({m for t in PLOTTED.values() for m in t})]
    table = pd.DataFrame([{k: row.get(k, math.nan) for k in shown} for row in rows])
    publish_table(table, f"bench-{experiment}-results", f"agent benchmark on {params['data_dir']}")
    for row in rows:
        values = ", ".join(
            f"{m} {row[m]:.3f}" for m in PLOTTED[row["task"]] if isinstance(row.get(m), int | float)
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
    args = parser.parse_args(argv)
    out = agent_bench(data_dir=args.data_dir, tasks=args.tasks, selectors=args.selectors, limit=args.limit)
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
