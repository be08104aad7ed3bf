"""BFCL's AST checker (`sage_prefect.benchmark.bfcl`): one hand-made case per rule, each with a
passing and a failing call, the loader and the OpenAI ``tools`` converter, and (when present) the
real ``../shared/data/agent/bfcl`` files: the ground truth must pass its own check."""

from __future__ import annotations

import doctest
import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import SHARED_DATA

from sage_prefect.benchmark import bfcl
from sage_prefect.benchmark.bfcl import (
    CallResult,
    check_call,
    check_calls,
    check_irrelevance,
    load_bfcl_pairs,
    openai_name_map,
    standardize_string,
    summarize,
    to_openai_tools,
)

SHARED_BFCL = SHARED_DATA / "agent" / "bfcl"

FUNCTIONS: list[dict[str, Any]] = [
    {
        "name": "trip.plan",
        "description": "Plan a trip.",
        "parameters": {
            "type": "dict",
            "properties": {
                "city": {"type": "string", "description": "Destination."},
                "days": {"type": "integer", "description": "Length of stay."},
                "budget": {"type": "float", "description": "Budget in USD."},
                "units": {"type": "string", "enum": ["metric", "imperial"], "default": "metric"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "point": {"type": "tuple", "items": {"type": "float"}},
                "hotel": {
                    "type": "dict",
                    "properties": {
                        "stars": {"type": "integer"},
                        "name": {"type": "string"},
                        "breakfast": {"type": "boolean"},
                    },
                },
                "stops": {
                    "type": "array",
                    "items": {
                        "type": "dict",
                        "properties": {"place": {"type": "string"}, "hours": {"type": "float"}},
                    },
                },
                "note": {"type": "any", "description": "Anything."},
                "verbose": {"type": "boolean", "default": False},
            },
            "required": ["city", "days"],
        },
    },
    {
        "name": "news.search",
        "description": "Search news.",
        "parameters": {"type": "dict", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
]

GROUND_TRUTH: list[dict[str, Any]] = [
    {
        "trip.plan": {
            "city": ["San Francisco, CA", "SF"],
            "days": [3],
            "budget": ["", 1500.0],
            "units": ["", "metric"],
            "tags": [["food", "Golden Gate"], ""],
            "point": ["", [37.7, -122.4]],
            "hotel": ["", {"stars": [4, 5], "name": ["Grand Hotel"], "breakfast": ["", True]}],
            "stops": [
                "",
                [{"place": ["Pier 39"], "hours": [2.0]}, {"place": ["Alcatraz"], "hours": ["", 3.0]}],
            ],
            "note": ["", "window seat"],
        }
    }
]


def call(name: str = "trip.plan", **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": {"city": "San Francisco, CA", "days": 3, **arguments}}


def check(c: dict[str, Any]) -> CallResult:
    return check_call(c, FUNCTIONS, GROUND_TRUTH)


def assert_fails(result: CallResult, error_type: str) -> None:
    assert not result.valid, result
    assert result.error_type == error_type, result
    assert result.error


# -- one rule at a time --------------------------------------------------------------------------


def test_right_call_is_valid() -> None:
    assert check(call()) == CallResult(True, None, None)
    full = call(
        budget=1500.0, units="metric", tags=["food", "Golden Gate"], hotel={"stars": 5, "name": "Grand Hotel"}
    )
    assert check(full).valid
    assert not check(call(budget=1400.0)).valid


def test_function_name_as_written_or_with_underscores() -> None:
    assert check(call("trip_plan")).valid  # the name to_openai_tools gives it
    assert_fails(check(call("news.search")), "simple_function_checker:wrong_func_name")
    assert_fails(check(call("trip-plan")), "simple_function_checker:wrong_func_name")
    assert_fails(check(call("Trip.plan")), "simple_function_checker:wrong_func_name")


def test_arguments_may_be_a_json_string() -> None:
    assert check({"name": "trip_plan", "arguments": json.dumps({"city": "SF", "days": 3})}).valid
    assert_fails(check({"name": "trip_plan", "arguments": "{city: SF"}), "ast_decoder:decoder_failed")


def test_missing_required_parameter() -> None:
    assert_fails(
        check({"name": "trip.plan", "arguments": {"city": "SF"}}), "simple_function_checker:missing_required"
    )
    assert check({"name": "trip.plan", "arguments": {"city": "SF", "days": 3}}).valid


def test_unexpected_parameter() -> None:
    # not in the schema
    assert_fails(check(call(airline="KLM")), "simple_function_checker:unexpected_param")
    # in the schema but not in the possible answer
    assert_fails(check(call(verbose=False)), "simple_function_checker:unexpected_param")
    # in the possible answer but not in the schema (an upstream answer error): still unexpected
    truth = [{"trip.plan": {**GROUND_TRUTH[0]["trip.plan"], "airline": ["KLM", ""]}}]
    assert check_call(call(), FUNCTIONS, truth).valid
    assert_fails(
        check_call(call(airline="KLM"), FUNCTIONS, truth), "simple_function_checker:unexpected_param"
    )


def test_optional_parameter_omitted_only_when_the_answer_allows_it() -> None:
    assert check(call()).valid  # budget, units, tags... all list ""
    truth = [{"trip.plan": {**GROUND_TRUTH[0]["trip.plan"], "units": ["imperial"]}}]
    assert_fails(check_call(call(), FUNCTIONS, truth), "simple_function_checker:missing_optional")
    assert check_call(call(units="imperial"), FUNCTIONS, truth).valid
    # passing the value "" where "" is acceptable is accepted too, as BFCL does
    assert check(call(units="")).valid


def test_int_accepted_for_float_not_the_other_way() -> None:
    assert check(call(budget=1500)).valid
    assert check(call(point=[37.7, -122.4])).valid
    assert_fails(check(call(days=3.0)), "type_error:simple")
    assert_fails(check(call(days=True)), "type_error:simple")
    assert_fails(check(call(budget="1500")), "type_error:simple")


def test_wrong_type() -> None:
    assert_fails(check(call(days="3")), "type_error:simple")
    assert_fails(check(call(city=["SF"])), "type_error:simple")
    assert_fails(check(call(tags="food")), "type_error:simple")
    assert_fails(check(call(tags=["food", 7])), "type_error:nested")
    assert_fails(check(call(hotel={"stars": "5", "name": "Grand Hotel"})), "type_error:nested")
    assert check(call(note="Window-Seat")).valid  # "any": no type constraint, value still checked
    assert_fails(check(call(note="aisle")), "value_error:string")
    truth = [{"trip.plan": {"city": ["SF"], "days": [3], "note": [1]}}]
    assert check_call(call(city="SF", note=1), FUNCTIONS, truth).valid
    assert check_call(call(city="SF", note=1.0), FUNCTIONS, truth).valid
    assert_fails(
        check_call(call(city="SF", note=True), FUNCTIONS, truth), "value_error:others"
    )  # True is not 1


def test_variable_rule_accepts_the_answers_own_type() -> None:
    # BFCL: an answer typed unlike the schema (a variable name) accepts a value of its type
    truth = [{"trip.plan": {"city": ["SF"], "days": ["num_days"]}}]
    assert check_call(call(city="SF", days="num_days"), FUNCTIONS, truth).valid
    assert_fails(check_call(call(city="SF", days="NUM_DAYS"), FUNCTIONS, truth), "value_error:others")
    assert_fails(check_call(call(city="SF", days=[3]), FUNCTIONS, truth), "type_error:simple")


def test_string_standardisation() -> None:
    for city in ("san francisco ca", "San-Francisco,CA.", "SAN_FRANCISCO ,CA", "s.f."):
        assert check(call(city=city)).valid, city
    assert_fails(check(call(city="Los Angeles")), "value_error:string")
    assert_fails(check(call(city="San Francisco CA!")), "value_error:string")  # "!" is not stripped
    assert standardize_string("It's 1/2-3_4*5^6.") == 'it"s123456'


def test_list_values_element_wise() -> None:
    assert check(call(tags=["FOOD", "golden-gate"])).valid
    assert_fails(check(call(tags=["Golden Gate", "food"])), "value_error:list/tuple")  # order matters
    assert_fails(check(call(tags=["food"])), "value_error:list/tuple")
    assert_fails(check(call(tags=["food", "golden gate", "bay"])), "value_error:list/tuple")
    assert_fails(check(call(point=[37.7, -122.5])), "value_error:list/tuple")


def test_dict_values_key_by_key() -> None:
    assert check(call(hotel={"stars": 4, "name": "grand hotel"})).valid
    assert check(call(hotel={"stars": 5, "name": "Grand Hotel", "breakfast": True})).valid
    assert_fails(check(call(hotel={"stars": 3, "name": "Grand Hotel"})), "value_error:dict_value")
    assert_fails(check(call(hotel={"stars": 4, "name": "Ritz"})), "value_error:dict_value")
    assert_fails(check(call(hotel={"stars": 4})), "value_error:dict_key")  # name is not optional
    assert_fails(check(call(hotel={"stars": 4, "name": "Grand Hotel", "pool": True})), "value_error:dict_key")
    assert_fails(check(call(hotel={"stars": 4, "name": "Grand Hotel", "breakfast": 1})), "type_error:nested")


def test_list_of_dicts() -> None:
    good = [{"place": "pier 39", "hours": 2}, {"place": "Alcatraz"}]
    assert check(call(stops=good)).valid
    assert check(call(stops=[good[0], {"place": "Alcatraz", "hours": 3.0}])).valid
    assert_fails(check(call(stops=good[:1])), "value_error:list_dict_count")
    assert_fails(check(call(stops=[good[1], good[0]])), "value_error:dict_value")
    assert_fails(check(call(stops=[{"place": "Pier 39"}, good[1]])), "value_error:dict_key")  # hours required
    assert_fails(check(call(stops=[{"place": "Pier 39", "hours": "2"}, good[1]])), "type_error:nested")


def test_exactly_one_call_for_multiple() -> None:
    one = call()
    assert check_calls([one], FUNCTIONS, GROUND_TRUTH).valid
    assert_fails(check_calls([one, one], FUNCTIONS, GROUND_TRUTH), "multiple_function_checker:wrong_count")
    assert_fails(check_calls([], FUNCTIONS, GROUND_TRUTH), "multiple_function_checker:wrong_count")
    with pytest.raises(ValueError, match="one function"):
        check_calls([one], FUNCTIONS, GROUND_TRUTH * 2)


def test_ground_truth_naming_an_unknown_function_is_an_error() -> None:
    with pytest.raises(ValueError, match="not among the functions"):
        check_call({"name": "nope", "arguments": {}}, FUNCTIONS, [{"nope": {}}])


def test_irrelevance_means_no_call() -> None:
    assert check_irrelevance([]) == CallResult(True, None, None)
    assert_fails(check_irrelevance([call()]), "irrelevance_error:decoder_success")


def test_summarize() -> None:
    results = [check(call()), check(call(days="3")), check(call(days="4")), check_irrelevance([])]
    assert summarize(results) == {
        "n": 4,
        "correct": 2,
        "accuracy": 0.5,
        "error_types": {"type_error:simple": 2},
    }
    assert math.isnan(summarize([])["accuracy"])


def test_module_docstring_examples() -> None:
    assert doctest.testmod(bfcl).failed == 0


# -- files and tools -------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_pairs(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "Plan 3 days in SF"}]
    q = _write_jsonl(tmp_path / "q.jsonl", [{"id": "m_0", "question": [messages], "function": FUNCTIONS}, ""])
    a = _write_jsonl(tmp_path / "a.jsonl", [{"id": "m_0", "ground_truth": GROUND_TRUTH}])
    (case,) = load_bfcl_pairs(q, a)
    assert (case.id, case.messages, case.functions, case.ground_truth) == (
        "m_0",
        messages,
        FUNCTIONS,
        GROUND_TRUTH,
    )
    assert load_bfcl_pairs(str(q))[0].ground_truth is None


def test_load_pairs_names_file_and_line(tmp_path: Path) -> None:
    good = {"id": "m_0", "question": [[{"role": "user", "content": "hi"}]], "function": FUNCTIONS}
    bad = _write_jsonl(tmp_path / "bad.jsonl", [good, "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_bfcl_pairs(bad)
    no_turns = _write_jsonl(tmp_path / "turns.jsonl", [good, good | {"id": "m_1", "question": []}])
    with pytest.raises(ValueError, match=r"turns\.jsonl:2: 'question'"):
        load_bfcl_pairs(no_turns)
    q = _write_jsonl(tmp_path / "q.jsonl", [good, good | {"id": "m_1"}])
    a = _write_jsonl(tmp_path / "a.jsonl", [{"id": "m_0", "ground_truth": GROUND_TRUTH}])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: no answer for 'm_1'"):
        load_bfcl_pairs(q, a)
    bad_answer = _write_jsonl(tmp_path / "ba.jsonl", [{"id": "m_0", "ground_truth": {"f": {}}}])
    with pytest.raises(ValueError, match=r"ba\.jsonl:1: 'ground_truth'"):
        load_bfcl_pairs(q, bad_answer)


def test_to_openai_tools() -> None:
    tools = to_openai_tools(FUNCTIONS)
    assert [t["function"]["name"] for t in tools] == ["trip_plan", "news_search"]
    assert openai_name_map(FUNCTIONS) == {"trip_plan": "trip.plan", "news_search": "news.search"}
    params = tools[0]["function"]["parameters"]
    props = params["properties"]
    assert tools[0]["type"] == "function" and tools[0]["function"]["description"] == "Plan a trip."
    assert params["type"] == "object" and params["required"] == ["city", "days"]
    assert props["budget"]["type"] == "number" and props["days"]["type"] == "integer"
    assert props["point"] == {"type": "array", "items": {"type": "number"}}
    assert props["hotel"]["properties"]["stars"] == {"type": "integer"}
    assert props["stops"]["items"]["type"] == "object"
    assert props["stops"]["items"]["properties"]["hours"] == {"type": "number"}
    assert props["note"] == {"description": "Anything."}
    assert FUNCTIONS[0]["parameters"]["type"] == "dict"  # the input is left alone
    for tool in tools:
        jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])
    validator = jsonschema.Draft202012Validator(params)
    assert validator.is_valid({"city": "SF", "days": 3, "budget": 10, "note": [1]})
    assert not validator.is_valid({"city": "SF", "days": 3, "hotel": {"stars": "five"}})
    with pytest.raises(ValueError, match="both map to"):
        to_openai_tools([{"name": "a.b", "parameters": {}}, {"name": "a_b", "parameters": {}}])
    with pytest.raises(ValueError, match="not a valid OpenAI tool name"):
        to_openai_tools([{"name": "a b", "parameters": {}}])


# -- the real BFCL files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bfcl_dir() -> Path:
    if not SHARED_BFCL.is_dir():
        pytest.skip(
            f"../shared/data not present: BFCL files expected at {SHARED_BFCL} (see ../shared/data/README.md)"
        )
    return SHARED_BFCL


def _first_acceptable(answer: Any) -> Any:
    """A value from a possible answer: the first acceptable value, recursively through dicts."""
    if isinstance(answer, dict):
        return {k: _first_acceptable(v[0]) for k, v in answer.items() if "" not in v}
    if isinstance(answer, list):
        return [_first_acceptable(v) for v in answer]
    return answer


def _ground_truth_call(case: bfcl.BfclCase) -> dict[str, Any]:
    """The ground truth as a call: each parameter's first acceptable value; parameters listing ""
    are omitted unless the schema requires them (then their first other value, when there is one)."""
    assert case.ground_truth is not None and len(case.ground_truth) == 1
    ((name, params),) = case.ground_truth[0].items()
    doc = next(f for f in case.functions if f["name"] == name)
    required = set(doc["parameters"].get("required", []))
    arguments = {}
    for param, answers in params.items():
        others = [a for a in answers if a != ""]
        if others and ("" not in answers or param in required):
            arguments[param] = _first_acceptable(others[0])
    return {"name": name, "arguments": arguments}


@pytest.mark.parametrize("category", ["multiple", "live_multiple"])
def test_real_ground_truth_passes_its_own_check(bfcl_dir: Path, category: str) -> None:
    cases = load_bfcl_pairs(
        bfcl_dir / f"BFCL_v4_{category}.jsonl", bfcl_dir / f"possible_answer_{category}.jsonl"
    )
    assert len(cases) >= 100
    results = [check_calls([_ground_truth_call(c)], c.functions, c.ground_truth or []) for c in cases]
    summary = summarize(results)
    failed = [(c.id, r.error) for c, r in zip(cases, results, strict=True) if not r.valid]
    print(f"{category}: ground truth self-check {summary}; failing: {failed}")
    assert summary["accuracy"] >= 0.99, failed
    # the checker is not vacuous on real data: another function offered, or the call without one
    # of its required arguments, fails
    for case in cases:
        gt_call = _ground_truth_call(case)
        truth = case.ground_truth or []
        for other in (f["name"] for f in case.functions if f["name"] != gt_call["name"]):
            result = check_calls([{**gt_call, "name": other}], case.functions, truth)
            assert result.error_type == "simple_function_checker:wrong_func_name", (case.id, other)
        doc = next(f for f in case.functions if f["name"] == gt_call["name"])
        for param in set(doc["parameters"].get("required", [])) & set(gt_call["arguments"]):
            arguments = {k: v for k, v in gt_call["arguments"].items() if k != param}
            result = check_calls([{**gt_call, "arguments": arguments}], case.functions, truth)
            assert result.error_type == "simple_function_checker:missing_required", (case.id, param)


@pytest.mark.parametrize(
    "name",
    [
        "BFCL_v4_multiple.jsonl",
        "BFCL_v4_live_multiple.jsonl",
        "BFCL_v4_irrelevance.jsonl",
        "BFCL_v4_live_irrelevance.jsonl",
        "BFCL_v4_live_relevance.jsonl",
    ],
)
def test_real_functions_convert_to_valid_json_schema(bfcl_dir: Path, name: str) -> None:
    cases = load_bfcl_pairs(bfcl_dir / name)
    assert cases and all(c.ground_truth is None and c.messages for c in cases)
    checked: set[str] = set()  # the live files repeat function docs: check each distinct schema once
    for case in cases:
        tools = to_openai_tools(case.functions)
        assert set(openai_name_map(case.functions).values()) == {f["name"] for f in case.functions}
        for tool in tools:
            assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", tool["function"]["name"])
            parameters = tool["function"]["parameters"]
            assert parameters["type"] == "object"
            key = json.dumps(parameters, sort_keys=True)
            if key not in checked:
                jsonschema.Draft202012Validator.check_schema(parameters)
                checked.add(key)
    assert len(checked) >= len(cases) // 4
