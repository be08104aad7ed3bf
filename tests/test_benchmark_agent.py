"""Agent-capability evaluation (sage_prefect.benchmark.agent): hand-checked metrics, and the
evaluators on the shipped sample and (when present) ``../shared/data/agent``, through the real
control plane (MiniLM embeddings; the tiny random-weight LM where the text does not matter, the
real SmolLM2-135M-Instruct for BFCL's function-call metric); the agent benchmark flow's
``bfcl_calls`` step end to end."""

from __future__ import annotations

import doctest
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import REAL_LLM, TINY_LLM

from sage_prefect.benchmark import agent
from sage_prefect.benchmark.agent import (
    BFCL_ANSWER_KINDS,
    BfclAnswer,
    bfcl_calls_row,
    bfcl_query,
    binary_metrics,
    evaluate_bfcl_calls,
    evaluate_bfcl_selection,
    evaluate_planning,
    evaluate_selection,
    evaluate_timing,
    metric_name,
    row_metrics,
    score_bfcl_case,
    selection_metrics,
    set_metrics,
)
from sage_prefect.benchmark.bfcl import BfclCase, load_bfcl_pairs
from sage_prefect.tasks.agent.data import (
    DataFormatError,
    holdout_split,
    load_bfcl,
    load_multi_tool,
    load_selection,
)
from sage_prefect.tasks.agent.selection import ToolSelector
from sage_prefect.tasks.agent.timing import TimingDecider

SAMPLE = Path(__file__).resolve().parents[1] / "sage_prefect" / "examples" / "agent_sample"
META = SAMPLE / "metatool"
BFCL = SAMPLE / "bfcl"
SHARED_AGENT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "agent"

ROW_KEYS = {"task", "dataset", "eval_file", "method", "n", "seconds", "setup_seconds", "fitted_on"}
SELECTION_METHODS: dict[str, dict[str, Any]] = {
    "keyword": {"method": "keyword"},
    "embedding": {"method": "embedding"},
    "hybrid": {"method": "hybrid"},
    "llm": {"method": "llm", "max_tokens": 16},
}


def approx(expected: dict[str, float]) -> Any:
    return pytest.approx(expected, nan_ok=True)


def _by(rows: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _one(rows: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    (row,) = _by(rows, **where)
    return row


def _check_rows(rows: list[dict[str, Any]], task: str) -> None:
    assert rows
    for row in rows:
        assert set(row) >= ROW_KEYS, row
        assert row["task"] == task
        assert isinstance(row["n"], int) and row["seconds"] >= 0 and row["setup_seconds"] >= 0
        for key in row_metrics(row):
            assert key.startswith(f"{task}.{row['dataset']}.")
            assert all(c.isalnum() or c in "_-./ " for c in key), key


# -- pure metrics ----------------------------------------------------------------------------------


def test_selection_metrics_by_hand() -> None:
    ranked = [["a", "b", "c"], ["b", "c", "a"], ["x", "y", "z"]]
    m = selection_metrics(ranked, ["a", "c", "a"], ks=(1, 2, 3))
    third, two_thirds = 1 / 3, 2 / 3
    assert m == approx(
        {
            "top1_accuracy": third,
            "top2_accuracy": two_thirds,
            "top3_accuracy": two_thirds,  # the third gold is not in the list at all
            "recall@1": third,
            "recall@2": two_thirds,
            "recall@3": two_thirds,
            "mrr": (1 + 1 / 2 + 0) / 3,
            "n": 3,
        }
    )
    # A gold set: any gold name counts for accuracy; recall is the share of the set found.
    m = selection_metrics([["a", "b", "c", "d"], ["q"]], [{"c", "d", "z"}, {"q"}], ks=(1, 3, 4))
    assert m == approx(
        {
            "top1_accuracy": 0.5,
            "top3_accuracy": 1.0,
            "top4_accuracy": 1.0,
            "recall@1": (0 + 1) / 2,
            "recall@3": (1 / 3 + 1) / 2,
            "recall@4": (2 / 3 + 1) / 2,
            "mrr": (1 / 3 + 1) / 2,
            "n": 2,
        }
    )
    # k beyond the list's length, an empty ranking.
    assert selection_metrics([["a"], []], ["a", "a"], ks=(5,)) == approx(
        {"top5_accuracy": 0.5, "recall@5": 0.5, "mrr": 0.5, "n": 2}
    )
    empty = selection_metrics([], [], ks=(1,))
    assert empty["n"] == 0 and math.isnan(empty["top1_accuracy"]) and math.isnan(empty["mrr"])
    with pytest.raises(ValueError, match="predictions"):
        selection_metrics([["a"]], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        selection_metrics([["a"]], [set()])
    with pytest.raises(ValueError, match="k must be"):
        selection_metrics([["a"]], ["a"], ks=(0,))


def test_set_metrics_by_hand() -> None:
    predicted = [{"a", "b"}, {"a"}, set(), {"x", "y", "z"}]
    gold = [{"a", "b"}, {"a", "b"}, {"c"}, {"x"}]
    # per query (P, R, F1): (1, 1, 1), (1, 1/2, 2/3), (0, 0, 0) [empty prediction], (1/3, 1, 1/2)
    assert set_metrics(predicted, gold) == approx(
        {
            "precision": (1 + 1 + 0 + 1 / 3) / 4,
            "recall": (1 + 0.5 + 0 + 1) / 4,
            "f1": (1 + 2 / 3 + 0 + 0.5) / 4,
            "exact_set_accuracy": 0.25,
            "micro_precision": 4 / 6,  # 4 hits among 6 predicted tools
            "micro_recall": 4 / 6,  # 4 hits among 6 gold tools
            "micro_f1": 4 / 6,
            "n": 4,
        }
    )
    nothing = set_metrics([set(), set()], [{"a"}, {"b", "c"}])
    assert nothing == approx(
        {
            "precision": 0.0,
            "recall": 0.0,
            "f1": 0.0,
            "exact_set_accuracy": 0.0,
            "micro_precision": 0.0,
            "micro_recall": 0.0,
            "micro_f1": 0.0,
            "n": 2,
        }
    )
    # Lists work as well as sets (duplicates collapse); order does not matter.
    assert set_metrics([["b", "a", "a"]], [["a", "b"]])["exact_set_accuracy"] == 1.0
    assert math.isnan(set_metrics([], [])["f1"])
    with pytest.raises(ValueError, match="empty"):
        set_metrics([{"a"}], [set()])


def test_binary_metrics_by_hand() -> None:
    m = binary_metrics([True, True, False, False, True], [True, False, False, True, True])
    assert m == approx(
        {
            "accuracy": 3 / 5,
            "precision": 2 / 3,
            "recall": 2 / 3,
            "f1": 2 / 3,
            "specificity": 1 / 2,
            "tp": 2,
            "fp": 1,
            "tn": 1,
            "fn": 1,
            "n": 5,
        }
    )
    # Single-class gold (BFCL irrelevance): recall (and F1) undefined -> NaN, not 0.
    neg = binary_metrics([False, False, True], [False, False, False])
    assert neg == approx(
        {
            "accuracy": 2 / 3,
            "precision": 0.0,
            "recall": math.nan,
            "f1": math.nan,
            "specificity": 2 / 3,
            "tp": 0,
            "fp": 1,
            "tn": 2,
            "fn": 0,
            "n": 3,
        }
    )
    all_right = binary_metrics([False, False], [False, False])
    assert all_right["accuracy"] == 1.0 and math.isnan(all_right["precision"]) and math.isnan(all_right["f1"])
    pos = binary_metrics([True, True], [True, True])
    assert (pos["precision"], pos["recall"], pos["f1"]) == (1.0, 1.0, 1.0) and math.isnan(pos["specificity"])
    # Both defined but zero: F1 is 0.
    assert binary_metrics([True, False], [False, True])["f1"] == 0.0
    assert math.isnan(binary_metrics([], [])["accuracy"])
    with pytest.raises(ValueError):
        binary_metrics([True], [])


def test_metric_names_and_doctests() -> None:
    row = {
        "task": "selection",
        "dataset": "metatool",
        "eval_file": "selection_dev.csv[held-out 20%, seed 0; random 200 of 2886, seed 0]",
        "method": "embedding",
        "n": 200,
        "top1_accuracy": 0.5,
        "recall@3": 0.75,
        "seconds": 1.5,
        "fitted_on": "selection_dev.csv[fit 80%, seed 0]",
        "flag": True,
    }
    assert (
        metric_name(row, "top1_accuracy")
        == "selection.metatool.selection_dev_holdout.embedding.top1_accuracy"
    )
    assert row_metrics(row) == {
        "selection.metatool.selection_dev_holdout.embedding.n": 200.0,
        "selection.metatool.selection_dev_holdout.embedding.top1_accuracy": 0.5,
        "selection.metatool.selection_dev_holdout.embedding.recall_at_3": 0.75,
        "selection.metatool.selection_dev_holdout.embedding.seconds": 1.5,
    }
    bfcl = {
        "task": "timing",
        "dataset": "bfcl",
        "eval_file": "BFCL_v4_live_irrelevance.jsonl",
        "method": "llm",
    }
    assert metric_name(bfcl, "accuracy") == "timing.bfcl.BFCL_v4_live_irrelevance.llm.accuracy"
    combined = {**bfcl, "eval_file": "combined[BFCL_v4_irrelevance.jsonl, BFCL_v4_live_relevance.jsonl]"}
    assert metric_name(combined, "f1") == "timing.bfcl.combined.llm.f1"
    odd = {**bfcl, "method": "embedding+classifier (v2)", "dataset": "my data"}
    assert (
        metric_name(odd, "recall@1")
        == "timing.my_data.BFCL_v4_live_irrelevance.embedding-classifier__v2.recall_at_1"
    )
    assert doctest.testmod(agent).failed == 0


# -- evaluators on the shipped sample -----------------------------------------------------------------


def test_selection_on_the_sample(controlplane: str) -> None:
    rows = evaluate_selection(META, SELECTION_METHODS, base_url=controlplane)
    _check_rows(rows, "selection")
    # The sample has an evaluation file: only it is scored, the dev file is fitted on in full.
    assert {r["eval_file"] for r in rows} == {"selection_test.csv"}
    assert [r["method"] for r in rows] == list(SELECTION_METHODS)
    for row in rows:
        assert row["dataset"] == "metatool" and row["n"] == 20
        assert row["top1_accuracy"] <= row["top3_accuracy"] <= row["top5_accuracy"]
        assert row["recall@3"] == row["top3_accuracy"]  # single gold tool
        assert 0 < row["mrr"] <= 1
    keyword, embedding, llm = (
        _one(rows, method="keyword"),
        _one(rows, method="embedding"),
        _one(rows, method="llm"),
    )
    assert keyword["fitted_on"] == "" and embedding["fitted_on"] == "selection_dev.csv"
    assert keyword["top3_accuracy"] >= 0.7 and embedding["top3_accuracy"] >= 0.85  # as in test_tasks_agent
    assert 0.0 <= llm["fallback_fraction"] <= 1.0 and "fallback_fraction" not in keyword
    # Same numbers as scoring by hand with the operator.
    test = load_selection(META / "selection_test.csv")
    sel = ToolSelector({"method": "keyword", "tools_path": str(META / "tools.json")})
    ranked = [[n for n, _ in r] for r in sel.rank([t["query"] for t in test], k=5)]
    hand = selection_metrics(ranked, [t["tool"] for t in test])
    assert {k: keyword[k] for k in hand} == approx(hand)

    limited = evaluate_selection(META, ["keyword"], limit=5, ks=(1,))
    assert _one(limited, method="keyword")["eval_file"] == "selection_test.csv[random 5 of 20, seed 0]"
    assert limited[0]["n"] == 5 and "top1_accuracy" in limited[0] and "top3_accuracy" not in limited[0]


def test_selection_on_a_dev_only_folder(tmp_path: Path, controlplane: str) -> None:
    folder = tmp_path / "metatool"
    folder.mkdir()
    for name in ("tools.json", "selection_dev.csv"):
        shutil.copy(META / name, folder / name)
    rows = evaluate_selection(
        folder,
        {"keyword": {"method": "keyword"}, "embedding": {"method": "embedding"}},
        base_url=controlplane,
    )
    _check_rows(rows, "selection")
    assert {r["eval_file"] for r in rows} == {"selection_dev.csv[held-out 20%, seed 0]"}
    assert all(r["n"] == 16 for r in rows)  # 20% of the 80 dev queries
    assert _one(rows, method="embedding")["fitted_on"] == "selection_dev.csv[fit 80%, seed 0]"
    assert metric_name(rows[0], "mrr") == "selection.metatool.selection_dev_holdout.keyword.mrr"
    # The held-out part is holdout_split's, so keyword numbers match scoring it by hand.
    _, held = holdout_split(load_selection(folder / "selection_dev.csv"), 0.2, seed=0)
    sel = ToolSelector({"method": "keyword", "tools_path": str(folder / "tools.json")})
    ranked = [[n for n, _ in r] for r in sel.rank([h["query"] for h in held], k=5)]
    hand = selection_metrics(ranked, [h["tool"] for h in held])
    assert _one(rows, method="keyword")["mrr"] == pytest.approx(hand["mrr"])
    # A method config that would fit on the held-out part is refused.
    with pytest.raises(ValueError, match="holdout_fraction"):
        evaluate_selection(
            folder, {"e": {"method": "embedding", "holdout_fraction": 0.0}}, base_url=controlplane
        )
    # Other seeds/fractions name themselves.
    other = evaluate_selection(folder, ["keyword"], holdout_fraction=0.25, seed=3)
    assert other[0]["eval_file"] == "selection_dev.csv[held-out 25%, seed 3]" and other[0]["n"] == 20


def test_bfcl_selection_on_the_sample(controlplane: str) -> None:
    methods = ["keyword", "embedding", "hybrid", "llm"]
    rows = evaluate_bfcl_selection(BFCL, methods, base_url=controlplane)
    _check_rows(rows, "selection")
    assert [(r["eval_file"], r["method"]) for r in rows] == [("BFCL_v4_multiple.jsonl", m) for m in methods]
    for row in rows:
        assert row["dataset"] == "bfcl" and row["n"] == 5 and row["fitted_on"] == ""
        assert row["top3_accuracy"] == 1.0  # 2-4 candidates per item
    assert 0.0 <= _one(rows, method="llm")["fallback_fraction"] <= 1.0
    # The bulk computation ranks exactly as one ToolSelector per item over its own functions.
    items = load_bfcl(BFCL / "BFCL_v4_multiple.jsonl")
    labels = {m: {"method": m, "base_url": controlplane} for m in ("keyword", "embedding", "hybrid")}
    bulk, _, _ = agent._bfcl_rank_basic(items, labels, 3)
    for method in labels:
        for item, ranked in zip(items, bulk[method], strict=True):
            tools = [{"name": f["name"], "description": f.get("description", "")} for f in item["function"]]
            sel = ToolSelector({"method": method, "tools": tools, "base_url": controlplane, "top_k": 3})
            assert [n for n, _ in sel.rank([bfcl_query(item)])[0]] == ranked, (method, item["id"])


def test_bfcl_errors_and_missing_files(tmp_path: Path) -> None:
    folder = tmp_path / "bfcl"
    folder.mkdir()
    assert evaluate_bfcl_selection(folder, ["keyword"]) == []
    shutil.copy(BFCL / "BFCL_v4_multiple.jsonl", folder / "BFCL_v4_multiple.jsonl")
    with pytest.raises(DataFormatError, match="possible_answer_multiple.jsonl") as exc:
        evaluate_bfcl_selection(folder, ["keyword"])
    assert exc.value.file == str(folder / "BFCL_v4_multiple.jsonl")
    answers = folder / "possible_answer_multiple.jsonl"
    lines = (BFCL / "possible_answer_multiple.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["ground_truth"] = [{"no.such_function": {}}]
    answers.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(DataFormatError, match="no.such_function"):
        evaluate_bfcl_selection(folder, ["keyword"])
    answers.write_text("{broken\n")
    with pytest.raises(DataFormatError) as exc:
        evaluate_bfcl_selection(folder, ["keyword"])
    assert exc.value.file == str(answers) and exc.value.line == 1
    with pytest.raises(DataFormatError, match="no such folder"):
        evaluate_bfcl_selection(tmp_path / "nowhere", ["keyword"])
    # MetaTool folders: a missing tools.json, a malformed selection file.
    meta = tmp_path / "metatool"
    meta.mkdir()
    assert evaluate_selection(meta, ["keyword"]) == [] and evaluate_planning(meta, ["retrieval"]) == []
    assert evaluate_timing(meta, None, ["rule"]) == [] and evaluate_timing(None, None, ["rule"]) == []
    (meta / "selection_test.csv").write_text("query,tool\nweather?,WeatherTool\n")
    with pytest.raises(DataFormatError, match="tools.json"):
        evaluate_selection(meta, ["keyword"])
    shutil.copy(META / "tools.json", meta / "tools.json")
    (meta / "selection_test.csv").write_text("query,tool\nweather?,NoSuchTool\n")
    with pytest.raises(DataFormatError, match="NoSuchTool") as exc:
        evaluate_selection(meta, ["keyword"])
    assert exc.value.file == str(meta / "selection_test.csv") and exc.value.line == 2


def test_planning_on_the_sample(controlplane: str) -> None:
    rows = evaluate_planning(
        META, ("retrieval", "llm"), base_url=controlplane, planner_config={"max_tokens": 32, "max_steps": 3}
    )
    _check_rows(rows, "planning")
    assert [r["method"] for r in rows] == ["retrieval", "llm", "selector_top3"]
    assert {r["eval_file"] for r in rows} == {"multi_tool_dev.json[held-out 20%, seed 0]"}
    assert all(r["n"] == 3 for r in rows)  # 20% of 15
    for row in rows:
        for key in ("precision", "recall", "f1", "exact_set_accuracy", "micro_f1"):
            assert 0.0 <= row[key] <= 1.0
        assert 1.0 <= row["mean_plan_steps"] <= 3.0
    assert 0.0 <= _one(rows, method="llm")["fallback_fraction"] <= 1.0
    assert _one(rows, method="selector_top3")["mean_plan_steps"] == 3.0
    # Retrieval rows match planning the held-out queries by hand.
    _, held = holdout_split(load_multi_tool(META / "multi_tool_dev.json"), 0.2, seed=0)
    retrieval = _one(rows, method="retrieval")
    assert retrieval["recall"] > 0
    keyword = evaluate_planning(
        META, {"kw": {"method": "retrieval", "selector_method": "keyword"}}, top_k=2
    )  # no model needed
    assert [r["method"] for r in keyword] == ["kw", "selector_top2"] and keyword[0]["n"] == len(held)
    no_topk = evaluate_planning(META, ["retrieval"], planner_config={"selector_method": "keyword"}, top_k=0)
    assert [r["method"] for r in no_topk] == ["retrieval"]


def test_timing_on_the_sample(tmp_path: Path, controlplane: str) -> None:
    methods = {
        "rule": {"method": "rule"},
        "embedding": {"method": "embedding"},
        "llm": {"method": "llm", "max_tokens": 4},
    }
    rows = evaluate_timing(META, BFCL, methods, base_url=controlplane)
    _check_rows(rows, "timing")
    files = ["timing_dev.json[held-out 20%, seed 0]", "BFCL_v4_irrelevance.jsonl"]
    assert [(r["eval_file"], r["method"]) for r in rows] == [(f, m) for f in files for m in methods]
    assert (
        _one(rows, method="embedding", eval_file=files[0])["fitted_on"] == "timing_dev.json[fit 80%, seed 0]"
    )
    assert _one(rows, method="rule", eval_file=files[0])["fitted_on"] == ""
    assert all(r["n"] == 8 for r in _by(rows, eval_file=files[0]))
    for row in _by(rows, eval_file=files[1]):  # every item is gold False: recall undefined
        assert row["dataset"] == "bfcl" and row["n"] == 3 and row["tp"] + row["fn"] == 0
        assert math.isnan(row["recall"]) and math.isnan(row["f1"])
        assert row["accuracy"] == row["specificity"] == pytest.approx(1.0 - row["predicted_tool_rate"])
    assert 0.0 <= _one(rows, method="llm", eval_file=files[0])["fallback_fraction"] <= 1.0

    # Several BFCL timing files: each scored, plus a combined row; no dev timing file: no embedding rows.
    folder = tmp_path / "bfcl"
    folder.mkdir()
    shutil.copy(BFCL / "BFCL_v4_irrelevance.jsonl", folder / "BFCL_v4_irrelevance.jsonl")
    shutil.copy(BFCL / "BFCL_v4_multiple.jsonl", folder / "BFCL_v4_live_relevance.jsonl")
    shutil.copy(BFCL / "BFCL_v4_multiple.jsonl", folder / "BFCL_v4_multiple.jsonl")  # not a timing file
    only = evaluate_timing(None, folder, ["rule", "embedding"])
    assert [r["eval_file"] for r in only] == [
        "BFCL_v4_irrelevance.jsonl",
        "BFCL_v4_live_relevance.jsonl",
        "combined[BFCL_v4_irrelevance.jsonl, BFCL_v4_live_relevance.jsonl]",
    ]
    assert {r["method"] for r in only} == {"rule"}
    relevance, combined = only[1], only[2]
    assert (
        relevance["n"] == 5
        and relevance["fp"] + relevance["tn"] == 0
        and math.isnan(relevance["specificity"])
    )
    assert combined["n"] == 8 and combined["tp"] == relevance["tp"] and combined["tn"] == only[0]["tn"]
    assert metric_name(combined, "accuracy") == "timing.bfcl.combined.rule.accuracy"
    assert bfcl_query(load_bfcl(BFCL / "BFCL_v4_multiple.jsonl")[0]).startswith("How many Japanese yen")


def test_timing_takes_queries_longer_than_the_models_limits(tmp_path: Path, controlplane: str) -> None:
    # 980 CJK characters pass the operators' character cuts (1000; llm 2000) but are ~980 MiniLM
    # tokens (> 256) and more than the tiny LM's 2048-token context: the embedding request asks
    # the control plane to cut them (truncate_prompt_tokens), the llm method falls back.
    folder = tmp_path / "bfcl"
    folder.mkdir()
    long_query = "天气" * 490
    lines = [
        {"id": f"live_irrelevance_{i}", "question": [[{"role": "user", "content": q}]], "function": []}
        for i, q in enumerate(["Tell me a joke about cats.", long_query, "Write a haiku about rain."])
    ]
    (folder / "BFCL_v4_live_irrelevance.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    methods = {
        "rule": {"method": "rule"},
        "embedding": {"method": "embedding"},
        "llm": {"method": "llm", "max_tokens": 4},
    }
    rows = evaluate_timing(META, folder, methods, base_url=controlplane)
    for method in methods:
        assert _one(rows, method=method, eval_file="BFCL_v4_live_irrelevance.jsonl")["n"] == 3
    # without the truncation field the control plane refuses the query, naming it
    refusing = TimingDecider(
        {
            "method": "embedding",
            "train_path": str(META / "timing_dev.json"),
            "truncate_inputs": False,
            "base_url": controlplane,
        }
    )
    with pytest.raises(openai.BadRequestError, match=r"input\[0\] has \d+ tokens"):
        refusing.probabilities([long_query])
    # a chat request over the LM's context is the llm method's fallback, not an error
    llm = TimingDecider({"method": "llm", "max_tokens": 4, "base_url": controlplane})
    assert llm.probabilities([long_query])[0][1] == "fallback"


# -- the shared benchmark data -----------------------------------------------------------------------------


@pytest.mark.skipif(
    not (SHARED_AGENT / "metatool" / "tools.json").is_file() or not (SHARED_AGENT / "bfcl").is_dir(),
    reason=f"agent benchmark data not found at {SHARED_AGENT} (see ../shared/data/README.md)",
)
def test_shared_agent_data_bounded(controlplane: str) -> None:
    meta, bfcl = SHARED_AGENT / "metatool", SHARED_AGENT / "bfcl"
    start = time.perf_counter()
    methods = {
        "keyword": {"method": "keyword"},
        "embedding": {"method": "embedding", "max_exemplars_per_tool": 4},  # a bounded fit
    }
    selection = evaluate_selection(meta, methods, base_url=controlplane, limit=100)
    _check_rows(selection, "selection")
    label = "selection_dev.csv[held-out 20%, seed 0; random 100 of 2886, seed 0]"
    assert {r["eval_file"] for r in selection} == {label} and all(r["n"] == 100 for r in selection)
    kw, emb = _one(selection, method="keyword"), _one(selection, method="embedding")
    assert emb["fitted_on"] == "selection_dev.csv[fit 80%, seed 0]"
    print(
        "MetaTool selection (100 held-out):", {r["method"]: round(r["top1_accuracy"], 3) for r in selection}
    )
    assert emb["top1_accuracy"] > kw["top1_accuracy"] + 0.05, (kw, emb)

    bfcl_rows = evaluate_bfcl_selection(bfcl, ["keyword", "embedding"], base_url=controlplane, limit=50)
    _check_rows(bfcl_rows, "selection")
    assert {r["eval_file"] for r in bfcl_rows} == {
        "BFCL_v4_live_multiple.jsonl[random 50 of 737, seed 0]",
        "BFCL_v4_multiple.jsonl[random 50 of 200, seed 0]",
    }
    assert all(r["top1_accuracy"] > 0.6 for r in bfcl_rows), bfcl_rows

    planning = evaluate_planning(meta, ["retrieval"], base_url=controlplane, limit=20)
    _check_rows(planning, "planning")
    assert planning[0]["eval_file"] == "multi_tool_dev.json[held-out 20%, seed 0; random 20 of 69, seed 0]"

    timing = evaluate_timing(meta, bfcl, ["rule", "embedding"], base_url=controlplane, limit=30)
    _check_rows(timing, "timing")
    files = {r["eval_file"].split("[")[0] for r in timing}
    assert files == {
        "timing_dev.json",
        "BFCL_v4_irrelevance.jsonl",
        "BFCL_v4_live_irrelevance.jsonl",
        "BFCL_v4_live_relevance.jsonl",
        "combined",
    }
    dev_rows = _by(timing, eval_file="timing_dev.json[held-out 20%, seed 0; random 30 of 146, seed 0]")
    assert len(dev_rows) == 2 and all(r["n"] == 30 for r in dev_rows)
    assert _one(timing, method="rule", eval_file="BFCL_v4_live_relevance.jsonl")["n"] == 16
    elapsed = time.perf_counter() - start
    print(f"shared-data bounded evaluation: {elapsed:.1f}s")


# -- BFCL's function-call metric ---------------------------------------------------------------------------

BFCL_ROW_KEYS = ROW_KEYS | {
    "correct",
    "accuracy",
    "mean_prompt_tokens",
    "mean_completion_tokens",
    "mean_request_seconds",
    "model",
    "tool_choice",
    *(f"{kind}_fraction" for kind in BFCL_ANSWER_KINDS),
}
NEEDS_SHARED_BFCL = pytest.mark.skipif(
    not (SHARED_AGENT / "bfcl" / "possible_answer_multiple.jsonl").is_file(),
    reason=f"BFCL data not found at {SHARED_AGENT / 'bfcl'} (see ../shared/data/README.md)",
)


def _sample_cases() -> tuple[list[BfclCase], list[BfclCase]]:
    multiple = load_bfcl_pairs(BFCL / "BFCL_v4_multiple.jsonl", BFCL / "possible_answer_multiple.jsonl")
    return multiple, load_bfcl_pairs(BFCL / "BFCL_v4_irrelevance.jsonl")


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}


def _check_bfcl_rows(rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """Fields, ranges and bookkeeping every `evaluate_bfcl_calls` result must satisfy."""
    assert rows
    for row in rows:
        assert set(row) >= BFCL_ROW_KEYS, sorted(BFCL_ROW_KEYS - set(row))
        assert row["task"] == "bfcl_calls" and row["method"] == f"llm-{row['tool_choice']}"
        assert 0.0 <= row["accuracy"] <= 1.0 and row["correct"] == round(row["accuracy"] * row["n"])
        fractions = [row[f"{kind}_fraction"] for kind in BFCL_ANSWER_KINDS]
        assert all(0.0 <= f <= 1.0 for f in fractions) and sum(fractions) == pytest.approx(1.0), row
        irrelevance = row["eval_file"].split("[")[0].endswith("irrelevance.jsonl")
        assert row["accuracy"] == pytest.approx(
            row["no_call_fraction" if irrelevance else "correct_call_fraction"]
        )
        errors = sum(v for k, v in row.items() if k.startswith("error:"))
        assert errors == row["n"] - row["correct"]
        mine = [r for r in records if r["eval_file"] == row["eval_file"] and r["method"] == row["method"]]
        assert len(mine) == row["n"] and sum(r["valid"] for r in mine) == row["correct"]
        for key in row_metrics(row):
            assert key.startswith(f"bfcl_calls.{row['dataset']}.") and ":" not in key, key


def test_bfcl_scoring_of_hand_made_answers() -> None:
    """Hand-made model outputs through the evaluator's scoring path: only the right call passes."""
    multiple, irrelevance = _sample_cases()
    case = multiple[0]  # currency.convert(amount=120.0, from_currency="USD", to_currency="JPY")
    right = {"amount": 120, "from_currency": "usd", "to_currency": "JPY"}  # int for float, any case
    answers = {
        "right": BfclAnswer([_call("currency_convert", right)]),
        "wrong value": BfclAnswer([_call("currency_convert", {**right, "amount": 100})]),
        "wrong type": BfclAnswer([_call("currency_convert", {**right, "amount": "120"})]),
        "missing": BfclAnswer([_call("currency_convert", {"amount": 120.0, "from_currency": "USD"})]),
        "extra": BfclAnswer([_call("currency_convert", {**right, "fee": 0})]),
        "other function": BfclAnswer([_call("weather_forecast", {"city": "Tokyo"})]),
        "made up": BfclAnswer([_call("convert_money", right)]),
        "unparsable": BfclAnswer([_call("currency_convert", '{"amount": 120, "from_')]),
        "twice": BfclAnswer([_call("currency_convert", right), _call("currency_convert", right)]),
        "text": BfclAnswer([], content="120 USD is about 18,000 JPY."),
        "refused": BfclAnswer(error="context_length_exceeded", detail="prompt too long"),
    }
    records = {k: score_bfcl_case(case, a) for k, a in answers.items()}
    expected = {
        "right": ("correct_call", None),
        "wrong value": ("wrong_arguments", "value_error:others"),
        "wrong type": ("wrong_arguments", "type_error:simple"),
        "missing": ("wrong_arguments", "simple_function_checker:missing_required"),
        "extra": ("wrong_arguments", "simple_function_checker:unexpected_param"),
        "other function": ("wrong_function", "simple_function_checker:wrong_func_name"),
        "made up": ("wrong_function", "simple_function_checker:wrong_func_name"),
        "unparsable": ("unparsable", "ast_decoder:decoder_failed"),
        "twice": ("multiple_calls", "multiple_function_checker:wrong_count"),
        "text": ("no_call", "multiple_function_checker:wrong_count"),
        "refused": ("fallback", "request_error:context_length_exceeded"),
    }
    assert {k: (r["answer"], r["error_type"]) for k, r in records.items()} == expected
    assert [k for k, r in records.items() if r["valid"]] == ["right"]
    assert records["right"]["calls"] == [{"name": "currency.convert", "arguments": json.dumps(right)}]
    assert records["made up"]["calls"][0]["name"] == "convert_money"  # unknown names stay as sent
    assert records["refused"]["error"] == "prompt too long" and records["text"]["content"].startswith("120")

    # Irrelevance: right iff no call; any call is a wrong function (or unparsable).
    off = irrelevance[0]
    assert score_bfcl_case(off, BfclAnswer([], content="Leonardo da Vinci."))["answer"] == "no_call"
    assert score_bfcl_case(off, BfclAnswer([], content="Leonardo."))["valid"] is True
    called = score_bfcl_case(off, BfclAnswer([_call("currency_convert", right)]))
    assert (called["answer"], called["valid"], called["error_type"]) == (
        "wrong_function",
        False,
        "irrelevance_error:decoder_success",
    )
    assert score_bfcl_case(off, BfclAnswer([_call("currency_convert", "{")]))["answer"] == "unparsable"
    # Relevance (BFCL live_relevance): any decodable call of an offered function.
    assert score_bfcl_case(off, BfclAnswer([_call("currency_convert", {})]), "relevance")["valid"] is True
    missed = score_bfcl_case(off, BfclAnswer([]), "relevance")
    assert (missed["valid"], missed["error_type"]) == (False, "relevance_error:no_call")
    with pytest.raises(ValueError, match="kind"):
        score_bfcl_case(case, BfclAnswer(), "parallel")

    # The row: one answer of each kind among 11, fractions add up, BFCL error types counted.
    row = bfcl_calls_row(
        list(records.values()), dataset="bfcl", eval_file="BFCL_v4_multiple.jsonl", method="llm-auto"
    )
    n = len(answers)
    assert (row["n"], row["correct"], row["accuracy"]) == (n, 1, pytest.approx(1 / n))
    assert row["wrong_arguments_fraction"] == pytest.approx(4 / n)
    assert row["wrong_function_fraction"] == pytest.approx(2 / n)
    for kind in ("correct_call", "unparsable", "multiple_calls", "no_call", "fallback"):
        assert row[f"{kind}_fraction"] == pytest.approx(1 / n), kind
    assert row["error:simple_function_checker:wrong_func_name"] == 2 and row["error:value_error:others"] == 1
    assert row["error:request_error:context_length_exceeded"] == 1
    assert math.isnan(row["mean_prompt_tokens"])  # hand-made answers carry no usage
    assert row_metrics(row)["bfcl_calls.bfcl.BFCL_v4_multiple.llm-auto.error_type_error_simple"] == 1.0
    empty = bfcl_calls_row([], dataset="bfcl", eval_file="x.jsonl", method="llm-auto")
    assert empty["n"] == 0 and math.isnan(empty["accuracy"])


def test_bfcl_calls_evaluator_scores_what_the_endpoint_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluator end to end with answers made by hand in place of the endpoint's: per-file
    rows, subsets, name mapping, required mode and argument checks."""
    multiple, irrelevance = _sample_cases()
    truth = {c.id: c.ground_truth for c in multiple}
    sent: list[tuple[str, str, int]] = []

    def fake_ask(
        api: Any, model: str, case: BfclCase, tool_choice: str, max_tokens: int, temperature: float
    ) -> BfclAnswer:
        sent.append((case.id, tool_choice, max_tokens))
        gt = truth.get(case.id)
        if gt is None:  # irrelevance: answer in text, except irrelevance_1
            calls = [_call("weather_forecast", {"city": "x"})] if case.id == "irrelevance_1" else []
            return BfclAnswer(calls, content="no tool needed")
        ((name, params),) = gt[0].items()
        args = {p: values[0] for p, values in params.items() if values[0] != ""}
        if case.id == "multiple_1":  # one wrong argument
            args["days"] = 4
        return BfclAnswer([_call(name.replace(".", "_"), args)], finish_reason="tool_calls", seconds=0.01)

    monkeypatch.setattr(agent, "_ask_bfcl", fake_ask)
    progress: list[tuple[str, int, int]] = []
    rows, records = evaluate_bfcl_calls(
        BFCL,
        base_url="http://127.0.0.1:9/v1",
        model="m",
        max_tokens=77,
        progress=lambda *a: progress.append(a),
    )
    _check_bfcl_rows(rows, records)
    by_file = {r["eval_file"]: r for r in rows}
    assert list(by_file) == ["BFCL_v4_irrelevance.jsonl", "BFCL_v4_multiple.jsonl"]
    assert by_file["BFCL_v4_multiple.jsonl"]["accuracy"] == pytest.approx(4 / 5)
    assert by_file["BFCL_v4_multiple.jsonl"]["error:value_error:others"] == 1
    assert by_file["BFCL_v4_irrelevance.jsonl"]["accuracy"] == pytest.approx(2 / 3)
    assert {(r["id"], r["valid"]) for r in records if not r["valid"]} == {
        ("multiple_1", False),
        ("irrelevance_1", False),
    }
    assert {m for _, _, m in sent} == {77} and progress[-1] == ("BFCL_v4_multiple.jsonl", 5, 5)
    # required: irrelevance files skipped; a subset names itself
    sent.clear()
    rows, records = evaluate_bfcl_calls(
        BFCL, base_url="http://127.0.0.1:9/v1", model="m", tool_choice="required", limit=2
    )
    assert [(r["eval_file"], r["method"], r["n"]) for r in rows] == [
        ("BFCL_v4_multiple.jsonl[random 2 of 5, seed 0]", "llm-required", 2)
    ]
    assert {c for _, c, _ in sent} == {"required"} and len(records) == 2
    assert metric_name(rows[0], "accuracy") == "bfcl_calls.bfcl.BFCL_v4_multiple.llm-required.accuracy"
    with pytest.raises(ValueError, match="tool_choice"):
        evaluate_bfcl_calls(BFCL, base_url="http://127.0.0.1:9/v1", model="m", tool_choice="none")


def test_bfcl_calls_data_errors(tmp_path: Path) -> None:
    folder = tmp_path / "bfcl"
    folder.mkdir()
    url = "http://127.0.0.1:9/v1"
    assert evaluate_bfcl_calls(folder, base_url=url, model="m") == ([], [])
    shutil.copy(BFCL / "BFCL_v4_multiple.jsonl", folder / "BFCL_v4_multiple.jsonl")
    with pytest.raises(DataFormatError, match="possible_answer_multiple.jsonl"):
        evaluate_bfcl_calls(folder, base_url=url, model="m")
    (folder / "possible_answer_multiple.jsonl").write_text('{"id": "multiple_0", "ground_truth": []}\n')
    with pytest.raises(DataFormatError, match="no answer for 'multiple_1'") as exc:
        evaluate_bfcl_calls(folder, base_url=url, model="m")
    assert exc.value.file == str(folder / "BFCL_v4_multiple.jsonl")
    with pytest.raises(DataFormatError, match="no such folder"):
        evaluate_bfcl_calls(tmp_path / "nowhere", base_url=url, model="m")


def test_bfcl_calls_with_the_real_model(controlplane: str) -> None:
    """SmolLM2-135M-Instruct through the control plane on the shipped sample, both modes."""
    start = time.perf_counter()
    rows, records = evaluate_bfcl_calls(
        BFCL, base_url=controlplane, model=REAL_LLM, limit=2, max_tokens=48, concurrency=4
    )
    _check_bfcl_rows(rows, records)
    assert [(r["eval_file"], r["n"]) for r in rows] == [
        ("BFCL_v4_irrelevance.jsonl[random 2 of 3, seed 0]", 2),
        ("BFCL_v4_multiple.jsonl[random 2 of 5, seed 0]", 2),
    ]
    assert all(r["fallback_fraction"] == 0.0 and r["mean_prompt_tokens"] > 50 for r in rows)
    required, req_records = evaluate_bfcl_calls(
        BFCL, base_url=controlplane, model=REAL_LLM, tool_choice="required", limit=2, max_tokens=64
    )
    _check_bfcl_rows(required, req_records)
    (row,) = required
    # a call is forced and its arguments follow the tool's schema: the model can only be wrong
    # about which function or which values
    assert row["no_call_fraction"] == row["unparsable_fraction"] == row["fallback_fraction"] == 0.0
    assert all(len(r["calls"]) == 1 for r in req_records)
    print(
        f"real model, sample: auto {[(r['eval_file'], r['accuracy']) for r in rows]}, "
        f"required {row['accuracy']:.2f}; {[(r['id'], r['calls']) for r in req_records]}; "
        f"{time.perf_counter() - start:.1f} s"
    )


def test_bfcl_calls_count_refused_requests(tmp_path: Path, controlplane: str) -> None:
    """A prompt longer than the model's context is a 400 context_length_exceeded: counted in
    fallback_fraction, never a crash."""
    folder = tmp_path / "bfcl"
    folder.mkdir()
    functions = json.loads((BFCL / "BFCL_v4_irrelevance.jsonl").read_text().splitlines()[0])["function"]
    lines = [
        {"id": f"irrelevance_{i}", "question": [[{"role": "user", "content": q}]], "function": functions}
        for i, q in enumerate(["Who painted the Mona Lisa?", "天气" * 2500])  # > the tiny LM's 2048 tokens
    ]
    (folder / "BFCL_v4_irrelevance.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows, records = evaluate_bfcl_calls(folder, base_url=controlplane, model=TINY_LLM, max_tokens=8)
    _check_bfcl_rows(rows, records)
    (row,) = rows
    assert row["n"] == 2 and row["fallback_fraction"] == 0.5
    assert row["error:request_error:context_length_exceeded"] == 1
    refused = next(r for r in records if r["id"] == "irrelevance_1")
    assert refused["answer"] == "fallback" and "context" in refused["error"]


@NEEDS_SHARED_BFCL
def test_bfcl_calls_on_the_shared_data(controlplane: str) -> None:
    """Every default file of ../shared/data/agent/bfcl, one case each: the files' formats, prompts
    and scoring. The random-weight model: what it calls does not matter here, and the real one
    spends ~20 s prefilling the long multi-tool prompts (the real model's calls are checked above)."""
    start = time.perf_counter()
    rows, records = evaluate_bfcl_calls(
        SHARED_AGENT / "bfcl", base_url=controlplane, model=TINY_LLM, limit=1, max_tokens=32
    )
    _check_bfcl_rows(rows, records)
    assert [r["eval_file"] for r in rows] == [
        "BFCL_v4_irrelevance.jsonl[random 1 of 240, seed 0]",
        "BFCL_v4_live_irrelevance.jsonl[random 1 of 618, seed 0]",
        "BFCL_v4_live_multiple.jsonl[random 1 of 737, seed 0]",
        "BFCL_v4_multiple.jsonl[random 1 of 200, seed 0]",
    ]
    print(f"shared BFCL, 1 case per file: {time.perf_counter() - start:.1f} s")


# -- the agent benchmark flow's bfcl_calls step ----------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_flow() -> Iterator[Any]:
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).resolve().parents[1]
    yield load_flow_from_entrypoint(f"{root / 'benchmarks' / 'flows' / 'agent.py'}:agent_bench")
    for name in list(sys.modules):
        if name.startswith("__prefect_loader"):
            del sys.modules[name]


def test_agent_flow_bfcl_calls_step(
    agent_flow: Any, prefect_api: str, controlplane: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from sage_prefect.benchmark.tracking import tracking_uri
    from sage_prefect.common.errors import ConfigError

    monkeypatch.setenv("SAGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = agent_flow(
        tasks=["bfcl_calls", "timing"],
        timing_methods=["rule", "llm"],
        llm_limit=2,
        bfcl_calls_limit=2,
        bfcl_tool_choice=["auto", "required"],
        bfcl_max_tokens=16,
        llm_model=TINY_LLM,
        base_url=controlplane,
    )
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("agent")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    metrics, params = run.data.metrics, run.data.params
    assert run.info.run_id == out["mlflow_run_id"]
    assert params["llm_model"] == TINY_LLM and params["bfcl_calls_limit"] == "2"
    assert params["endpoint"] == controlplane and params["llm_limit"] == "2"
    for key in (
        "bfcl_calls.bfcl.BFCL_v4_multiple.llm-auto.accuracy",
        "bfcl_calls.bfcl.BFCL_v4_multiple.llm-required.accuracy",
        "bfcl_calls.bfcl.BFCL_v4_irrelevance.llm-auto.fallback_fraction",
        "bfcl_calls.bfcl.BFCL_v4_irrelevance.llm-auto.no_call_fraction",
        "timing.bfcl.BFCL_v4_irrelevance.llm.fallback_fraction",
        "timing.metatool.timing_dev_holdout.rule.accuracy",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert "bfcl_calls.bfcl.BFCL_v4_irrelevance.llm-required.accuracy" not in metrics
    assert metrics["bfcl_calls.bfcl.BFCL_v4_multiple.llm-auto.n"] == 2
    rows = out["rows"]
    # the llm timing rows score llm_limit items, the rule rows the whole held-out part
    llm_dev = _one(rows, task="timing", method="llm", dataset="metatool")
    assert llm_dev["n"] == 2 and llm_dev["eval_file"].endswith("random 2 of 8, seed 0]")
    assert _one(rows, task="timing", method="rule", dataset="metatool")["n"] == 8
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    cases = json.loads((artifacts / "bfcl_calls_cases.json").read_text())
    assert len(cases) == 2 + 2 + 2 and {c["method"] for c in cases} == {"llm-auto", "llm-required"}
    assert all({"id", "answer", "valid", "error_type", "calls", "content"} <= set(c) for c in cases)
    plots = sorted(p.name for p in (artifacts / "plots").iterdir())
    assert sum(p.startswith("bfcl_calls-bfcl_BFCL_v4_") for p in plots) == 2, plots
    with pytest.raises(ConfigError, match="bfcl_tool_choice"):
        agent_flow(tasks=["bfcl_calls"], bfcl_tool_choice="none", base_url=controlplane)
