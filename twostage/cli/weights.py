"""`twostage weights`: list, fetch and pin the super-resolution weight files."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "weights",
        help="list / download / pin the Real-ESRGAN weight files",
        description="Without options: list every weight of the manifest, and the networks train-sr "
                    "trained into the weights folder, as ok, missing, bad "
                    "(hash mismatch) or unpinned (no known hash yet); exit 1 if any is bad. "
                    "Nothing is ever downloaded unless you ask with --fetch.",
    )
    p.add_argument("--weights-dir", type=Path, help="weights folder (default: $TWOSTAGE_WEIGHTS, else weights/ of a checkout, "
                        "else ~/.cache/twostage/weights)")
    p.add_argument("--manifest", type=Path, help="manifest YAML (default <weights folder>/manifest.yaml, "
                                                 "else the repository's weights/manifest.yaml)")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--fetch", metavar="NAME", help="download NAME from its manifest URL (hash-checked, atomic)")
    act.add_argument("--pin", metavar="NAME", help="record the sha256 of the present file of NAME in pins.yaml")
    p.add_argument("--overwrite", action="store_true", help="with --fetch: replace a present file")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..sr import weights

    if args.fetch:
        path, sha = weights.fetch(args.fetch, args.weights_dir, args.manifest, overwrite=args.overwrite)
        print(f"{args.fetch}: {path} sha256 {sha}")
        return 0
    if args.pin:
        sha = weights.pin(args.pin, args.weights_dir, args.manifest)
        print(f"{args.pin}: pinned sha256 {sha}")
        return 0
    rows = weights.status(args.weights_dir, args.manifest)
    width = max(len(r["name"]) for r in rows) if rows else 4
    for r in rows:
        source = f"trained by train-sr on {r['trained_on'].get('data')}" if r["trained_on"] else r["url"]
        detail = r["file"] if r["state"] in ("ok", "unpinned") else f"{r['file']}  <- {source}"
        if r["trained_on"] and r["state"] == "ok":
            detail += f"  (train-sr, {r['trained_on'].get('steps')} steps on {r['trained_on'].get('data')})"
        print(f"{r['name']:<{width}}  {r['state']:<8}  {detail}")
        if r["state"] == "bad":
            print(f"{'':<{width}}  sha256 {r['sha256']} != expected {r['expected']}")
    return 1 if any(r["state"] == "bad" for r in rows) else 0
