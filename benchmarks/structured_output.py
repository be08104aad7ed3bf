"""Structured output: what grammar-constrained decoding (``response_format`` json_schema) costs the
local engine, and what it buys, on the real model at concurrency 16.

64 chat requests ask for a JSON answer about a short text, under three JSON schemas with nested
objects, enums and arrays (`SCHEMAS`: a person with an address, an order with items and shipping,
a product review with scores, pros and cons; strings of at most 48 characters and arrays of at
most 3 items, so that every valid object fits in ``--max-tokens``: a constrained output cut off
at max_tokens is not valid JSON); the system prompt gives the schema, so the model knows what
to write in every arm. In one run, on one engine, ``--concurrency`` (16) in flight:

  free         (a) unconstrained: the prompt alone asks for JSON
  constrained  (b) the same requests with ``response_format={"type": "json_schema", ...}``: the
               engine masks each row's logits with its llguidance grammar at every step

each greedy (temperature 0) and sampled (temperature 0.8, ``seed`` = the request's index), i.e.
four passes of the 64 requests. Reported per pass: completion tokens/s, the share of outputs
that parse as JSON (the whole text; and, for (a), leniently: the first ``{`` to the last ``}``,
which forgives Markdown fences and chatter) and that validate against the request's schema
(``jsonschema``), and the ratio of tokens/s (b)/(a) (goal >= 0.85x), also per CPU-second of this process (less
sensitive to other processes' load than wall time). The cost of the grammar is
also timed inside the engine (`llm_batching.EngineTimer`): mask computation per step (on the mask
thread, overlapped with the forward pass), time the sampler waits for and applies the masks, the
decode step's wall time by batch size in both arms, and the grammar compile per request.

Run:  .venv/bin/python benchmarks/structured_output.py [--model smollm2-135m-instruct] [--threads 1]
          [--dtype auto] [--requests 64] [--concurrency 16] [--max-tokens 192] [--no-sampled]
Writes benchmarks/results/structured_output.json (``--out``) and prints a table (about 14
minutes on the 2-core machine: four passes of 3-4 minutes; ``--no-sampled`` halves it). ``--model tiny`` (random weights) runs too, but its free output is noise:
only the constrained arm's validity and the costs mean anything there.

Measure on an otherwise idle machine (see `llm_batching`); the load average before and after
the run is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llm_batching import (  # noqa: E402
    EngineTimer,
    print_caveats,
    progress_bar,
    report_header,
    run_engine,
)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sage_prefect.controlplane.engines.base import GenerationRequest  # noqa: E402
from sage_prefect.controlplane.engines.local_llm import TransformersLLMEngine  # noqa: E402
from sage_prefect.controlplane.structured import check_response_format  # noqa: E402

GOAL = 0.85
SAMPLED_TEMPERATURE = 0.8

_SHORT = {"type": "string", "maxLength": 48}
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": _SHORT,
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "occupation": _SHORT,
            "address": {
                "type": "object",
                "properties": {"street": _SHORT, "city": _SHORT, "country": _SHORT},
                "required": ["street", "city", "country"],
                "additionalProperties": False,
            },
            "languages": {"type": "array", "items": _SHORT, "minItems": 1, "maxItems": 3},
            "contact": {"type": "string", "enum": ["email", "phone", "post"]},
        },
        "required": ["name", "age", "occupation", "address", "languages", "contact"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "customer": _SHORT,
            "status": {"type": "string", "enum": ["pending", "shipped", "delivered", "cancelled"]},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "product": _SHORT,
                        "quantity": {"type": "integer", "minimum": 1},
                        "unit_price": {"type": "number", "minimum": 0},
                    },
                    "required": ["product", "quantity", "unit_price"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            },
            "shipping": {
                "type": "object",
                "properties": {
                    "method": {"type": "string", "enum": ["standard", "express"]},
                    "city": _SHORT,
                },
                "required": ["method", "city"],
                "additionalProperties": False,
            },
        },
        "required": ["customer", "status", "items", "shipping"],
        "additionalProperties": False,
    },
    "review": {
        "type": "object",
        "properties": {
            "product": _SHORT,
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
            "scores": {
                "type": "object",
                "properties": {
                    "quality": {"type": "integer", "minimum": 1, "maximum": 5},
                    "value": {"type": "integer", "minimum": 1, "maximum": 5},
                    "delivery": {"type": "integer", "minimum": 1, "maximum": 5},
                },
                "required": ["quality", "value", "delivery"],
                "additionalProperties": False,
            },
            "pros": {"type": "array", "items": _SHORT, "maxItems": 3},
            "cons": {"type": "array", "items": _SHORT, "maxItems": 3},
        },
        "required": ["product", "rating", "sentiment", "scores", "pros", "cons"],
        "additionalProperties": False,
    },
}

PEOPLE = (
    "Maria Lopez is 34 and works as a nurse. She lives at 12 Harbour Road in Lisbon, Portugal, "
    "speaks Portuguese and English, and prefers to be contacted by email.",
    "Tom Becker, a 58-year-old carpenter, has a workshop at 4 Mill Lane, Freiburg, Germany. He only "
    "speaks German. Call him on the phone.",
    "Aiko Tanaka (27) is a software engineer living at 3-1 Sakura Street, Osaka, Japan. Languages: "
    "Japanese, English, a little Korean. Email is best.",
    "Our new tenant, Kwame Mensah, is 41 and teaches history. Address: 88 Ring Road, Accra, Ghana. "
    "He speaks English, Twi and French and asked for letters by post.",
    "Sofia Rossi, 19, student of architecture, Via Roma 21, Turin, Italy; speaks Italian and Spanish; "
    "reach her by phone.",
    "Dr. Anil Sharma is a 65-year-old retired surgeon. He lives at 7 Lake View Road, Pune, India, "
    "speaks Hindi, Marathi and English, and likes to receive post.",
    "Emma Wilson is a 30-year-old pilot based at 150 King Street, Toronto, Canada. She speaks English "
    "and French. Please use email.",
    "Lars Nilsson, baker, aged 47, Storgatan 5, Uppsala, Sweden. Swedish and English. Phone preferred.",
    "The applicant, Fatima Zahra, is 23, a lab technician at 19 Rue des Fleurs, Casablanca, Morocco. "
    "She speaks Arabic, French and English and wants answers by email.",
    "Jorge Silva (52), fisherman, Rua do Porto 3, Porto, Portugal. Speaks Portuguese. Post only.",
    "Chloe Martin is a 38-year-old journalist who lives at 22 Rue Victor Hugo in Lyon, France. She "
    "speaks French, English and German and prefers the phone.",
)
ORDERS = (
    "Order for Jane Smith: two blue mugs at 8.50 each and one teapot at 24.00. It was shipped by "
    "express to Manchester.",
    "Customer Ahmed Khan ordered three notebooks (2.99 each). Status pending, standard delivery to Leeds.",
    "Li Wei's order has been delivered to Shanghai with standard shipping: one laptop stand for "
    "35.00, one USB cable for 6.50 and four stickers at 1.00 each.",
    "Cancelled: Peter Novak's order of one bicycle helmet (59.90), standard shipping to Prague.",
    "Olga Petrova bought five packets of seeds at 3.20 and one watering can at 12.75; the order "
    "shipped express to Kyiv.",
    "Pending order from Carlos Ruiz: one pair of running shoes, 89.99, express delivery to Madrid.",
    "Anna Kowalski's order was delivered by standard post to Krakow. It had two jars of honey at 7.40 each.",
    "The order of Samuel Okafor (shipped, express, to Lagos): one phone case for 15.00 and two "
    "screen protectors at 9.99.",
    "Hannah Berg ordered a desk lamp for 42.00, two light bulbs at 4.50 and one extension cord at "
    "11.00. Still pending; standard shipping to Oslo.",
    "Delivered to Dublin by express: Sean Murphy's order of one wool scarf at 25.00.",
    "Yuki Sato's order is cancelled. It was three boxes of green tea at 6.80, standard, to Kyoto.",
)
REVIEWS = (
    "Review of the Aero kettle: boils fast and looks great, but the lid is stiff. Good value, arrived "
    "a day late. Four stars.",
    "The TrailPro backpack is excellent: tough fabric, lots of pockets, cheap for what you get. "
    "Delivery was quick. Five stars!",
    "Disappointed with the SoundMax headphones. The sound is muddy and they hurt after an hour. "
    "Shipping was fine. Two stars.",
    "The Comfy office chair is okay. Comfortable enough, a bit expensive, delivery took two weeks. "
    "Three stars.",
    "Bought the ChefMate knife set. Very sharp, nice handles, fair price, and it came the next day. "
    "Five stars.",
    "The PixelView monitor died after a week. Poor quality, not worth the money, slow delivery. One star.",
    "SleepWell pillow: soft and supportive, reasonable price, delivered on time. The smell at first "
    "was strange. Four stars.",
    "The Rapid blender is loud and leaks from the base, though it is cheap and arrived fast. Two stars.",
    "GreenLeaf plant pot: pretty, solid, good price, packed carefully. Five stars from me.",
    "Meh. The BrightDesk lamp works but the light is cold, it cost too much, and delivery was average. "
    "Three stars.",
)
TEXTS = {"person": PEOPLE, "order": ORDERS, "review": REVIEWS}
ASK = {
    "person": "Extract the person described in this text.",
    "order": "Extract the order described in this text.",
    "review": "Extract the product review in this text, with scores from 1 to 5.",
}


def request_spec(i: int) -> tuple[str, list[dict[str, Any]]]:
    """The ``i``-th request: its schema's name and its chat messages."""
    kind = ("person", "order", "review")[i % 3]
    texts = TEXTS[kind]
    text = texts[(i // 3) % len(texts)]
    system = (
        "You turn text into JSON. Reply with one JSON object and nothing else, matching this JSON "
        f"schema:\n{json.dumps(SCHEMAS[kind])}"
    )
    user = f"{ASK[kind]}\n\nText: {text}"
    return kind, [{"role": "system", "content": system}, {"role": "user", "content": user}]


def response_format(kind: str) -> dict[str, Any]:
    fmt = check_response_format(
        {"type": "json_schema", "json_schema": {"name": kind, "schema": SCHEMAS[kind]}}
    )
    assert fmt is not None
    return fmt


def check_output(text: str, schema: dict[str, Any]) -> dict[str, bool]:
    """Whether the text parses as JSON and validates (strictly: the whole text; leniently: the
    first '{' to the last '}')."""
    import jsonschema

    def judge(candidate: str) -> tuple[bool, bool]:
        try:
            value = json.loads(candidate)
        except ValueError:
            return False, False
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError:
            return True, False
        return True, True

    parses, valid = judge(text.strip())
    start, end = text.find("{"), text.rfind("}")
    lenient = judge(text[start : end + 1]) if start != -1 and end > start else (False, False)
    return {"parses": parses, "valid": valid, "parses_lenient": lenient[0], "valid_lenient": lenient[1]}


def pass_summary(
    results: list[dict[str, Any]],
    seconds: float,
    cpu_seconds: float,
    kinds: list[str],
    steps: dict[int, int],
    timing: dict[str, Any],
) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in results)
    checks = [check_output(r["text"], SCHEMAS[k]) for r, k in zip(results, kinds, strict=True)]
    n = len(results)
    n_steps = sum(steps.values())
    return {
        "seconds": round(seconds, 3),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 2),
        "cpu_seconds": round(cpu_seconds, 3),
        "tokens_per_cpu_s": round(tokens / cpu_seconds, 2),
        "completion_tokens_per_request": {
            "min": min(r["tokens"] for r in results),
            "median": statistics.median(r["tokens"] for r in results),
            "max": max(r["tokens"] for r in results),
        },
        "finish_reasons": {
            reason: sum(r["finish_reason"] == reason for r in results)
            for reason in sorted({str(r["finish_reason"]) for r in results})
        },
        "share_parses": round(sum(c["parses"] for c in checks) / n, 3),
        "share_valid": round(sum(c["valid"] for c in checks) / n, 3),
        # among the outputs that ended by themselves (not cut off at max_tokens): the grammar
        # guarantees these; a cut-off output is unfinished JSON whatever the arm
        "share_valid_of_ended": round(
            sum(c["valid"] for c, r in zip(checks, results, strict=True) if r["finish_reason"] == "stop")
            / max(1, sum(r["finish_reason"] == "stop" for r in results)),
            3,
        ),
        "share_parses_lenient": round(sum(c["parses_lenient"] for c in checks) / n, 3),
        "share_valid_lenient": round(sum(c["valid_lenient"] for c in checks) / n, 3),
        "mean_decode_batch": round(sum(k * v for k, v in steps.items()) / max(n_steps, 1), 2),
        "decode_steps": n_steps,
        "engine_time_breakdown": timing,
        "example_output": results[0]["text"][:400],
        "invalid_outputs": [
            {"request": i, "schema": k, "finish_reason": r["finish_reason"], "text": r["text"][:600]}
            for i, (r, k, c) in enumerate(zip(results, kinds, checks, strict=True))
            if not c["valid"]
        ][:4],
    }


async def bench(args: argparse.Namespace, console: Console) -> dict[str, Any]:

    load_before = os.getloadavg()
    engine = TransformersLLMEngine(
        args.model, max_batch_size=args.concurrency, threads=args.threads, dtype=args.dtype
    )
    specs = [request_spec(i) for i in range(args.requests)]
    kinds = [k for k, _ in specs]
    prompts = [engine.render_chat(messages) for _, messages in specs]
    formats = {kind: response_format(kind) for kind in SCHEMAS}

    def requests(constrained: bool, temperature: float) -> list[GenerationRequest]:
        return [
            GenerationRequest(
                id=f"req-{i}",
                prompt=p,
                max_tokens=args.max_tokens,
                temperature=temperature,
                seed=i if temperature > 0 else None,
                response_format=formats[kinds[i]] if constrained else None,
            )
            for i, p in enumerate(prompts)
        ]

    passes: list[tuple[str, bool, float]] = [("greedy", False, 0.0), ("greedy", True, 0.0)]
    if args.sampled:
        passes += [("sampled", False, SAMPLED_TEMPERATURE), ("sampled", True, SAMPLED_TEMPERATURE)]
    out: dict[str, dict[str, Any]] = {}
    try:
        # warm-up: lazy inits, the llguidance tokenizer (built on the first constrained request)
        warm = requests(True, 0.0)[: args.concurrency]
        for r in warm:
            r.max_tokens = 4
        await run_engine(engine, warm, args.concurrency)
        timer = EngineTimer(engine)
        with progress_bar(console) as progress:
            for mode, constrained, temperature in passes:
                arm = "constrained" if constrained else "free"
                engine.step_batch_sizes.clear()
                timer.reset()
                label = f"{'(b)' if constrained else '(a)'} {arm}, {mode}"
                cpu = time.process_time()
                results, seconds = await run_engine(
                    engine, requests(constrained, temperature), args.concurrency, progress, label
                )
                cpu = time.process_time() - cpu
                steps = dict(sorted(engine.step_batch_sizes.items()))
                out.setdefault(mode, {})[arm] = pass_summary(
                    results, seconds, cpu, kinds, steps, timer.report(seconds)
                )
    finally:
        await engine.aclose()
    load_after = os.getloadavg()

    for mode in out:
        free, constrained = out[mode]["free"], out[mode]["constrained"]
        ratio = constrained["tokens_per_s"] / free["tokens_per_s"]
        out[mode]["ratio_constrained_vs_free_tokens_per_s"] = round(ratio, 3)
        out[mode]["goal_met"] = ratio >= GOAL
        out[mode]["ratio_constrained_vs_free_tokens_per_cpu_s"] = round(
            constrained["tokens_per_cpu_s"] / free["tokens_per_cpu_s"], 3
        )
        out[mode]["mask_cost"] = mask_cost(
            free["engine_time_breakdown"], constrained["engine_time_breakdown"]
        )
    prompt_tokens = [engine.count_tokens(p) for p in prompts]
    return {
        **report_header("structured_output.py", engine, args.model, load_before, load_after),
        "dtype": args.dtype,
        "threads": args.threads,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "sampled_temperature": SAMPLED_TEMPERATURE,
        "schemas": {kind: kinds.count(kind) for kind in SCHEMAS},
        "prompt_tokens": {
            "min": min(prompt_tokens),
            "median": statistics.median(prompt_tokens),
            "max": max(prompt_tokens),
        },
        "goal_ratio": GOAL,
        **out,
    }


def mask_cost(free: dict[str, Any], constrained: dict[str, Any]) -> dict[str, Any]:
    """The grammar's cost per decode step: mask computation (off the critical path while it is
    shorter than the forward pass), the sampler's extra time (waiting for and applying masks),
    the extra time in ``advance`` (``consume``), and the decode step's wall time at each batch
    size seen in both arms."""
    fp, cp = free["parts"], constrained["parts"]

    def per_call(parts: dict[str, Any], name: str) -> float:
        return parts.get(name, {}).get("ms_per_call", 0.0)

    fill = cp.get("fill_masks", {})
    steps_free, steps_con = free["decode_step_ms_by_batch_size"], constrained["decode_step_ms_by_batch_size"]
    common = sorted(set(steps_free) & set(steps_con))
    return {
        "fill_masks_ms_per_step": fill.get("ms_per_call"),
        "fill_masks_steps": fill.get("calls"),
        "forward_decode_ms_per_step_constrained": per_call(cp, "forward_decode"),
        "sample_ms_per_call_free": per_call(fp, "sample"),
        "sample_ms_per_call_constrained": per_call(cp, "sample"),
        "apply_masks_ms_per_call": per_call(cp, "apply_masks"),
        "advance_ms_per_token_free": per_call(fp, "advance"),
        "advance_ms_per_token_constrained": per_call(cp, "advance"),
        "grammar_compile_ms_per_request": per_call(cp, "prepare"),
        "prepare_ms_per_request_free": per_call(fp, "prepare"),
        "decode_step_ms_by_batch_size": {
            b: {"free": steps_free[b], "constrained": steps_con[b]} for b in common
        },
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(
        f"{report['requests']} JSON requests ({', '.join(f'{k} x{v}' for k, v in report['schemas'].items())}), "
        f"{report['concurrency']} in flight, max_tokens {report['max_tokens']}, dtype {report['dtype']}, "
        f"{report['threads']} torch thread(s); {report['machine']}; load average before "
        f"{report['load_average_before'][0]}, after {report['load_average_after'][0]}"
    )
    console.print(f"model: {report['model']}")
    table = Table()
    cols = (
        "pass",
        "tok/s",
        "tok/CPU-s",
        "tokens",
        "seconds",
        "batch",
        "parse",
        "valid",
        "parse~",
        "valid~",
        "valid|ended",
        "(b)/(a)",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "pass" else "right")
    for mode in ("greedy", "sampled"):
        if mode not in report:
            continue
        for arm in ("free", "constrained"):
            s = report[mode][arm]
            ratio = ""
            if arm == "constrained":
                ok = "met" if report[mode]["goal_met"] else "NOT met"
                ratio = f"{report[mode]['ratio_constrained_vs_free_tokens_per_s']:.2f}x ({ok})"
            table.add_row(
                f"{'(b)' if arm == 'constrained' else '(a)'} {arm}, {mode}",
                f"{s['tokens_per_s']:.1f}",
                f"{s['tokens_per_cpu_s']:.1f}",
                str(s["completion_tokens"]),
                f"{s['seconds']:.1f}",
                f"{s['mean_decode_batch']:.1f}",
                f"{100 * s['share_parses']:.0f}%",
                f"{100 * s['share_valid']:.0f}%",
                f"{100 * s['share_parses_lenient']:.0f}%",
                f"{100 * s['share_valid_lenient']:.0f}%",
                f"{100 * s['share_valid_of_ended']:.0f}%",
                ratio,
            )
    console.print(table)
    console.print(
        f"parse/valid: the whole output parses as JSON / validates against its schema; ~: leniently, "
        f"first '{{' to last '}}'; valid|ended: valid among the outputs not cut off at max_tokens. Goal (b)/(a) >= {GOAL}x. batch: mean decode batch size."
    )
    for mode in ("greedy", "sampled"):
        if mode in report:
            m = report[mode]["mask_cost"]
            console.print(
                f"{mode}: masks {m['fill_masks_ms_per_step']} ms/step on the mask thread (forward "
                f"{m['forward_decode_ms_per_step_constrained']} ms/step); sample {m['sample_ms_per_call_free']} -> "
                f"{m['sample_ms_per_call_constrained']} ms/step; advance {m['advance_ms_per_token_free']} -> "
                f"{m['advance_ms_per_token_constrained']} ms/token; grammar compile "
                f"{m['grammar_compile_ms_per_request']} ms/request"
            )
    print_caveats(report, console)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="model-store name, local Hugging Face directory, or 'tiny' (random weights) "
        "(default: smollm2-135m-instruct)",
    )
    parser.add_argument("--requests", type=int, default=64, help="requests per pass (default 64)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--max-tokens", type=int, default=192, help="max_tokens per request (default 192)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine (default 1)")
    parser.add_argument("--dtype", default="auto", help="engine dtype: auto (float32 on CPU), bfloat16, ...")
    parser.add_argument(
        "--sampled",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also run the sampled passes (temperature {SAMPLED_TEMPERATURE}, seeded; default on)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "structured_output.json"
    )
    args = parser.parse_args()

    console = Console(width=None if sys.stdout.isatty() else 140)
    report = asyncio.run(bench(args, console))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, console)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
