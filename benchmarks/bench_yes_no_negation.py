"""Yes/no accuracy of a saved adapter on easy-VQA, split into plain ("is there a red shape?") and negated ("is no
red shape present?") questions, real and grey image: where a one-pass model stands on the parity that the negated
questions make (benchmarks/VISION_LEVERS.md, "One pass from the image").

    python benchmarks/bench_yes_no_negation.py out/run/adapter.safetensors [--limit 400]
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    from peft_vlm.cli import _model_for
    from peft_vlm.data import easy_vqa
    from peft_vlm.evaluation.vqa import Question, grey_image, vqa_accuracy
    from peft_vlm.recipes import evaluation_precision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("--limit", type=int, default=400, help="evenly spaced yes/no test questions")
    args = parser.parse_args(argv)
    model = _model_for(args.adapter, None, [])
    yes_no = [q for q in easy_vqa.questions("test") if easy_vqa.question_type(q.text) == "yes/no"]
    chosen = [yes_no[i * len(yes_no) // args.limit] for i in range(min(args.limit, len(yes_no)))]
    questions = [Question(q.text, q.answer, q.image, "negated" if easy_vqa.is_negated(q.text) else "plain")
                 for q in chosen]
    protocol = model.answer_protocol
    with evaluation_precision(protocol.precision if protocol else None)():
        for image, replace in (("real", None), ("grey", grey_image(model))):
            print(f"{image} image: {vqa_accuracy(model, questions, batch_size=64, replace_image=replace)}")


if __name__ == "__main__":
    main()
