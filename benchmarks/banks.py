"""Reference-bank costs: time to add a product, bytes per level, load-and-swap, coreset trade.

    python benchmarks/banks.py [--data ../shared/data/industrial] [--weights FILE] [--artifact DIR]
                               [--store URL] [--coresets none,4096,1024,256] [--test-images 40]

- add: ``inspector bank add`` end to end (read 4 image files, backbone, bank, bank-mode
  statistics through the full graph, encode, store) per real class; median over classes.
- bytes: fp16 bank size per product and level at the model's input size.
- swap: ``BankWatcher.refresh`` after one product changed, with 1, 4 and 16 products in service
  (fetch + validate the changed blob, stack and pad all of them); median over repeats.
- coreset: memory against detection for each cap on vectors per level, using the training-free
  residual magnitude (``1 - cos`` to the nearest bank vector, blurred, top-1% image score): the
  bank's content enters the model only through this nearest-neighbour residual, so this isolates
  what the coreset removes. Image and pixel AUROC per class, 4 random good shots per draw.

Without ``--artifact`` the timing model is the default configuration with untrained heads: the
same graph and the same arithmetic as a trained one. Results go to
``benchmarks/results/banks.json`` and ``.md`` with the machine and commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trainer.benchmark import commit, machine

from inspector.artifact import backbone_info, backbone_signature, load_artifact
from inspector.banks import BankMeta, BankWatcher, encode_bank, open_store
from inspector.banks.record import content_digest
from inspector.banks.register import read_shots, register_product
from inspector.model import InspectionModel, ModelConfig, build_bank, load_backbone_weights
from inspector.model.calibration import top_fraction_mean
from trainer.data import list_classes, list_samples, load_image, load_mask
from trainer.metrics import roc_auc

REPO = Path(__file__).resolve().parents[1]
SHOTS = 4
PIXEL_STRIDE = 4  # pixel AUROC on every 4th row and column: 16x fewer pixels, same ranking statistics


def load_model(args) -> tuple[InspectionModel, str, str]:
    if args.artifact:
        model, card = load_artifact(args.artifact)
        return model, card.signature, card.model_id
    torch.manual_seed(0)
    model = InspectionModel(ModelConfig()).eval()
    sha = load_backbone_weights(model.backbone, args.weights)
    return model, backbone_signature(backbone_info(model, sha)), "untrained-heads"


def bench_add(model, signature, model_id, data, classes, store_url, images: int = SHOTS) -> dict:
    """``bank add`` end to end (read the files, features, bank, cross-scored statistics, encode,
    store) of ``images`` good images per class; with more than ``SHOTS`` the bank holds up to the
    model's ``bank.images`` of them, as ``bank add`` does by default."""
    store = open_store(store_url)
    bank_images = SHOTS if images <= SHOTS else model.cfg.bank.images
    times = {}
    for cls in classes:
        files = [s.path for s in list_samples(data, cls, "train")[:images]]
        t0 = time.perf_counter()
        shots = read_shots(files, model.input_size)
        reg = register_product(model, signature, model_id, cls, shots, bank_images, model.cfg.bank.coreset,
                               min_images=SHOTS)
        store.put("bench", encode_bank(reg.bank, reg.meta), reg.meta)
        times[cls] = time.perf_counter() - t0
        print(f"[banks] add {cls} from {len(files)} images: {times[cls]:.2f}s", file=sys.stderr)
    levels = reg.meta.levels
    return {
        "images": images,
        "bank_images": bank_images,
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "median_seconds": round(statistics.median(times.values()), 3),
        "bytes_per_level": [n * c * 2 for n, c in levels],
        "levels": levels,
        "bytes_per_product": reg.meta.nbytes,
        "store": store.url,
    }


def bench_swap(model, signature, store_url, repeats: int) -> dict:
    """Refresh time after one product changed, with P products in service (random unit banks of
    the model's full size: the time depends on sizes only)."""
    out = {}
    rng = np.random.default_rng(0)
    feats = [torch.randn(SHOTS, c, *g) for c, g in zip(model.channels, model.grids)]
    b = build_bank(feats).with_stats(0.0, 1.0)

    def meta_for(name: str) -> BankMeta:
        return BankMeta(product=name, signature=signature, shots=SHOTS, images=[],
                        levels=[list(f.shape) for f in b.features], u=0.0, gamma=1.0, model_id="bench",
                        created_at="", content_sha256=content_digest(b))

    for products in (1, 4, 16):
        root = tempfile.mkdtemp(prefix="banks-swap-")
        store = open_store(store_url if store_url.startswith("redis") else f"file://{root}",
                           prefix=f"bench-swap-{products}-{rng.integers(1 << 30)}")
        for i in range(products):
            m = meta_for(f"p{i}")
            store.put("bench", encode_bank(b, m), m)
        w = BankWatcher(store, "bench", signature, model.channels)
        w.refresh()
        times = []
        for _ in range(repeats):
            m = meta_for("p0")
            store.put("bench", encode_bank(b, m), m)
            t0 = time.perf_counter()
            assert w.refresh()
            times.append(time.perf_counter() - t0)
        out[str(products)] = {"median_ms": round(1000 * statistics.median(times), 2),
                              "max_ms": round(1000 * max(times), 2)}
        print(f"[banks] swap with {products} products: {out[str(products)]['median_ms']} ms", file=sys.stderr)
    return out


@torch.no_grad()
def nn_scores(model, bank, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training-free residual maps: image scores and maps for ``(N, S, S, 3)`` images."""
    scores, maps = [], []
    for i in range(0, len(images), 8):
        feats = model.extract(torch.from_numpy(images[i : i + 8]))
        dist = []
        for level, f in enumerate(feats):
            refs = bank.features[level].unsqueeze(0).expand(f.shape[0], -1, -1)
            _, sim = model.residual(level, f, refs)
            dist.append(1.0 - sim)
        m = model.fuse(dist)
        scores.append(top_fraction_mean(m, model.cfg.score.top_fraction).numpy())
        maps.append(m[:, 0, ::PIXEL_STRIDE, ::PIXEL_STRIDE].numpy())
    return np.concatenate(scores), np.concatenate(maps)


def bench_coreset(model, data, classes, caps, n_test: int, draws: int) -> dict:
    size = model.input_size
    table = {}
    for cls in classes:
        train = list_samples(data, cls, "train")
        test = list_samples(data, cls, "test")
        rng = np.random.default_rng(0)
        good = [s for s in test if s.label == 0]
        bad = [s for s in test if s.label == 1]
        pick = [good[i] for i in rng.permutation(len(good))[: n_test // 2]] + \
               [bad[i] for i in rng.permutation(len(bad))[: n_test // 2]]
        images = np.stack([load_image(s.path, size) for s in pick])
        labels = np.array([s.label for s in pick])
        masks = np.stack([(load_mask(s, size) if s.label else np.zeros((size, size), bool))
                          if (s.label == 0 or s.mask_path) else np.zeros((size, size), bool) for s in pick])
        masks = masks[:, ::PIXEL_STRIDE, ::PIXEL_STRIDE]
        has_mask = np.array([s.label == 0 or s.mask_path is not None for s in pick])
        table[cls] = {}
        for draw in range(draws):
            idx = np.random.default_rng(100 + draw).permutation(len(train))[:SHOTS]
            shots = torch.from_numpy(np.stack([load_image(train[i].path, size) for i in idx]))
            with torch.no_grad():
                feats = model.extract(shots)
            for cap in caps:
                bank = build_bank(feats, cap, seed=draw)
                score, maps = nn_scores(model, bank, images)
                entry = table[cls].setdefault(str(cap), {"image_auroc": [], "pixel_auroc": [],
                                                         "bytes": bank.nbytes - 4 * (bank.prototype.numel() + 2)})
                entry["image_auroc"].append(roc_auc(labels, score))
                pixel_labels = masks[has_mask].ravel()
                entry["pixel_auroc"].append(roc_auc(pixel_labels, maps[has_mask].ravel())
                                            if pixel_labels.any() else float("nan"))  # class without masks
            print(f"[banks] coreset {cls} draw {draw} done", file=sys.stderr)
        for entry in table[cls].values():
            for k in ("image_auroc", "pixel_auroc"):
                entry[k] = round(float(np.mean(entry[k])), 4)  # NaN stays NaN: shown as "-"
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "industrial"))
    p.add_argument("--weights", default=str(REPO.parent / "shared" / "weights" / "resnet18-imagenet1k-l1-l3.safetensors"))
    p.add_argument("--artifact")
    p.add_argument("--store", default=None, help="store for the add and swap timings (default: a temporary file:// store)")
    p.add_argument("--coresets", default="none,4096,1024,256")
    p.add_argument("--test-images", type=int, default=40, help="test images per class (half good, half defective)")
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "banks"))
    p.add_argument("--no-coreset", action="store_true", help="only the add and swap timings")
    p.add_argument("--add-images", type=int, default=50,
                   help="good images per class for the registration timing (besides the 4-shot one)")
    args = p.parse_args(argv)
    for path in (args.data, args.weights if not args.artifact else args.artifact):
        if not Path(path).exists():
            print(f"error: {path} is missing: this benchmark reads the shared real data and weights", file=sys.stderr)
            return 2
    torch.set_grad_enabled(False)
    model, signature, model_id = load_model(args)
    classes = list_classes(args.data)
    store_url = args.store or f"file://{tempfile.mkdtemp(prefix='banks-add-')}"
    caps = [None if c == "none" else int(c) for c in args.coresets.split(",")]
    result = {
        "machine": machine(), "commit": commit(), "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "input_size": model.input_size, "model": model_id, "threads": torch.get_num_threads(),
        "add": bench_add(model, signature, model_id, args.data, classes, store_url),
        "add_many": bench_add(model, signature, model_id, args.data, classes, store_url, args.add_images),
        "swap": bench_swap(model, signature, store_url, args.repeats),
    }
    previous = Path(args.out).with_suffix(".json")
    if args.no_coreset and previous.is_file():  # keep the last measured coreset table
        result["coreset"] = json.loads(previous.read_text())["coreset"]
        result["coreset_measured"] = json.loads(previous.read_text()).get("coreset_measured", "earlier run")
    else:
        result["coreset"] = bench_coreset(model, args.data, classes, caps, args.test_images, args.draws)
        result["coreset_measured"] = result["measured"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result, caps))
    print(markdown(result, caps))
    return 0


def many_line(r: dict) -> str:
    """The many-image registration timing, or a note that this run predates it."""
    if "add_many" not in r:
        return "- add from many images: not measured in this run"
    m = r["add_many"]
    return (f"- add a product from {m['images']} good images (`bank add`, end to end: bank of up to {m['bank_images']} "
            f"images, every image cross-scored for the normal statistics): median {m['median_seconds']} s ("
            + ", ".join(f"{k} {v}" for k, v in m["seconds"].items()) + ")")


def markdown(r: dict, caps) -> str:
    add = r["add"]
    lines = [
        "# Reference banks: cost and coreset trade-off", "",
        f"measured {r['measured']} on {r['machine']['cpu']} ({r['machine']['threads']} threads), torch "
        f"{r['machine']['torch']}, commit {r['commit']}; input {r['input_size']} px; model {r['model']}",
        "", f"- add a 4-shot product (`bank add`, end to end): median {add['median_seconds']} s over "
        f"{len(add['seconds'])} classes ({', '.join(f'{k} {v}' for k, v in add['seconds'].items())}); store {add['store']}",
        many_line(r),
        "- bytes per product: " + f"{add['bytes_per_product']:,} (" + ", ".join(
            f"level {i}: {n} x {c} = {b:,}" for i, ((n, c), b) in enumerate(zip(add["levels"], add["bytes_per_level"]))) + ")",
        "- load and swap after one product changed: " + ", ".join(
            f"{p} products {v['median_ms']} ms (max {v['max_ms']})" for p, v in r["swap"].items()),
        "", "| coreset cap per level | bytes per product | " + " | ".join(
            f"{c} img / pix AUROC" for c in r["coreset"]) + " | mean img / pix |",
        "|---|---|" + "---|" * (len(r["coreset"]) + 1),
    ]
    for cap in caps:
        row = [r["coreset"][c][str(cap)] for c in r["coreset"]]
        img = np.nanmean([e["image_auroc"] for e in row])
        pix = np.nanmean([e["pixel_auroc"] for e in row])
        lines.append(f"| {cap or 'all'} | {row[0]['bytes']:,} | " + " | ".join(
            f"{e['image_auroc']:.3f} / {e['pixel_auroc']:.3f}" for e in row) + f" | {img:.3f} / {pix:.3f} |")
    lines += ["", "AUROC of the training-free residual magnitude (1 - cos to the nearest bank vector), "
              "the part of the score the bank determines; 4 random good shots per draw."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
