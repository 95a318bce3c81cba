"""`kvyard bench accuracy`: few-shot accuracy of a running server on a local JSONL file.

Two question styles (no download: the file is yours; examples/accuracy/ has small ones):
  gsm8k  {"question", "answer": "... #### 42"}: the model writes a worked answer; the last number
         it writes before the next "Question:" is compared with the number after "####".
  mmlu   {"question", "choices": [..], "answer": "B" (or an index)}: the model writes one letter.
The first --num-shots lines are the worked examples of every prompt (they are not scored); the
next --num-questions lines are scored. Requests go to native /generate (greedy), --parallel at a
time; one JSON line per run with --output-file.

    kvyard bench accuracy --base-url http://127.0.0.1:30000 --data-path q.jsonl --style gsm8k
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import Optional

from kvyard.bench.common import append_result, console
from kvyard.cli.common import OneLineParser, run_reporting_errors

LETTERS = "ABCDEFGHIJ"
NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="kvyard bench accuracy", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--data-path", required=True, help="JSONL file of questions (see above)")
    p.add_argument("--style", choices=("gsm8k", "mmlu"), required=True)
    p.add_argument("--num-shots", type=int, default=5)
    p.add_argument("--num-questions", type=int, default=None, help="default: every line after the shots")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 256 (gsm8k), 2 (mmlu)")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--output-file", default=None)
    return p


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: asyncio.run(run(ns)))


# -- questions -----------------------------------------------------------------------------
def load_rows(path: str, style: str) -> list[dict]:
    rows = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            need = ("question", "answer") if style == "gsm8k" else ("question", "choices", "answer")
            missing = [k for k in need if k not in row]
            if missing:
                raise ValueError(f"data_path: line {number} has no {missing[0]!r} field")
            rows.append(row)
    return rows


def gold(row: dict, style: str) -> str:
    if style == "gsm8k":
        return _number(row["answer"].split("####")[-1]) or ""
    answer = row["answer"]
    return LETTERS[answer] if isinstance(answer, int) else str(answer).strip().upper()[:1]


def render(row: dict, style: str, with_answer: bool) -> str:
    if style == "gsm8k":
        text = f"Question: {row['question']}\nAnswer:"
        if with_answer:
            worked, _, final = row["answer"].rpartition("####")
            text += f" {worked.strip()} The answer is {final.strip()}.\n\n"
        return text
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(row["choices"]))
    text = f"Question: {row['question']}\n{options}Answer:"
    return text + (f" {gold(row, style)}\n\n" if with_answer else "")


def predicted(output: str, style: str) -> Optional[str]:
    if style == "gsm8k":
        found = NUMBER.findall(output.split("Question:")[0])
        return _number(found[-1]) if found else None
    letter = output.strip()[:1].upper()
    return letter if letter in LETTERS else None


def _number(text: str) -> Optional[str]:
    found = NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    value = float(found[-1].rstrip("."))
    return str(int(value)) if value.is_integer() else str(value)


# -- the run -------------------------------------------------------------------------------
async def run(ns) -> int:
    import httpx

    rows = load_rows(ns.data_path, ns.style)
    if ns.num_shots < 0 or ns.num_shots >= len(rows):
        raise ValueError(f"num_shots must be in [0, {len(rows) - 1}] for {len(rows)} lines, got {ns.num_shots}")
    shots, questions = rows[:ns.num_shots], rows[ns.num_shots:][:ns.num_questions]
    prefix = "".join(render(r, ns.style, True) for r in shots)
    max_new = ns.max_new_tokens or (256 if ns.style == "gsm8k" else 2)
    stop = ["Question:", "\n\n"] if ns.style == "gsm8k" else ["\n"]
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    gate = asyncio.Semaphore(max(1, ns.parallel))
    async with httpx.AsyncClient(base_url=ns.base_url.rstrip("/"), headers=headers, timeout=None) as client:
        async def ask(row: dict) -> str:
            async with gate:
                r = await client.post("/generate", json={"text": prefix + render(row, ns.style, False),
                                                         "sampling_params": {"max_new_tokens": max_new,
                                                                             "temperature": 0, "stop": stop}})
                r.raise_for_status()
                return r.json()["text"]

        with console.status(f"{len(questions)} questions to {ns.base_url}…"):
            outputs = await asyncio.gather(*(ask(r) for r in questions))
    correct = sum(predicted(o, ns.style) == gold(r, ns.style) for o, r in zip(outputs, questions))
    invalid = sum(predicted(o, ns.style) is None for o in outputs)
    result = {"bench": "accuracy", "style": ns.style, "data_path": ns.data_path, "num_shots": ns.num_shots,
              "num_questions": len(questions), "accuracy": correct / len(questions),
              "invalid": invalid / len(questions)}
    console.print(f"accuracy {result['accuracy']:.3f} ({correct}/{len(questions)}), "
                  f"invalid answers {invalid}", highlight=False)
    append_result(ns.output_file, result)
    return 0
