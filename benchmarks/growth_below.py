"""A bank grown from the stream against a 50-image registration, for one class and one draw.

Usage: python benchmarks/growth_below.py SPLIT CLASS SEED [BELOW]
  e.g. python benchmarks/growth_below.py A commutator 0 1.0   (about 5 minutes on 2 cores; BELOW
  defaults to GrowthConfig's)

Reads the card of benchmarks/results/accuracy/splitSPLIT, ../shared/data/industrial and the shared
ResNet-18 weights. Registers CLASS from 50 random train/good images (draw SEED), streams 200 of its
other train/good images with 5% test defects from its 4 most diverse ones with bank growth at
``below`` (GrowthConfig), and prints one JSON line: how many frames and defects joined, the image
AUROC and the FRR/escape at the line threshold of the grown and the 50-image banks (on the test
set without the streamed defects), the escape at 1% FRR. Choose ``below`` on source classes only.
"""
import sys, json, time
import numpy as np, torch
from inspector.model import InspectionModel, load_backbone_weights
from inspector.artifact import read_card
from inspector.banks.normal import NormalStats, StreamConfig, calibrated, scale_of
from inspector.banks.register import raw_scores_against
from inspector.banks.growth import GrowthConfig
from trainer import evaluate as E, line_eval, metrics
from trainer.data import ImageCache

split, cls, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
below = float(sys.argv[4]) if len(sys.argv) > 4 else GrowthConfig().below
root = "../shared/data/industrial"
t0 = time.time()
card = read_card(f"benchmarks/results/accuracy/split{split}")
model = InspectionModel(card.model_config).eval()
load_backbone_weights(model.backbone, "../shared/weights/resnet18-imagenet1k-l1-l3.safetensors")
thr = card.training["thresholds"]["bank"]
test = E.load_test_set(model, root, [cls], False, per_class=200, seed=0)
rng = np.random.default_rng(seed)
_, _, _, info = E.register_draw(model, root, [cls], rng, 50)
ci = info[0]
labels = test.labels
def rates(raw, u, g):
    r = metrics.rate_at_threshold(labels_k, calibrated(raw, u, g), thr)
    return round(r["false_reject_rate"], 4), round(r["escape_rate"], 4)
def esc_at_frr(raw, frr):
    good = raw[labels_k == 0]
    t = metrics.threshold_at_false_reject_rate(good, frr)
    return round(float((raw[labels_k == 1] <= t).mean()), 4)
# the stream
start = NormalStats.from_registration(cls, model.leave_one_out_scores(ci.shot_features).tolist(), ci.registered.normal.method)
good = ci.unused[:200]
spare = ci.unused[200:260] or ci.unused[:0]
feats = E.extract_features(model, ImageCache.load(good, model.input_size).images, progress=False)
spare_feats = E.extract_features(model, ImageCache.load(spare, model.input_size).images, progress=False) if spare else None
good_raw = raw_scores_against(model, feats, ci.baseline)
raw_b = raw_scores_against(model, test.features, ci.baseline)
order = line_eval.stream_order(len(good_raw), int((labels == 1).sum()), 200, 0.05, rng)
keep = np.ones(len(labels), bool); keep[np.flatnonzero(labels == 1)] = line_eval.held_out(order, int((labels == 1).sum()))
labels_k = labels[keep]
test_kept = [f[keep] for f in test.features]
reg = ci.registered
reg_raw = raw_scores_against(model, test_kept, reg.bank)
res = {"class": cls, "split": split, "seed": seed, "below": below, "stream_defects": int(order.defect.sum())}
res["reg50"] = {"auroc": round(metrics.roc_auc(labels_k, reg_raw), 4), "u_gamma": [reg.normal.u, reg.normal.gamma],
                "rates": rates(reg_raw, reg.normal.u, reg.normal.gamma)}
reg_frr = res["reg50"]["rates"][0]
raws = {"reg50": (reg_raw, reg.bank)}
out = line_eval.simulate_growing_stream(model, start, ci.baseline, len(ci.shot_features[0]), order,
    [f.float() for f in feats], [f[labels == 1].float() for f in test.features], thr, StreamConfig(),
    GrowthConfig(max_images=model.cfg.bank.images, below=below), [f.float() for f in test_kept],
    labels_k, model.cfg.bank.coreset)
joined = out["joined"]
g_raw = raw_scores_against(model, test_kept, out["bank"])
last = out["trace"][-1]
name = "grown"
res[name] = {"joined": len(joined), "joined_defects": int(order.defect[joined].sum()), "growths": out["growths"],
             "auroc": round(metrics.roc_auc(labels_k, g_raw), 4), "u_gamma": [last["u"], last["gamma"]],
             "rates": rates(g_raw, last["u"], last["gamma"]), "stream_frr": round(out["stream_frr"], 4)}
raws[name] = (g_raw, out["bank"])
for name, (raw, bank) in raws.items():
    res[name]["esc_at_1pct"] = esc_at_frr(raw, 0.01)
    res[name]["esc_at_reg_frr"] = esc_at_frr(raw, max(reg_frr, 0.005))
    res[name]["test_good_q90"] = round(float(np.quantile(raw[labels_k == 0], 0.9)), 5)
    if spare:  # statistics measured on unseen train/good frames against the bank (what an ideal calibration would give)
        u, g = scale_of(raw_scores_against(model, spare_feats, bank).tolist(), "q90")
        res[name]["spare_q90"] = [u, g, rates(raw, u, g)]
res["seconds"] = round(time.time() - t0)
print(json.dumps(res, default=float))
