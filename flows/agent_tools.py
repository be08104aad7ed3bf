"""agent_tools: queries -> timing decision -> tool selection -> plan, into a LanceDB table.

Reads data in the MetaTool format of ``../shared/data/agent`` (its README): a folder with
``tools.json`` and query files (``selection_*.csv`` with ``query[,tool]``), optionally
``selection_dev.csv`` (exemplar queries the embedding selector is fitted on) and
``timing_dev.json`` (labelled "needs a tool?" items the embedding timing classifier is fitted
on). Only ``*_dev`` files are ever fitted on; the queries come from an evaluation file
(``selection_test.csv``, ...) when the folder has one. When the queries carry the gold
``tool``, the flow reports top-1 and top-k accuracy of the selection.

Run it::

    python flows/agent_tools.py                                  # the shipped sample
    python flows/agent_tools.py --data-dir ../shared/data/agent/metatool --queries q.csv
    sage-prefect flow run agent_tools -p selector=hybrid -p timing=embedding
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_table_artifact

from sage_prefect.common.errors import ConfigError
from sage_prefect.common.settings import command_line_defaults, load_settings
from sage_prefect.controlplane.server import connect_or_start
from sage_prefect.data import replace_table
from sage_prefect.examples import AGENT_SAMPLE_DIR
from sage_prefect.kernel import environment_from_settings
from sage_prefect.tasks import CSVSource, JSONLSource, LanceSink, Planner, TimingDecider, ToolSelector
from sage_prefect.tasks.agent.data import agent_data_folders


def metatool_dir(data_dir: str | None) -> Path:
    """The folder holding ``tools.json``: ``data_dir`` itself or its ``metatool/`` subfolder."""
    root = Path(data_dir).expanduser().resolve() if data_dir else AGENT_SAMPLE_DIR
    metatool, _bfcl = agent_data_folders(root, "agent_tools")
    if metatool is None:
        raise ConfigError(
            f"agent_tools: no tools.json in {root} or {root / 'metatool'}", field="data_dir", file=str(root)
        )
    return metatool


def default_queries(folder: Path) -> Path:
    """The first evaluation selection file (``selection_*.csv`` not ending in ``_dev``), else the dev file."""
    evaluation = sorted(p for p in folder.glob("selection_*.csv") if not p.stem.endswith("_dev"))
    if evaluation:
        return evaluation[0]
    dev = folder / "selection_dev.csv"
    if dev.is_file():
        return dev
    raise ConfigError(f"agent_tools: no selection_*.csv in {folder}; pass queries=...", field="queries")


@flow(name="agent_tools", log_prints=True)
def agent_tools(
    data_dir: str | None = None,
    queries: str | None = None,
    selector: Literal["keyword", "embedding", "hybrid", "llm"] = "embedding",
    timing: Literal["rule", "embedding", "llm"] = "rule",
    planner: Literal["llm", "retrieval"] = "llm",
    top_k: int = 5,
    output_table: str = "agent_plans",
    lance_uri: str | None = None,
    queries_per_partition: int = 64,
) -> dict[str, Any]:
    """Decide, select and plan for every query of ``queries`` with the tools of ``data_dir``."""
    settings = load_settings()
    folder = metatool_dir(data_dir)
    query_path = Path(queries).expanduser().resolve() if queries else default_queries(folder)
    uri = lance_uri or str(settings.lance_dir)
    tools = str(folder / "tools.json")
    # Fit only on *_dev files, and never on the file whose queries are being answered.
    dev = folder / "selection_dev.csv"
    exemplars = str(dev) if dev.is_file() and dev.resolve() != query_path else None
    timing_dev = folder / "timing_dev.json"
    if timing == "embedding" and not timing_dev.is_file():
        raise ConfigError(f"agent_tools: timing='embedding' needs {timing_dev}", field="timing")
    source = (
        (CSVSource, {"path": str(query_path)})
        if query_path.suffix == ".csv"
        else (JSONLSource, {"path": str(query_path)})
    )
    staging = f"{output_table}.staging"
    with connect_or_start() as base_url:
        env = environment_from_settings("agent_tools-pipeline", settings, batch_size=queries_per_partition)
        with env:
            timing_cfg: dict[str, Any] = {"base_url": base_url, "method": timing}
            if timing == "embedding":
                timing_cfg["train_path"] = str(timing_dev)
            (
                env.from_source(*source)
                .map(TimingDecider, timing_cfg)
                .map(
                    ToolSelector,
                    {
                        "base_url": base_url,
                        "method": selector,
                        "tools_path": tools,
                        "top_k": top_k,
                        "exemplars_path": exemplars,
                    },
                )
                .map(
                    Planner,
                    {
                        "base_url": base_url,
                        "method": planner,
                        "tools_path": tools,
                        "exemplars_path": exemplars,
                        # The retrieval side of the plan ranks tools as the selection step did.
                        "selector_method": selector if selector != "llm" else "embedding",
                    },
                )
                .sink(LanceSink, {"uri": uri, "table": staging, "mode": "overwrite"})
            )
            result = env.submit()
    replace_table(uri, staging, output_table)  # the previous table stays until this run's rows are complete
    summary = summarize_plans(uri, output_table)
    summary.update(
        queries_file=str(query_path),
        tools=tools,
        fitted_on=exemplars,
        output_table=output_table,
        lance_uri=uri,
        pipeline_flow_run_id=result.flow_run_id,
    )
    create_table_artifact(
        key="agent-tools-summary",
        table=[{"metric": k, "value": v} for k, v in summary.items()],
        description=f"agent_tools on {query_path.name}: rows in LanceDB table {output_table!r} at {uri}",
    )
    print(f"agent_tools: {summary['queries']} queries -> table {output_table!r} at {uri}")
    return summary


def summarize_plans(uri: str, table: str) -> dict[str, Any]:
    """Query count, the share routed to a tool, and selection accuracy when a gold ``tool`` is present."""
    import lancedb

    rows = lancedb.connect(uri).open_table(table).to_arrow().to_pylist()
    n = len(rows)
    summary: dict[str, Any] = {"queries": n}
    if not n:
        return summary
    summary["needs_tool_rate"] = round(sum(r["needs_tool"] for r in rows) / n, 4)
    if "tool" in rows[0]:
        summary["selection_top1"] = round(sum(r["selected_tools"][:1] == [r["tool"]] for r in rows) / n, 4)
        summary["selection_topk"] = round(sum(r["tool"] in r["selected_tools"] for r in rows) / n, 4)
    return summary


def main(argv: list[str] | None = None) -> None:
    command_line_defaults()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir", default=None, help="MetaTool-format folder (default: the shipped sample)"
    )
    parser.add_argument("--queries", default=None, help="CSV or JSONL with a 'query' field")
    parser.add_argument("--selector", choices=["keyword", "embedding", "hybrid", "llm"], default="embedding")
    parser.add_argument("--timing", choices=["rule", "embedding", "llm"], default="rule")
    parser.add_argument("--planner", choices=["llm", "retrieval"], default="llm")
    parser.add_argument("--lance-uri", default=None)
    args = parser.parse_args(argv)
    summary = agent_tools(
        data_dir=args.data_dir,
        queries=args.queries,
        selector=args.selector,
        timing=args.timing,
        planner=args.planner,
        lance_uri=args.lance_uri,
    )
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":  # Dask process workers re-import this file: keep the run behind this guard
    main()
