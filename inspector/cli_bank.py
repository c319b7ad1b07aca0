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


def add_bank_parser(sub: argparse._SubParsersAction) -> None:
    bank = sub.add_parser("bank", help="manage a line's reference banks (products)")
    cmds = bank.add_subparsers(dest="bank_command", required=True)

    def common(p: argparse.ArgumentParser, product: bool = True) -> None:
        p.add_argument("--line", required=True, help="line name, e.g. 3")
        if product:
            p.add_argument("--product", required=True, help="product name: letters, digits, _ . -")
        p.add_argument("--store", help="redis://host:port/db, rediss://..., or file:///dir (default: the line's config)")
        p.add_argument("--config", help="line config TOML (default /etc/inspector/line<L>.toml when present)")

    p = cmds.add_parser("add", help="register a product from a few good images")
    common(p)
    p.add_argument("images", nargs="+", help="image files or folders of good images")
    p.add_argument("--shots", type=int, help="images kept in the bank (default: the model's, usually 4)")
    p.add_argument("--coreset", type=int, help="cap on bank vectors per level (greedy k-center)")
    p.add_argument("--artifact", help="model artifact (default: the line config's engine.artifact)")
    p.add_argument("--seed", type=int, default=0)

    p = cmds.add_parser("list", help="products registered on a line")
    common(p, product=False)
    p.add_argument("--json", action="store_true")

    p = cmds.add_parser("show", help="one product's bank: shots, version, size, signature, statistics")
    common(p)
    p.add_argument("--version", type=int, help="a stored version (default: the active one)")
    p.add_argument("--json", action="store_true")

    p = cmds.add_parser("remove", help="stop inspecting a product on a line")
    common(p)

    p = cmds.add_parser("export", help="write a product's bank to a portable file")
    common(p)
    p.add_argument("--out", required=True, help="file to write (.bank)")
    p.add_argument("--version", type=int)

    p = cmds.add_parser("import", help="register a product from an exported bank file")
    common(p, product=False)
    p.add_argument("file", help="an exported .bank file")
    p.add_argument("--product", help="register under this name (default: the name in the file)")
    p.add_argument("--artifact", help="check the bank against this model before importing")


def _config(args: argparse.Namespace):
    from .config import default_config_path, load_config

    path = args.config
    if path is None and default_config_path(args.line).is_file():
        path = default_config_path(args.line)
    overrides = {"banks.store": args.store} if args.store else {}
    if getattr(args, "artifact", None):
        overrides["engine.artifact"] = args.artifact
    return load_config(path, os.environ, overrides, args.line)


def _store(cfg):
    from .banks import open_store

    b = cfg.banks
    return open_store(b.store, b.prefix, b.keep_versions, b.password, b.username, b.tls_ca_file)


def cmd_bank(args: argparse.Namespace) -> int:
    from .artifact import ArtifactError
    from .banks import BankError, NotFound, StoreError

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
    from .artifact import load_artifact

    if not cfg.engine.artifact:
        raise ValueError("no model artifact: pass --artifact or set engine.artifact in the line config")
    return load_artifact(cfg.engine.artifact)


def _add(args, cfg, store) -> int:
    from .banks import encode_bank
    from .banks.register import read_shots, register_product

    t0 = time.perf_counter()
    model, card = _load_model(cfg)
    shots = args.shots or card.model_config.bank.shots
    coreset = args.coreset if args.coreset is not None else card.model_config.bank.coreset
    images = read_shots(args.images, model.input_size)
    say = lambda msg: print(f"[bank] {msg}", file=sys.stderr)  # noqa: E731
    reg = register_product(model, card.signature, card.model_id, args.product, images, shots, coreset,
                           args.seed, progress=say)
    if len(images) > len(reg.chosen):
        say(f"picked the {len(reg.chosen)} most diverse of {len(images)} images: {', '.join(reg.chosen)}")
    version, epoch = store.put(args.line, encode_bank(reg.bank, reg.meta), reg.meta)
    print(f"registered {args.product} version {version} on line {args.line} (epoch {epoch}) in "
          f"{time.perf_counter() - t0:.1f}s: {reg.meta.shots} shots, {reg.meta.nbytes / 2**20:.2f} MiB, "
          f"bank-mode u {reg.meta.u:.3f} gamma {reg.meta.gamma:.3f}, store {store.url}")
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
    meta = store.meta(args.line, args.product, args.version)
    versions = store.versions(args.line, args.product)
    data = json.loads(meta.to_json()) | {"stored_versions": versions, "bytes": meta.nbytes}
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(f"product     {meta.product} (line {args.line}, version {meta.version}; stored {versions})")
    print(f"built       {meta.created_at} with model {meta.model_id}")
    print(f"signature   {meta.signature}")
    print(f"shots       {meta.shots} of {meta.candidates or meta.shots} offered; coreset {meta.coreset}")
    for im in meta.images:
        print(f"            {im['name']}  sha256 {im['sha256'][:16]}")
    print("levels      " + ", ".join(f"{n} x {c}" for n, c in meta.levels) + f"  ({meta.nbytes / 2**20:.2f} MiB fp16)")
    print(f"bank mode   u {meta.u:.4f}  gamma {meta.gamma:.4f}")
    return 0


def _remove(args, cfg, store) -> int:
    epoch = store.remove(args.line, args.product)
    print(f"removed {args.product} from line {args.line} (epoch {epoch})")
    return 0


def _export(args, cfg, store) -> int:
    from .banks import decode_bank

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

    from .banks import BankError, decode_bank, encode_bank

    blob = Path(args.file).read_bytes()
    signature = None
    if cfg.engine.artifact:
        from .artifact import read_card

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


BANK_COMMANDS = {"add": _add, "list": _list, "show": _show, "remove": _remove, "export": _export, "import": _import}
