"""A short real run on the embedded default: SmolLM2-135M-Instruct + a small open_clip ViT, LoRA, easy-vqa.

    python recipes/quickstart.py [--steps 40]

Trains the connector and LoRA for a few steps on real easy-vqa questions, answers test questions before and after,
saves the adapter and prints what the file holds. It shows the whole path works; it is too short to learn much.
"""
import argparse
import random
import time

import peft
import torch
from PIL import Image

import peft_vlm as pv
from peft_vlm.embedded import default_language_model_path, register_default_vision


def easy_vqa_split(split: str):
    import easy_vqa

    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    return [(q, a, paths[i]) for q, a, i in zip(questions, answers, image_ids)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="out/quickstart")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    start = time.time()

    model = pv.VisionLanguageModel.from_pretrained(default_language_model_path(), vision=register_default_vision())
    pv.apply(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    print(pv.trainable_summary(model))

    train, test = easy_vqa_split("train"), easy_vqa_split("test")
    examples = random.sample(test, 3)

    def answer_examples(title):
        answers = model.generate(images=[Image.open(p) for _, _, p in examples], prompts=[q for q, _, _ in examples], max_new_tokens=6)
        print(title)
        for (question, truth, _), answer in zip(examples, answers):
            print(f"  Q: {question}  expected: {truth}  model: {answer.strip()!r}")

    answer_examples("before training:")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(1, args.steps + 1):
        rows = random.sample(train, args.batch_size)
        batch = model.tokenize([q for q, _, _ in rows], [Image.open(p) for _, _, p in rows], answers=[a for _, a, _ in rows])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == 1:
            print(f"step {step:>4}  loss {loss.item():.3f}  ({time.time() - start:.0f} s)")
    model.eval()
    answer_examples("after training:")
    path = pv.save_adapter(model, args.out)
    print(pv.describe_adapter(path))
    print(f"wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
