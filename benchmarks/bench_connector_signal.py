"""What a freshly initialised connector passes on of the image: the image-dependent share of its output and a
linear probe of colour and shape from it, on easy-VQA training images with the embedded default's tower
(benchmarks/VISION_LEVERS.md, "Flamingo's resampler").

    python benchmarks/bench_connector_signal.py [--connectors mlp2x_gelu,perceiver_resampler,qformer] [--images 600]

The share is the variance of the output across images over its mean square: 1.0 when every image gives a
different output of mean zero, near 0 when every image gives nearly the same output. The probes (multinomial
logistic regression on the standardised output, fitted on two thirds of the images, scored on the rest) say
whether colour and shape can still be read from it, in fp32 and in bf16 autocast.
"""
from __future__ import annotations

import argparse

import torch


def probe(features: torch.Tensor, labels: torch.Tensor, fit: int, steps: int = 300) -> float:
    """Held-out accuracy of a linear classifier of `labels` from `features` (rows `fit:` held out)."""
    mean, std = features[:fit].mean(0), features[:fit].std(0) + 1e-6
    features = (features - mean) / std
    weight = torch.zeros(features.shape[1], int(labels.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features[:fit] @ weight + bias, labels[:fit])
        (loss + 1e-3 * weight.square().sum()).backward()
        optimizer.step()
    with torch.no_grad():
        return ((features[fit:] @ weight + bias).argmax(1) == labels[fit:]).float().mean().item()


def image_share(output: torch.Tensor) -> float:
    flat = output.flatten(1)
    return ((flat - flat.mean(0)).square().mean() / flat.square().mean()).item()


def main(argv: list[str] | None = None) -> None:
    import peft_vlm as pv
    from peft_vlm.data import easy_vqa

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connectors", default="mlp2x_gelu,perceiver_resampler,qformer")
    parser.add_argument("--images", type=int, default=600, help="training images with a known colour and shape")
    parser.add_argument("--tokens", default="pooled", help="the tower's vision_options tokens (pooled or patches)")
    args = parser.parse_args(argv)
    known = easy_vqa.annotations("train")
    paths = {q.image_id: q.image for q in easy_vqa.questions("train")}
    ids = [i for i, (colour, shape) in known.items() if colour and shape][: args.images]
    labels = {}
    for index, kind in enumerate(("colour", "shape")):
        names = sorted({known[i][index] for i in ids})
        labels[kind] = torch.tensor([names.index(known[i][index]) for i in ids])
    fit = 2 * len(ids) // 3
    print(f"{len(ids)} images ({fit} to fit the probes, {len(ids) - fit} to score them), tokens={args.tokens}\n")
    print("| connector | visual tokens | image-dependent share | colour probe | shape probe | colour probe, bf16 |")
    print("|---|---|---|---|---|---|")
    for connector in args.connectors.split(","):
        torch.manual_seed(0)
        model = pv.VisionLanguageModel.from_pretrained("embedded", vision="embedded_contrastive", connector=connector,
                                                       vision_options={"tokens": args.tokens}).eval()
        with torch.no_grad():
            features = model.vision_tower(model.pixel_values([paths[i] for i in ids]))
            output = model.connector(features).float()
            with torch.autocast("cpu", torch.bfloat16):
                output_bf16 = model.connector(features).float()
        flat = output.flatten(1)
        print(f"| {connector} | {output.shape[1]} x {output.shape[2]} | {image_share(output):.4f} | "
              f"{probe(flat, labels['colour'], fit):.3f} | {probe(flat, labels['shape'], fit):.3f} | "
              f"{probe(output_bf16.flatten(1), labels['colour'], fit):.3f} |", flush=True)


if __name__ == "__main__":
    main()
