"""``inspector bank ...``: register, list, show, remove, export and import reference banks.

Where the banks live comes from ``--store``, else the line's config (file, ``INSPECTOR_*``
environment), else the embedded ``file://`` default; the password only ever comes from the
environment, systemd credentials or the config file, and is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def coreset_arg(text: str):
    """argparse type of ``--coreset``: one cap, one per level, or ``all``."""
    from ..model.bank import parse_coreset

    try:
        return parse_coreset(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _common(p: argparse.ArgumentParser, product: bool = True) -> None:
    """The arguments every ``bank`` subcommand takes: the line, the product, where the banks are."""
    p.add_argument("--line", required=True, help="line name, e.g. 3")
    if product:
        p.add_argument("--product", required=True, help="product name: letters, digits, _ . -")
    p.add_argument("--store", help="redis://host:port/db, rediss://..., or file:///dir (default: the line's config)")
    p.add_argument("--config", help="line config TOML (default /etc/inspector/line<L>.toml when present)")


def _add_add_parser(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser(
        "add", help="register a product from its good images (30 or more recommended)",
        description="Register a product from its good images. Up to --bank-images of them (the most diverse "
                    "when more are given) form the reference bank, reduced to a coreset per level; every image "
                    "is scored against a bank that does not contain it (the other folds of a 5-fold split) to "
                    "measure the product's normal score statistics, which put it on the line's one threshold "
                    "scale. Give 30 to 64 good images: more images in the bank find more defects, and with "
                    "fewer than 30 the statistics are uncertain until the stream or feedback has refined them.")
    _common(p)
    p.add_argument("images", nargs="+", help="image files or folders of good images (30 or more recommended)")
    p.add_argument("--bank-images", type=int, help="most images kept in the bank (default: the model's, 64)")
    p.add_argument("--shots", type=int, help="fewest distinct good images accepted (default: the model's, 4)")
    p.add_argument("--coreset", type=coreset_arg,
                   help="cap on bank vectors per level (greedy k-center): one for every level or one per level, "
                        "e.g. 4096,1024,1024 (default: the card's)")
    p.add_argument("--artifact", help="model artifact (default: the line config's engine.artifact)")
    p.add_argument("--seed", type=int, default=0)


def add_bank_parser(sub: argparse._SubParsersAction) -> None:
    bank = sub.add_parser("bank", help="manage a line's reference banks (products)")
    cmds = bank.add_subparsers(dest="bank_command", required=True)
    _add_add_parser(cmds)
    p = cmds.add_parser("list", help="products registered on a line")
    _common(p, product=False)
    p.add_argument("--json", action="store_true")

    p = cmds.add_parser("show", help="one product's bank: shots, version, size, signature, statistics")
    _common(p)
    p.add_argument("--version", type=int, help="a stored version (default: the active one)")
    p.add_argument("--json", action="store_true")

    p = cmds.add_parser(
        "feedback", help="confirm good parts: re-measure a product's statistics with them, no restart",
        description="Score images an operator confirmed good against the product's bank and add them to its "
                    "normal set; its statistics are measured again and every worker on the line serves them "
                    "within one bank poll, without retraining or a restart.")
    _common(p)
    p.add_argument("--good", nargs="+", default=[], help="image files or folders of confirmed-good parts")
    p.add_argument("--archived", nargs="+", default=[], metavar="FRAME_ID",
                   help="frames from the failed-frame archive an operator confirmed good (with --archive-dir)")
    p.add_argument("--archive-dir", help="the line's archive directory ([archive] dir)")
    p.add_argument("--artifact", help="model artifact (default: the line config's engine.artifact)")

    p = cmds.add_parser("remove", help="stop inspecting a product on a line")
    _common(p)

    p = cmds.add_parser("export", help="write a product's bank to a portable file")
    _common(p)
    p.add_argument("--out", required=True, help="file to write (.bank)")
    p.add_argument("--version", type=int)

    p = cmds.add_parser("import", help="register a product from an exported bank file")
    _common(p, product=False)
    p.add_argument("file", help="an exported .bank file")
    p.add_argument("--product", help="register under this name (default: the name in the file)")
    p.add_argument("--artifact", help="check the bank against this model before importing")


def _config(args: argparse.Namespace):
    from ..config import default_config_path, load_config

    path = args.config
    if path is None and default_config_path(args.line).is_file():
        path = default_config_path(args.line)
    overrides = {"banks.store": args.store} if args.store else {}
    if getattr(args, "artifact", None):
        overrides["engine.artifact"] = args.artifact
    return load_config(path, os.environ, overrides, args.line)


def _store(cfg):
    from ..banks import open_configured_store

    return open_configured_store(cfg.banks)


def cmd_bank(args: argparse.Namespace) -> int:
    from ..artifact import ArtifactError
    from ..banks import BankError, NotFound, StoreError

    try:
        cfg = _config(args)
        store = _store(cfg)
        try:
            return BANK_COMMANDS[args.bank_command](args, cfg, store)
        finally:
            store.close()
    except (BankError, StoreError, ArtifactError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 3


def _load_model(cfg):
    from ..artifact import load_artifact

    if not cfg.engine.artifact:
        raise ValueError("no model artifact: pass --artifact or set engine.artifact in the line config")
    return load_artifact(cfg.engine.artifact)


def _add(args, cfg, store) -> int:
    from ..banks import BankError, encode_bank
    from ..banks.register import read_shots, register_product

    from ..banks.watcher import over_capacity
    from ..model.bank import bank_capacity, bank_vectors
    from ..model.bank import describe_coreset, level_caps

    t0 = time.perf_counter()
    model, card = _load_model(cfg)
    bank_cfg = card.model_config.bank
    shots = args.shots if args.shots is not None else bank_cfg.shots
    bank_images = args.bank_images if args.bank_images is not None else bank_cfg.images
    coreset = args.coreset if args.coreset is not None else bank_cfg.coreset
    for name, value in (("--shots", shots), ("--bank-images", bank_images)):
        if value is not None and value < 1:
            raise BankError("bad_argument", f"{name} must be a positive count, got {value}")
    try:
        caps = level_caps(coreset, len(model.grids))
    except ValueError as err:
        raise BankError("bad_argument", f"--coreset: {err}") from None
    if any(c is None for c in caps) and args.coreset is not None:
        raise BankError("bad_argument", f"--coreset must be a positive count per level, got {describe_coreset(coreset)}")
    images = read_shots(args.images, model.input_size)
    capacity = bank_capacity(model)
    distinct = min(len({im.sha256 for im in images}), bank_images)  # the bank's images: known before any feature
    expected = bank_vectors(model, distinct, caps)
    _refuse_over_capacity([(n, got, c) for n, (got, c) in enumerate(zip(expected, capacity)) if got > c],
                          capacity, bank_cfg.images)
    say = lambda msg: print(f"[bank] {msg}", file=sys.stderr)  # noqa: E731
    reg = register_product(model, card.signature, card.model_id, args.product, images, bank_images, coreset,
                           args.seed, progress=say, min_images=shots)
    _refuse_over_capacity(over_capacity(reg.bank, capacity), capacity, bank_cfg.images)
    if reg.meta.candidates > len(reg.chosen):
        say(f"picked the {len(reg.chosen)} most diverse of {reg.meta.candidates} images for the bank; the others "
            f"were scored against it")
    version, epoch = store.put(args.line, encode_bank(reg.bank, reg.meta), reg.meta)
    normal = reg.meta.normal
    print(f"registered {args.product} version {version} on line {args.line} (epoch {epoch}) in "
          f"{time.perf_counter() - t0:.1f}s: {reg.meta.shots} images in the bank, {reg.meta.nbytes / 2**20:.2f} MiB, "
          f"normal statistics from {normal['count']} scores, {_how(normal)} "
          f"(u {reg.meta.u:.4f}, gamma {reg.meta.gamma:.4f}), store {store.url}")
    if normal["thin"]:
        say(f"warning: only {normal['count']} good-image scores behind {args.product}'s statistics: its threshold is "
            f"uncertain until self-calibration (stream) or `inspector bank feedback` refines them; register from "
            f"30 or more good images to avoid this")
    return 0


def _refuse_over_capacity(over, capacity, card_images: int) -> None:
    """``bank_too_large`` naming each level ``(level, vectors, capacity)`` that does not fit."""
    from ..banks import BankError

    if over:
        raise BankError("bank_too_large", "the bank would not fit the model's compiled capacity ("
                        + ", ".join(f"level {n + 1}: {got} vectors, capacity {c}" for n, got, c in over)
                        + f"): register with --bank-images {card_images} or fewer, or --coreset "
                        + ",".join(map(str, capacity)))


def _archived_frames(args) -> list:
    """The archived model inputs of ``--archived`` frame ids, each checked to be this product's."""
    from ..worker.archive import FRAME_FILE, find_entry
    from ..banks import BankError

    if not args.good and not args.archived:
        raise BankError("no_images", "give confirmed-good images with --good or archived frames with --archived")
    if not args.archived:
        return []
    if not args.archive_dir:
        raise BankError("no_archive", "--archived needs --archive-dir (the line's [archive] dir)")
    paths = []
    for frame_id in args.archived:
        entry = find_entry(args.archive_dir, frame_id)
        if entry is None:
            raise BankError("not_archived", f"frame {frame_id!r} is not in the archive {args.archive_dir}")
        product = entry.result().get("product")
        if product != args.product:
            raise BankError("wrong_product", f"archived frame {frame_id!r} was judged as {product!r}, not {args.product!r}")
        paths.append(entry.path / FRAME_FILE)
    return paths


def _feedback(args, cfg, store) -> int:
    import numpy as np

    from ..banks import BankError, decode_bank
    from ..banks.feedback import confirm_good
    from ..banks.normal import calibrated
    from ..banks.register import extract, raw_scores_against, read_shots

    model, card = _load_model(cfg)
    images = read_shots([*args.good, *_archived_frames(args)], model.input_size)
    meta = store.meta(args.line, args.product)
    shots = {im["sha256"] for im in meta.images}
    inside = [im.name for im in images if im.sha256 in shots]
    if inside:
        raise BankError("in_bank", f"{', '.join(inside)} are shots in {args.product}'s bank: an image cannot be "
                                   "scored against a bank that contains it")
    bank, meta = decode_bank(store.blob(args.line, args.product, meta.version), card.signature, model.channels)
    meta = meta.with_version(store.state(args.line).products.get(args.product, meta.version))
    raw = raw_scores_against(model, extract(model, np.stack([im.pixels for im in images])), bank)
    current, new = confirm_good(store, args.line, meta, raw.tolist())
    print(f"feedback for {args.product} on line {args.line}: {len(images)} confirmed-good images; statistics from "
          f"{new.count} scores (u {current.u:.4f} -> {new.u:.4f}, gamma {current.gamma:.4f} -> {new.gamma:.4f}); "
          f"workers serve them within one bank poll")
    for im, r in zip(images, raw):
        print(f"  {im.name}: score {calibrated(float(r), current.u, current.gamma):.3f} before, "
              f"{calibrated(float(r), new.u, new.gamma):.3f} now")
    return 0


def _list(args, cfg, store) -> int:
    state = store.state(args.line)
    rows = []
    for product, version in sorted(state.products.items()):
        meta = store.meta(args.line, product, version)
        rows.append({"product": product, "version": version, "shots": meta.shots,
                     "mib": round(meta.nbytes / 2**20, 3), "created_at": meta.created_at})
    if args.json:
        print(json.dumps({"line": args.line, "epoch": state.epoch, "products": rows}, indent=2))
        return 0
    print(f"line {args.line}: {len(rows)} products, epoch {state.epoch}, store {store.url}")
    if rows:
        print(f"{'product':<24}{'version':>8}{'shots':>7}{'MiB':>8}  created")
        for r in rows:
            print(f"{r['product']:<24}{r['version']:>8}{r['shots']:>7}{r['mib']:>8.2f}  {r['created_at']}")
    return 0


def _show(args, cfg, store) -> int:
    from ..banks.normal import NormalStats
    from ..model.bank import describe_coreset

    meta = store.meta(args.line, args.product, args.version)
    versions = store.versions(args.line, args.product)
    data = json.loads(meta.to_json()) | {"stored_versions": versions, "bytes": meta.nbytes}
    live = store.normal(args.line, args.product)
    if live is not None and live.bank_version == meta.version:
        data["normal_in_service"] = live.summary()
    else:
        data["normal_in_service"] = NormalStats.from_meta(meta).summary()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(f"product     {meta.product} (line {args.line}, version {meta.version}; stored {versions})")
    print(f"built       {meta.created_at} with model {meta.model_id}")
    print(f"signature   {meta.signature}")
    print(f"bank        {meta.shots} images of {meta.candidates or meta.shots} offered; coreset {describe_coreset(meta.coreset)}")
    for im in meta.images:
        print(f"            {im['name']}  sha256 {im['sha256'][:16]}")
    print("levels      " + ", ".join(f"{n} x {c}" for n, c in meta.levels) + f"  ({meta.nbytes / 2**20:.2f} MiB fp16)")
    reg = NormalStats.from_meta(meta)
    print(f"registered  u {reg.u:.4f}  gamma {reg.gamma:.4f}  ({_stats_line(reg, meta)})")
    live = data["normal_in_service"]
    print(f"in service  u {live['u']:.4f}  gamma {live['gamma']:.4f}  (from {live['source']}, {live['count']} "
          f"scores, revision {live['revision']}{', FROZEN: a fail-rate jump paused stream learning' if live['frozen'] else ''}"
          f"{', thin' if live['thin'] else ''}; updated {live['updated_at']})")
    return 0


def _stats_line(reg, meta) -> str:
    if not isinstance(meta.normal, dict):
        return "leave-one-out map mean and max of the shots: registered before normal statistics existed"
    how = _how(meta.normal)
    warn = "; THIN: threshold uncertain until the stream or feedback refines it" if reg.thin else ""
    return f"{reg.method}, {reg.count} scores, {how}{warn}"


def _how(normal: dict) -> str:
    """How a registration's scores were obtained, in words."""
    scored = normal.get("scored", "held_out")
    if scored not in ("cross_fold", "leave_one_out") or "folds" not in normal:
        return scored.replace("_", "-")  # banks registered before the bank held every image
    held = normal.get("held_out", 0)
    how = "leave-one-out" if scored == "leave_one_out" else f"cross-scored in {normal['folds']} folds"
    return how + (f", {held} against the served bank" if held else "")


def _remove(args, cfg, store) -> int:
    epoch = store.remove(args.line, args.product)
    print(f"removed {args.product} from line {args.line} (epoch {epoch})")
    return 0


def _export(args, cfg, store) -> int:
    from ..banks import decode_bank

    blob = store.blob(args.line, args.product, args.version)
    _, meta = decode_bank(blob)  # never export a damaged bank
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, out)
    print(f"exported {args.product} ({meta.shots} shots, signature {meta.signature}) to {out}")
    return 0


def _import(args, cfg, store) -> int:
    import dataclasses

    from ..banks import BankError, decode_bank, encode_bank

    blob = Path(args.file).read_bytes()
    signature = None
    if cfg.engine.artifact:
        from ..artifact import read_card

        signature = read_card(cfg.engine.artifact).signature
    bank, meta = decode_bank(blob, signature)
    if args.product and args.product != meta.product:
        meta = dataclasses.replace(meta, product=args.product)
        blob = encode_bank(bank, meta)
    elif signature is None:
        print("[bank] no --artifact given: the bank's backbone signature is not checked here; "
              "the worker will refuse it if it does not match", file=sys.stderr)
    if not meta.product:
        raise BankError("bad_meta", "bank file names no product")
    version, epoch = store.put(args.line, blob, meta)
    print(f"imported {meta.product} version {version} on line {args.line} (epoch {epoch})")
    return 0


BANK_COMMANDS = {"add": _add, "list": _list, "show": _show, "feedback": _feedback, "remove": _remove,
                 "export": _export, "import": _import}
